"""A chat answer's thinking apart from its content, as vLLM's `reasoning_content` field has it.

Qwen3 and DeepSeek-R1 style models think between `<think>` and `</think>` before they answer.
Pure text, so the front end can split both a whole answer (`parse`) and a stream of detokenized
text (`stream`), where a marker may arrive split across deltas, down to one character each.
The two agree: any split of a text into feeds streams out exactly what `parse` gives.

One deliberate difference from vLLM: a Qwen3 answer that opens `<think>` and never closes it
(the model ran out of tokens while thinking) is reasoning here, not content. A stream cannot
take back the reasoning it has already sent, and the whole answer has to say the same.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Style:
    """How one family of models marks its thinking."""

    starts_in_reasoning: bool  # the chat template opened `<think>` in the prompt (DeepSeek-R1)
    start: str = "<think>"
    end: str = "</think>"


REASONING_PARSERS: dict[str, Style] = {
    # the answer opens <think> itself; without it (enable_thinking=false) it is all content
    "qwen3": Style(starts_in_reasoning=False),
    # the prompt ends in "<think>\n", so the answer is reasoning until </think>
    "deepseek_r1": Style(starts_in_reasoning=True),
}


@dataclass(frozen=True)
class Split:
    reasoning: str | None  # None when there was no thinking or it was empty
    content: str | None  # None when empty, or when the thinking never ended


@dataclass
class ReasoningDelta:
    reasoning: str = ""
    content: str = ""


class ReasoningParser:
    def __init__(self, style: str):
        try:
            self._style = REASONING_PARSERS[style]
        except KeyError:
            known = ", ".join(sorted(REASONING_PARSERS))
            raise ValueError(f"unknown reasoning parser {style!r}; known: {known}") from None
        self.style = style

    @property
    def end_marker(self) -> str:
        """For the engine: constrained decoding (a JSON schema, say) starts after this text."""
        return self._style.end

    def parse(self, text: str) -> Split:
        style = self._style
        stripped = text.lstrip()
        if stripped.startswith(style.start):  # whitespace before the marker belongs to neither part
            body, thinking = stripped[len(style.start) :], True
        else:
            body, thinking = text, style.starts_in_reasoning
        if not thinking:
            return Split(None, text or None)
        reasoning, ended, rest = body.partition(style.end)
        if not ended:
            return Split(reasoning or None, None)
        # the newlines between </think> and the answer are layout, not part of the answer
        return Split(reasoning or None, rest.lstrip("\n") or None)

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self._style)


# the states of a stream, in the order it goes through them
_START = "start"  # not yet known whether the answer opens with <think>
_REASONING = "reasoning"
_AFTER_END = "after_end"  # </think> seen; dropping the newlines before the content
_CONTENT = "content"


class ReasoningStream:
    """One answer's text as it is generated, split as it goes.

    Holds back only what may still turn out to be a marker: leading whitespace plus a prefix of
    `<think>` at the start, or a prefix of `</think>` at the end of the reasoning; the newlines
    after `</think>` wait only until the content shows whether they were leading. All else goes
    out at once.
    """

    def __init__(self, style: Style):
        self._style = style
        self._state = _START
        self._held = ""

    @property
    def in_reasoning(self) -> bool:
        """True inside the thinking: from the start for DeepSeek-R1, once `<think>` is whole for
        Qwen3; False once `</think>` has come."""
        if self._state == _START:
            return self._style.starts_in_reasoning
        return self._state == _REASONING

    def feed(self, text: str) -> ReasoningDelta:
        """The new text since the previous feed; returns what may be sent on now."""
        delta = ReasoningDelta()
        self._held += text
        self._advance(delta)
        return delta

    def finish(self) -> ReasoningDelta:
        """The answer has ended: what was held back was no marker after all, so send it."""
        delta = ReasoningDelta()
        if self._state == _START:  # blank, or an unfinished "<thi": as parse() treats it
            self._state = _REASONING if self._style.starts_in_reasoning else _CONTENT
        if self._state == _REASONING:
            delta.reasoning = self._held
        elif self._state == _CONTENT:
            delta.content = self._held
        self._held = ""  # after </think>, only newlines that led no content are left: dropped
        return delta

    def _advance(self, delta: ReasoningDelta) -> None:
        style = self._style
        while True:
            if self._state == _START:
                stripped = self._held.lstrip()
                if stripped.startswith(style.start):
                    self._held = stripped[len(style.start) :]
                    self._state = _REASONING
                    continue
                if style.start.startswith(stripped):  # may still become "<think>"
                    return
                self._state = _REASONING if style.starts_in_reasoning else _CONTENT
            elif self._state == _REASONING:
                reasoning, ended, rest = self._held.partition(style.end)
                if ended:
                    delta.reasoning += reasoning
                    self._held = rest
                    self._state = _AFTER_END
                    continue
                keep = _partial_suffix(self._held, style.end)
                cut = len(self._held) - keep
                delta.reasoning += self._held[:cut]
                self._held = self._held[cut:]
                return
            elif self._state == _AFTER_END:
                self._held = self._held.lstrip("\n")
                if not self._held:
                    return
                self._state = _CONTENT
            else:
                delta.content += self._held
                self._held = ""
                return


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is a proper prefix of `marker`."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0
