"""The rule catalogue: every cross-field and host check a configuration must pass.

Adapted from the checks SGLang's server arguments enforce, plus the ones it
lacks. Each rule is data: a stable id (used in output, docs and tests), the
keys it reads, a severity, what it requires and how to fix a violation. A rule
whose `check` is None is enforced by the bounds of its keys in the schema; it is
listed here so that the catalogue is complete and schema errors on those keys
carry its id and fix. `LIFTED` lists limits SGLang has that daemon does not.
"""

from __future__ import annotations

import inspect
import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from daemon.config.errors import Severity
from daemon.config.facts import Facts
from daemon.config.schema import DaemonSettings
from daemon.engine.model_dir import SUPPORTED_ARCHITECTURES, ModelDirError, ModelInfo, Problem

# Longest socket name the IPC layer appends to runtime.dir ("/daemon-<pid>/<tier>-<n>.ipc"),
# and the kernel's limit on a Unix socket path (sun_path is 108 bytes with the NUL).
IPC_NAME_BUDGET = 48
UNIX_SOCKET_PATH_MAX = 107


@dataclass(frozen=True)
class Finding:
    message: str
    key: str | None = None  # the key to blame, when it is not the rule's first key


CheckResult = str | Finding | Iterable[Finding] | None
Check = Callable[[DaemonSettings, Facts], CheckResult]


@dataclass(frozen=True)
class Rule:
    id: str
    keys: tuple[str, ...]
    severity: Severity
    summary: str  # what the rule requires
    fix: str  # how to fix a violation
    check: Check | None = None  # None: enforced by the schema's bounds on `keys`
    schema_errors: frozenset[str] = frozenset()  # for schema-enforced rules: the pydantic error types they cover

    def findings(self, config: DaemonSettings, facts: Facts) -> list[Finding]:
        assert self.check is not None
        result = self.check(config, facts)
        if not result:
            return []
        if isinstance(result, str):
            return [Finding(result)]
        if isinstance(result, Finding):
            return [result]
        return list(result)


@dataclass(frozen=True)
class LiftedLimit:
    """A combination SGLang refuses that daemon supports."""

    id: str
    keys: tuple[str, ...]
    sglang: str  # what SGLang does
    why: str  # why daemon can support it


RULES: list[Rule] = []


def rule(id: str, *, keys: Iterable[str], fix: str, severity: Severity = Severity.ERROR) -> Callable[[Check], Check]:
    """Register a check; its docstring is the rule's summary."""

    def register(check: Check) -> Check:
        RULES.append(Rule(id, tuple(keys), severity, inspect.getdoc(check) or "", fix, check))
        return check

    return register


_LOWER = frozenset({"greater_than_equal", "greater_than"})
_UPPER = frozenset({"less_than_equal", "less_than", "finite_number"})
_CHOICE = frozenset({"literal_error"})


def schema_rule(id: str, *, keys: Iterable[str], summary: str, fix: str, errors: frozenset[str]) -> None:
    RULES.append(Rule(id, tuple(keys), Severity.ERROR, summary, fix, schema_errors=errors))


# --- TLS ---------------------------------------------------------------------------------------


@rule(
    "tls.key-without-cert",
    keys=["server.tls.keyfile", "server.tls.certfile"],
    fix="set server.tls.certfile to the certificate of that key, or remove server.tls.keyfile",
)
def _key_without_cert(c: DaemonSettings, f: Facts) -> CheckResult:
    """A TLS private key needs its certificate."""
    if c.server.tls.keyfile and not c.server.tls.certfile:
        return "keyfile is set but certfile is not"


@rule(
    "tls.cert-without-key",
    keys=["server.tls.certfile", "server.tls.keyfile"],
    fix="set server.tls.keyfile to the certificate's private key, or remove server.tls.certfile",
)
def _cert_without_key(c: DaemonSettings, f: Facts) -> CheckResult:
    """A TLS certificate needs its private key."""
    if c.server.tls.certfile and not c.server.tls.keyfile:
        return "certfile is set but keyfile is not"


@rule(
    "tls.ca-without-cert",
    keys=["server.tls.ca_certs", "server.tls.certfile", "server.tls.keyfile"],
    fix="set server.tls.certfile and server.tls.keyfile, or remove server.tls.ca_certs",
)
def _ca_without_cert(c: DaemonSettings, f: Facts) -> CheckResult:
    """Client-certificate authorities only mean something when TLS is on (certfile and keyfile)."""
    tls = c.server.tls
    if tls.ca_certs and not (tls.certfile and tls.keyfile):
        return "ca_certs is set but TLS is off (certfile and keyfile are not both set)"


@rule(
    "tls.password-without-key",
    keys=["server.tls.keyfile_password", "server.tls.keyfile"],
    fix="set server.tls.keyfile (and certfile), or remove server.tls.keyfile_password",
)
def _password_without_key(c: DaemonSettings, f: Facts) -> CheckResult:
    """A key password needs an encrypted keyfile to open."""
    if c.server.tls.keyfile_password and not c.server.tls.keyfile:
        return "keyfile_password is set but there is no keyfile"


@rule(
    "tls.refresh-without-cert",
    keys=["server.tls.refresh", "server.tls.certfile", "server.tls.keyfile"],
    fix="set server.tls.certfile and server.tls.keyfile, or set server.tls.refresh = false",
)
def _refresh_without_cert(c: DaemonSettings, f: Facts) -> CheckResult:
    """Certificate refresh watches certfile and keyfile, so both must be set."""
    tls = c.server.tls
    if tls.refresh and not (tls.certfile and tls.keyfile):
        return "refresh is on but certfile and keyfile are not both set"


@rule(
    "tls.verify-client-without-ca",
    keys=["server.tls.verify_client", "server.tls.ca_certs"],
    fix="set server.tls.ca_certs to the CA bundle that signs client certificates, or set verify_client = false",
)
def _verify_client_without_ca(c: DaemonSettings, f: Facts) -> CheckResult:
    """Verifying client certificates needs the authorities that sign them."""
    if c.server.tls.verify_client and not c.server.tls.ca_certs:
        return "verify_client is on but ca_certs is not set"


@rule(
    "tls.ca-certs-unused",
    keys=["server.tls.ca_certs", "server.tls.verify_client"],
    severity=Severity.WARNING,
    fix="set server.tls.verify_client = true to require client certificates, or remove ca_certs",
)
def _ca_unused(c: DaemonSettings, f: Facts) -> CheckResult:
    """ca_certs only takes effect with verify_client."""
    tls = c.server.tls
    if tls.ca_certs and tls.certfile and tls.keyfile and not tls.verify_client:
        return "ca_certs is set but verify_client is off, so client certificates are not checked"


@rule(
    "tls.file-missing",
    keys=["server.tls.certfile", "server.tls.keyfile", "server.tls.ca_certs"],
    fix="correct the path, or create the file (readable by the daemon's user) before starting",
)
def _tls_files(c: DaemonSettings, f: Facts) -> Iterator[Finding]:
    """Certificate, key and CA files must exist and be readable, checked before anything loads."""
    for name in ("certfile", "keyfile", "ca_certs"):
        path = getattr(c.server.tls, name)
        if path and (problem := f.file_problem(path)):
            yield Finding(problem, f"server.tls.{name}")


@rule(
    "tls.cert-invalid",
    keys=["server.tls.certfile", "server.tls.keyfile", "server.tls.keyfile_password"],
    fix="point certfile and keyfile at a PEM certificate and its matching private key "
    "(and set keyfile_password if the key is encrypted)",
)
def _cert_invalid(c: DaemonSettings, f: Facts) -> CheckResult:
    """The certificate and key must load together, as the front-end will load them."""
    tls = c.server.tls
    if not (tls.certfile and tls.keyfile) or f.file_problem(tls.certfile) or f.file_problem(tls.keyfile):
        return None
    password = tls.keyfile_password.get_secret_value() if tls.keyfile_password else None
    if problem := f.tls_problem(tls.certfile, tls.keyfile, password):
        return Finding(problem[1], f"server.tls.{problem[0]}")


@rule("tls.ca-invalid", keys=["server.tls.ca_certs"], fix="point ca_certs at a PEM bundle of CA certificates")
def _ca_invalid(c: DaemonSettings, f: Facts) -> CheckResult:
    """The client CA bundle must hold PEM certificates."""
    ca = c.server.tls.ca_certs
    if ca and not f.file_problem(ca):
        return f.ca_problem(ca)


# --- HTTP front-end ----------------------------------------------------------------------------

schema_rule(
    "server.port-range",
    keys=["server.port"],
    summary="The HTTP port is in 1..65535.",
    fix="use a port between 1 and 65535",
    errors=_LOWER | _UPPER,
)
schema_rule(
    "server.http2-streams-range",
    keys=["server.http2_max_concurrent_streams"],
    summary="The HTTP/2 concurrent-stream limit is in 1..2^32-1.",
    fix="use a value between 1 and 4294967295",
    errors=_LOWER | _UPPER,
)
schema_rule(
    "workers.min",
    keys=["server.workers", "tokenizer.workers"],
    summary="Every worker pool has at least one process.",
    fix="use 1 or more",
    errors=_LOWER,
)

_HOSTNAME = re.compile(r"^(?=.{1,253}$)(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?$")


def _is_ip_or_hostname(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return bool(_HOSTNAME.match(host))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@rule(
    "server.host-invalid",
    keys=["server.host"],
    fix="use an IP address (127.0.0.1, 0.0.0.0, ::) or a host name of letters, digits, '-' and '.'",
)
def _host_invalid(c: DaemonSettings, f: Facts) -> CheckResult:
    """The listen address is an IP address or a valid host name."""
    if not _is_ip_or_hostname(c.server.host):
        return f"{c.server.host!r} is neither an IP address nor a host name"


@rule(
    "server.public-without-api-key",
    keys=["server.host", "server.api_key"],
    severity=Severity.WARNING,
    fix="set server.api_key (e.g. from DAEMON_SERVER__API_KEY), or listen on 127.0.0.1",
)
def _public_without_key(c: DaemonSettings, f: Facts) -> CheckResult:
    """Listening beyond loopback without an API key lets anyone who can reach the port use the model."""
    if _is_ip_or_hostname(c.server.host) and not _is_loopback(c.server.host) and c.server.api_key is None:
        return f"listening on {c.server.host} with no api_key: anyone who reaches the port can use the model"


@rule(
    "server.privileged-port",
    keys=["server.port"],
    severity=Severity.WARNING,
    fix="use a port >= 1024, or grant CAP_NET_BIND_SERVICE (systemd: AmbientCapabilities=CAP_NET_BIND_SERVICE)",
)
def _privileged_port(c: DaemonSettings, f: Facts) -> CheckResult:
    """Ports below 1024 need root or CAP_NET_BIND_SERVICE."""
    if c.server.port < 1024 and f.may_bind_privileged_ports is False:
        return f"port {c.server.port} is privileged and this user is not root"


def _dist_init_port(c: DaemonSettings) -> int | None:
    parsed = _parse_host_port(c.distributed.dist_init_addr) if c.distributed.dist_init_addr else None
    return parsed[1] if parsed else None


@rule(
    "ports.conflict",
    keys=["server.port", "distributed.nccl_port", "distributed.dist_init_addr"],
    fix="give every listener of this node its own port",
)
def _port_conflict(c: DaemonSettings, f: Facts) -> Iterator[Finding]:
    """The node's listeners (HTTP, GPU-worker rendezvous, node-0 rendezvous) use distinct ports."""
    listeners = {"server.port": c.server.port, "distributed.nccl_port": c.distributed.nccl_port}
    if c.distributed.node_rank == 0:  # node 0 is the one listening on dist_init_addr
        listeners["distributed.dist_init_addr"] = _dist_init_port(c)
    seen: dict[int, str] = {}
    for key, port in listeners.items():
        if port is None:
            continue
        if port in seen:
            yield Finding(f"{key} uses port {port}, already used by {seen[port]}", key)
        else:
            seen[port] = key


# --- tokenizer and model -----------------------------------------------------------------------


def _model_problem(f: Facts, c: DaemonSettings, problem: Problem) -> str | None:
    info = f.model(c.model.path)
    if isinstance(info, ModelDirError) and info.problem is problem:
        return info.message
    return None


def _model_info(f: Facts, c: DaemonSettings) -> ModelInfo | None:
    info = f.model(c.model.path)
    return info if isinstance(info, ModelInfo) else None


@rule(
    "model.path-missing",
    keys=["model.path"],
    fix="set model.path to a local Hugging Face model directory, or builtin:demo",
)
def _model_missing(c: DaemonSettings, f: Facts) -> CheckResult:
    """model.path names an existing directory or a built-in model."""
    return _model_problem(f, c, Problem.MISSING)


@rule(
    "model.config-invalid",
    keys=["model.path"],
    fix="point model.path at a complete Hugging Face model directory (its config.json must be intact)",
)
def _model_config(c: DaemonSettings, f: Facts) -> CheckResult:
    """The model directory has a readable config.json with the model's dimensions."""
    return _model_problem(f, c, Problem.CONFIG)


@rule("model.weights-missing", keys=["model.path"], fix="copy the missing safetensors files into the model directory")
def _weights_missing(c: DaemonSettings, f: Facts) -> CheckResult:
    """Every safetensors shard of the model (per its index) is present."""
    return _model_problem(f, c, Problem.WEIGHTS_MISSING)


@rule(
    "model.weights-corrupt",
    keys=["model.path"],
    fix="download or copy the damaged shard again; its size or header does not match",
)
def _weights_corrupt(c: DaemonSettings, f: Facts) -> CheckResult:
    """Every safetensors shard has a valid header and all its tensor data."""
    return _model_problem(f, c, Problem.WEIGHTS_CORRUPT)


@rule(
    "model.architecture-unsupported",
    keys=["model.path"],
    fix=f"serve a model of a supported architecture: {', '.join(SUPPORTED_ARCHITECTURES)}",
)
def _architecture(c: DaemonSettings, f: Facts) -> CheckResult:
    """The model's architecture is one the engine implements (the Llama family)."""
    info = _model_info(f, c)
    if info and not set(info.architectures) & set(SUPPORTED_ARCHITECTURES):
        return f"config.json architectures {list(info.architectures)} are not supported"


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
    "model.tp-size-min", keys=["model.tp_size"], summary="tp_size is at least 1.", fix="use 1 or more", errors=_LOWER
)


@rule(
    "model.tp-divides-heads",
    keys=["model.tp_size", "model.path"],
    fix="use a tp_size that divides both the model's attention heads and its KV heads",
)
def _tp_heads(c: DaemonSettings, f: Facts) -> CheckResult:
    """tp_size divides the model's attention heads and KV heads, so each GPU holds whole heads."""
    info = _model_info(f, c)
    tp = c.model.tp_size
    if info and (info.num_attention_heads % tp or info.num_key_value_heads % tp):
        return (
            f"tp_size {tp} does not divide the model's {info.num_attention_heads} attention heads "
            f"and {info.num_key_value_heads} KV heads"
        )


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
    keys=["model.tp_size", "model.device", "distributed.nnodes"],
    fix="lower tp_size to the GPUs this node can see (CUDA_VISIBLE_DEVICES), or spread over more nodes",
)
def _tp_gpus(c: DaemonSettings, f: Facts) -> CheckResult:
    """With device = cuda, this node's share of tp_size fits in its visible GPUs."""
    if c.model.device != "cuda" or (probe := f.cuda) is None or probe.devices == 0:
        return None
    per_node = -(-c.model.tp_size // c.distributed.nnodes)
    if per_node > probe.devices:
        return f"tp_size {c.model.tp_size} needs {per_node} GPUs on this node but {probe.devices} are visible"


@rule(
    "model.context-exceeds-model",
    keys=["model.context_length", "model.path"],
    fix="lower model.context_length to the model's max_position_embeddings, or unset it",
)
def _context_exceeds(c: DaemonSettings, f: Facts) -> CheckResult:
    """context_length is within the model's maximum (max_position_embeddings)."""
    info = _model_info(f, c)
    limit = info.max_position_embeddings if info else None
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


# --- scheduler ---------------------------------------------------------------------------------

schema_rule(
    "scheduler.policy-choice",
    keys=["scheduler.policy"],
    summary="The scheduling policy is fcfs, lof or priority.",
    fix="use fcfs, lof or priority",
    errors=_CHOICE,
)
schema_rule(
    "scheduler.mem-fraction-range",
    keys=["scheduler.mem_fraction_static"],
    summary="mem_fraction_static is strictly between 0 and 1.",
    fix="use a fraction such as 0.85",
    errors=_LOWER | _UPPER,
)


def _context_length(c: DaemonSettings, f: Facts) -> int | None:
    if c.model.context_length:
        return c.model.context_length
    info = _model_info(f, c)
    return info.max_position_embeddings if info else None


@rule(
    "scheduler.total-tokens-below-context",
    keys=["scheduler.max_total_tokens", "model.context_length"],
    fix="raise scheduler.max_total_tokens to at least the context length, or lower model.context_length",
)
def _total_below_context(c: DaemonSettings, f: Facts) -> CheckResult:
    """The KV cache holds at least one full-length request (max_total_tokens >= context length)."""
    total, context = c.scheduler.max_total_tokens, _context_length(c, f)
    if total and context and total < context:
        return f"max_total_tokens {total} is less than the context length {context}"


@rule(
    "scheduler.chunked-prefill-size",
    keys=["scheduler.chunked_prefill_size"],
    fix="use a positive chunk size such as 2048, or -1 to disable chunked prefill",
)
def _chunked_prefill(c: DaemonSettings, f: Facts) -> CheckResult:
    """chunked_prefill_size is positive, or -1 (off)."""
    size = c.scheduler.chunked_prefill_size
    if size == 0 or size < -1:
        return f"chunked_prefill_size {size} is neither positive nor -1"


@rule(
    "scheduler.chunk-exceeds-cache",
    keys=["scheduler.chunked_prefill_size", "scheduler.max_total_tokens"],
    severity=Severity.WARNING,
    fix="lower chunked_prefill_size to at most max_total_tokens",
)
def _chunk_exceeds_cache(c: DaemonSettings, f: Facts) -> CheckResult:
    """A prefill chunk fits in the KV cache."""
    size, total = c.scheduler.chunked_prefill_size, c.scheduler.max_total_tokens
    if total and size > total:
        return f"chunked_prefill_size {size} exceeds max_total_tokens {total}; chunks will be capped"


@rule(
    "scheduler.running-exceeds-cache",
    keys=["scheduler.max_running_requests", "scheduler.max_total_tokens"],
    severity=Severity.WARNING,
    fix="lower max_running_requests, or raise max_total_tokens",
)
def _running_exceeds_cache(c: DaemonSettings, f: Facts) -> CheckResult:
    """Every running request needs KV-cache room, so more running requests than cache tokens cannot happen."""
    running, total = c.scheduler.max_running_requests, c.scheduler.max_total_tokens
    if total and running > total:
        return f"max_running_requests {running} can never be reached with max_total_tokens {total}"


# --- distributed -------------------------------------------------------------------------------


def _parse_host_port(addr: str) -> tuple[str, int] | None:
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]\s]+):(\d{1,5})", addr)
    if not match:
        return None
    host, port = (match[1], match[2]) if match[1] else (match[3], match[4])
    return (host, int(port)) if 1 <= int(port) <= 65535 and _is_ip_or_hostname(host) else None


@rule(
    "distributed.node-rank-range",
    keys=["distributed.node_rank", "distributed.nnodes"],
    fix="use a node_rank from 0 to nnodes - 1",
)
def _node_rank(c: DaemonSettings, f: Facts) -> CheckResult:
    """node_rank is below nnodes."""
    if c.distributed.node_rank >= c.distributed.nnodes:
        return f"node_rank {c.distributed.node_rank} is not below nnodes {c.distributed.nnodes}"


@rule(
    "distributed.init-addr-required",
    keys=["distributed.dist_init_addr", "distributed.nnodes"],
    fix="set distributed.dist_init_addr to node 0's host:port on every node",
)
def _init_addr_required(c: DaemonSettings, f: Facts) -> CheckResult:
    """Several nodes need a rendezvous address."""
    if c.distributed.nnodes > 1 and not c.distributed.dist_init_addr:
        return f"nnodes is {c.distributed.nnodes} but dist_init_addr is not set"


@rule(
    "distributed.init-addr-format",
    keys=["distributed.dist_init_addr"],
    fix="write host:port, e.g. 10.0.0.1:25000 or [fd00::1]:25000",
)
def _init_addr_format(c: DaemonSettings, f: Facts) -> CheckResult:
    """dist_init_addr is host:port with a port in 1..65535."""
    addr = c.distributed.dist_init_addr
    if addr and _parse_host_port(addr) is None:
        return f"dist_init_addr {addr!r} is not host:port"


@rule(
    "distributed.init-addr-unused",
    keys=["distributed.dist_init_addr", "distributed.nnodes"],
    severity=Severity.WARNING,
    fix="remove dist_init_addr, or set nnodes to the number of machines",
)
def _init_addr_unused(c: DaemonSettings, f: Facts) -> CheckResult:
    """dist_init_addr only matters with several nodes."""
    if c.distributed.dist_init_addr and c.distributed.nnodes == 1:
        return "dist_init_addr is set but nnodes is 1"


@rule(
    "distributed.tp-divisible-by-nnodes",
    keys=["model.tp_size", "distributed.nnodes"],
    fix="use a tp_size that is a multiple of nnodes",
)
def _tp_nodes(c: DaemonSettings, f: Facts) -> CheckResult:
    """tp_size splits evenly over the nodes."""
    if c.model.tp_size % c.distributed.nnodes:
        return f"tp_size {c.model.tp_size} is not divisible by nnodes {c.distributed.nnodes}"


# --- runtime -----------------------------------------------------------------------------------


@rule(
    "runtime.dir-too-long",
    keys=["runtime.dir"],
    fix=f"use a runtime.dir of at most {UNIX_SOCKET_PATH_MAX - IPC_NAME_BUDGET} bytes, such as /run/daemon",
)
def _dir_too_long(c: DaemonSettings, f: Facts) -> CheckResult:
    """IPC socket paths under runtime.dir fit the kernel's Unix socket path limit."""
    length = len(os.fsencode(c.runtime.dir)) if c.runtime.dir else 0
    if c.runtime.dir and length + IPC_NAME_BUDGET > UNIX_SOCKET_PATH_MAX:
        return f"runtime.dir is {length} bytes long; socket paths under it would exceed {UNIX_SOCKET_PATH_MAX} bytes"


@rule(
    "runtime.dir-unwritable",
    keys=["runtime.dir"],
    severity=Severity.WARNING,
    fix="create runtime.dir writable by the daemon's user (systemd: RuntimeDirectory=daemon)",
)
def _dir_unwritable(c: DaemonSettings, f: Facts) -> CheckResult:
    """The daemon can create its sockets under runtime.dir."""
    return f.dir_problem(c.runtime.dir) if c.runtime.dir else None


LIFTED: list[LiftedLimit] = [
    LiftedLimit(
        "lifted.http2-with-tls-refresh",
        ("server.enable_http2", "server.tls.refresh"),
        sglang="refuses --enable-http2 with --enable-ssl-refresh: Granian cannot swap certificates in place",
        why="the supervisor owns the listening socket and rotates certificates by starting a new front-end "
        "on it and draining the old one, so HTTP/2 and refresh work together",
    ),
    LiftedLimit(
        "lifted.http2-with-tokenizer-workers",
        ("server.enable_http2", "tokenizer.workers"),
        sglang="refused --enable-http2 with --tokenizer-worker-num > 1 (lifted upstream later)",
        why="tokenizers are their own process pool behind ZeroMQ, independent of the front-end's HTTP mode",
    ),
]

RULES_BY_ID: dict[str, Rule] = {r.id: r for r in RULES}


def schema_rule_for(key: str, error_type: str) -> Rule | None:
    """The catalogue rule that a schema error of this type on `key` enforces, if any."""
    return next((r for r in RULES if key in r.keys and error_type in r.schema_errors), None)
