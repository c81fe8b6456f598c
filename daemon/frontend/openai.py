"""OpenAI-compatible request bodies in, response bodies and stream chunks out.

Parsing is strict about what it understands (types, ranges) and explicit about
what it does not implement: a field the engine cannot honour with a
non-default value is a 400 naming it, never silently ignored. Fields OpenAI
clients send that change nothing here (user, default penalties...) pass.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any

import msgspec

from daemon.ipc.messages import ErrorInfo, GenerateOutput, GenerateRequest, Sampling

MaxTokens = Annotated[int, msgspec.Meta(ge=1)]
Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
TopK = Annotated[int, msgspec.Meta(ge=-1)]
Seed = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Priority = Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31 - 1)]
Stop = str | Annotated[list[str], msgspec.Meta(max_length=16)] | None
DEFAULT_MAX_TOKENS = 16


class StreamOptions(msgspec.Struct, forbid_unknown_fields=False):
    include_usage: bool = False


class _Common(msgspec.Struct, forbid_unknown_fields=False, kw_only=True):
    model: str | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: Seed | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    priority: Priority = 0
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


class CompletionRequest(_Common, kw_only=True):
    prompt: str | list[Any]  # a string, a list of one string, or token ids (checked below)
    max_tokens: MaxTokens | None = DEFAULT_MAX_TOKENS
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatRequest(_Common, kw_only=True):
    messages: list[dict[str, Any]]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.error = ErrorInfo(status, message, param=param)


_LOCATION = re.compile(r" - at `\$\.?([^`]*)`")


def parse(body: bytes, kind: type[CompletionRequest] | type[ChatRequest]) -> CompletionRequest | ChatRequest:
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        text = str(exc)
        param = (match[1].split(".")[0].split("[")[0] or None) if (match := _LOCATION.search(text)) else None
        raise BadRequest(_LOCATION.sub("", text).rstrip(".") + (f" (in `{param}`)" if param else ""), param) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None


def _unsupported(request: _Common) -> None:
    if request.n != 1:
        raise BadRequest("only n = 1 is supported", "n")
    if request.logprobs not in (None, False, 0):
        raise BadRequest("logprobs are not supported", "logprobs")
    if request.presence_penalty or request.frequency_penalty:
        param = "presence_penalty" if request.presence_penalty else "frequency_penalty"
        raise BadRequest(f"{param} is not supported", param)
    if isinstance(request, CompletionRequest):
        if request.echo:
            raise BadRequest("echo is not supported", "echo")
        if request.suffix:
            raise BadRequest("suffix is not supported", "suffix")
        if request.best_of not in (None, 1):
            raise BadRequest("only best_of = 1 is supported", "best_of")
    if isinstance(request, ChatRequest):
        if request.tools:
            raise BadRequest("tools are not supported", "tools")
        if request.response_format and request.response_format.get("type", "text") != "text":
            raise BadRequest("only the text response format is supported", "response_format")


def to_generate_request(request: CompletionRequest | ChatRequest, request_id: str, reply_to: str) -> GenerateRequest:
    """The tokenizer-bound request; max_tokens defaults to what is left of the context."""
    _unsupported(request)
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    if any(not s for s in stop):
        raise BadRequest("stop strings must not be empty", "stop")
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    messages = None
    if isinstance(request, ChatRequest):
        messages = request.messages
        max_tokens = request.max_completion_tokens or request.max_tokens
    else:
        max_tokens = request.max_tokens
        if isinstance(request.prompt, str):
            prompt = request.prompt
        elif request.prompt and all(isinstance(p, str) for p in request.prompt):
            if len(request.prompt) != 1:
                raise BadRequest("only one prompt per request is supported", "prompt")
            prompt = request.prompt[0]
        elif request.prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in request.prompt):
            prompt_ids = list(request.prompt)
        else:
            raise BadRequest("prompt must be a string, a list of one string, or a list of token ids", "prompt")
    sampling = Sampling(
        max_tokens=max_tokens,  # None: the tokenizer fills in what the prompt leaves of the context
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=max(request.top_k, 0),
        seed=request.seed,
        stop_token_ids=tuple(request.stop_token_ids or ()),
        ignore_eos=request.ignore_eos,
    )
    return GenerateRequest(
        request_id=request_id,
        reply_to=reply_to,
        sampling=sampling,
        prompt=prompt,
        prompt_token_ids=prompt_ids,
        messages=messages,
        stop=stop,
        priority=request.priority,
        arrival=time.time(),
        stream=request.stream,
    )


# --- responses ---------------------------------------------------------------------------------


def error_body(error: ErrorInfo) -> dict[str, Any]:
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": None}}


def _usage(output: GenerateOutput) -> dict[str, int]:
    return {
        "prompt_tokens": output.prompt_tokens,
        "completion_tokens": output.completion_tokens,
        "total_tokens": output.prompt_tokens + output.completion_tokens,
    }


class Responder:
    """Shapes one request's outputs as OpenAI completion or chat-completion JSON."""

    def __init__(self, chat: bool, request_id: str, model: str):
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.model = model
        self.created = int(time.time())

    def _envelope(self, obj: str, choice: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}

    def full(self, text: str, last: GenerateOutput) -> dict[str, Any]:
        if self.chat:
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": last.finish_reason}
            body = self._envelope("chat.completion", choice)
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}
            body = self._envelope("text_completion", choice)
        return {**body, "usage": _usage(last)}

    def first_chunk(self) -> dict[str, Any] | None:
        if not self.chat:
            return None
        delta = {"role": "assistant", "content": ""}
        return self._envelope(
            "chat.completion.chunk", {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        )

    def chunk(self, output: GenerateOutput) -> dict[str, Any]:
        if self.chat:
            delta = {"content": output.text} if output.text else {}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": output.finish_reason}
            return self._envelope("chat.completion.chunk", choice)
        choice = {"index": 0, "text": output.text, "logprobs": None, "finish_reason": output.finish_reason}
        return self._envelope("text_completion", choice)

    def usage_chunk(self, last: GenerateOutput) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": _usage(last),
        }
