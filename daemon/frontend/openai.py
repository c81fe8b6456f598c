"""OpenAI-compatible request bodies in: parsed strictly, checked against the field policy, turned into
tokenizer-bound requests (one per prompt).

The request models and their policy are in request_models.py, the answers in response_models.py.
"""

from __future__ import annotations

import time
from typing import Any, get_args

import msgspec
import structlog

from daemon.config.schema import DaemonSettings
from daemon.frontend import parsing
from daemon.frontend.asgi import BadRequest
from daemon.frontend.constraints import check_beside_min_tokens, constraint_of
from daemon.frontend.parsing import Unknown
from daemon.frontend.request_models import (
    IPC_INT_MAX,
    TOKEN_ID,
    ChatRequest,
    CompletionRequest,
    RequestModel,
)
from daemon.frontend.tools import ToolPlan
from daemon.ipc.messages import ChatOptions, GenerateRequest, ModelDefaultField, Sampling

log = structlog.get_logger("daemon.frontend")

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions; chat defaults to what the context leaves
_SIBLINGS: dict[RequestModel, tuple[RequestModel, str]] = {
    CompletionRequest: (ChatRequest, "/v1/chat/completions"),
    ChatRequest: (CompletionRequest, "/v1/completions"),
}


def parse(body: bytes, model: RequestModel, unknown_fields: Unknown = "reject") -> CompletionRequest | ChatRequest:
    """The request in `body`, or a BadRequest naming the field at fault (`param`)."""
    return parsing.parse(body, model, unknown_fields, sibling=_SIBLINGS[model])


def to_generate_requests(
    request: CompletionRequest | ChatRequest,
    request_id: str,
    reply_to: str,
    settings: DaemonSettings,
    tools: ToolPlan | None = None,
) -> list[GenerateRequest]:
    """The tokenizer-bound requests, one per prompt, with every unset field at its default.
    `tools`: the chat request's (plan_tools), after check_policy."""
    constraint = constraint_of(request)
    if tools is not None and tools.constraint is not None:
        if constraint is not None:
            raise BadRequest(
                f"`tool_choice` {tools.choice} cannot be combined with `{constraint.param}`", "tool_choice"
            )
        constraint = tools.constraint
    if constraint is not None:
        check_beside_min_tokens(constraint, request.min_tokens)
    thinking = settings.model.reasoning_parser
    if constraint is not None and isinstance(request, ChatRequest) and thinking != "none":
        constraint = msgspec.structs.replace(constraint, thinking=thinking)  # free text until the thinking ends
    if request.priority and settings.scheduler.policy != "priority":  # it would change nothing: say so
        raise BadRequest(
            f"`priority` needs scheduler.policy = priority (this server schedules by {settings.scheduler.policy})",
            "priority",
        )
    max_prompts = settings.server.max_prompts_per_request
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    if any(not s for s in stop):
        raise BadRequest("stop strings must not be empty", "stop")
    echo = isinstance(request, CompletionRequest) and bool(request.echo)
    if request.max_tokens == 0 and not echo:
        raise BadRequest("max_tokens must be at least 1 (0 only with echo)", "max_tokens")
    if isinstance(request, ChatRequest):
        max_tokens = request.max_completion_tokens or request.max_tokens
        prompts: list[dict[str, Any]] = [{"messages": request.messages, "chat": _chat_options(request, tools)}]
    else:
        max_tokens = DEFAULT_MAX_TOKENS if request.max_tokens is None else request.max_tokens
        prompts = [
            {**prompt, "add_special_tokens": _default(request.add_special_tokens, True)}
            for prompt in _prompts(request.prompt, max_prompts)
        ]
    sampling = Sampling(
        max_tokens=max_tokens,  # None: the tokenizer fills in what the prompt leaves of the context
        temperature=_default(request.temperature, 1.0),
        top_p=_default(request.top_p, 1.0),
        top_k=max(request.top_k or 0, 0),
        min_p=_default(request.min_p, 0.0),
        seed=request.seed,
        stop_token_ids=tuple(request.stop_token_ids or ()),
        ignore_eos=_default(request.ignore_eos, False),
        repetition_penalty=_default(request.repetition_penalty, 1.0),
        frequency_penalty=_default(request.frequency_penalty, 0.0),
        presence_penalty=_default(request.presence_penalty, 0.0),
        min_tokens=request.min_tokens or 0,
        logit_bias=_logit_bias(request.logit_bias),
        allowed_token_ids=tuple(request.allowed_token_ids or ()),
    )
    logprobs = _logprobs(request, settings.server.max_logprobs)
    if request.prompt_logprobs is not None and request.prompt_logprobs > settings.server.max_logprobs:
        most = settings.server.max_logprobs
        raise BadRequest(f"prompt_logprobs must be at most {most} (server.max_logprobs)", "prompt_logprobs")
    # echo with logprobs shows the prompt's tokens' too, with as many alternatives
    asked = [k for k in (request.prompt_logprobs, logprobs if echo else None) if k is not None]
    sampling = msgspec.structs.replace(sampling, logprobs=logprobs, prompt_logprobs=max(asked, default=None))
    choices = request.n or 1
    if choices > settings.server.max_choices_per_prompt:
        limit = settings.server.max_choices_per_prompt
        raise BadRequest(f"n must be at most {limit} (server.max_choices_per_prompt)", "n")
    # left to the model's defaults (generation_config.json), which the tokenizer tier reads
    unset_sampling = tuple(name for name in get_args(ModelDefaultField) if getattr(request, name) is None)
    arrival = time.time()
    # choice index = prompt index * n + j, as vLLM numbers them; choice j of a seeded request draws
    # from seed + j, as vLLM's do (the same seed for all would give n copies of one answer)
    seeded = [
        (
            index * choices + j,
            prompt,
            sampling
            if sampling.seed is None
            else msgspec.structs.replace(sampling, seed=(sampling.seed + j) % (IPC_INT_MAX + 1)),
        )
        for index, prompt in enumerate(prompts)
        for j in range(choices)
    ]
    return [
        GenerateRequest(
            request_id=request_id if len(seeded) == 1 else f"{request_id}-{index}",
            reply_to=reply_to,
            sampling=choice_sampling,
            truncate_prompt_tokens=request.truncate_prompt_tokens,
            skip_special_tokens=_default(request.skip_special_tokens, True),
            include_stop_str_in_output=_default(request.include_stop_str_in_output, False),
            stop=stop,
            priority=request.priority or 0,
            arrival=arrival,
            stream=_default(request.stream, False),
            echo=echo,
            bad_words=tuple(request.bad_words or ()),
            unset_sampling=unset_sampling,
            constraint=constraint,
            parse_tool_calls=tools is not None and tools.choice == "auto",
            **prompt,
        )
        for index, prompt, choice_sampling in seeded
    ]


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


def chat_echo(request: CompletionRequest | ChatRequest) -> str:
    """What a chat answer begins with under vLLM's echo: the last message's content where the
    last message is the assistant's (its text parts joined by newlines), else nothing."""
    if not isinstance(request, ChatRequest) or not request.echo or not request.messages:
        return ""
    last = request.messages[-1]
    if last.get("role") != "assistant":
        return ""
    content = last.get("content") or ""
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


def _logprobs(request: CompletionRequest | ChatRequest, most: int) -> int | None:
    """How many likeliest tokens' log-probabilities to report with each token's (None: no logprobs)."""
    if isinstance(request, ChatRequest):
        asked, param = (request.top_logprobs or 0) if request.logprobs else None, "top_logprobs"
    else:
        asked, param = request.logprobs, "logprobs"
    if asked is not None and asked > most:
        raise BadRequest(f"{param} must be at most {most} (server.max_logprobs)", param)
    return asked


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} as (id, bias) pairs (the tokenizer checks the ids are in the vocabulary)."""
    pairs = []
    for key, value in (bias or {}).items():
        if not (key.isascii() and key.isdigit()) or int(key) > IPC_INT_MAX:
            raise BadRequest(f"logit_bias keys must be token ids (integers as strings), not {key!r}", "logit_bias")
        if value:
            pairs.append((int(key), value))
    return tuple(sorted(pairs))


def _chat_options(request: ChatRequest, tools: ToolPlan | None) -> ChatOptions:
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
        tools=tools.template_tools if tools is not None else None,
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
        return [_bounded({"prompt_token_ids": list(prompt)})]
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
            return [_bounded(p) for p in prompts]
    raise BadRequest(
        "prompt must be a string, a list of token ids, or a non-empty list of strings or of token-id lists", "prompt"
    )


def _bounded(prompt: dict[str, Any]) -> dict[str, Any]:
    """A prompt whose token ids, if any, are within TOKEN_ID's bounds (what the IPC carries)."""
    low, high = TOKEN_ID.ge, TOKEN_ID.le
    if any(not low <= i <= high for i in prompt.get("prompt_token_ids", ())):
        raise BadRequest(f"prompt token ids must be in {low}..{high}", "prompt")
    return prompt
