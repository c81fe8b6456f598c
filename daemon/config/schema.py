"""The configuration schema: every setting's type, default, bounds, docs and reload scope.

This module is the single source of truth for settings. The JSON Schema, the
README's configuration reference, environment variable names, unknown-key
suggestions and the reload planner are all derived from the fields below.
Cross-field rules live in the `rules` package; single-field bounds live here.
"""

from __future__ import annotations

import enum
import hashlib
import json
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue, NoDefault
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "DAEMON_"
ENV_NESTED_DELIMITER = "__"
BUILTIN_PREFIX = "builtin:"


class Reload(enum.StrEnum):
    """What applying a change of a setting costs at reload time."""

    LIVE = "live"  # pushed to the running processes; nothing restarts
    FRONTEND = "frontend"  # the Granian front-end tier restarts (socket handed over)
    TOKENIZER = "tokenizer"  # the tokenizer pool restarts
    SCHEDULER = "scheduler"  # the scheduler restarts
    WORKER = "worker"  # GPU workers restart (and the scheduler that drives them)
    SUPERVISOR = "supervisor"  # cannot be applied by reload: restart the daemon


# What a reload does when a key of each scope changes (documentation, and `daemon config scopes`).
RELOAD_EFFECTS: dict[Reload, str] = {
    Reload.LIVE: "pushed to the running processes and acknowledged; no process restarts",
    Reload.FRONTEND: "a new Granian front-end starts on the supervisor's listening socket (a new one "
    "if the address changed), then the old one drains its requests and streams",
    Reload.TOKENIZER: "a new tokenizer pool starts beside the old one; once the reload switches, new "
    "requests go to it, the old pool finishes what it holds and exits",
    Reload.SCHEDULER: "as worker: the scheduler adopts the new settings while the worker is replaced",
    Reload.WORKER: "the scheduler holds new requests and lets running ones finish, then the model "
    "worker is replaced; held requests run on the new one (or get a 503 after runtime.drain_timeout_s). "
    "With runtime.model_reload = blue_green, the new worker loads beside the old one and takes new "
    "requests once the reload switches to it. With model.dp_size > 1 (rolling), one replica at a time "
    "is drained and replaced while the others serve",
    Reload.SUPERVISOR: "refused: the reload is rejected and names the key; restart the daemon",
}


@dataclass(frozen=True)
class ResolvePath:
    """Marks a setting holding a file system path.

    A relative path is resolved against the directory of the config file it
    came from (or the working directory for environment and command-line
    values), so `daemon check` and the running daemon agree whatever their
    working directory. Values starting with `keep_prefix` are names, not paths.
    """

    keep_prefix: str | None = None


LocalPath = Annotated[Path, ResolvePath()]
ModelRef = Annotated[str, ResolvePath(keep_prefix=BUILTIN_PREFIX)]


def setting(default: Any = ..., *, doc: str, reload: Reload, **constraints: Any) -> Any:
    """A schema field: every setting must say what it is and what changing it restarts."""
    return Field(default, description=doc, json_schema_extra={"x-reload": reload.value}, **constraints)


def section(model: type[BaseModel], doc: str) -> Any:
    """A table; required when one of its keys is, so a missing table is reported like a missing key."""
    required = any(field.is_required() for field in model.model_fields.values())
    return Field(description=doc) if required else Field(default_factory=model, description=doc)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _exact_scalars(cls, value: Any, info: ValidationInfo) -> Any:
        """TOML's scalars are typed: no booleans for numbers or numbers for booleans, no NUL in text.

        (pydantic's lax mode would read `port = true` as 1; environment values
        arrive as strings and are parsed as usual.)
        """
        annotation = cls.model_fields[info.field_name].annotation
        takes_bool = _mentions(annotation, bool)
        if isinstance(value, bool) != takes_bool and isinstance(value, int | float):
            kind = "boolean (true or false)" if isinstance(value, bool) else "number"
            raise PydanticCustomError(
                "scalar_type",
                "got a {kind}, expected {expected}",
                {"kind": kind, "expected": describe_type(annotation)},
            )
        if isinstance(value, str) and "\0" in value:
            raise PydanticCustomError("nul_character", "text cannot contain a NUL character")
        if value == "" and _mentions(annotation, Path):
            raise PydanticCustomError("empty_path", "a path cannot be empty")
        return value


class TLSSettings(Section):
    certfile: LocalPath | None = setting(
        None,
        doc="PEM certificate chain served to clients. Enables HTTPS (with ALPN h2 when "
        "server.enable_http2). Requires keyfile.",
        reload=Reload.FRONTEND,
    )
    keyfile: LocalPath | None = setting(
        None, doc="PEM private key of certfile. Requires certfile.", reload=Reload.FRONTEND
    )
    keyfile_password: SecretStr | None = setting(
        None, doc="Password of an encrypted keyfile. Secret: masked in every output.", reload=Reload.FRONTEND
    )
    ca_certs: LocalPath | None = setting(
        None,
        doc="PEM bundle of certificate authorities that sign client certificates (mutual TLS, with "
        "verify_client). Requires certfile and keyfile.",
        reload=Reload.FRONTEND,
    )
    verify_client: bool = setting(
        False,
        doc="Require every client to present a certificate signed by ca_certs (mutual TLS).",
        reload=Reload.FRONTEND,
    )
    min_version: Literal["1.2", "1.3"] = setting(
        "1.2", doc="Oldest TLS protocol version accepted from clients.", reload=Reload.FRONTEND
    )
    refresh: bool = setting(
        False,
        doc="Watch certfile and keyfile and rotate to new certificates when the files change, "
        "without dropping connections. Requires certfile and keyfile.",
        reload=Reload.LIVE,
    )


class ServerSettings(Section):
    host: str = setting(
        "127.0.0.1",
        doc="Address the HTTP front-end listens on: an IP address or host name; 0.0.0.0 or :: for every interface.",
        reload=Reload.FRONTEND,
        min_length=1,
    )
    port: int = setting(8000, doc="TCP port of the HTTP front-end.", reload=Reload.FRONTEND, ge=1, le=65535)
    enable_http2: bool = setting(
        True,
        doc="Serve HTTP/2 beside HTTP/1.1 on the same port: h2c with prior knowledge in cleartext, "
        "ALPN h2 over TLS. Off: HTTP/1.1 only.",
        reload=Reload.FRONTEND,
    )
    http2_max_concurrent_streams: int = setting(
        200,
        doc="Most concurrent HTTP/2 streams (requests) one client connection may open.",
        reload=Reload.FRONTEND,
        ge=1,
        le=2**32 - 1,
    )
    workers: int = setting(
        1,
        doc="Front-end (Granian) worker processes. One is enough for most loads: the HTTP I/O is "
        "multi-threaded in Rust.",
        reload=Reload.FRONTEND,
        ge=1,
        le=256,
    )
    backlog: int = setting(
        1024,
        doc="Listen backlog: connections the kernel queues before the front-end accepts them.",
        reload=Reload.FRONTEND,
        ge=128,
        le=65535,
    )
    max_connections: int = setting(
        8192,
        doc="Most client connections each front-end worker holds open at once (Granian's backpressure); "
        "beyond it new connections wait in the listen backlog until one closes. Idle keep-alive and silent "
        "connections count too, so keep it well above the clients' connection pools: with the default, "
        "2,000 idle connections leave /health answering. The front-end raises its open-file limit to fit.",
        reload=Reload.FRONTEND,
        ge=16,
        le=1_000_000,
    )
    header_read_timeout_s: float = setting(
        30.0,
        doc="HTTP/1.1: seconds a client has to send a request's whole header block, and the longest an "
        "idle keep-alive connection stays open between requests; then the connection is closed (no "
        "response). With enable_http2 off it also closes a connection that never sends a byte.",
        reload=Reload.FRONTEND,
        ge=1.0,
        le=3600.0,
        allow_inf_nan=False,
    )
    body_read_timeout_s: float = setting(
        60.0,
        doc="Seconds a client has to send a request's whole body, once its headers are in (a body shorter "
        "than its Content-Length, a trickled or endless chunked body); then the request gets 408 and "
        "nothing runs.",
        reload=Reload.FRONTEND,
        ge=1.0,
        le=3600.0,
        allow_inf_nan=False,
    )
    http2_keepalive_interval_s: float | None = setting(
        60.0,
        doc="HTTP/2: seconds between PINGs on a connection; a peer that does not answer one within "
        "http2_keepalive_timeout_s is dropped with its streams (a vanished client, a dead NAT entry). "
        "Unset: no PINGs.",
        reload=Reload.FRONTEND,
        ge=1.0,
        le=86400.0,
        allow_inf_nan=False,
    )
    http2_keepalive_timeout_s: float = setting(
        20.0,
        doc="HTTP/2: seconds to wait for a PING's answer before the connection is dropped.",
        reload=Reload.FRONTEND,
        ge=1.0,
        le=3600.0,
        allow_inf_nan=False,
    )
    api_key: SecretStr | None = setting(
        None,
        doc="Bearer token required on /v1/* endpoints, /tokenize and /detokenize. Unset: no authentication. "
        "Secret: masked in every output.",
        reload=Reload.LIVE,
        min_length=1,
    )
    max_request_body_bytes: int = setting(
        8 * 1024 * 1024,
        doc="Largest accepted request body; larger requests get 413.",
        reload=Reload.LIVE,
        ge=1024,
        le=1024**3,
    )
    max_prompts_per_request: int = setting(
        256,
        doc="Most prompts one /v1/completions request may carry (a list of strings or of token-id lists); "
        "each is scheduled as its own request and answered as its own choice. More: 400.",
        reload=Reload.LIVE,
        ge=1,
        le=65536,
    )
    max_choices_per_prompt: int = setting(
        16,
        doc="Largest `n` a request may ask for: choices sampled from each prompt, each scheduled as its own "
        "request (they share the prompt's cached blocks). More: 400.",
        reload=Reload.LIVE,
        ge=1,
        le=1024,
    )
    max_logprobs: int = setting(
        20,
        doc="Most alternatives a request may ask log-probabilities of at each position (completions' "
        "`logprobs`, chat's `top_logprobs`), as vLLM's --max-logprobs. More: 400.",
        reload=Reload.LIVE,
        ge=0,
        le=1024,
    )
    unknown_request_fields: Literal["reject", "ignore"] = setting(
        "reject",
        doc="What a request field the API does not know gets. reject: a 400 naming it, with the closest "
        "known field. ignore: the request is served as if it were absent, and the field is logged once "
        "(for clients that send vendor extras).",
        reload=Reload.LIVE,
    )
    tls: TLSSettings = section(TLSSettings, "TLS (HTTPS) for the front-end.")


class TokenizerSettings(Section):
    path: ModelRef | None = setting(
        None,
        doc="Tokenizer directory (tokenizer.json, tokenizer_config.json) or builtin: name. Unset: model.path.",
        reload=Reload.TOKENIZER,
        min_length=1,
    )
    workers: int = setting(
        1,
        doc="Tokenizer worker processes (tokenize, chat template, incremental detokenize).",
        reload=Reload.TOKENIZER,
        ge=1,
        le=64,
    )


class SchedulerSettings(Section):
    policy: Literal["fcfs", "lof", "priority"] = setting(
        "fcfs",
        doc="Order in which queued requests are admitted: fcfs (first come, first served), lof "
        "(longest output first), priority (the request's priority field, then arrival).",
        reload=Reload.LIVE,
    )
    max_running_requests: int = setting(
        128,
        doc="Most requests decoding at once in the running batch.",
        reload=Reload.LIVE,
        ge=1,
        le=1_000_000,
    )
    max_queued_requests: int = setting(
        1024,
        doc="Most requests waiting for admission; beyond it new requests get 503 with Retry-After. 0: no queue.",
        reload=Reload.LIVE,
        ge=0,
        le=10_000_000,
    )
    max_total_tokens: int | None = setting(
        None,
        doc="KV-cache capacity in tokens, shared by all running requests. Unset: sized after a "
        "warm-up step of the largest shape (max_running_requests sequences, chunked_prefill_size "
        "tokens): on CUDA, what mem_fraction_static of the GPU leaves once the weights and that "
        "step's measured peak are counted; on CPU, 16 contexts' worth within a quarter of the memory "
        "then available.",
        reload=Reload.WORKER,
        ge=1,
        le=2**40,
    )
    mem_fraction_static: float = setting(
        0.85,
        doc="Fraction of GPU memory the worker may hold, when max_total_tokens is unset: its weights, "
        "its KV cache and a step's transient memory (the peak of its warm-up step).",
        reload=Reload.WORKER,
        gt=0.0,
        lt=1.0,
        allow_inf_nan=False,
    )
    chunked_prefill_size: int = setting(
        2048,
        doc="Most prompt tokens prefilled in one step; longer prompts are prefilled in chunks "
        "between decode steps. -1 disables chunking.",
        reload=Reload.LIVE,
    )
    enable_prefix_caching: bool = setting(
        True,
        doc="Share the KV cache of full blocks between requests whose prompts start with the same "
        "tokens: a prompt prefix already in the cache is not computed again. Switched off by a "
        "reload, every cached prefix is forgotten at once.",
        reload=Reload.LIVE,
    )


class ModelSettings(Section):
    path: ModelRef = setting(
        doc="Local Hugging Face-format model directory (config.json plus safetensors), or "
        "builtin:demo for the small built-in demo model (it produces no meaningful text).",
        reload=Reload.WORKER,
        min_length=1,
    )
    served_model_name: str | None = setting(
        None,
        doc="Model name clients send and /v1/models lists. Unset: the model directory's name (demo for builtin:demo).",
        reload=Reload.LIVE,
        min_length=1,
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = setting(
        "auto",
        doc=(
            "Weight and activation dtype. auto: float32 on CPU; on CUDA the checkpoint's float16 or "
            "bfloat16 (bfloat16 for a float32 checkpoint)."
        ),
        reload=Reload.WORKER,
    )
    device: Literal["auto", "cpu", "cuda"] = setting(
        "auto", doc="Where the model runs. auto: CUDA when a GPU is visible, else CPU.", reload=Reload.WORKER
    )
    tp_size: int = setting(
        1,
        doc="Tensor-parallel degree: GPUs (over all nodes) that each hold a slice of the model.",
        reload=Reload.WORKER,
        ge=1,
        le=1024,
    )
    dp_size: int = setting(
        1,
        doc="Data-parallel degree: independent replicas of the model, each tp_size processes (replica i on "
        "CUDA takes the i-th run of tp_size visible GPUs). The scheduler places each new request on one "
        "replica, by load and by the prompt prefix its cache holds; each replica steps on its own, and "
        "one that dies restarts alone while the others serve.",
        reload=Reload.WORKER,
        ge=1,
        le=64,
    )
    cpu_threads: int | None = setting(
        None,
        doc="Threads the engine uses on CPU, shared by its processes (tp_size ranks times dp_size "
        "replicas). Unset: the machine's CPUs but two (left to the other tiers), at least one each.",
        reload=Reload.WORKER,
        ge=1,
        le=4096,
    )
    enforce_eager: bool = setting(
        False,
        doc="Run every step eagerly. Otherwise, on CUDA with tp_size 1, steps of decodes only (up to "
        "scheduler.max_running_requests of them at the worker's start) are padded to a bucket of "
        "batch sizes and replayed as CUDA graphs, each captured the first time a step needs it. On "
        "CPU every step is eager.",
        reload=Reload.WORKER,
    )
    context_length: int | None = setting(
        None,
        doc="Most tokens (prompt plus output) in one request. Unset: the model's maximum "
        "(max_position_embeddings, or its sliding attention window if smaller).",
        reload=Reload.WORKER,
        ge=1,
        le=2**30,
    )
    seed: int = setting(
        0,
        doc="Seed of the sampler's random state; requests without their own seed draw from it.",
        reload=Reload.WORKER,
        ge=0,
        le=2**63 - 1,
    )
    tool_parser: Literal["auto", "none", "hermes", "llama3_json", "mistral"] = setting(
        "auto",
        doc="The format in which the model writes tool calls, parsed out of answers to requests with tools and "
        "tool_choice auto: hermes (<tool_call> JSON: Hermes, Qwen), llama3_json (Llama 3.1+ JSON), mistral "
        "([TOOL_CALLS]). auto: from the markers its chat template writes. none: such requests are a 400.",
        reload=Reload.LIVE,
    )
    reasoning_parser: Literal["none", "qwen3", "deepseek_r1"] = setting(
        "none",
        doc="Move the model's thinking (<think>...</think>) out of chat answers' content into "
        "reasoning_content, as vLLM does: qwen3 (the answer opens <think> itself) or deepseek_r1 (the "
        "prompt opened it). none: the thinking stays in the content.",
        reload=Reload.LIVE,
    )


class DistributedSettings(Section):
    nnodes: int = setting(1, doc="Machines the model is spread over.", reload=Reload.SUPERVISOR, ge=1, le=1024)
    node_rank: int = setting(
        0, doc="This machine's index among the nnodes (0 is the head).", reload=Reload.SUPERVISOR, ge=0, le=1023
    )
    dist_init_addr: str | None = setting(
        None,
        doc="host:port where node 0 accepts the other nodes' rendezvous. Required when nnodes > 1.",
        reload=Reload.SUPERVISOR,
        min_length=1,
    )
    nccl_port: int | None = setting(
        None,
        doc="TCP port for the collective-communication rendezvous of this node's GPU workers. Unset: a free port.",
        reload=Reload.WORKER,
        ge=1,
        le=65535,
    )


class LoggingSettings(Section):
    level: Literal["debug", "info", "warning", "error", "critical"] = setting(
        "info", doc="Least severe level logged, in every process.", reload=Reload.LIVE
    )
    format: Literal["auto", "json", "console"] = setting(
        "auto",
        doc="json: one JSON object a line. console: readable, for people. auto: console on a terminal, json otherwise.",
        reload=Reload.LIVE,
    )
    access_log: bool = setting(
        False, doc="Log one line per HTTP request (Granian's access log).", reload=Reload.FRONTEND
    )

    @field_validator("level", mode="before")
    @classmethod
    def _level_any_case(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class RuntimeSettings(Section):
    dir: LocalPath | None = setting(
        None,
        doc="Directory for the IPC sockets and control socket. Unset: $RUNTIME_DIRECTORY (systemd), "
        "else $XDG_RUNTIME_DIR/daemon, else /tmp/daemon-<uid>.",
        reload=Reload.SUPERVISOR,
    )
    cache_dir: LocalPath | None = setting(
        None,
        doc="Where built-in models are built and kept. Unset: $CACHE_DIRECTORY (systemd), else "
        "$XDG_CACHE_HOME/daemon, else ~/.cache/daemon.",
        reload=Reload.WORKER,
    )
    drain_timeout_s: float = setting(
        30.0,
        doc="Longest wait for in-flight requests and streams to finish when a tier stops or restarts. "
        "A running front-end keeps the value it started with until a reload replaces it.",
        reload=Reload.LIVE,
        gt=0,
        le=86400,
        allow_inf_nan=False,
    )
    hang_timeout_s: float = setting(
        60.0,
        doc="A worker, scheduler or tokenizer process that sends no heartbeat for this long (frozen, "
        "deadlocked, a step that never returns) is declared hung: killed and restarted like a crashed one, "
        "its requests ending with a 503. Raise it where one model step can take longer. 0: never.",
        reload=Reload.LIVE,
        ge=0,
        le=86400,
        allow_inf_nan=False,
    )
    watch_config: bool = setting(
        True, doc="Reload when the config file changes (SIGHUP and daemon reload always work).", reload=Reload.LIVE
    )
    model_reload: Literal["rolling", "drain", "blue_green"] = setting(
        "rolling",
        doc="How a reload replaces the model worker (the new config's value applies). rolling: one "
        "replica (model.dp_size) at a time is drained (no new requests, its running ones finish), "
        "stopped, and replaced, the next once the new one serves, while the others serve; with one "
        "replica this is drain. drain: new requests wait while the running ones finish on every "
        "replica, then the new workers load. blue_green: the new worker loads beside the running "
        "one, then takes new requests at once while the old one finishes its own (with several "
        "replicas, one replica at a time); needs memory for both, else that replacement falls back "
        "to drain.",
        reload=Reload.LIVE,
    )


class DaemonSettings(BaseSettings):
    """Configuration of the daemon (server.toml)."""

    # Values reach this class already merged from their sources (see `sources.py`), which
    # keep track of where each came from; pydantic-settings must not read the process
    # environment behind their back, so init arguments are the only source.
    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        validate_default=True,
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        case_sensitive=False,
        title="daemon server.toml",
    )

    server: ServerSettings = section(ServerSettings, "HTTP front-end: listener, protocols, limits.")
    tokenizer: TokenizerSettings = section(TokenizerSettings, "Tokenizer worker pool.")
    scheduler: SchedulerSettings = section(SchedulerSettings, "Continuous-batching scheduler and KV-cache budget.")
    model: ModelSettings = section(ModelSettings, "The model served and how it runs.")
    distributed: DistributedSettings = section(DistributedSettings, "Multi-node and multi-GPU layout.")
    logging: LoggingSettings = section(LoggingSettings, "Logs of every process.")
    runtime: RuntimeSettings = section(RuntimeSettings, "Supervisor runtime: IPC directory, draining, file watch.")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, **_other_sources):  # type: ignore[override]
        return (init_settings,)


@dataclass(frozen=True)
class SettingInfo:
    """One leaf setting, as introspected from the schema."""

    key: str  # dotted path, e.g. "server.tls.certfile"
    field: FieldInfo

    @property
    def reload(self) -> Reload:
        return Reload(self.field.json_schema_extra["x-reload"])  # type: ignore[index]

    @property
    def env_var(self) -> str:
        return ENV_PREFIX + self.key.upper().replace(".", ENV_NESTED_DELIMITER)

    @property
    def is_secret(self) -> bool:
        return _mentions(self.field.annotation, SecretStr)

    @property
    def path_marker(self) -> ResolvePath | None:
        markers = [*self.field.metadata, *_annotated_metadata(self.field.annotation)]
        return next((m for m in markers if isinstance(m, ResolvePath)), None)

    @property
    def type_name(self) -> str:
        return describe_type(self.field.annotation)

    @property
    def bounds(self) -> str:
        """The numeric bounds of the setting, e.g. ">= 1 and <= 256"; empty when unbounded."""
        symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
        return " and ".join(
            f"{symbol} {getattr(item, name)}"
            for item in self.field.metadata
            for name, symbol in symbols.items()
            if getattr(item, name, None) is not None
        )

    @property
    def required(self) -> bool:
        return self.field.is_required()


def _mentions(annotation: Any, target: type) -> bool:
    if annotation is target:
        return True
    return any(_mentions(arg, target) for arg in get_args(annotation))


def _annotated_metadata(annotation: Any) -> list[Any]:
    if get_origin(annotation) is Annotated:
        return list(annotation.__metadata__)
    return [m for arg in get_args(annotation) for m in _annotated_metadata(arg)]


_TYPE_NAMES = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    Path: "path",
    SecretStr: "secret string",
}


def describe_type(annotation: Any) -> str:
    """A reader's name for a setting's type: "integer", "path", "\"fcfs\" | \"lof\"", ..."""
    origin = get_origin(annotation)
    if origin is Literal:
        return " | ".join(f'"{choice}"' for choice in get_args(annotation))
    if origin is Annotated:
        return describe_type(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return " or ".join(describe_type(a) for a in get_args(annotation) if a is not type(None))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table"
    return _TYPE_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _section_model(field: FieldInfo) -> type[BaseModel] | None:
    annotation = field.annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def iter_settings(model: type[BaseModel] = DaemonSettings, prefix: str = "") -> Iterator[SettingInfo]:
    """Every leaf setting of `model`, depth first, in declaration order."""
    for name, field in model.model_fields.items():
        nested = _section_model(field)
        if nested is not None:
            yield from iter_settings(nested, f"{prefix}{name}.")
        else:
            yield SettingInfo(f"{prefix}{name}", field)


def iter_sections(
    model: type[BaseModel] = DaemonSettings, prefix: str = ""
) -> Iterator[tuple[str, FieldInfo, type[BaseModel]]]:
    """Every table of the schema, as (dotted key, field, model)."""
    for name, field in model.model_fields.items():
        nested = _section_model(field)
        if nested is not None:
            yield f"{prefix}{name}", field, nested
            yield from iter_sections(nested, f"{prefix}{name}.")


SETTINGS: dict[str, SettingInfo] = {info.key: info for info in iter_settings()}
SECTIONS: dict[str, type[BaseModel]] = {key: model for key, _field, model in iter_sections()}


def get_value(config: BaseModel, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


MASK = "********"


def plain_value(value: Any, *, reveal_secrets: bool = False) -> Any:
    """A setting's value as plain data (str, int, float, bool or None)."""
    if isinstance(value, SecretStr):
        return value.get_secret_value() if reveal_secrets else MASK
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    return value


def toml_value(value: Any) -> str:
    """A plain value as TOML writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    # JSON string escapes are valid TOML basic-string escapes; TOML also forbids a raw DEL.
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def flat_values(config: BaseModel, *, reveal_secrets: bool = False) -> dict[str, Any]:
    """Every leaf setting of `config` by dotted key, as plain data; secrets masked unless revealed."""
    return {key: plain_value(get_value(config, key), reveal_secrets=reveal_secrets) for key in SETTINGS}


class _TomlJsonSchema(GenerateJsonSchema):
    """JSON Schema as a TOML file sees it: TOML has no null, an unset key is simply absent."""

    def nullable_schema(self, schema: Any) -> JsonSchemaValue:
        return self.generate_inner(schema["schema"])

    def get_default_value(self, schema: Any) -> Any:
        default = super().get_default_value(schema)
        return NoDefault if default is None else default

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False  # the key is its own title; descriptions say the rest


def nested_values(flat: dict[str, Any]) -> dict[str, Any]:
    """{"server.port": 1} -> {"server": {"port": 1}}; unset (None) values are left out."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        if value is None:
            continue
        *tables, name = key.split(".")
        node = nested
        for table in tables:
            node = node.setdefault(table, {})
        node[name] = value
    return nested


def config_hash(config: BaseModel) -> str:
    """Fingerprint of an effective configuration: equal configs, equal hashes (secrets included)."""
    canonical = json.dumps(flat_values(config, reveal_secrets=True), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def json_schema() -> dict[str, Any]:
    """The JSON Schema of server.toml, with each setting's reload scope as `x-reload`."""
    schema = DaemonSettings.model_json_schema(schema_generator=_TomlJsonSchema)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
