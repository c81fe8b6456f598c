"""The bodies the generation endpoints answer with, as OpenAI defines them, and the Responder that fills them.

Declared as structs so that /openapi.json describes exactly what is sent.
"""

from __future__ import annotations

import time
from typing import Literal

import msgspec

from daemon.ipc.messages import FinishReason, GenerateOutput


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int  # prompt tokens whose keys and values came from the prefix cache


class Usage(msgspec.Struct):
    """Token counts of the whole request (all its prompts)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionChoice(msgspec.Struct):
    index: int  # the prompt's position in the request
    text: str
    finish_reason: FinishReason | None
    logprobs: None = None


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


class ChatChoice(msgspec.Struct):
    index: int
    message: ChatMessage
    finish_reason: FinishReason | None
    logprobs: None = None


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
    logprobs: None = None


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

    def __init__(self, chat: bool, response_id: str, model: str, choices: int = 1, per_prompt: int = 1):
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + response_id
        self.model = model
        self.created = int(time.time())
        self.choices, self.per_prompt = choices, per_prompt

    def _usage(self, lasts: list[GenerateOutput]) -> Usage:
        """Every choice's completion tokens; each prompt's tokens once, as OpenAI and vLLM count
        them (the first choice of each prompt stands for it, and reports what the cache held of it
        before its siblings could find it there)."""
        firsts = lasts[:: self.per_prompt]
        prompt = sum(last.prompt_tokens for last in firsts)
        completion = sum(last.completion_tokens for last in lasts)
        cached = sum(last.cached_tokens for last in firsts)
        return Usage(prompt, completion, prompt + completion, PromptTokensDetails(cached))

    def full(self, results: list[tuple[str, GenerateOutput]]) -> Completion | ChatCompletion:
        usage = self._usage([last for _text, last in results])
        if self.chat:
            choices = [
                ChatChoice(index, ChatMessage("assistant", text), last.finish_reason)
                for index, (text, last) in enumerate(results)
            ]
            return ChatCompletion(self.id, self.created, self.model, choices, usage)
        completions = [CompletionChoice(index, text, last.finish_reason) for index, (text, last) in enumerate(results)]
        return Completion(self.id, self.created, self.model, completions, usage=usage)

    def first_chunk(self) -> ChatCompletionChunk | None:
        if not self.chat:
            return None
        openings = [ChatChunkChoice(i, ChatDelta(role="assistant", content=""), None) for i in range(self.choices)]
        return ChatCompletionChunk(self.id, self.created, self.model, openings)

    def chunk(self, index: int, output: GenerateOutput) -> Completion | ChatCompletionChunk:
        if self.chat:
            delta = ChatDelta(content=output.text or None)
            return ChatCompletionChunk(
                self.id, self.created, self.model, [ChatChunkChoice(index, delta, output.finish_reason)]
            )
        choice = CompletionChoice(index, output.text, output.finish_reason)
        return Completion(self.id, self.created, self.model, [choice])

    def usage_chunk(self, lasts: list[GenerateOutput]) -> Completion | ChatCompletionChunk:
        if self.chat:
            return ChatCompletionChunk(self.id, self.created, self.model, [], usage=self._usage(lasts))
        return Completion(self.id, self.created, self.model, [], usage=self._usage(lasts))
