"""The answer to tool_choice required: a JSON array of calls, as vLLM has the grammar write it.

    [{"name": "get_weather", "parameters": {"city": "Paris"}}, ...]

Not a model's own format (not in PARSERS): the grammar makes the answer this shape, and each call
is sent as soon as it is whole, so a stream need not wait for the array to end. An answer cut
short (max_tokens) leaves what is not a whole call as content.
"""

from __future__ import annotations

from daemon.frontend.tool_parsers import SPACE, Kind, Scanner, Step, ToolParser

# the states of an answer: before the array, before an element, after one, after the array
_START, _ELEMENT, _AFTER_ELEMENT, _END = range(4)


class RequiredScanner(Scanner):
    def __init__(self, tool_names: frozenset[str]):
        super().__init__(tool_names)
        self.state = _START

    def step(self, text: str, final: bool) -> Step | None:
        if self.state == _END:  # past the array, or given up on: content, at once
            return Step(Kind.CONTENT, len(text))
        space = SPACE.match(text).end()
        if space:
            return Step(Kind.MARKUP, space)
        if self.state == _START:
            if text[0] != "[":
                return self._give_up()
            self.state = _ELEMENT
            return Step(Kind.MARKUP, 1)
        if self.state == _AFTER_ELEMENT:
            if text[0] in ",]":
                self.state = _ELEMENT if text[0] == "," else _END
                return Step(Kind.DROP if text[0] == "]" else Kind.MARKUP, 1)
            return self._give_up()
        if text[0] != "{":
            return self._give_up()
        end = self.json_end(text, 0)
        if end is None:
            return self._give_up() if final else None
        call = self.call(text[:end], keys=("parameters",))
        if call is None:
            return self._give_up()
        self.state = _AFTER_ELEMENT
        return Step(Kind.CALL, end, *call)

    def _give_up(self) -> Step:
        """The rest is content: what the grammar allowed was cut short."""
        self.state = _END
        return Step(Kind.CONTENT, 0)


class RequiredParser(ToolParser):
    name = "required"
    scanner = RequiredScanner
