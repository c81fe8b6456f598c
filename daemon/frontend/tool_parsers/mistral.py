"""Mistral tool calls, in both forms its tokenizers have had.

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, ...]
    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]...

Text before `[TOOL_CALLS]` (and between calls) is content. In a list, each call counts as soon
as it is whole, so that a stream need not wait for the list to end; from an element that does
not hold up, the text is content, as written, up to the next `[TOOL_CALLS]`.
"""

from __future__ import annotations

import re

from daemon.frontend.tool_parsers import SPACE, Kind, Scanner, Step, ToolParser, content_until

MARKER = "[TOOL_CALLS]"
ARGS = "[ARGS]"
_NAME = re.compile(r"[^\[\]{}\s]*")

# the states of an answer: outside calls, then, in a list, before an element or after one
_TEXT, _AFTER_CALL, _ELEMENT, _AFTER_ELEMENT = range(4)


class MistralScanner(Scanner):
    def __init__(self, tool_names: frozenset[str]):
        super().__init__(tool_names)
        self.state = _TEXT

    def step(self, text: str, final: bool) -> Step | None:
        space = SPACE.match(text).end()
        if self.state == _AFTER_CALL:
            if space == len(text):  # whether it is layout depends on what follows
                return Step(Kind.DROP, space) if final else None
            self.state = _TEXT
            if space:
                return Step(Kind.MARKUP, space)
        if self.state == _TEXT:
            if not text.startswith(MARKER):
                return content_until(text, MARKER, final)
            start = SPACE.match(text, len(MARKER)).end()
            if start == len(text):
                return Step(Kind.CONTENT, len(text)) if final else None
            if text[start] != "[":
                return self._named(text, start, final)
            self.state = _ELEMENT
            return Step(Kind.MARKUP, start + 1)
        if space:
            return Step(Kind.MARKUP, space)
        if self.state == _AFTER_ELEMENT:
            if text[0] == ",":
                self.state = _ELEMENT
                return Step(Kind.MARKUP, 1)
            if text[0] == "]":
                self.state = _AFTER_CALL
                return Step(Kind.DROP, 1)
            return self._give_up()
        if text[0] != "{":  # _ELEMENT
            return self._give_up()
        end = self.json_end(text, 0)
        if end is None:
            return self._give_up() if final else None
        call = self.call(text[:end])
        if call is None:
            return self._give_up()
        self.state = _AFTER_ELEMENT
        return Step(Kind.CALL, end, *call)

    def _give_up(self) -> Step:
        """The list so far is content after all; look for the next marker from here."""
        self.state = _TEXT
        return Step(Kind.CONTENT, 0)

    def _named(self, text: str, start: int, final: bool) -> Step | None:
        """`[TOOL_CALLS]name[ARGS]{...}`; if it does not hold up, the marker is content and the rest is read again."""
        args = _NAME.match(text, start).end()
        if not text.startswith(ARGS, args):
            return None if ARGS.startswith(text[args:]) and not final else Step(Kind.CONTENT, len(MARKER))
        opening = SPACE.match(text, args + len(ARGS)).end()
        if opening == len(text):
            return None if not final else Step(Kind.CONTENT, len(MARKER))
        end = self.json_end(text, opening) if text[opening] == "{" else opening
        if end is None:
            return None if not final else Step(Kind.CONTENT, len(MARKER))
        call = self.named_call(text[start:args], text[opening:end])
        if call is None:
            return Step(Kind.CONTENT, len(MARKER))
        self.state = _AFTER_CALL
        return Step(Kind.CALL, end, *call)


class MistralParser(ToolParser):
    name = "mistral"
    scanner = MistralScanner
