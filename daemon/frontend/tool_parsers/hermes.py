"""Hermes tool calls, as Hermes 2 Pro, Qwen2.5 and Qwen3 write them.

    Let me look that up.
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Any number of calls, each between its own tags; text outside them is content. A last call cut
off before its closing tag (a stop sequence, the token limit) still counts when its JSON is
whole. Whitespace between calls and after the last one is layout, not content.
"""

from __future__ import annotations

from daemon.frontend.tool_parsers import SPACE, Kind, Scanner, Step, ToolParser, content_until, held_prefix

START = "<tool_call>"
END = "</tool_call>"


class HermesScanner(Scanner):
    def __init__(self, tool_names: frozenset[str]):
        super().__init__(tool_names)
        self.after_call = False

    def step(self, text: str, final: bool) -> Step | None:
        if self.after_call:
            space = SPACE.match(text).end()
            if space == len(text):  # whether it is layout depends on what follows
                return Step(Kind.DROP, space) if final else None
            self.after_call = False
            if space:
                return Step(Kind.MARKUP, space)
        if not text.startswith(START):
            return content_until(text, START, final)
        # the call runs to the first closing tag: the JSON inside is judged only then
        searched = self.memo.get("searched", len(START))
        end = text.find(END, searched)
        if end >= 0:
            inner, length = text[len(START) : end], end + len(END)
        elif not final:
            self.memo["searched"] = max(len(START), len(text) - len(END) + 1)
            return None
        else:  # the closing tag never came, or only its start did
            inner, length = text[len(START) :].rstrip(), len(text)
            inner = inner[: len(inner) - held_prefix(inner, END)]
        call = self.call(inner)
        if call is None:
            return Step(Kind.CONTENT, length)
        self.after_call = True
        return Step(Kind.CALL, length, *call)


class HermesParser(ToolParser):
    name = "hermes"
    scanner = HermesScanner
