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

from daemon.frontend.asgi import BadRequest
from daemon.ipc.messages import GenerateOutput, GenerateRequest, Sampling

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


def to_generate_requests(
    request: CompletionRequest | ChatRequest, request_id: str, reply_to: str, max_prompts: int
) -> list[GenerateRequest]:
    """The tokenizer-bound requests, one per prompt; max_tokens defaults to what is left of the context."""
    _unsupported(request)
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    if any(not s for s in stop):
        raise BadRequest("stop strings must not be empty", "stop")
    if isinstance(request, ChatRequest):
        max_tokens = request.max_completion_tokens or request.max_tokens
        prompts: list[dict[str, Any]] = [{"messages": request.messages}]
    else:
        max_tokens = request.max_tokens
        prompts = _prompts(request.prompt, max_prompts)
    sampling = Sampling(
        max_tokens=max_tokens,  # None: the tokenizer fills in what the prompt leaves of the context
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=max(request.top_k, 0),
        seed=request.seed,
        stop_token_ids=tuple(request.stop_token_ids or ()),
        ignore_eos=request.ignore_eos,
    )
    arrival = time.time()
    return [
        GenerateRequest(
            request_id=request_id if len(prompts) == 1 else f"{request_id}-{index}",
            reply_to=reply_to,
            sampling=sampling,
            stop=stop,
            priority=request.priority,
            arrival=arrival,
            stream=request.stream,
            **prompt,
        )
        for index, prompt in enumerate(prompts)
    ]


def _is_token_ids(value: Any) -> bool:
    return (
        isinstance(value, list) and bool(value) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)
    )


def _prompts(prompt: Any, max_prompts: int) -> list[dict[str, Any]]:
    """A completions `prompt` as one entry per prompt: a string, token ids, or a list of either."""
    if isinstance(prompt, str):
        return [{"prompt": prompt}]
    if _is_token_ids(prompt):
        return [{"prompt_token_ids": list(prompt)}]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            prompts = [{"prompt": p} for p in prompt]
        elif all(_is_token_ids(p) for p in prompt):
            prompts = [{"prompt_token_ids": list(p)} for p in prompt]
        else:
            prompts = []
        if len(prompts) > max_prompts:
            raise BadRequest(f"at most {max_prompts} prompts per request (server.max_prompts_per_request)", "prompt")
        if prompts:
            return prompts
    raise BadRequest(
        "prompt must be a string, a list of token ids, or a non-empty list of strings or of token-id lists", "prompt"
    )


# --- responses ---------------------------------------------------------------------------------


def _usage(lasts: list[GenerateOutput]) -> dict[str, int]:
    prompt = sum(last.prompt_tokens for last in lasts)
    completion = sum(last.completion_tokens for last in lasts)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Responder:
    """Shapes one request's outputs as OpenAI completion or chat-completion JSON, a choice per prompt."""

    def __init__(self, chat: bool, response_id: str, model: str):
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + response_id
        self.model = model
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def full(self, results: list[tuple[str, GenerateOutput]]) -> dict[str, Any]:
        choices = []
        for index, (text, last) in enumerate(results):
            if self.chat:
                message = {"role": "assistant", "content": text}
                choices.append(
                    {"index": index, "message": message, "logprobs": None, "finish_reason": last.finish_reason}
                )
            else:
                choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": last.finish_reason})
        body = self._envelope("chat.completion" if self.chat else "text_completion", choices)
        return {**body, "usage": _usage([last for _text, last in results])}

    def first_chunk(self) -> dict[str, Any] | None:
        if not self.chat:
            return None
        delta = {"role": "assistant", "content": ""}
        return self._envelope(
            "chat.completion.chunk", [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]
        )

    def chunk(self, index: int, output: GenerateOutput) -> dict[str, Any]:
        if self.chat:
            delta = {"content": output.text} if output.text else {}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": output.finish_reason}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": index, "text": output.text, "logprobs": None, "finish_reason": output.finish_reason}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, lasts: list[GenerateOutput]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._envelope(obj, []), "usage": _usage(lasts)}
