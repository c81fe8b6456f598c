"""OpenAI-compatible request bodies in: parsed strictly, checked against the field policy, turned into
tokenizer-bound requests (one per prompt).

The request models and their policy are in request_models.py, the answers in response_models.py.
"""

from __future__ import annotations

import difflib
import re
import time
from typing import Any, Literal

import msgspec
import structlog

from daemon.config.schema import DaemonSettings
from daemon.frontend.asgi import BadRequest
from daemon.frontend.request_models import (
    ChatRequest,
    CompletionRequest,
    LenientChatRequest,
    LenientCompletionRequest,
    RequestModel,
    check_policy,
)
from daemon.ipc.messages import ChatOptions, GenerateRequest, Sampling

log = structlog.get_logger("daemon.frontend")

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions; chat defaults to what the context leaves
_LENIENT: dict[RequestModel, RequestModel] = {
    CompletionRequest: LenientCompletionRequest,
    ChatRequest: LenientChatRequest,
}
_ENDPOINT = {CompletionRequest: "/v1/completions", ChatRequest: "/v1/chat/completions"}
_LOCATION = re.compile(r" - at `\$\.?([^`]*)`")
_MISSING = re.compile(r"^Object missing required field `([^`]*)`")
_UNKNOWN = re.compile(r"^Object contains unknown field `([^`]*)`")
_ignored_logged: set[tuple[str, str]] = set()  # (endpoint, field): each ignored field is logged once


def parse(
    body: bytes, model: RequestModel, unknown_fields: Literal["reject", "ignore"] = "reject"
) -> CompletionRequest | ChatRequest:
    """The request in `body`, or a BadRequest naming the field at fault (`param`)."""
    try:
        return msgspec.json.decode(body, type=model)
    except msgspec.DecodeError as exc:
        if not isinstance(exc, msgspec.ValidationError):
            raise BadRequest(f"the request body is not valid JSON: {exc}") from None
        text = str(exc)
    location = match[1] if (match := _LOCATION.search(text)) else ""
    if _UNKNOWN.match(text) and not location:  # unknown top-level fields: the operator's choice
        unknown = _unknown_fields(body, model)
        if unknown_fields == "ignore":
            for name in unknown:
                if (_ENDPOINT[model], name) not in _ignored_logged:
                    _ignored_logged.add((_ENDPOINT[model], name))
                    log.warning("request.field_ignored", field=name, endpoint=_ENDPOINT[model])
            return parse(body, _LENIENT[model], "reject")
        raise BadRequest(_unknown_message(unknown, model), unknown[0])
    if missing := _MISSING.match(text):
        path = f"{location}.{missing[1]}" if location else missing[1]
        raise BadRequest(f"`{path}` is required", _top(path))
    message = _LOCATION.sub("", text).rstrip(".")
    raise BadRequest(message + (f" (in `{location}`)" if location else ""), _top(location) or None)


def _top(path: str) -> str:
    return path.split(".")[0].split("[")[0]


def _unknown_fields(body: bytes, model: RequestModel) -> list[str]:
    known = set(model.__struct_fields__)
    return [name for name in msgspec.json.decode(body, type=dict[str, msgspec.Raw]) if name not in known]


def _unknown_message(unknown: list[str], model: RequestModel) -> str:
    parts = []
    other = ChatRequest if model is CompletionRequest else CompletionRequest
    for name in unknown:
        close = difflib.get_close_matches(name, model.__struct_fields__, n=1, cutoff=0.6)
        if close:
            parts.append(f"unknown field `{name}`: did you mean `{close[0]}`?")
        elif name in other.__struct_fields__:
            parts.append(f"unknown field `{name}`: it belongs to {_ENDPOINT[other]}, not {_ENDPOINT[model]}")
        else:
            parts.append(f"unknown field `{name}`")
    return "; ".join(parts) + " (server.unknown_request_fields = reject)"


def to_generate_requests(
    request: CompletionRequest | ChatRequest, request_id: str, reply_to: str, settings: DaemonSettings
) -> list[GenerateRequest]:
    """The tokenizer-bound requests, one per prompt, with every unset field at its default."""
    check_policy(request)
    if request.priority and settings.scheduler.policy != "priority":  # it would change nothing: say so
        raise BadRequest(
            f"`priority` needs scheduler.policy = priority (this server schedules by {settings.scheduler.policy})",
            "priority",
        )
    max_prompts = settings.server.max_prompts_per_request
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    if any(not s for s in stop):
        raise BadRequest("stop strings must not be empty", "stop")
    if isinstance(request, ChatRequest):
        max_tokens = request.max_completion_tokens or request.max_tokens
        prompts: list[dict[str, Any]] = [{"messages": request.messages, "chat": _chat_options(request)}]
    else:
        max_tokens = request.max_tokens or DEFAULT_MAX_TOKENS
        prompts = [
            {**prompt, "add_special_tokens": _default(request.add_special_tokens, True)}
            for prompt in _prompts(request.prompt, max_prompts)
        ]
    sampling = Sampling(
        max_tokens=max_tokens,  # None: the tokenizer fills in what the prompt leaves of the context
        temperature=_default(request.temperature, 1.0),
        top_p=_default(request.top_p, 1.0),
        top_k=max(request.top_k or 0, 0),
        seed=request.seed,
        stop_token_ids=tuple(request.stop_token_ids or ()),
        ignore_eos=_default(request.ignore_eos, False),
    )
    arrival = time.time()
    return [
        GenerateRequest(
            request_id=request_id if len(prompts) == 1 else f"{request_id}-{index}",
            reply_to=reply_to,
            sampling=sampling,
            truncate_prompt_tokens=request.truncate_prompt_tokens,
            skip_special_tokens=_default(request.skip_special_tokens, True),
            include_stop_str_in_output=_default(request.include_stop_str_in_output, False),
            stop=stop,
            priority=request.priority or 0,
            arrival=arrival,
            stream=_default(request.stream, False),
            **prompt,
        )
        for index, prompt in enumerate(prompts)
    ]


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


def _chat_options(request: ChatRequest) -> ChatOptions:
    continue_final = _default(request.continue_final_message, False)
    template_kwargs = dict(request.chat_template_kwargs or {})
    if request.documents is not None:
        template_kwargs["documents"] = request.documents
    return ChatOptions(
        # continuing the final message implies not opening a new turn, unless the client says otherwise
        add_generation_prompt=_default(request.add_generation_prompt, not continue_final),
        continue_final_message=continue_final,
        template_kwargs=template_kwargs,
        add_special_tokens=_default(request.add_special_tokens, False),
    )


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
