"""Configuration sources: the TOML file, the environment, `--set` arguments.

Each source becomes a `Layer`: nested values plus the origin of every key, so
that any error later can say where the offending value came from. Layers merge
in precedence order: defaults < file < environment < env file < command line.
"""

from __future__ import annotations

import copy
import difflib
import io
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli
from pydantic_settings import EnvSettingsSource, SettingsError

from daemon.config.errors import DEFAULT_ORIGIN, ConfigError, Origin, OriginKind, Severity, Violation
from daemon.config.files import NotARegularFile, read_regular_file
from daemon.config.schema import (
    ENV_NESTED_DELIMITER,
    ENV_PREFIX,
    SECTIONS,
    SETTINGS,
    DaemonSettings,
)
from daemon.config.toml_lines import line_of, locate_keys

# Variables the daemon sets for its own children; they are not settings.
INTERNAL_ENV_VARS = frozenset({"DAEMON_PARENT_PID"})


@dataclass
class Layer:
    values: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, Origin] = field(default_factory=dict)  # dotted key -> origin


def error(rule: str, message: str, fix: str, origin: Origin | None = None, key: str | None = None) -> Violation:
    return Violation(rule, Severity.ERROR, key, message, fix, origin)


def source_error(
    rule: str, message: str, fix: str, origin: Origin | None = None, key: str | None = None
) -> ConfigError:
    return ConfigError([error(rule, message, fix, origin, key)])


# --- the TOML file ---------------------------------------------------------------------------


def read_config_file(path: Path) -> Layer:
    """Parse the config file. A missing or unreadable file is an error, never silent defaults."""
    where = Origin(OriginKind.FILE, str(path))
    try:
        data = read_regular_file(path)
    except FileNotFoundError:
        raise source_error(
            "file.missing",
            f"config file {path} does not exist",
            "pass the path of an existing TOML file with -c",
            where,
        ) from None
    except (IsADirectoryError, NotARegularFile) as exc:
        what = "a directory" if isinstance(exc, IsADirectoryError) else str(exc).removeprefix(f"{path} is ")
        what = what.removesuffix(", not a regular file")
        raise source_error(
            "file.unreadable", f"{path} is {what}, not a config file", "pass the TOML file itself with -c", where
        ) from None
    except ValueError as exc:
        raise source_error("file.unreadable", str(exc), "a config file is a few KiB of TOML", where) from None
    except OSError as exc:
        raise source_error(
            "file.unreadable", f"cannot read {path}: {exc.strerror or exc}", "check the file's permissions", where
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise source_error(
            "file.encoding",
            f"byte {exc.start} is not valid UTF-8",
            "save the file as UTF-8",
            Origin(OriginKind.FILE, str(path), line),
        ) from None
    try:
        values = tomli.loads(text)
    except RecursionError:
        raise source_error(
            "file.syntax", "invalid TOML: values nested too deeply", "flatten the nesting", where
        ) from None
    except tomli.TOMLDecodeError as exc:
        line, column = _decode_error_position(exc, text)
        message = getattr(exc, "msg", None) or str(exc).split(" (at ")[0]
        raise source_error(
            "file.syntax",
            f"invalid TOML: {message} (line {line}, column {column})",
            "correct the TOML syntax at that position",
            Origin(OriginKind.FILE, str(path), line),
        ) from None
    lines = locate_keys(text)
    layer = Layer(values)
    for key in _leaf_keys(values, tables=True):  # tables too: errors about a whole table need a line
        layer.origins[key] = Origin(OriginKind.FILE, str(path), line_of(key, lines))
    # The directory of the path as given, not of a symlink's target: Kubernetes mounts a
    # ConfigMap file as a link into a directory that is replaced on every update.
    _resolve_paths(values, Path(os.path.abspath(path)).parent)
    return layer


def _decode_error_position(exc: tomli.TOMLDecodeError, text: str) -> tuple[int, int]:
    line, column = getattr(exc, "lineno", None), getattr(exc, "colno", None)
    if line is None:
        match = re.search(r"line (\d+), column (\d+)", str(exc))
        line, column = (int(match[1]), int(match[2])) if match else (1, 1)
    return line, column


def _leaf_keys(values: Mapping[str, Any], prefix: str = "", *, tables: bool = False) -> Iterable[str]:
    for name, value in values.items():
        key = f"{prefix}{name}"
        if tables or not isinstance(value, Mapping):
            yield key
        if isinstance(value, Mapping):
            yield from _leaf_keys(value, f"{key}.", tables=tables)


def _resolve_paths(values: dict[str, Any], base: Path) -> None:
    """Make relative path settings absolute against `base`, in place."""
    for info in SETTINGS.values():
        marker = info.path_marker
        parent = _get_table(values, info.key.rsplit(".", 1)[0])
        name = info.key.rsplit(".", 1)[1]
        if marker is None or parent is None or not isinstance(parent.get(name), str):
            continue
        raw = parent[name]
        if (marker.keep_prefix and raw.startswith(marker.keep_prefix)) or not raw or "\0" in raw:
            continue
        try:
            path = Path(raw).expanduser()
        except RuntimeError:  # ~user of an unknown user: left as written, the path rules report it
            path = Path(raw)
        parent[name] = str(base / path)


def _get_table(values: Mapping[str, Any], dotted: str) -> dict[str, Any] | None:
    node: Any = values
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node if isinstance(node, dict) else None


# --- the environment and --set -----------------------------------------------------------------


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment parsing, over an explicit mapping instead of os.environ."""

    def __init__(self, variables: Mapping[str, str]):
        self._variables = {name.lower(): value for name, value in variables.items()}
        super().__init__(DaemonSettings)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return self._variables


def env_var_key(name: str) -> str | None:
    """The dotted key an environment variable sets, or None if it names no setting or table."""
    if not name.upper().startswith(ENV_PREFIX):
        return None
    key = name[len(ENV_PREFIX) :].lower().replace(ENV_NESTED_DELIMITER, ".")
    return key if key in SETTINGS or key in SECTIONS else None


_OVERRIDE_NAMES = [info.env_var for info in SETTINGS.values()]


def env_layer(variables: Mapping[str, str], origin_for: Callable[[str], Origin]) -> Layer:
    """Settings from environment-style variables (`DAEMON_SERVER__PORT=9000`).

    `origin_for(name)` gives the origin to record for a variable. Empty values
    are ignored, as if unset. A variable that looks like an override but names
    no setting is an error with a suggestion; unrelated DAEMON_* variables pass.
    Raises ConfigError listing every bad variable.
    """
    layer, problems = Layer(), []
    for name, value in sorted(variables.items()):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in INTERNAL_ENV_VARS or value == "":
            continue
        key = env_var_key(name)
        if key is None:
            if problem := _unknown_variable(upper, origin_for(name)):
                problems.append(problem)
            continue
        try:
            values = _MappingEnvSource({upper: value})()
        except (SettingsError, ValueError, RecursionError):
            example = next(info.env_var for info in SETTINGS.values() if info.key.startswith(key + "."))
            problems.append(
                error(
                    "env.invalid-json",
                    f"{name} names the table [{key}] but its value is not a JSON object",
                    f"set one key per variable, e.g. {example}=..., or give a JSON object",
                    origin_for(name),
                    key,
                )
            )
            continue
        _resolve_paths(values, Path.cwd())
        _merge_into(layer.values, values)
        for leaf in _leaf_keys(values):
            layer.origins[leaf] = origin_for(name)
    if problems:
        raise ConfigError(problems)
    return layer


def _unknown_variable(name: str, origin: Origin) -> Violation | None:
    close = difflib.get_close_matches(name, _OVERRIDE_NAMES, n=1, cutoff=0.85)
    if ENV_NESTED_DELIMITER not in name and not close:
        return None  # some other program's DAEMON_* variable: not ours to judge
    hint = f"did you mean {close[0]}?" if close else "see `daemon config reference` for the variable of each key"
    return error("env.unknown-variable", f"{name} does not name a setting", hint, origin)


def cli_layer(assignments: Iterable[str]) -> Layer:
    """Settings from repeated `--set key=value`; values parse exactly like environment values."""
    variables: dict[str, str] = {}
    origins: dict[str, Origin] = {}
    problems = []
    for number, assignment in enumerate(assignments, 1):
        key, sep, value = assignment.partition("=")
        key = key.strip()
        # Origins name the key, never the value: it may be a secret.
        origin = Origin(OriginKind.CLI, key if sep and key else f"argument {number}")
        if not sep or not key:
            problems.append(
                error(
                    "cli.syntax",
                    f"--set argument {number} is not key=value",
                    "write --set section.key=value, e.g. --set server.port=9000",
                    origin,
                )
            )
        elif key in SECTIONS:
            example = next(k for k in SETTINGS if k.startswith(key + "."))
            problems.append(
                error(
                    "cli.unknown-key",
                    f"{key} is a table",
                    f"set one of its keys, e.g. --set {example}=...",
                    origin,
                    key,
                )
            )
        elif key not in SETTINGS:
            problems.append(error("cli.unknown-key", f"--set names unknown key {key!r}", suggest_key(key), origin, key))
        elif value == "":
            problems.append(
                error("cli.syntax", f"--set {key}= has an empty value", "give a value after '='", origin, key)
            )
        else:
            name = SETTINGS[key].env_var
            variables[name] = value
            origins[name] = origin
    if problems:
        raise ConfigError(problems)
    return env_layer(variables, origins.__getitem__)


def suggest_key(key: str) -> str:
    """A did-you-mean for an unknown dotted key."""
    section, _, name = key.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in SETTINGS if k.rpartition(".")[0] == section]
    siblings += [k.rpartition(".")[2] for k in SECTIONS if k.rpartition(".")[0] == section]
    if close := difflib.get_close_matches(name, siblings, n=1, cutoff=0.6):
        return f"did you mean {section + '.' if section else ''}{close[0]}?"
    elsewhere = [k for k in SETTINGS if k.rpartition(".")[2] == name]
    if elsewhere:
        return f"did you mean {elsewhere[0]}? ({name} belongs in [{elsewhere[0].rpartition('.')[0]}])"
    if close := difflib.get_close_matches(key, list(SETTINGS), n=1, cutoff=0.8):
        return f"did you mean {close[0]}?"
    where = f"[{section}]" if section else "the top level"
    valid = ", ".join(sorted(set(siblings))) or "none"
    return f"remove it; valid keys in {where}: {valid}"


# --- merging -----------------------------------------------------------------------------------


def _merge_into(target: dict[str, Any], overlay: Mapping[str, Any]) -> None:
    for name, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(target.get(name), dict):
            _merge_into(target[name], value)
        else:
            target[name] = copy.deepcopy(value)


def merge_layers(layers: Iterable[Layer]) -> Layer:
    merged = Layer()
    for layer in layers:
        _merge_into(merged.values, layer.values)
        merged.origins.update(layer.origins)
    return merged


def origin_of(origins: Mapping[str, Origin], key: str) -> Origin:
    """Where the value of `key` came from; a key no source set has its default."""
    return origins.get(key, DEFAULT_ORIGIN)


def process_env_layer(environ: Mapping[str, str]) -> Layer:
    return env_layer(environ, lambda name: Origin(OriginKind.ENV, name))


def env_file_layer(path: Path) -> Layer:
    return env_layer(read_env_file(path), lambda name: Origin(OriginKind.ENV_FILE, name, file=path))


def read_env_file(path: Path) -> dict[str, str]:
    """Variables of a systemd/dotenv-style env file (KEY=value lines)."""
    from dotenv import dotenv_values

    where = Origin(OriginKind.FILE, str(path))
    try:
        data = read_regular_file(path)
    except FileNotFoundError:
        raise source_error(
            "env-file.missing", f"env file {path} does not exist", "pass an existing file to --env-file", where
        ) from None
    except (IsADirectoryError, NotARegularFile) as exc:
        problem = f"env file {path} is a directory" if isinstance(exc, IsADirectoryError) else f"env file {exc}"
        raise source_error("env-file.missing", problem, "pass an existing file to --env-file", where) from None
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise source_error(
            "env-file.unreadable", f"cannot read env file {path}: {reason}", "check the file's permissions", where
        ) from None
    try:
        values = dotenv_values(stream=io.StringIO(data.decode("utf-8")), interpolate=False)
    except (OSError, UnicodeDecodeError) as exc:
        raise source_error(
            "env-file.unreadable", f"cannot read env file {path}: {exc}", "save it as UTF-8 KEY=value lines", where
        ) from None
    return {name: value for name, value in values.items() if value is not None}
