"""Every message exchanged between processes, defined once as typed structs.

Encoded as MessagePack with msgspec (no pickle: a peer can only ever send these
shapes). Each channel carries a tagged union, decoded by `decoder(Channel)`.
Messages are batched where volume grows: the scheduler sends one `StepTokens` per
tokenizer per engine step, and one `StepPlan` per step to the workers, so IPC
cost grows with steps, not with tokens times requests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import msgspec

FinishReason = Literal["stop", "length", "abort", "error"]
# The sampling fields whose default, when a request leaves them unset, is the model's own
# (generation_config.json) where it has one: Sampling holds the neutral value until then.
ModelDefaultField = Literal["temperature", "top_p", "top_k", "min_p", "repetition_penalty"]


class Sampling(msgspec.Struct, frozen=True, omit_defaults=True):
    """How to choose tokens and when to stop, as the engine sees it."""

    # None: the model's default (generation_config.json) within what the context leaves, else all that it
    # leaves after the prompt: set by the tokenizer
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    min_tokens: int = 0  # the stop token ids (end-of-sequence included) are held back until then
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    allowed_token_ids: tuple[int, ...] = ()  # empty: all
    bad_words: tuple[tuple[int, ...], ...] = ()  # token sequences never to complete (the tokenizer makes them)
    logprobs: int | None = None  # each token's log-probability and those of the N likeliest (None: none)
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (None: none)

    @property
    def needs_token_counts(self) -> bool:
        """Whether the worker needs the tokens the sequence has seen (its prompt among them)."""
        penalised = self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
        return penalised or self.min_tokens > 0 or bool(self.bad_words)


class Constraint(msgspec.Struct, frozen=True, array_like=True):
    """What a constrained request's output must match (engine/grammar.py compiles it): a JSON schema
    (as JSON text), any JSON object, a regex, one of some strings (a JSON array), or an EBNF grammar."""

    kind: Literal["json_schema", "json_object", "regex", "choice", "grammar", "structural_tag"]
    spec: str = ""
    param: str = "response_format"  # the request field it came from, for the 400 when it does not compile
    compact: bool = False  # JSON without whitespace between tokens (but ", " and ": ")
    thinking: Literal["qwen3", "deepseek_r1"] | None = None  # it starts after a reasoning model's thinking


class TokenLogprobs(msgspec.Struct, frozen=True, array_like=True):
    """A generated token's log-probability under the model (its raw logits: before penalties,
    temperature and the rest, as vLLM reports them by default), and the likeliest tokens'."""

    logprob: float
    rank: int  # 1 for the likeliest token
    top_ids: list[int]
    top_logprobs: list[float]


class OutputLogprob(msgspec.Struct, frozen=True, array_like=True):
    """TokenLogprobs with each token's text beside its id (a prompt's first token: no logprob)."""

    token_id: int
    token: str
    logprob: float | None
    rank: int | None
    top: list[tuple[int, str, float]]  # (id, text, logprob) of the likeliest tokens


class ErrorInfo(msgspec.Struct, frozen=True):
    """A request that ends in an error: the HTTP status and OpenAI-style error object."""

    status: int  # 400, 503, ...
    message: str
    type: str = "invalid_request_error"
    param: str | None = None


# --- front-end -> tokenizer ---------------------------------------------------------------------


class ChatOptions(msgspec.Struct, frozen=True, omit_defaults=True):
    """How a conversation becomes a prompt: the chat template's inputs beside the messages."""

    add_generation_prompt: bool = True  # end with the assistant's turn opening
    continue_final_message: bool = False  # leave the last (assistant) message open, to be continued
    template_kwargs: dict[str, Any] = {}  # extra variables for the template (e.g. enable_thinking)
    add_special_tokens: bool = False  # also add the tokenizer's own specials (BOS) to the rendered text
    tools: list[dict] | None = None  # the functions the model may call, as chat templates take them


class GenerateRequest(msgspec.Struct, frozen=True, tag=True):
    request_id: str  # unique inside the daemon, whatever the client's X-Request-Id
    reply_to: str  # the front-end worker's result endpoint
    sampling: Sampling
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict] | None = None  # chat: OpenAI-shaped messages
    chat: ChatOptions | None = None  # with messages
    add_special_tokens: bool = True  # a text prompt gets the tokenizer's specials (BOS), as a plain prompt
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last N tokens
    skip_special_tokens: bool = True  # special tokens are left out of the text
    include_stop_str_in_output: bool = False  # the stop string that ended the text stays in it
    stop: tuple[str, ...] = ()
    priority: int = 0
    arrival: float = 0.0  # wall-clock time the front-end received it
    stream: bool = True  # False: the whole text comes in the last output, in one message
    echo: bool = False  # the first output carries the prompt as text
    bad_words: tuple[str, ...] = ()  # the tokenizer turns them into Sampling.bad_words
    # What the client left unset in `sampling`: the tokenizer puts the model's defaults there.
    unset_sampling: tuple[ModelDefaultField, ...] = ()
    constraint: Constraint | None = None  # the output must match it (compiled before the request is queued)
    # tool_choice auto: the answer is parsed for tool calls, in the format the tokenizer names (GenerateOutput)
    parse_tool_calls: bool = False


class AbortRequest(msgspec.Struct, frozen=True, tag=True):
    """The client went away or timed out: drop the request wherever it is."""

    request_id: str


# --- tokenizer -> front-end ---------------------------------------------------------------------


class GenerateOutput(msgspec.Struct, frozen=True, tag=True):
    request_id: str
    text: str = ""  # new text since the previous output
    finish_reason: FinishReason | None = None  # set on the last output of a request
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: ErrorInfo | None = None
    cached_tokens: int = 0  # prompt tokens found in the prefix cache (usage.prompt_tokens_details)
    logprobs: list[OutputLogprob] = []  # one per token generated since the previous output, when asked
    # with the first output: the prompt as text (echo), and its tokens' logprobs (the first has none)
    prompt_text: str | None = None
    prompt_logprobs: list[OutputLogprob] = []
    tool_parser: str | None = None  # with the first output, when the request parses tool calls: their format


class OutputBatch(msgspec.Struct, frozen=True, tag=True):
    """The outputs of one engine step for the requests of one front-end worker."""

    outputs: list[GenerateOutput]


# --- tokenizer -> scheduler ---------------------------------------------------------------------


class ScheduleRequest(msgspec.Struct, frozen=True, tag=True):
    request_id: str
    tokenizer: int  # which tokenizer worker gets the tokens back
    prompt_ids: list[int]
    sampling: Sampling
    priority: int = 0
    arrival: float = 0.0
    constraint: Constraint | None = None


class PrepareConstraint(msgspec.Struct, frozen=True, tag=True):
    """Compile this constraint ahead, on a thread (to the worker, from the scheduler). The
    tokenizer sends it to the scheduler as soon as a constrained request comes, for a head start:
    the scheduler admits the request only once the worker has said ConstraintReady."""

    constraint: Constraint


class ConstraintReady(msgspec.Struct, frozen=True, tag=True):
    """The worker has compiled `constraint` (or failed to: the request then fails when it starts)."""

    worker_epoch: int
    constraint: Constraint


# --- scheduler -> tokenizer ---------------------------------------------------------------------


class SequenceUpdate(msgspec.Struct, frozen=True, omit_defaults=True):
    request_id: str
    token_ids: list[int]  # new tokens since the previous update
    finish_reason: FinishReason | None = None
    error: ErrorInfo | None = None
    cached_tokens: int = 0  # with the first token: prompt tokens whose keys and values came from the prefix cache
    logprobs: list[TokenLogprobs] = []  # one per token of token_ids, when the request asked for them
    prompt_logprobs: list[TokenLogprobs] = []  # with the first token: the prompt's tokens' from the second on


class StepTokens(msgspec.Struct, frozen=True, tag=True):
    """Everything one engine step produced for the requests of one tokenizer worker."""

    updates: list[SequenceUpdate]


# --- scheduler <-> worker -----------------------------------------------------------------------


# A chunk's token that the previous step samples: the scheduler plans a step before it
# knows the tokens of the one in flight, and the worker fills them in.
SAMPLED_LAST_STEP = -1


class PlannedChunk(msgspec.Struct, frozen=True, array_like=True):
    seq_id: int
    token_ids: list[int]  # may be [SAMPLED_LAST_STEP]
    start: int
    block_table: list[int]
    sample: bool
    sampling: Sampling
    # the whole prompt, with the first chunk after admission when sampling.needs_token_counts
    prompt_ids: list[int] | None = None
    # report the logprobs of the chunk's prompt tokens (sampling.prompt_logprobs, first computation)
    score_prompt: bool = False
    constraint: Constraint | None = None  # with the first chunk after admission: the worker starts its matcher


class StepPlan(msgspec.Struct, frozen=True, tag=True):
    step: int
    scheduler_epoch: int  # a new scheduler numbers sequences afresh: the worker forgets the old ones
    chunks: list[PlannedChunk]
    finished: list[int] = []  # sequences the worker may forget (their random generators)


class StepResult(msgspec.Struct, frozen=True, tag=True):
    step: int
    worker_epoch: int
    tokens: dict[int, int]  # seq_id -> sampled token, for chunks that sampled
    error: str | None = None  # the whole step failed: every sequence in it ends
    failed: dict[int, str] = {}  # seq_id -> why: these sequences alone failed, the others' tokens stand
    seconds: float = 0.0  # how long the worker took to run it
    logprobs: dict[int, TokenLogprobs] = {}  # seq_id -> its token's, for sequences that asked
    # seq_id -> the logprobs of the prompt tokens its scored chunk covers (see ModelRunner.step)
    prompt_logprobs: dict[int, list[TokenLogprobs]] = {}
    completed: list[int] = []  # constrained sequences whose grammar this step's token completed: they end


# --- control: every tier <-> supervisor ---------------------------------------------------------


class TierReady(msgspec.Struct, frozen=True, tag=True):
    tier: str
    index: int
    pid: int
    model: LoadedModel | None = None  # a worker's: what it loaded


class TierEvent(msgspec.Struct, frozen=True, tag=True):
    """The supervisor's news of a tier process, published to every tier."""

    tier: str
    index: int
    epoch: int  # how many times the supervisor has started this tier
    # "standby": ready beside the serving one, started by a reload that has not switched to it yet
    state: Literal["starting", "standby", "up", "down", "draining", "stopped"]
    # A worker's, from its TierReady: with "up", the tiers that check requests against the served
    # context follow it from this news, rather than each deriving its own from the config.
    model: LoadedModel | None = None
    # With "down": the supervisor starts it again, so requests for it may wait (a stop, or a crash
    # loop the supervisor gives up on, says False: nothing is coming back).
    restarting: bool = False


class FrontendWorkerReady(msgspec.Struct, frozen=True, tag=True):
    """A Granian worker process of front-end instance `main_pid` is about to accept connections."""

    pid: int
    main_pid: int


class FrontendRetiring(msgspec.Struct, frozen=True, tag=True):
    """Front-end instance `main_pid` is being replaced: its workers answer HTTP/1.1 requests with
    `Connection: close`, so that clients leave its connections before it stops accepting."""

    main_pid: int


class ConfigUpdate(msgspec.Struct, frozen=True, tag=True):
    """A reload changed live settings: adopt those of `generation` (config-<generation>.json)
    and acknowledge with ConfigApplied."""

    generation: int


class Heartbeat(msgspec.Struct, frozen=True, tag=True):
    """A tier's main loop is turning (sent at least every HEARTBEAT_INTERVAL_S): the supervisor
    declares a tier hung when they stop for runtime.hang_timeout_s."""

    tier: str
    index: int
    pid: int


class ConfigApplied(msgspec.Struct, frozen=True, tag=True):
    tier: str
    index: int
    pid: int
    generation: int


class EngineHold(msgspec.Struct, frozen=True, tag=True):
    """The worker of replica `replica` is about to be replaced: place nothing new on it (new requests
    go to the other replicas, or wait), finish what runs, and say EngineIdle when nothing does. The
    hold ends when a worker of that replica announces itself (the new one, or one of the running
    config when the new one fails)."""

    replica: int = 0


class EngineHoldAbandoned(msgspec.Struct, frozen=True, tag=True):
    """No worker will end the hold (the daemon stops in the middle of a worker reload): answer
    the requests it holds with a 503 saying `reason`, at once rather than at the drain's end.
    With `replica`, only that replica's hold: a reload removed it (model.dp_size lowered)."""

    reason: str
    replica: int | None = None  # None: every replica


class EngineBeside(msgspec.Struct, frozen=True, tag=True):
    """Blue-green model reload: the worker of `epoch` starts beside the running one. When it
    announces itself, the scheduler connects to it and waits for EngineSwitch; its "down" or
    "stopped" event (a crash, or the reload withdrew it) means none is coming."""

    epoch: int
    replica: int = 0  # the replica it serves (model.dp_size > 1)


class EngineSwitch(msgspec.Struct, frozen=True, tag=True):
    """A blue-green reload commits: new requests, and those not started, go to the worker of
    `epoch`; the one it replaces (`replaced`, its epoch now: it may have restarted during the
    reload) finishes what it started, then the scheduler says EngineIdle for it. Announcements
    of `replaced` or older are stale from now on."""

    epoch: int
    replaced: int
    replica: int = 0


class EngineIdle(msgspec.Struct, frozen=True, tag=True):
    """Nothing runs any more on the worker being replaced (`epoch`, 0 for the one held) of
    replica `replica`."""

    pid: int
    epoch: int = 0
    replica: int = 0


class EngineJoined(msgspec.Struct, frozen=True, tag=True):
    """The scheduler drives the worker of `epoch` as replica `replica`'s from now on: a rolling
    reload moves to the next replica only then, so that one always serves."""

    pid: int
    epoch: int
    replica: int = 0


class ReloadCommand(msgspec.Struct, frozen=True, tag=True):
    """`daemon reload`: reload now and answer with the ReloadReport."""


class ReloadReport(msgspec.Struct, frozen=True, tag=True):
    """The outcome of one reload, as logged (config.reload), kept in status.json and sent back to
    `daemon reload`."""

    result: Literal["applied", "unchanged", "rejected", "rolled_back"]
    trigger: str
    generation: int  # running after the reload
    config_hash: str
    at: float  # wall-clock time it finished
    duration_s: float
    reason: str | None = None  # why rejected or rolled back
    changes: dict[str, dict[str, Any]] = {}  # key -> old, new (secrets masked), scope
    restarted: list[str] = []  # tiers restarted
    notes: list[str] = []  # e.g. keys the environment shadows


class TokenizerHello(msgspec.Struct, frozen=True, tag=True):
    """A starting tokenizer worker asking the scheduler to answer (with SchedulerHello).

    The answer proves that the scheduler's path back to the worker is connected:
    tokens sent on a path still connecting would be lost and their request hang.
    """

    index: int


class SchedulerHello(msgspec.Struct, frozen=True, tag=True):
    pid: int


class WorkerReady(msgspec.Struct, frozen=True, tag=True):
    """A worker announcing it can take steps: when it starts, then every second while idle.

    It says how large its KV cache is, so the scheduler's bookkeeping matches it.
    """

    epoch: int
    num_blocks: int
    block_size: int
    context_length: int
    # Its model's keys and values depend only on the tokens before them (not a RoPE that follows the
    # sequence's length): a prefix one sequence computed may serve another.
    prefix_cacheable: bool = True
    replica: int = 0  # which data-parallel replica of the model it serves (its tier index)


STEP_KINDS = ("prefill", "decode")  # engine steps that compute prompt tokens, and those that only decode


class SchedulerStats(msgspec.Struct, frozen=True, tag=True):
    running: int
    queued: int
    free_tokens: int
    total_tokens: int
    # Prefix caching, since the scheduler started: tokens looked up and found at admissions, and
    # the serving worker's blocks whose hash is findable now.
    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    prefix_cache_blocks: int = 0
    # Engine steps, as the serving workers timed them (see batcher.StepCounts)
    steps: dict[str, int] = {}  # by kind (STEP_KINDS)
    step_seconds: dict[str, float] = {}
    step_tokens: dict[str, int] = {}
    replicas: list[ReplicaStats] = []  # the figures above that each replica has, by replica (model.dp_size)


class ReplicaStats(msgspec.Struct, frozen=True):
    """One data-parallel replica's share of SchedulerStats."""

    replica: int
    epoch: int  # the worker serving it (0: none now: it is restarting or being replaced)
    running: int
    queued: int
    free_tokens: int
    total_tokens: int
    placed: int = 0  # requests placed on it since the scheduler started
    state: Literal["serving", "held", "away"] = "serving"  # held: drained for a reload; away: no worker


# --- the supervisor's status file (status.json in the socket directory) ------------------------


def read_status_file(directory: Path) -> DaemonStatus | None:
    """The supervisor's status file in socket directory `directory`; None if unreadable."""
    from daemon.ipc.endpoints import STATUS_FILE

    try:
        return msgspec.json.decode((directory / STATUS_FILE).read_bytes(), type=DaemonStatus)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def serving_worker(status: DaemonStatus | None) -> TierStatus | None:
    """The model worker serving now: the newest one up (during a blue-green reload the old one is
    up too, until the new one replaces it). None while none is: a restart, a drain-mode reload."""
    up = [t for t in status.tiers if t.tier == "worker" and t.state == "up"] if status else []
    return max(up, key=lambda t: t.epoch, default=None)


class TierStatus(msgspec.Struct, frozen=True):
    tier: str
    index: int
    pid: int | None
    epoch: int
    state: Literal["starting", "standby", "up", "draining", "down", "stopped"]
    since: float  # wall-clock time of the last state change
    restarts: int = 0  # after deaths (not reloads)
    model: LoadedModel | None = None  # a worker's, from its TierReady


class DaemonStatus(msgspec.Struct, frozen=True):
    supervisor_pid: int
    generation: int
    config_hash: str
    started: float
    tiers: list[TierStatus]
    last_reload: ReloadReport | None = None
    reloads: dict[str, int] = {}  # by result


# --- the model a worker serves ------------------------------------------------------------------


class LoadedModel(msgspec.Struct, frozen=True):
    """The model a worker loaded, as it reports it (TierReady) and the status file keeps it: the
    front-end shows it (/v1/models, /server_info) without resolving model.path itself, which for
    the built-in model would take the engine's code."""

    directory: str  # absolute: the built-in model's directory in the cache, or model.path resolved
    max_model_len: int  # the context it serves: model.context_length, else the model's maximum
    ranks: list[ModelRank] = []  # the processes holding it (model.tp_size of them), rank 0 first
    vocab_size: int = 0  # the ids its embedding holds (0: not said); a prompt's must be below it


class ModelRank(msgspec.Struct, frozen=True):
    """One process of a tensor-parallel worker group."""

    rank: int
    pid: int
    device: str
    node: int = 0  # distributed.node_rank of the machine it runs on


# --- front-end <-> tokenizer: /tokenize and /detokenize ------------------------------------------


class Tokenize(msgspec.Struct, frozen=True, tag=True):
    """/tokenize: a prompt (or a conversation, through the chat template) to token ids; the
    tokenizer worker answers `reply_to` with Tokenized. Exactly one of prompt and messages."""

    request_id: str
    reply_to: str  # the front-end worker's result endpoint
    prompt: str | None = None
    add_special_tokens: bool = True  # with prompt: the tokenizer's specials (BOS), as a plain prompt
    messages: list[dict] | None = None
    chat: ChatOptions | None = None  # with messages
    return_token_strs: bool = False


class Tokenized(msgspec.Struct, frozen=True, tag=True):
    request_id: str
    tokens: list[int] = []
    token_strs: list[str] | None = None  # the vocabulary's string of each token, when asked
    max_model_len: int = 0
    error: ErrorInfo | None = None


class Detokenize(msgspec.Struct, frozen=True, tag=True):
    """/detokenize: token ids to text, special tokens included; answered with Detokenized."""

    request_id: str
    reply_to: str
    tokens: list[int]


class Detokenized(msgspec.Struct, frozen=True, tag=True):
    request_id: str
    text: str = ""
    error: ErrorInfo | None = None


ToTokenizer = GenerateRequest | AbortRequest | StepTokens | SchedulerHello | Tokenize | Detokenize
ToScheduler = (
    ScheduleRequest | AbortRequest | StepResult | WorkerReady | TokenizerHello | PrepareConstraint | ConstraintReady
)
ToWorker = StepPlan | PrepareConstraint
ToFrontend = OutputBatch | Tokenized | Detokenized
ToSupervisor = TierReady | FrontendWorkerReady | ConfigApplied | EngineIdle | EngineJoined | ReloadCommand | Heartbeat
# PUB/SUB: from the supervisor (events) and the scheduler (stats)
Broadcast = (
    TierEvent
    | SchedulerStats
    | ConfigUpdate
    | EngineHold
    | EngineHoldAbandoned
    | EngineBeside
    | EngineSwitch
    | FrontendRetiring
)

_encoder = msgspec.msgpack.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decoder(channel: object) -> msgspec.msgpack.Decoder:
    """A decoder for one channel's union of messages; anything else raises msgspec.DecodeError."""
    return msgspec.msgpack.Decoder(channel)
