"""How one chat choice's text becomes its message: reasoning (model.reasoning_parser), content,
and tool calls (tools.py says which way), for a whole answer and for a stream of text deltas.

The two ways agree: a stream's deltas add up to what the whole answer gives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from daemon.frontend.reasoning import ReasoningParser
from daemon.frontend.tool_parsers import ToolCall, ToolCallDelta, ToolStream, new_call_id, parser_named
from daemon.frontend.tool_parsers.required import RequiredParser
from daemon.frontend.tools import ToolPlan


@dataclass
class Shaped:
    """A whole answer's message, or a streamed delta of one ("" and [] when it adds nothing)."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


class AnswerShape:
    """The shaping of every choice of one request: `plan` its tools (None: none), `tool_parser`
    the format `auto` parses, `reasoning` the reasoning parser's style (None: none)."""

    def __init__(self, plan: ToolPlan | None, tool_parser: str | None, reasoning: str | None):
        self.plan = plan if plan is not None and plan.choice != "none" else None
        self.tool_parser = tool_parser
        self.reasoning = ReasoningParser(reasoning) if reasoning not in (None, "none") else None

    def stream(self) -> AnswerStream:
        return AnswerStream(self)

    def whole(self, text: str) -> tuple[str | None, str | None, list[ToolCall]]:
        """(content, reasoning, tool calls) of a whole answer."""
        stream = self.stream()
        parts = [stream.feed(text), stream.finish()]
        content = "".join(p.content for p in parts)
        reasoning = "".join(p.reasoning for p in parts)
        return content or None, reasoning or None, stream.calls


class AnswerStream:
    """One choice's text, delta by delta."""

    def __init__(self, shape: AnswerShape):
        self._plan = shape.plan
        self._reasoning = shape.reasoning.stream() if shape.reasoning is not None else None
        self._tools: ToolStream | None = None  # auto and required: calls parsed out of the text
        if self._plan is not None and self._plan.choice == "auto":
            assert shape.tool_parser is not None, "the tokenizer refuses auto without a parser"
            self._tools = parser_named(shape.tool_parser)(self._plan.names).stream()
        elif self._plan is not None and self._plan.choice == "required":
            self._tools = RequiredParser(self._plan.names).stream()
        self._named_id: str | None = None
        self._named_arguments: list[str] = []

    @property
    def calls(self) -> list[ToolCall]:
        if self._tools is not None:
            assert self._plan is not None
            return self._tools.calls[:1] if self._plan.one_call else self._tools.calls
        if self._plan is not None and self._plan.choice == "named" and self._named_id is not None:
            return [ToolCall(self._named_id, self._plan.named or "", "".join(self._named_arguments))]
        return []

    def feed(self, text: str) -> Shaped:
        shaped = Shaped()
        if self._reasoning is not None:
            split = self._reasoning.feed(text)
            shaped.reasoning, text = split.reasoning, split.content
        self._answer(shaped, text, final=False)
        return shaped

    def finish(self) -> Shaped:
        shaped = Shaped()
        text = ""
        if self._reasoning is not None:
            split = self._reasoning.finish()
            shaped.reasoning, text = split.reasoning, split.content
        self._answer(shaped, text, final=True)
        return shaped

    def _answer(self, shaped: Shaped, text: str, *, final: bool) -> None:
        """The part after the reasoning: content, or calls."""
        plan = self._plan
        if plan is None:
            shaped.content = text
        elif self._tools is not None:
            delta = self._tools.feed(text) if text else None
            tail = self._tools.finish() if final else None
            for part in (delta, tail):
                if part is not None:
                    shaped.content += part.content
                    # parallel_tool_calls false: the first call alone
                    shaped.tool_calls += [d for d in part.tool_calls if d.index == 0 or not plan.one_call]
        elif plan.choice == "named":
            if text and self._named_id is None:
                self._named_id = new_call_id()
                shaped.tool_calls.append(ToolCallDelta(0, self._named_id, plan.named))
            if text:
                self._named_arguments.append(text)
                shaped.tool_calls.append(ToolCallDelta(0, arguments=text))
