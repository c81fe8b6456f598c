"""Request bodies to their structs, with errors that name the field at fault.

One parser for every JSON endpoint: a body decodes straight into its struct (the
fast path, which refuses unknown fields); only when that fails is it read again as
a plain object, to name every unknown field with the known one it may be a typo of,
or to drop them when the operator set server.unknown_request_fields = "ignore".
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Literal, TypeVar

import msgspec
import structlog

from daemon.frontend.asgi import BadRequest

log = structlog.get_logger("daemon.frontend")
T = TypeVar("T")
Unknown = Literal["reject", "ignore"]  # server.unknown_request_fields
_LOCATION = re.compile(r" - at `\$\.?([^`]*)`")
_MISSING = re.compile(r"^Object missing required field `([^`]*)`")
# msgspec's decoder stops at Python's recursion limit (about 1,000 levels) and raises RecursionError
TOO_DEEP = "the request body nests too deeply (JSON arrays and objects nest at most a few hundred levels)"
_ignored_logged: set[tuple[str, str]] = set()  # (struct, field): each ignored field is logged once


def parse(body: bytes, kind: type[T], unknown: Unknown = "reject", *, sibling: tuple[type, str] | None = None) -> T:
    """The body as `kind`, or a BadRequest naming the field at fault (`param`).

    `sibling`: another body shape and where it is taken, named when an unknown field is one of its fields.
    """
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError:
        pass
    except msgspec.DecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest(TOO_DEEP) from None
    return convert(json_object(body), kind, unknown, sibling=sibling)


def json_object(body: bytes) -> dict[str, Any]:
    try:
        return msgspec.json.decode(body, type=dict[str, Any])
    except msgspec.ValidationError as exc:
        if str(exc).startswith("Number out of range"):  # valid JSON, beyond a double: say where
            field = _out_of_range(body)
            raise BadRequest(f"a number is out of range (in `{field}`)", field) from None
        raise BadRequest("the request body must be a JSON object") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest(TOO_DEEP) from None


def _out_of_range(body: bytes) -> str | None:
    """The top-level field holding a number no double can hold (msgspec's error has no key)."""
    for name, raw in msgspec.json.decode(body, type=dict[str, msgspec.Raw]).items():
        try:
            msgspec.json.decode(raw)
        except msgspec.ValidationError:
            return name
        except RecursionError:  # deep, but not what this looks for
            continue
    return None


def convert(
    fields: dict[str, Any], kind: type[T], unknown: Unknown = "reject", *, sibling: tuple[type, str] | None = None
) -> T:
    """`fields` (a decoded JSON object) as `kind`, with unknown top-level fields refused or dropped."""
    known: tuple[str, ...] = kind.__struct_fields__  # type: ignore[attr-defined]
    if strangers := [name for name in fields if name not in known]:
        if unknown == "reject":
            raise BadRequest(_unknown_message(strangers, known, sibling), strangers[0])
        for name in strangers:
            if (kind.__name__, name) not in _ignored_logged:
                _ignored_logged.add((kind.__name__, name))
                log.warning("request.field_ignored", field=name, body=kind.__name__)
        fields = {name: value for name, value in fields.items() if name in known}
    try:
        return msgspec.convert(fields, type=kind)
    except msgspec.ValidationError as exc:
        text = str(exc)
    location = found[1] if (found := _LOCATION.search(text)) else ""
    if missing := _MISSING.match(text):
        path = f"{location}.{missing[1]}" if location else missing[1]
        raise BadRequest(f"`{path}` is required", _top(path))
    message = _LOCATION.sub("", text).rstrip(".")
    raise BadRequest(message + (f" (in `{location}`)" if location else ""), _top(location) or None)


def _top(path: str) -> str:
    return re.split(r"[.\[]", path)[0]


def _unknown_message(names: list[str], known: tuple[str, ...], sibling: tuple[type, str] | None) -> str:
    """Each unknown field, with the known one it may be a typo of, or the other shape it belongs to."""
    parts = []
    for name in names:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        if close:
            parts.append(f"unknown field `{name}`: did you mean `{close[0]}`?")
        elif sibling is not None and name in sibling[0].__struct_fields__:
            parts.append(f"unknown field `{name}`: it belongs to {sibling[1]}")
        else:
            parts.append(f"unknown field `{name}`")
    return "; ".join(parts) + " (server.unknown_request_fields = reject)"
