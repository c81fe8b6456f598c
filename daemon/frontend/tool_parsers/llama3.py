"""Llama 3.1 and 3.2 JSON tool calls.

    <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}

The whole answer is the call (the tag is optional; "arguments" is taken for "parameters" too),
or several separated by ";". Only an answer that starts with "{" or the tag, after whitespace,
is read as calls: any other answer is content, even one that has such JSON further on. From a
call that does not hold up to the end, the text is content, as written.
"""

from __future__ import annotations

import re

from daemon.frontend.tool_parsers import SPACE, Kind, Scanner, Step, ToolParser

PYTHON_TAG = "<|python_tag|>"
_SEPARATOR = re.compile(r"\s*;?\s*")

# the states of an answer, in the order it goes through them
_START, _CALL, _AFTER_CALL, _CONTENT = range(4)


class Llama3Scanner(Scanner):
    def __init__(self, tool_names: frozenset[str]):
        super().__init__(tool_names)
        self.state = _START

    def step(self, text: str, final: bool) -> Step | None:
        if self.state == _CONTENT:
            return Step(Kind.CONTENT, len(text))
        if self.state == _AFTER_CALL:
            end = _SEPARATOR.match(text).end()
            if end == len(text):  # ";" and whitespace at the very end are layout too
                return Step(Kind.DROP, end) if final else None
            if text[end] != "{":
                return self._content(text)
            self.state = _CALL
            if end:
                return Step(Kind.MARKUP, end)
        space = SPACE.match(text).end()
        if space:
            return Step(Kind.MARKUP, space)
        if self.state == _START:
            if text.startswith(PYTHON_TAG):
                self.state = _CALL
                return Step(Kind.MARKUP, len(PYTHON_TAG))
            if not final and PYTHON_TAG.startswith(text):
                return None
            self.state = _CALL
        if text[0] != "{":
            return self._content(text)
        end = self.json_end(text, 0)
        if end is None:
            return self._content(text) if final else None
        call = self.call(text[:end], ("parameters", "arguments"))
        if call is None:
            return self._content(text)
        self.state = _AFTER_CALL
        return Step(Kind.CALL, end, *call)

    def _content(self, text: str) -> Step:
        self.state = _CONTENT
        return Step(Kind.CONTENT, len(text))


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    scanner = Llama3Scanner
