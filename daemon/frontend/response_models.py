"""The bodies the generation endpoints answer with, as OpenAI defines them, and the Responder that fills them.

Declared as structs so that /openapi.json describes exactly what is sent.
"""

from __future__ import annotations

import time
from typing import Literal

import msgspec

from daemon.frontend.chat_answer import AnswerShape, AnswerStream, Shaped
from daemon.ipc.messages import FinishReason, GenerateOutput, OutputLogprob


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int  # prompt tokens whose keys and values came from the prefix cache


class Usage(msgspec.Struct):
    """Token counts of the whole request (all its prompts)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(msgspec.Struct):
    """Per generated token (OpenAI's legacy completions shape): its text, its log-probability,
    the likeliest tokens' (the token itself among them), and where its text starts in the choice's."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(msgspec.Struct):
    """vLLM's: one token's log-probability, its rank (1: the likeliest) and its text."""

    logprob: float
    rank: int | None
    decoded_token: str


# vLLM's prompt_logprobs: per prompt token, {token id: PromptLogprob} for the token and the likeliest
# (the first token: null)
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(msgspec.Struct):
    index: int  # prompt index * n + choice
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None
    prompt_logprobs: PromptLogprobs | msgspec.UnsetType = msgspec.UNSET  # only when asked


class Completion(msgspec.Struct):
    """A /v1/completions answer; also each chunk of a streamed one (usage only in the last, if asked)."""

    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    object: Literal["text_completion"] = "text_completion"
    usage: Usage | None = None


ChatFinishReason = FinishReason | Literal["tool_calls"]


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str  # a JSON object, as text


class ToolCallObject(msgspec.Struct):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class FunctionCallDelta(msgspec.Struct, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallDeltaObject(msgspec.Struct, omit_defaults=True):
    index: int
    function: FunctionCallDelta
    id: str | None = None
    type: Literal["function"] | None = None  # with the id, on a call's first delta


class ChatMessage(msgspec.Struct, omit_defaults=True):
    role: Literal["assistant"]
    content: str | None  # null when the answer is tool calls only
    # vLLM's: the model's thinking, with model.reasoning_parser
    reasoning_content: str | None | msgspec.UnsetType = msgspec.UNSET
    tool_calls: list[ToolCallObject] | msgspec.UnsetType = msgspec.UNSET  # only when there are some


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None  # the token's text as UTF-8


class TokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(msgspec.Struct):
    content: list[TokenLogprob] | None


class ChatChoice(msgspec.Struct):
    index: int
    message: ChatMessage
    finish_reason: ChatFinishReason | None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(msgspec.Struct):
    """A /v1/chat/completions answer."""

    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: Literal["chat.completion"] = "chat.completion"
    prompt_logprobs: PromptLogprobs | msgspec.UnsetType = msgspec.UNSET  # vLLM's, only when asked


class ChatDelta(msgspec.Struct, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDeltaObject] | None = None


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: ChatDelta
    finish_reason: ChatFinishReason | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(msgspec.Struct):
    """One server-sent event of a streamed /v1/chat/completions answer."""

    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    usage: Usage | None = None
    prompt_logprobs: PromptLogprobs | msgspec.UnsetType = msgspec.UNSET  # vLLM's, with the first output


class ErrorObject(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None = None


class ErrorResponse(msgspec.Struct):
    """Every 4xx and 5xx answer, and an error event that ends a stream."""

    error: ErrorObject


class Responder:
    """Shapes one request's outputs as OpenAI completion or chat-completion bodies: `choices` in all,
    `per_prompt` (n) of them for each prompt, one after another. `logprobs`: the N likeliest
    asked for with each token (None: no logprobs); `prompt_logprobs`: vLLM's field, asked with N;
    `echo`: completions' text and logprobs begin with the prompt's."""

    def __init__(
        self,
        chat: bool,
        response_id: str,
        model: str,
        *,
        choices: int = 1,
        per_prompt: int = 1,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        echo: bool = False,
        chat_echo: str = "",
        shape: AnswerShape | None = None,
    ):
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + response_id
        self.model = model
        self.created = int(time.time())
        self.choices, self.per_prompt = choices, per_prompt
        self.logprobs, self.prompt_logprobs, self.echo = logprobs, prompt_logprobs, echo
        self.chat_echo = chat_echo  # what every chat choice begins with (vLLM's echo)
        self._offsets = [0] * choices  # text offsets so far, by choice (completions' logprobs)
        # a chat answer's reasoning and tool calls apart from its content (chat_answer.py)
        self.shape = shape if shape is not None else AnswerShape(None, None, None)
        self._streams: dict[int, AnswerStream] = {}
        self._called: set[int] = set()  # streamed choices that made tool calls

    def usage(self, lasts: list[GenerateOutput]) -> Usage:
        """Every choice's completion tokens; each prompt's tokens once, as OpenAI and vLLM count
        them (the first choice of each prompt stands for it, and reports what the cache held of it
        before its siblings could find it there)."""
        firsts = lasts[:: self.per_prompt]
        prompt = sum(last.prompt_tokens for last in firsts)
        completion = sum(last.completion_tokens for last in lasts)
        cached = sum(last.cached_tokens for last in firsts)
        return Usage(prompt, completion, prompt + completion, PromptTokensDetails(cached))

    def full(self, results: list[tuple[str, GenerateOutput, list[OutputLogprob]]]) -> Completion | ChatCompletion:
        """`results`: per choice, its whole text, its last output (with the prompt's text and
        logprobs, where asked) and all its tokens' logprobs."""
        usage = self.usage([last for _text, last, _logprobs in results])
        if self.chat:
            choices = [
                self._chat_choice(index, text, last, logprobs) for index, (text, last, logprobs) in enumerate(results)
            ]
            answer = ChatCompletion(self.id, self.created, self.model, choices, usage)
            if self.prompt_logprobs is not None and results:
                answer.prompt_logprobs = self._prompt_logprobs(results[0][1].prompt_logprobs)
            return answer
        completions = [
            self._completion_choice(index, text, last.finish_reason, last.prompt_text, last.prompt_logprobs, logprobs)
            for index, (text, last, logprobs) in enumerate(results)
        ]
        return Completion(self.id, self.created, self.model, completions, usage=usage)

    def _chat_choice(self, index: int, text: str, last: GenerateOutput, logprobs: list[OutputLogprob]) -> ChatChoice:
        self.shape.tool_parser = self.shape.tool_parser or last.tool_parser
        content, reasoning, calls = self.shape.whole(text)
        if self.chat_echo or not (calls or reasoning):  # null only beside calls or thinking, as in vLLM
            content = self.chat_echo + (content or "")
        message = ChatMessage("assistant", content)
        if self.shape.reasoning is not None:
            message.reasoning_content = reasoning
        if calls:
            message.tool_calls = [ToolCallObject(c.id, FunctionCall(c.name, c.arguments)) for c in calls]
        finish = "tool_calls" if calls and last.finish_reason == "stop" else last.finish_reason
        return ChatChoice(index, message, finish, self._chat_logprobs(logprobs))

    def first_chunk(self) -> ChatCompletionChunk | None:
        if not self.chat:
            return None
        openings = [
            ChatChunkChoice(i, ChatDelta(role="assistant", content=self.chat_echo), None) for i in range(self.choices)
        ]
        return ChatCompletionChunk(self.id, self.created, self.model, openings)

    def chunk(
        self, index: int, output: GenerateOutput, usage: Usage | None = None
    ) -> Completion | ChatCompletionChunk | None:
        """A streamed chunk of choice `index` (with `usage`: the whole request's so far); None when
        it has nothing to send yet (text held back, that may turn out to be a tool call)."""
        if self.chat:
            delta = self._chat_delta(index, output)
            if delta is None and output.finish_reason is None and not output.logprobs and usage is None:
                return None
            finish = output.finish_reason
            if finish == "stop" and index in self._called:
                finish = "tool_calls"
            choice = ChatChunkChoice(index, delta or ChatDelta(), finish, self._chat_logprobs(output.logprobs))
            answer = ChatCompletionChunk(self.id, self.created, self.model, [choice], usage=usage)
            # the prompt's, once (as the whole answer's): with the first output of the first choice
            if self.prompt_logprobs is not None and index == 0 and output.prompt_logprobs:
                answer.prompt_logprobs = self._prompt_logprobs(output.prompt_logprobs)
            return answer
        choice = self._completion_choice(
            index, output.text, output.finish_reason, output.prompt_text, output.prompt_logprobs, output.logprobs
        )
        return Completion(self.id, self.created, self.model, [choice], usage=usage)

    def _chat_delta(self, index: int, output: GenerateOutput) -> ChatDelta | None:
        stream = self._streams.get(index)
        if stream is None:  # the first output: the tokenizer says which tool-call format the model writes
            self.shape.tool_parser = self.shape.tool_parser or output.tool_parser
            stream = self._streams[index] = self.shape.stream()
        shaped = stream.feed(output.text) if output.text else None
        if output.finish_reason is not None:
            tail = stream.finish()
            shaped = tail if shaped is None else _joined(shaped, tail)
        if not shaped:
            return None
        if shaped.tool_calls:
            self._called.add(index)
        calls = [
            ToolCallDeltaObject(
                d.index,
                FunctionCallDelta(d.name, d.arguments),
                d.id,
                "function" if d.id is not None else None,
            )
            for d in shaped.tool_calls
        ]
        return ChatDelta(
            content=shaped.content or None, reasoning_content=shaped.reasoning or None, tool_calls=calls or None
        )

    def usage_chunk(self, lasts: list[GenerateOutput]) -> Completion | ChatCompletionChunk:
        if self.chat:
            return ChatCompletionChunk(self.id, self.created, self.model, [], usage=self.usage(lasts))
        return Completion(self.id, self.created, self.model, [], usage=self.usage(lasts))

    def _completion_choice(
        self,
        index: int,
        text: str,
        finish: FinishReason | None,
        prompt_text: str | None,
        prompt_logprobs: list[OutputLogprob],
        logprobs: list[OutputLogprob],
    ) -> CompletionChoice:
        """A choice, or a streamed chunk of one: the one with the prompt's text and logprobs (the
        first) begins with them where echo asks."""
        if self.echo and prompt_text is not None:
            text = prompt_text + text
        shown = [*prompt_logprobs, *logprobs] if self.echo else logprobs
        choice = CompletionChoice(index, text, finish, self._completion_logprobs(index, shown))
        if self.prompt_logprobs is not None and prompt_logprobs:
            choice.prompt_logprobs = self._prompt_logprobs(prompt_logprobs)
        return choice

    def _completion_logprobs(self, index: int, logprobs: list[OutputLogprob]) -> CompletionLogprobs | None:
        """As vLLM: each token's top entries are the N likeliest and the token itself (none for a
        prompt's first token, which has no logprob); a token's text offset is the sum of the
        lengths of the token texts before it (a streamed choice's go on from chunk to chunk)."""
        if self.logprobs is None:
            return None
        offsets = []
        for entry in logprobs:
            offsets.append(self._offsets[index])
            self._offsets[index] += len(entry.token)
        top = [
            None
            if entry.logprob is None
            else {**{text: lp for _id, text, lp in entry.top[: self.logprobs]}, entry.token: entry.logprob}
            for entry in logprobs
        ]
        return CompletionLogprobs(
            [entry.token for entry in logprobs], [entry.logprob for entry in logprobs], top, offsets
        )

    def _chat_logprobs(self, logprobs: list[OutputLogprob]) -> ChatLogprobs | None:
        if self.logprobs is None:
            return None
        return ChatLogprobs(
            [
                TokenLogprob(
                    entry.token,
                    entry.logprob if entry.logprob is not None else float("-inf"),
                    list(entry.token.encode()),
                    [TopLogprob(text, logprob, list(text.encode())) for _id, text, logprob in entry.top],
                )
                for entry in logprobs
            ]
        )

    def _prompt_logprobs(self, entries: list[OutputLogprob]) -> PromptLogprobs:
        """vLLM's prompt_logprobs: per prompt token, its own entry and the N likeliest, by token id."""
        shown: PromptLogprobs = []
        for entry in entries:
            if entry.logprob is None:
                shown.append(None)
                continue
            top = {
                str(token_id): PromptLogprob(lp, rank, text)
                for rank, (token_id, text, lp) in enumerate(entry.top[: self.prompt_logprobs], start=1)
            }
            shown.append({str(entry.token_id): PromptLogprob(entry.logprob, entry.rank, entry.token), **top})
        return shown


def _joined(first: Shaped, second: Shaped) -> Shaped:
    return Shaped(
        first.content + second.content, first.reasoning + second.reasoning, first.tool_calls + second.tool_calls
    )
