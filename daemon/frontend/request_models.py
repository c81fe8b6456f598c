"""The bodies of /v1/completions and /v1/chat/completions, and what the daemon does with each field.

Every field a client written for OpenAI, vLLM or SGLang sends is declared here once,
with its type and its policy, and nothing else decides:

- honoured: it does what the client asked;
- logged: an identifier or note for the client's records (user, metadata...), written
  on the request's log line;
- refused: not implemented yet; any value but the neutral one (unset, null, or the value
  that changes nothing, such as n = 1) is a 400 naming it, never accepted and ignored.

A field may also require another (top_logprobs needs logprobs), as in OpenAI's API.
`check_policy` enforces all of it in one place; the README's field table, `daemon api
fields` and /openapi.json are generated from these same declarations. Explicit null
means unset for every optional field.
"""

from __future__ import annotations

import functools
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec

from daemon.frontend.asgi import BadRequest

UNSET = (None,)


@dataclass(frozen=True)
class Policy:
    status: Literal["honoured", "logged", "refused"]
    neutral: tuple[Any, ...] = UNSET  # values a refused field accepts: they ask for nothing
    requires: str | None = None  # a field that must be set (truthy) when this one is set
    planned: str | None = None  # the work that will honour a refused field


def honoured(doc: str, *, requires: str | None = None) -> msgspec.Meta:
    return msgspec.Meta(description=doc, extra={"policy": Policy("honoured", requires=requires)})


def logged(doc: str) -> msgspec.Meta:
    return msgspec.Meta(description=doc, extra={"policy": Policy("logged")})


def refused(doc: str, *, neutral: tuple[Any, ...] = UNSET, planned: str | None, requires: str | None = None) -> Any:
    return msgspec.Meta(
        description=doc, extra={"policy": Policy("refused", neutral=neutral, requires=requires, planned=planned)}
    )


# Every integer the engine sees travels as MessagePack's int64: a larger one could not be sent
# on, so it is refused here, naming its field, rather than failing later as a 500.
IPC_INT_MAX = 2**63 - 1
TOKEN_ID = msgspec.Meta(ge=0, le=IPC_INT_MAX)  # also beyond the vocabulary: a 400 from the tokenizer
TokenId = Annotated[int, TOKEN_ID]
TokenCount = Annotated[int, msgspec.Meta(ge=1, le=IPC_INT_MAX)]

Float = float | None
Int = int | None
Bool = bool | None
Stop = str | Annotated[list[str], msgspec.Meta(max_length=16)] | None


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    include_usage: Annotated[Bool, honoured("Send a last chunk with the usage of the whole request.")] = None
    continuous_usage_stats: Annotated[
        Bool,
        honoured("vLLM's: every chunk also carries the usage so far (with include_usage).", requires="include_usage"),
    ] = None


class _Common(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Fields both endpoints take."""

    model: Annotated[
        str | None, honoured("The served model's name (model.served_model_name); another name is a 404.")
    ] = None
    max_tokens: Annotated[
        Annotated[int, msgspec.Meta(ge=0, le=IPC_INT_MAX)] | None,
        honoured(
            "Most tokens to generate (0 only with completions' echo: the prompt scored, nothing generated). "
            "Unset: 16 for completions; for chat, the model's max_new_tokens (generation_config.json) "
            "within what the context leaves, else what the context leaves."
        ),
    ] = None
    temperature: Annotated[
        Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] | None,
        honoured(
            "Sampling temperature; 0, and anything below 1e-5, is greedy. Unset: the model's default "
            "(generation_config.json), else 1."
        ),
    ] = None
    top_p: Annotated[
        Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None,
        honoured(
            "Nucleus sampling: the smallest set of tokens whose probabilities add up to top_p (the likeliest "
            "token is always in it). Unset: the model's default (generation_config.json), else 1."
        ),
    ] = None
    top_k: Annotated[
        Annotated[int, msgspec.Meta(ge=-1, le=IPC_INT_MAX)] | None,
        honoured(
            "Sample among the k likeliest tokens; 0 or -1 (or more than the vocabulary): all. Unset: the "
            "model's default (generation_config.json), else all."
        ),
    ] = None
    seed: Annotated[
        Annotated[int, msgspec.Meta(ge=0, le=IPC_INT_MAX)] | None,
        honoured("Seed of this request's own random generator: the same request gives the same tokens."),
    ] = None
    stop: Annotated[
        Stop, honoured("Up to 16 strings that end the text where they first appear (across token boundaries).")
    ] = None
    stop_token_ids: Annotated[
        list[TokenId] | None, honoured("Token ids that end generation, beside the model's end-of-sequence tokens.")
    ] = None
    ignore_eos: Annotated[Bool, honoured("Keep generating past the end-of-sequence token.")] = None
    include_stop_str_in_output: Annotated[
        Bool, honoured("Keep the stop string (or stop token's text) that ended the text in it.")
    ] = None
    skip_special_tokens: Annotated[Bool, honoured("Leave special tokens out of the text (default true).")] = None
    truncate_prompt_tokens: Annotated[
        Annotated[int, msgspec.Meta(ge=-1, le=IPC_INT_MAX)] | None,
        honoured("Keep only the prompt's last N tokens; -1: as many as fit beside max_tokens."),
    ] = None
    stream: Annotated[Bool, honoured("Answer with server-sent events as the text is generated.")] = None
    stream_options: Annotated[StreamOptions | None, honoured("Options of a streamed answer.", requires="stream")] = None
    priority: Annotated[
        Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31 - 1)] | None,
        honoured(
            "With scheduler.policy = priority: lower runs first. Non-zero under another policy: 400 (it would "
            "change nothing)."
        ),
    ] = None
    user: Annotated[str | None, logged("An end-user id, for the client's records.")] = None
    n: Annotated[
        Annotated[int, msgspec.Meta(ge=1, le=IPC_INT_MAX)] | None,
        honoured(
            "Choices sampled from each prompt (at most server.max_choices_per_prompt), indexed prompt by prompt; "
            "with a seed, choice j draws from seed + j."
        ),
    ] = None
    # Not implemented yet: refused unless they ask for nothing.
    presence_penalty: Annotated[
        Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)] | None,
        honoured("Subtracted once from the logit of every token generated so far (-2 to 2)."),
    ] = None
    frequency_penalty: Annotated[
        Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)] | None,
        honoured("Subtracted from a token's logit once per time it was generated so far (-2 to 2)."),
    ] = None
    repetition_penalty: Annotated[
        Annotated[float, msgspec.Meta(gt=0.0)] | None,
        honoured(
            "vLLM's: the logit of a token in the prompt or generated so far is divided by it if positive, "
            "multiplied if not (1: none). Unset: the model's default (generation_config.json), else 1."
        ),
    ] = None
    logit_bias: Annotated[
        Annotated[dict[str, Annotated[float, msgspec.Meta(ge=-100.0, le=100.0)]], msgspec.Meta(max_length=1024)] | None,
        honoured("Added to the logits of the token ids given as keys (-100 to 100; -100 bans, 100 forces)."),
    ] = None
    min_p: Annotated[
        Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None,
        honoured(
            "Sample only among tokens at least min_p times as likely as the likeliest (after temperature). "
            "Unset: the model's default (generation_config.json), else 0."
        ),
    ] = None
    min_tokens: Annotated[
        Annotated[int, msgspec.Meta(ge=0, le=IPC_INT_MAX)] | None,
        honoured(
            "Tokens to generate before the end-of-sequence token or a stop_token_ids token may end the text "
            "(at most max_tokens)."
        ),
    ] = None
    prompt_logprobs: Annotated[
        Annotated[int, msgspec.Meta(ge=0, le=IPC_INT_MAX)] | None,
        honoured(
            "vLLM's: log-probabilities of each prompt token after the first and of the N likeliest at its "
            "place (at most server.max_logprobs), by token id; streamed, in the first chunk that carries "
            "text (vLLM refuses it with stream). The prompt is then computed in full, not read from the "
            "prefix cache."
        ),
    ] = None
    use_beam_search: Annotated[
        Bool, refused("Beam search instead of sampling.", neutral=(None, False), planned=None)
    ] = None
    length_penalty: Annotated[Float, refused("Beam search's length penalty.", neutral=(None, 1.0), planned=None)] = None
    allowed_token_ids: Annotated[
        Annotated[list[TokenId], msgspec.Meta(min_length=1)] | None,
        honoured("Only these token ids may be generated."),
    ] = None
    bad_words: Annotated[
        Annotated[list[Annotated[str, msgspec.Meta(min_length=1)]], msgspec.Meta(max_length=256)] | None,
        honoured(
            "Words that may not be generated, as vLLM bans them: each word's tokens (with and without a "
            "leading space); a one-token word is never generated, a longer one's last token not after the rest."
        ),
    ] = None
    spaces_between_special_tokens: Annotated[
        Bool, refused("vLLM's detokenizer option.", neutral=(None, True), planned=None)
    ] = None
    response_format: Annotated[
        dict[str, Any] | None,
        honoured(
            "The shape of the answer: {type: text}, {type: json_object} (a JSON object), {type: json_schema, "
            "json_schema: {name, schema, strict}} (JSON valid for the schema, always enforced as strict: true "
            "asks), or vLLM's {type: structural_tag} (structures and triggers, or xgrammar's format). Enforced "
            "token by token with a grammar (xgrammar)."
        ),
    ] = None
    structured_outputs: Annotated[
        dict[str, Any] | None,
        honoured(
            "vLLM's constrained decoding: exactly one of json (a schema), regex, choice (a list of strings), "
            "grammar (EBNF), structural_tag (its JSON text) or json_object: true; disable_any_whitespace: compact JSON."
        ),
    ] = None
    guided_json: Annotated[Any, honoured("vLLM's older JSON-schema constraint (an object, or its JSON text).")] = None
    guided_regex: Annotated[str | None, honoured("vLLM's older regex constraint.")] = None
    guided_choice: Annotated[list[str] | None, honoured("vLLM's older choice constraint.")] = None
    guided_grammar: Annotated[str | None, honoured("vLLM's older grammar constraint (EBNF).")] = None
    guided_decoding_backend: Annotated[
        str | None,
        refused(
            "vLLM's older constraint backend choice: xgrammar is the one.",
            neutral=(None, "xgrammar", "auto"),
            planned=None,
        ),
    ] = None
    guided_whitespace_pattern: Annotated[str | None, refused("vLLM's older JSON whitespace pattern.", planned=None)] = (
        None
    )
    regex: Annotated[str | None, honoured("SGLang's regex constraint.")] = None
    json_schema: Annotated[
        str | dict[str, Any] | None, honoured("SGLang's JSON-schema constraint (an object, or its JSON text).")
    ] = None
    ebnf: Annotated[str | None, honoured("SGLang's grammar constraint (EBNF).")] = None


class CompletionRequest(_Common, kw_only=True):
    """POST /v1/completions."""

    prompt: Annotated[
        str | list[Any],
        honoured(
            "A string, a list of token ids (in the vocabulary), or a list of strings or "
            "of token-id lists (one choice each)."
        ),
    ]
    add_special_tokens: Annotated[
        Bool, honoured("Add the tokenizer's special tokens (BOS) to a text prompt (default true).")
    ] = None
    logprobs: Annotated[
        Annotated[int, msgspec.Meta(ge=0, le=IPC_INT_MAX)] | None,
        honoured(
            "Log-probabilities of each generated token and of the N likeliest at its place (at most "
            "server.max_logprobs), from the model's logits before any sampling option changes them."
        ),
    ] = None
    echo: Annotated[
        Bool,
        honoured(
            "Put the prompt before the completion; with logprobs, the prompt's tokens come first in them "
            "(the first token's logprob is null)."
        ),
    ] = None
    best_of: Annotated[
        Int,
        refused(
            "Generate several and return the best (vLLM removed it: ask for n choices and pick).",
            neutral=(None, 1),
            planned=None,
        ),
    ] = None
    suffix: Annotated[
        str | None, refused("Text after the completion (insertion).", neutral=(None, ""), planned=None)
    ] = None


class ChatRequest(_Common, kw_only=True):
    """POST /v1/chat/completions."""

    messages: Annotated[
        list[dict[str, Any]], honoured("The conversation: {role, content} objects (content: text or text parts).")
    ]
    max_completion_tokens: Annotated[TokenCount | None, honoured("Most tokens to generate; wins over max_tokens.")] = (
        None
    )
    add_generation_prompt: Annotated[
        Bool, honoured("End the prompt with the assistant's turn opening (default true).")
    ] = None
    continue_final_message: Annotated[
        Bool, honoured("Leave the last message open, for the model to continue it (with add_generation_prompt false).")
    ] = None
    add_special_tokens: Annotated[
        Bool,
        honoured(
            "Also add the tokenizer's special tokens to the rendered conversation (default false: the "
            "template writes them)."
        ),
    ] = None
    chat_template_kwargs: Annotated[
        dict[str, Any] | None, honoured("Extra variables for the chat template (e.g. enable_thinking).")
    ] = None
    documents: Annotated[
        list[dict[str, Any]] | None, honoured("Documents for templates that take them (retrieval).")
    ] = None
    metadata: Annotated[dict[str, str] | None, logged("Key-value notes for the client's records.")] = None
    safety_identifier: Annotated[str | None, logged("An end-user id, for the client's records.")] = None
    prompt_cache_key: Annotated[str | None, logged("A client's cache routing hint.")] = None
    logprobs: Annotated[
        Bool,
        honoured(
            "Log-probabilities of each generated token, from the model's logits before any sampling option "
            "changes them."
        ),
    ] = None
    top_logprobs: Annotated[
        Annotated[int, msgspec.Meta(ge=0, le=20)] | None,
        honoured(
            "How many likeliest tokens' log-probabilities to return at each position (at most server.max_logprobs).",
            requires="logprobs",
        ),
    ] = None
    tools: Annotated[
        list[dict[str, Any]] | None,
        honoured(
            "Functions the model may call ({type: function, function: {name, description, parameters}}), "
            "given to the chat template."
        ),
    ] = None
    tool_choice: Annotated[
        str | dict[str, Any] | None,
        honoured(
            "none; auto (the default with tools: the answer is parsed for calls, in model.tool_parser's "
            "format); required (at least one call, enforced by a grammar); or {type: function, function: "
            "{name}} (that call, enforced by a grammar over its parameters).",
            requires="tools",
        ),
    ] = None
    parallel_tool_calls: Annotated[
        Bool,
        honoured(
            "false: at most one call (enforced by the grammar with tool_choice required; with auto, calls after "
            "the first are dropped).",
            requires="tools",
        ),
    ] = None
    functions: Annotated[
        list[dict[str, Any]] | None, refused("Deprecated form of tools.", neutral=(None, []), planned=None)
    ] = None
    function_call: Annotated[
        str | dict[str, Any] | None,
        refused("Deprecated form of tool_choice.", neutral=(None, "none"), planned=None, requires="functions"),
    ] = None
    chat_template: Annotated[str | None, refused("A chat template sent with the request.", planned=None)] = None
    echo: Annotated[
        Bool,
        honoured(
            "vLLM's: begin the answer with the last message's content when that message is the assistant's "
            "(one being continued)."
        ),
    ] = None
    modalities: Annotated[
        list[str] | None, refused("Output modalities; only text.", neutral=(None, ["text"]), planned=None)
    ] = None
    audio: Annotated[dict[str, Any] | None, refused("Audio output.", planned=None)] = None
    prediction: Annotated[dict[str, Any] | None, refused("Predicted output.", planned=None)] = None
    reasoning_effort: Annotated[str | None, refused("Reasoning effort of reasoning models.", planned=None)] = None
    verbosity: Annotated[str | None, refused("Answer verbosity.", planned=None)] = None
    web_search_options: Annotated[dict[str, Any] | None, refused("Web search.", planned=None)] = None
    service_tier: Annotated[
        str | None, refused("Processing tier; this server has one.", neutral=(None, "auto", "default"), planned=None)
    ] = None
    store: Annotated[Bool, refused("Store the answer on the server.", neutral=(None, False), planned=None)] = None


# --- the policy, read from the declarations above -------------------------------------------------

RequestModel = type[CompletionRequest] | type[ChatRequest]


@dataclass(frozen=True)
class FieldInfo:
    name: str
    policy: Policy
    doc: str
    required: bool


@functools.cache
def fields_of(model: RequestModel) -> tuple[FieldInfo, ...]:
    hints = typing.get_type_hints(model, include_extras=True)
    infos = []
    for field in msgspec.structs.fields(model):
        meta = next(m for m in hints[field.name].__metadata__ if isinstance(m, msgspec.Meta))
        required = field.default is msgspec.NODEFAULT and field.default_factory is msgspec.NODEFAULT
        infos.append(FieldInfo(field.name, meta.extra["policy"], meta.description or "", required))
    return tuple(infos)


def _is_set(value: Any) -> bool:
    return value is not None and value is not False and value != [] and value != {}


def check_policy(request: CompletionRequest | ChatRequest) -> None:
    """A 400 for the first field that needs another the request lacks, or asks for what is not implemented."""
    infos = fields_of(type(request))
    for info in infos:
        value = getattr(request, info.name)
        if info.policy.requires and value is not None and not _is_set(getattr(request, info.policy.requires)):
            raise BadRequest(f"`{info.name}` is only allowed when `{info.policy.requires}` is set", info.name)
    for info in infos:
        value = getattr(request, info.name)
        if info.policy.status == "refused" and not _neutral(value, info.policy.neutral):
            shown = ", ".join("null" if v is None else msgspec.json.encode(v).decode() for v in info.policy.neutral)
            raise BadRequest(f"`{info.name}` is not supported by this server yet (accepted values: {shown})", info.name)
    options = request.stream_options
    if options is not None and options.continuous_usage_stats and not options.include_usage:
        raise BadRequest(
            "`stream_options.continuous_usage_stats` is only allowed when `stream_options.include_usage` is set",
            "stream_options",
        )


def _neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    # bool is an int in Python: True must not pass for 1, nor False for 0
    return any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in neutral)


def logged_fields(request: CompletionRequest | ChatRequest) -> dict[str, Any]:
    return {
        info.name: value
        for info in fields_of(type(request))
        if info.policy.status == "logged" and (value := getattr(request, info.name)) is not None
    }
