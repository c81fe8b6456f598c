"""Several nodes: ranks, the rendezvous address, how tensor parallelism spreads over nodes."""

from __future__ import annotations

from daemon.config.errors import Severity
from daemon.config.facts import Facts
from daemon.config.rules.addresses import parse_host_port
from daemon.config.rules.catalogue import CheckResult, rule
from daemon.config.schema import DaemonSettings


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
    if addr and parse_host_port(addr) is None:
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


@rule(
    "distributed.one-replica-over-nodes",
    keys=["model.dp_size", "distributed.nnodes"],
    fix="use dp_size = 1 with nnodes > 1 (one tensor-parallel group spans the nodes)",
)
def _one_replica(c: DaemonSettings, f: Facts) -> CheckResult:
    """Spread over several nodes, the model runs as one replica: its group spans them all."""
    if c.distributed.nnodes > 1 and c.model.dp_size > 1:
        return f"dp_size {c.model.dp_size} with nnodes {c.distributed.nnodes}: a model spread over nodes is one replica"


@rule(
    "distributed.no-blue-green-over-nodes",
    keys=["runtime.model_reload", "distributed.nnodes"],
    fix='use runtime.model_reload = "drain" (or "rolling", which is drain for one replica) with nnodes > 1',
)
def _no_blue_green(c: DaemonSettings, f: Facts) -> CheckResult:
    """A group spanning nodes meets at dist_init_addr: a second group cannot meet there beside it."""
    if c.distributed.nnodes > 1 and c.runtime.model_reload == "blue_green":
        return (
            "model_reload blue_green with nnodes > 1: the new worker group would have to meet at "
            "dist_init_addr while the serving one holds it"
        )
