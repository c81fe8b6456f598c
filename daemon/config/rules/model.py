"""The model and its tokenizer: directories, weights, architecture, parallelism, devices."""

from __future__ import annotations

from daemon.config.errors import Severity
from daemon.config.facts import Facts
from daemon.config.rules.catalogue import LOWER, Check, CheckResult, rule, schema_rule
from daemon.config.schema import DaemonSettings
from daemon.engine.model_dir import ModelDirError, ModelInfo, Problem
from daemon.engine.models.registry import ACTIVATIONS, BY_ARCHITECTURE, DTYPES, ROPE_PARAMETERS, Capability


def model_info(f: Facts, c: DaemonSettings) -> ModelInfo | None:
    info = f.model(c.model.path)
    return info if isinstance(info, ModelInfo) else None


def _directory_problem(problem: Problem) -> Check:
    """A check reporting one kind of problem the model directory inspection finds."""

    def check(c: DaemonSettings, f: Facts) -> CheckResult:
        info = f.model(c.model.path)
        return info.message if isinstance(info, ModelDirError) and info.problem is problem else None

    return check


# One rule per kind of unusable model directory, so each has its own id and fix.
for problem, rule_id, summary, fix in [
    (
        Problem.MISSING,
        "model.path-missing",
        "model.path names an existing directory or a built-in model.",
        "set model.path to a local Hugging Face model directory, or builtin:demo",
    ),
    (
        Problem.CONFIG,
        "model.config-invalid",
        "The model directory has a readable config.json with the model's dimensions.",
        "point model.path at a complete Hugging Face model directory (its config.json must be intact)",
    ),
    (
        Problem.WEIGHTS_MISSING,
        "model.weights-missing",
        "Every safetensors shard of the model (per its index) is present.",
        "copy the missing safetensors files into the model directory",
    ),
    (
        Problem.WEIGHTS_CORRUPT,
        "model.weights-corrupt",
        "Every safetensors shard has a valid header and all its tensor data.",
        "download or copy the damaged shard again; its size or header does not match",
    ),
]:
    rule(rule_id, keys=["model.path"], fix=fix, summary=summary)(_directory_problem(problem))


def _capability(capability: Capability) -> Check:
    """A check reporting what of one kind the engine's capability table says it cannot run."""

    def check(c: DaemonSettings, f: Facts) -> CheckResult:
        info = model_info(f, c)
        problems = [p.message for p in info.unsupported if p.capability is capability] if info else []
        return "; ".join(problems) or None

    return check


# One rule per kind of thing the engine cannot run, from the capability table the worker uses too
# (daemon/engine/models/registry.py): a model that passes these never fails to load for their reasons.
for capability, summary, fix in [
    (
        Capability.ARCHITECTURE,
        "The model's architecture is one the engine implements.",
        f"serve a model of a supported architecture: {', '.join(BY_ARCHITECTURE)}",
    ),
    (
        Capability.ACTIVATION,
        "The model's MLP activation is one the engine implements.",
        f"serve a model whose activation is one of {', '.join(ACTIVATIONS)}",
    ),
    (
        Capability.ROPE,
        "The model's RoPE scaling is one the engine implements, with the parameters it needs.",
        f"serve a model whose RoPE scaling is one of {', '.join(ROPE_PARAMETERS)}, with its parameters set",
    ),
    (
        Capability.QUANTIZATION,
        "The model is not quantized (the engine runs unquantized weights only).",
        "serve the model's unquantized (float16, bfloat16 or float32) checkpoint",
    ),
    (
        Capability.DTYPE,
        "The model's weights are in a floating-point dtype the engine loads.",
        f"serve a checkpoint whose dtype is one of {', '.join(DTYPES)}",
    ),
]:
    rule(f"model.{capability}-unsupported", keys=["model.path"], fix=fix, summary=summary)(_capability(capability))


@rule(
    "tokenizer.path-missing",
    keys=["tokenizer.path"],
    fix="set tokenizer.path to a directory with tokenizer.json (or unset it to use model.path)",
)
def _tokenizer_missing(c: DaemonSettings, f: Facts) -> CheckResult:
    """The tokenizer directory exists and holds tokenizer files."""
    if c.tokenizer.path == c.model.path and isinstance(f.model(c.model.path), ModelDirError):
        return None  # the model.* rule that failed already says what is wrong with this directory
    return f.tokenizer_problem(c.tokenizer.path) if c.tokenizer.path else None


@rule(
    "model.served-name-colon",
    keys=["model.served_model_name"],
    fix="choose a served_model_name without ':' (it is reserved for model:adapter names)",
)
def _served_name(c: DaemonSettings, f: Facts) -> CheckResult:
    """Served model names contain no ':'."""
    if c.model.served_model_name and ":" in c.model.served_model_name:
        return f"served_model_name {c.model.served_model_name!r} contains ':'"


schema_rule(
    "model.tp-size-min", keys=["model.tp_size"], summary="tp_size is at least 1.", fix="use 1 or more", errors=LOWER
)


@rule(
    "model.tp-divides-heads",
    keys=["model.tp_size", "model.path"],
    fix="use a tp_size that divides the model's attention heads, and divides or is a multiple of its KV heads",
)
def _tp_heads(c: DaemonSettings, f: Facts) -> CheckResult:
    """tp_size divides the attention heads, and divides or is a multiple of the KV heads (each held by some ranks)."""
    info = model_info(f, c)
    tp = c.model.tp_size
    if info is None or tp == 1:
        return None
    heads, kv_heads = info.num_attention_heads, info.num_key_value_heads
    if heads % tp:
        return f"tp_size {tp} does not divide the model's {heads} attention heads"
    if kv_heads % tp and tp % kv_heads:
        return f"tp_size {tp} neither divides nor is a multiple of the model's {kv_heads} KV heads"


@rule(
    "model.cuda-unavailable",
    keys=["model.device"],
    fix='set model.device = "auto" or "cpu", or run on a host with a working CUDA GPU and PyTorch',
)
def _cuda_unavailable(c: DaemonSettings, f: Facts) -> CheckResult:
    """device = cuda needs a visible CUDA GPU."""
    if c.model.device == "cuda" and (probe := f.cuda) is not None and probe.devices == 0:
        return f"device is cuda but {probe.reason}"


@rule(
    "model.tp-exceeds-gpus",
    keys=["model.tp_size", "model.device", "distributed.nnodes", "model.dp_size"],
    fix="lower tp_size (or dp_size) to the GPUs this node can see (CUDA_VISIBLE_DEVICES), or spread over more nodes",
)
def _tp_gpus(c: DaemonSettings, f: Facts) -> CheckResult:
    """With device = cuda, this node's share of tp_size times dp_size (replicas on GPUs of their own) fits its GPUs."""
    if c.model.device != "cuda" or (probe := f.cuda) is None or probe.devices == 0:
        return None
    per_replica = -(-c.model.tp_size // c.distributed.nnodes)
    needed = per_replica * c.model.dp_size
    if needed <= probe.devices:
        return None
    if c.model.dp_size == 1:
        return f"tp_size {c.model.tp_size} needs {needed} GPUs on this node but {probe.devices} are visible"
    return (
        f"dp_size {c.model.dp_size} replicas of tp_size {c.model.tp_size} need {needed} GPUs on this node "
        f"but {probe.devices} are visible"
    )


@rule(
    "model.context-exceeds-model",
    keys=["model.context_length", "model.path"],
    fix="lower model.context_length to the model's maximum, or unset it",
)
def _context_exceeds(c: DaemonSettings, f: Facts) -> CheckResult:
    """context_length is within the model's maximum (max_position_embeddings, as RoPE scaling extends it)."""
    info = model_info(f, c)
    limit = info.max_context if info else None
    if c.model.context_length and limit and c.model.context_length > limit:
        return f"context_length {c.model.context_length} exceeds the model's maximum of {limit}"


@rule(
    "model.half-on-cpu",
    keys=["model.dtype", "model.device"],
    severity=Severity.WARNING,
    fix="use dtype float32 or bfloat16 on CPU",
)
def _half_on_cpu(c: DaemonSettings, f: Facts) -> CheckResult:
    """float16 on CPU is slow and loses precision."""
    if c.model.device == "cpu" and c.model.dtype == "float16":
        return "dtype float16 on device cpu is slow and imprecise"
