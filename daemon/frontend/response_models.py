"""The bodies the generation endpoints answer with, as OpenAI defines them, and the Responder that fills them.

Declared as structs so that /openapi.json describes exactly what is sent.
"""

from __future__ import annotations

import time
from typing import Literal

import msgspec

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


class CompletionChoice(msgspec.Struct):
    index: int  # prompt index * n + choice
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None


class Completion(msgspec.Struct):
    """A /v1/completions answer; also each chunk of a streamed one (usage only in the last, if asked)."""

    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    object: Literal["text_completion"] = "text_completion"
    usage: Usage | None = None


class ChatMessage(msgspec.Struct):
    role: Literal["assistant"]
    content: str


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
    finish_reason: FinishReason | None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(msgspec.Struct):
    """A /v1/chat/completions answer."""

    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: Literal["chat.completion"] = "chat.completion"


class ChatDelta(msgspec.Struct, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(msgspec.Struct):
    """One server-sent event of a streamed /v1/chat/completions answer."""

    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    usage: Usage | None = None


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
    `per_prompt` (n) of them for each prompt, one after another."""

    def __init__(
        self, chat: bool, response_id: str, model: str, choices: int = 1, per_prompt: int = 1, logprobs: bool = False
    ):
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + response_id
        self.model = model
        self.created = int(time.time())
        self.choices, self.per_prompt = choices, per_prompt
        self.logprobs = logprobs  # the request asked for them: every choice and chunk has its own
        self._offsets = [0] * choices  # text offsets so far, by choice (completions' logprobs)

    def _usage(self, lasts: list[GenerateOutput]) -> Usage:
        """Every choice's completion tokens; each prompt's tokens once, as OpenAI and vLLM count
        them (the first choice of each prompt stands for it, and reports what the cache held of it
        before its siblings could find it there)."""
        firsts = lasts[:: self.per_prompt]
        prompt = sum(last.prompt_tokens for last in firsts)
        completion = sum(last.completion_tokens for last in lasts)
        cached = sum(last.cached_tokens for last in firsts)
        return Usage(prompt, completion, prompt + completion, PromptTokensDetails(cached))

    def full(self, results: list[tuple[str, GenerateOutput, list[OutputLogprob]]]) -> Completion | ChatCompletion:
        usage = self._usage([last for _text, last, _logprobs in results])
        if self.chat:
            choices = [
                ChatChoice(index, ChatMessage("assistant", text), last.finish_reason, self._chat_logprobs(logprobs))
                for index, (text, last, logprobs) in enumerate(results)
            ]
            return ChatCompletion(self.id, self.created, self.model, choices, usage)
        completions = [
            CompletionChoice(index, text, last.finish_reason, self._completion_logprobs(index, logprobs))
            for index, (text, last, logprobs) in enumerate(results)
        ]
        return Completion(self.id, self.created, self.model, completions, usage=usage)

    def first_chunk(self) -> ChatCompletionChunk | None:
        if not self.chat:
            return None
        openings = [ChatChunkChoice(i, ChatDelta(role="assistant", content=""), None) for i in range(self.choices)]
        return ChatCompletionChunk(self.id, self.created, self.model, openings)

    def chunk(self, index: int, output: GenerateOutput) -> Completion | ChatCompletionChunk:
        if self.chat:
            delta = ChatDelta(content=output.text or None)
            choice = ChatChunkChoice(index, delta, output.finish_reason, self._chat_logprobs(output.logprobs))
            return ChatCompletionChunk(self.id, self.created, self.model, [choice])
        logprobs = self._completion_logprobs(index, output.logprobs)
        return Completion(
            self.id, self.created, self.model, [CompletionChoice(index, output.text, output.finish_reason, logprobs)]
        )

    def usage_chunk(self, lasts: list[GenerateOutput]) -> Completion | ChatCompletionChunk:
        if self.chat:
            return ChatCompletionChunk(self.id, self.created, self.model, [], usage=self._usage(lasts))
        return Completion(self.id, self.created, self.model, [], usage=self._usage(lasts))

    def _completion_logprobs(self, index: int, logprobs: list[OutputLogprob]) -> CompletionLogprobs | None:
        """As vLLM: each token's top entries are the N likeliest and the token itself; a token's
        text offset is the sum of the lengths of the token texts before it (a streamed choice's
        offsets go on from chunk to chunk)."""
        if not self.logprobs:
            return None
        offsets = []
        for entry in logprobs:
            offsets.append(self._offsets[index])
            self._offsets[index] += len(entry.token)
        return CompletionLogprobs(
            [entry.token for entry in logprobs],
            [entry.logprob for entry in logprobs],
            [{**dict(entry.top), entry.token: entry.logprob} for entry in logprobs],
            offsets,
        )

    def _chat_logprobs(self, logprobs: list[OutputLogprob]) -> ChatLogprobs | None:
        if not self.logprobs:
            return None
        return ChatLogprobs(
            [
                TokenLogprob(
                    entry.token,
                    entry.logprob,
                    list(entry.token.encode()),
                    [TopLogprob(token, logprob, list(token.encode())) for token, logprob in entry.top],
                )
                for entry in logprobs
            ]
        )
