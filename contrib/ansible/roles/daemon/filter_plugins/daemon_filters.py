"""Filters of the daemon role: render server.toml and the env file from variables.

- `daemon_toml`: a dict of dicts as TOML (tables for dicts, None values left out).
- `daemon_int`, `daemon_bool`, `daemon_number`: give a variable its TOML type when Ansible
  templated it into a string (`port: "{{ other_port }}"` is the string "8000" before
  ansible-core 2.19). A value that is not what the key wants is passed on unchanged, so
  that `daemon check` (the template's `validate`) rejects it with its own message.
- `daemon_env_value`: one value of an env file, quoted so that both systemd's
  EnvironmentFile= and `daemon --env-file` read it back as it was.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from ansible.errors import AnsibleFilterError

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_INT = re.compile(r"^[+-]?[0-9]+$")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _key(key: object) -> str:
    text = str(key)
    return text if _BARE_KEY.match(text) else _string(text)


def _string(text: str) -> str:
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _value(value: object, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(float(value))
    if isinstance(value, str):
        return _string(str(value))
    if isinstance(value, Mapping):
        items = [f"{_key(k)} = {_value(v, f'{where}.{k}')}" for k, v in value.items() if v is not None]
        return "{" + ", ".join(items) + "}"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_value(v, f"{where}[]") for v in value) + "]"
    raise AnsibleFilterError(f"daemon_toml: {where}: cannot write a {type(value).__name__} as TOML: {value!r}")


def _table(table: Mapping, path: list[str], lines: list[str]) -> None:
    scalars = [(k, v) for k, v in table.items() if v is not None and not isinstance(v, Mapping)]
    tables = [(k, v) for k, v in table.items() if isinstance(v, Mapping)]
    if path and (scalars or not tables):
        if lines:
            lines.append("")
        lines.append("[" + ".".join(_key(p) for p in path) + "]")
    for key, value in scalars:
        lines.append(f"{_key(key)} = {_value(value, '.'.join([*path, str(key)]))}")
    for key, value in tables:
        _table(value, [*path, str(key)], lines)


def daemon_toml(config: Mapping) -> str:
    """`config` as a TOML document: top-level scalars first, then one [table] per dict."""
    if not isinstance(config, Mapping):
        raise AnsibleFilterError(f"daemon_toml: expected a dict, got {type(config).__name__}")
    lines: list[str] = []
    _table(config, [], lines)
    return "\n".join(lines) + "\n"


def daemon_int(value: object) -> object:
    if isinstance(value, str) and _INT.match(value.strip()):
        return int(value.strip())
    return value


def daemon_number(value: object) -> object:
    if isinstance(value, str):
        with_int = daemon_int(value)
        if with_int is not value:
            return with_int
        try:
            return float(value.strip())
        except ValueError:
            return value
    return value


def daemon_bool(value: object) -> object:
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no"):
        return value.strip().lower() in ("true", "yes")
    return value


_SAFE_ENV = re.compile(r"^[A-Za-z0-9_./:@,+=%-]*$")


def daemon_env_value(value: object) -> str:
    if isinstance(value, bool):
        value = "true" if value else "false"
    text = str(value)
    if _SAFE_ENV.match(text):
        return text
    if "'" not in text and "\n" not in text and "\\" not in text:
        return f"'{text}'"
    raise AnsibleFilterError(
        "daemon_env_value: an env file value may not hold a single quote, a backslash or a newline "
        "(systemd and the daemon would read it differently)"
    )


class FilterModule:
    def filters(self) -> dict:
        return {
            "daemon_toml": daemon_toml,
            "daemon_int": daemon_int,
            "daemon_number": daemon_number,
            "daemon_bool": daemon_bool,
            "daemon_env_value": daemon_env_value,
        }
