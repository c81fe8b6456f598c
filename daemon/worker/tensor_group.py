"""A tensor-parallel worker group: the worker the supervisor starts is rank 0, and it starts the others.

With model.tp_size N, the model is split over N processes (engine/parallel.py). Rank 0 is the
worker tier's process as before: it alone speaks ZeroMQ, to the scheduler and the supervisor.
It starts ranks 1..N-1 as its own children (`python -m daemon.worker.follower RANK`), in its
process group, so whatever stops or kills it stops them too. Each step, rank 0 sends the
step's resolved chunks (last step's tokens filled in) to the others by a torch.distributed
broadcast, and all ranks run the forward pass together; only rank 0 samples.

The group lives and dies as one. A rank that exits ends rank 0 (a thread watches their
processes), which the supervisor restarts with a new group; rank 0's exit ends the others
(tier.guard watches the spawner). When nothing runs, rank 0 broadcasts a keep-alive now and
then, so that the others' wait never reaches the collective timeout.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from daemon.tier import EXIT_REGROUP, SPAWNER_VAR

if TYPE_CHECKING:
    import torch
    import torch.distributed as dist

    from daemon.config.schema import DaemonSettings
    from daemon.engine.parallel import Parallel
    from daemon.engine.runner import ModelRunner, SequenceChunk
    from daemon.ipc.messages import ModelRank

log = structlog.get_logger("daemon.worker")

GROUP_VAR = "DAEMON_TP_INIT"  # where its group meets: init_method, or tcp://host:port (several nodes)
TCP = "tcp://"
# A collective that waits longer fails (and the group restarts) rather than hang: longer than
# any one step can take, and the followers' idle wait is cut short by keep-alives well before.
COLLECTIVE_TIMEOUT_S = 600.0
KEEPALIVE_S = 60.0
# Over several nodes, more often: a node that left (stopped, restarted, or refused and come again)
# is noticed at the next one, so the group re-forms while nothing runs, not at the next request.
NODES_KEEPALIVE_S = 1.0
EXIT_RANK_LOST = 1


class GroupBroken(RuntimeError):
    """A rank of the group is gone, or a step failed part-way through its collectives."""


def init_method(socket_dir: Path, epoch: int) -> str:
    """Where a group on one machine meets: a file in the daemon's private socket directory, one
    per worker epoch (two groups may run at once, in a blue-green reload)."""
    return f"file://{socket_dir / f'tp-group-{epoch}'}"


def meeting_place(where: str, rank: int) -> str | dist.Store:
    """What join_group needs for the group that meets at `where`: an init method as it is, or the
    store of a group over several machines ("tcp://host:port", served by rank 0: nodes.py)."""
    if not where.startswith(TCP):
        return where
    from daemon.engine.parallel import open_store

    return open_store(where.removeprefix(TCP), master=rank == 0, timeout_s=COLLECTIVE_TIMEOUT_S)


def device_type(settings: DaemonSettings) -> str:
    from daemon.engine.runner import resolve_device

    return resolve_device(settings.model.device).type


def group_ranks(settings: DaemonSettings, device: torch.device, pids: list[int], first: int = 0) -> list[ModelRank]:
    """What the status shows of each rank this node holds (the worker alone at tp_size 1), ranks
    `first`, `first` + 1, ...: its PID and device (the ranks of a node use its CUDA devices in turn)."""
    from daemon.ipc.messages import ModelRank

    node = settings.distributed.node_rank
    if settings.model.tp_size == 1:
        return [ModelRank(0, pids[0], str(device), node)]
    devices = [f"cuda:{local}" if device.type == "cuda" else device.type for local in range(len(pids))]
    return [ModelRank(first + i, pid, dev, node) for i, (pid, dev) in enumerate(zip(pids, devices, strict=True))]


class Followers:
    """A node's first rank's handle on its other ranks (`ranks`): started together, watched,
    stopped together."""

    def __init__(self, ranks: range, meeting: str, replica: int):
        self.processes: list[subprocess.Popen] = []
        env = {**os.environ, SPAWNER_VAR: str(os.getpid()), GROUP_VAR: meeting}
        for rank in ranks:
            argv = [sys.executable, "-m", "daemon.worker.follower", str(rank), str(replica)]
            self.processes.append(subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL))
        self._stopping = threading.Event()
        # Watched from a thread, not the worker's loop: a rank may die while rank 0 waits in a
        # collective for it (loading, or mid-step), and rank 0 must not wait out the timeout.
        threading.Thread(target=self._watch, name="tp-ranks", daemon=True).start()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def _watch(self) -> None:
        exits = {os.pidfd_open(p.pid): p for p in self.processes}
        ready, _, _ = select.select(list(exits), [], [])
        if self._stopping.is_set():
            return
        process = exits[ready[0]]
        process.poll()
        if process.returncode == EXIT_REGROUP:  # its group ended on another node: so does ours
            log.warning("worker.group_ended", rank_pid=process.pid)
            os._exit(EXIT_REGROUP)
        log.error("worker.rank_lost", rank_pid=process.pid, exit_status=process.returncode)
        os._exit(EXIT_RANK_LOST)  # the supervisor restarts the group

    def stop(self) -> None:
        self._stopping.set()
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGKILL)
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)


def lead(parallel: Parallel, chunks: list[SequenceChunk] | None) -> None:
    """Rank 0: send a step's chunks (their tokens resolved) to the other ranks; None keeps them
    awake. Nothing else: they sample nothing, so they keep no state of a sequence to forget."""
    parallel.broadcast_object(chunks)


def follow(parallel: Parallel, runner: ModelRunner) -> None:
    """Ranks 1..N-1: run the steps rank 0 sends, until the group breaks (or this process is stopped)."""
    while True:
        chunks: list[SequenceChunk] | None = parallel.broadcast_object(None)
        if chunks is not None:
            runner.follow(chunks)
