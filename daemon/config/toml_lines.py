"""Where each key of a TOML document is defined: tomli keeps no positions, so scan the text.

Only error messages use this: a line number is a courtesy, never a parse.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_KEY_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_DOTTED_KEY = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
_TABLE_HEADER = re.compile(rf"^\s*\[\[?\s*({_DOTTED_KEY})\s*\]\]?")
_ASSIGNMENT = re.compile(rf"^\s*({_DOTTED_KEY})\s*=\s*(.*)$")


def _split_dotted(dotted: str) -> list[str]:
    return [part.strip("\"'") for part in re.findall(_KEY_PART, dotted)]


def locate_keys(text: str) -> dict[str, int]:
    """Map dotted keys to the line defining them. tomli keeps no positions, so scan the text.

    Handles tables, dotted keys and values spanning lines (multi-line strings
    and arrays); a key inside an inline table maps to the line of its table.
    """
    found: dict[str, int] = {}
    table: list[str] = []
    lines = text.split("\n")  # TOML's newlines only: str.splitlines() also splits at U+2028 and friends
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if header := _TABLE_HEADER.match(line):
            table = _split_dotted(header[1])
            _record(found, table, index)
            continue
        if not (assignment := _ASSIGNMENT.match(line)):
            continue
        _record(found, table + _split_dotted(assignment[1]), index)
        index = _skip_continuation(lines, index, assignment[2])
    return found


def _record(found: dict[str, int], parts: list[str], line: int) -> None:
    """The first line that mentions a key also defines its implicit parent tables ([a.b] defines a)."""
    for end in range(1, len(parts) + 1):
        found.setdefault(".".join(parts[:end]), line)


def _skip_continuation(lines: list[str], index: int, value: str) -> int:
    """Index of the first line after a value that may span several lines.

    `value` is the rest of the line the value starts on; lines[index] is the next
    one. Follows strings (multi-line ones too), arrays and inline tables.
    """
    depth, quote, text = 0, None, value
    while True:
        i = 0
        while i < len(text):
            if quote:
                if text[i] == "\\" and quote in ('"', '"""'):
                    i += 2
                elif text.startswith(quote, i):
                    i, quote = i + len(quote), None
                else:
                    i += 1
                continue
            if text[i] == "#":
                break
            opening = next((q for q in ('"""', "'''", '"', "'") if text.startswith(q, i)), None)
            if opening:
                i, quote = i + len(opening), opening
                continue
            depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(text[i], 0)
            i += 1
        if quote in ('"', "'"):
            quote = None  # single-line strings end with their line (else tomli rejected the file)
        if (quote is None and depth <= 0) or index >= len(lines):
            return index
        text, index = lines[index], index + 1


def line_of(key: str, lines: Mapping[str, int]) -> int | None:
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        if (line := lines.get(".".join(parts[:end]))) is not None:
            return line
    return None
