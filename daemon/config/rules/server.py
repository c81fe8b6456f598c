"""The HTTP front-end: listener address, port, worker counts, exposure, port conflicts."""

from __future__ import annotations

from collections.abc import Iterator

from daemon.config.errors import Severity
from daemon.config.facts import Facts
from daemon.config.rules.addresses import is_ip_or_hostname, is_loopback, parse_host_port
from daemon.config.rules.catalogue import LOWER, UPPER, CheckResult, Finding, rule, schema_rule
from daemon.config.schema import DaemonSettings

schema_rule(
    "server.port-range",
    keys=["server.port"],
    summary="The HTTP port is in 1..65535.",
    fix="use a port between 1 and 65535",
    errors=LOWER | UPPER,
)
schema_rule(
    "server.http2-streams-range",
    keys=["server.http2_max_concurrent_streams"],
    summary="The HTTP/2 concurrent-stream limit is in 1..2^32-1.",
    fix="use a value between 1 and 4294967295",
    errors=LOWER | UPPER,
)
schema_rule(
    "workers.min",
    keys=["server.workers", "tokenizer.workers"],
    summary="Every worker pool has at least one process.",
    fix="use 1 or more",
    errors=LOWER,
)


@rule(
    "server.host-invalid",
    keys=["server.host"],
    fix="use an IP address (127.0.0.1, 0.0.0.0, ::) or a host name of letters, digits, '-' and '.'",
)
def _host_invalid(c: DaemonSettings, f: Facts) -> CheckResult:
    """The listen address is an IP address or a valid host name."""
    if not is_ip_or_hostname(c.server.host):
        return f"{c.server.host!r} is neither an IP address nor a host name"


@rule(
    "server.public-without-api-key",
    keys=["server.host", "server.api_key"],
    severity=Severity.WARNING,
    fix="set server.api_key (e.g. from DAEMON_SERVER__API_KEY), or listen on 127.0.0.1",
)
def _public_without_key(c: DaemonSettings, f: Facts) -> CheckResult:
    """Listening beyond loopback without an API key lets anyone who can reach the port use the model."""
    if is_ip_or_hostname(c.server.host) and not is_loopback(c.server.host) and c.server.api_key is None:
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
    parsed = parse_host_port(c.distributed.dist_init_addr) if c.distributed.dist_init_addr else None
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
