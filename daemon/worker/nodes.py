"""A tensor-parallel group spread over several machines (distributed.nnodes > 1).

Every node runs `daemon -c` on the same file; node 0 runs every tier, and each other node runs
only its worker (node_worker.py). The model's tp_size ranks are split evenly: node k holds ranks
k·per_node .. k·per_node + per_node - 1, and the first of them is the worker its supervisor
starts, which starts the others, as rank 0 does on one machine (tensor_group.py).

They meet at distributed.dist_init_addr, a torch.distributed TCPStore that node 0's rank 0
serves. Before the process group forms, each other node's worker posts there the digest of
every setting the group computes with, and the ranks it brings; node 0 compares the digests
with its own, and answers ok, or refused with the keys that differ, which both sides log. A
refused node, like one whose group ended, exits with tier.EXIT_REGROUP: its supervisor starts it
again (not counted as a crash), and it meets the head's next group, once both run one config.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
import structlog

from daemon.config.schema import SETTINGS, Reload, flat_values
from daemon.ipc.messages import ModelRank

if TYPE_CHECKING:
    import torch.distributed as dist

    from daemon.config.schema import DaemonSettings

log = structlog.get_logger("daemon.worker")

POLL_S = 0.2  # how often node 0 looks for the other nodes' arrivals
# Besides the worker's own settings, the group's shape: node_rank differs by design.
GROUP_KEYS = ("distributed.nnodes", "distributed.dist_init_addr")
# Worker settings each node may set for itself: where it keeps its files, its CPUs, its ports.
NODE_OWN = ("runtime.cache_dir", "model.cpu_threads", "distributed.nccl_port")


class NodeRefused(RuntimeError):
    """Node 0 refused this node: their configs differ."""


@dataclass(frozen=True)
class NodeLayout:
    """Which ranks of the group a node holds."""

    nnodes: int
    node: int
    per_node: int

    @property
    def first_rank(self) -> int:
        return self.node * self.per_node

    @property
    def ranks(self) -> range:
        return range(self.first_rank, self.first_rank + self.per_node)


def node_layout(settings: DaemonSettings) -> NodeLayout:
    nodes = settings.distributed
    return NodeLayout(nodes.nnodes, nodes.node_rank, settings.model.tp_size // nodes.nnodes)


def group_digests(settings: DaemonSettings) -> dict[str, str]:
    """A digest of each setting the group computes with (the worker's), by key: compared across
    nodes, they name what differs without sending a value (a secret) over the network."""
    values = flat_values(settings, reveal_secrets=True)
    keys = [
        key
        for key, info in SETTINGS.items()
        if (info.reload is Reload.WORKER or key in GROUP_KEYS) and key not in NODE_OWN
    ]
    return {key: _digest(values[key]) for key in keys}


def group_hash(digests: dict[str, str]) -> str:
    return _digest(sorted(digests.items()))[:16]


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


class Arrival(msgspec.Struct, frozen=True):
    """What a node posts when it arrives: its settings' digests and the ranks it brings."""

    node: int
    digests: dict[str, str]
    ranks: list[ModelRank]


def _key(node: int, attempt: int, what: str) -> str:
    return f"daemon/node/{node}/{attempt}/{what}"


def arrive(store: dist.Store, settings: DaemonSettings, ranks: list[ModelRank]) -> None:
    """Node k > 0: post this node's arrival, and wait for node 0's answer. NodeRefused if it refused."""
    node = settings.distributed.node_rank
    attempt = store.add(f"daemon/node/{node}/attempts", 1)  # node 0 answers the latest only
    digests = group_digests(settings)
    store.set(_key(node, attempt, "arrival"), msgspec.json.encode(Arrival(node, digests, ranks)))
    store.wait([_key(node, attempt, "answer")])
    answer = store.get(_key(node, attempt, "answer")).decode()
    if answer != "ok":
        log.error("worker.node_refused", node=node, config_hash=group_hash(digests), reason=answer)
        raise NodeRefused(answer)
    log.info("worker.node_accepted", node=node, config_hash=group_hash(digests))


def gather(store: dist.Store, settings: DaemonSettings) -> list[ModelRank]:
    """Node 0: wait until every other node arrived with the same config; the ranks they bring.

    A node that differs is refused (it will come again, perhaps after its own reload); the
    wait has no end of its own: the supervisor's startup timeout bounds it."""
    mine = group_digests(settings)
    waiting = set(range(1, settings.distributed.nnodes))
    answered = dict.fromkeys(waiting, 0)
    ranks: dict[int, list[ModelRank]] = {}
    while waiting:
        for node in sorted(waiting):
            attempt = store.add(f"daemon/node/{node}/attempts", 0)
            if attempt <= answered[node] or not store.check([_key(node, attempt, "arrival")]):
                continue
            answered[node] = attempt
            arrival = msgspec.json.decode(store.get(_key(node, attempt, "arrival")), type=Arrival)
            differing = sorted(k for k in mine.keys() | arrival.digests.keys() if mine.get(k) != arrival.digests.get(k))
            if differing:
                reason = (
                    f"node {node}'s config (hash {group_hash(arrival.digests)}) differs from node 0's "
                    f"(hash {group_hash(mine)}) at {', '.join(differing)}"
                )
                log.error("worker.node_refused", node=node, reason=reason)
                store.set(_key(node, attempt, "answer"), reason)
                continue
            store.set(_key(node, attempt, "answer"), "ok")
            log.info("worker.node_joined", node=node, config_hash=group_hash(mine), ranks=len(arrival.ranks))
            ranks[node] = arrival.ranks
            waiting.discard(node)
        if waiting:
            time.sleep(POLL_S)
    return [rank for node in sorted(ranks) for rank in ranks[node]]


def node_plan(settings: DaemonSettings) -> dict:
    """What this node runs, as `daemon check` shows it (several nodes only); `group_hash` must be
    the same on every node, or node 0 refuses the others."""
    layout = node_layout(settings)
    head = layout.node == 0
    return {
        "node_rank": layout.node,
        "nnodes": layout.nnodes,
        "tiers": ["worker", "scheduler", "tokenizer", "frontend"] if head else ["worker"],
        "ranks": list(layout.ranks),
        "tp_size": settings.model.tp_size,
        ("serves_group_at" if head else "joins_group_at"): settings.distributed.dist_init_addr,
        "group_hash": group_hash(group_digests(settings)),
    }


def describe_plan(plan: dict) -> str:
    ranks = plan["ranks"]
    span = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    if plan["node_rank"] == 0:
        what = f"every tier, and {span} of {plan['tp_size']}; the group meets here, at {plan['serves_group_at']}"
    else:
        what = f"only its worker, {span} of {plan['tp_size']}, joining node 0 at {plan['joins_group_at']}"
    return f"node {plan['node_rank']} of {plan['nnodes']} runs {what} (group config hash {plan['group_hash']})"
