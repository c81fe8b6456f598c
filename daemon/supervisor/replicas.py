"""The model's data-parallel replicas (model.dp_size), and how a reload replaces them.

Each replica is one worker process, Child("worker", i) (with tp_size > 1, rank 0 of a group
that starts its other ranks): its index is the replica's, its epoch (never reused by any
worker) names its plan socket. The scheduler drives each replica apart, and the arbiter
supervises each alone: one that dies restarts while the others serve.

A reload replaces them as runtime.model_reload (the new config's) says:

- rolling: one replica at a time. The scheduler places nothing new on it and says when its
  running requests are done (bounded by runtime.drain_timeout_s); it stops; a new worker
  starts in its slot; once that one is ready and the scheduler drives it, the next. The others
  serve meanwhile, and no replica's weights are ever loaded twice. With one replica this is
  the drain mode.
- drain: every replica at once, as above; new requests wait in the scheduler meanwhile.
- blue_green: a replica's new worker loads beside it, takes its new requests once up, and the
  old one finishes its own; one replica at a time. A single replica is prepared beside the
  serving tiers by the transaction (reload.py); several are replaced here, in the commit.

A reload that changes dp_size starts the added replicas first and drains and stops the
surplus ones (highest index first) last, so that the model keeps as many replicas serving as
it can throughout. When the replicas' GPUs move (tp_size changes too: each replica takes its
own run of tp_size devices), the surplus go first and the added come last instead, so that
each new worker finds its devices free.

The rollback (reload.py's undo) is the same procedure towards the running config, applied to
the replicas the failed reload started (those started with its generation), those it added
(removed again) and those it removed (started again).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import structlog

from daemon.config.handoff import read_config
from daemon.config.schema import DaemonSettings
from daemon.ipc.messages import EngineBeside, EngineHold, EngineHoldAbandoned, EngineSwitch
from daemon.supervisor.process import STOP_GRACE_S, Child, StartupFailed, TierStartFailed, first_of, kill
from daemon.tier import EXIT_NO_ROOM_BESIDE, STOP_SIGNAL

log = structlog.get_logger("daemon.supervisor")

# A new worker is announcing itself within a second of being ready: the scheduler drives it this
# soon, else a rolling reload goes on without its word (the replica then serves a little later).
JOIN_TIMEOUT_S = 30.0


class SchedulerNews:
    """What the scheduler said of its engines (EngineIdle, EngineJoined), as (replica, epoch) keys
    that a procedure waits for."""

    def __init__(self) -> None:
        self._heard: set[tuple[int, int]] = set()
        self._changed = asyncio.Event()

    def heard(self, key: tuple[int, int]) -> None:
        self._heard.add(key)
        self._changed.set()

    def forget(self, key: tuple[int, int]) -> None:
        self._heard.discard(key)

    async def until(self, key: tuple[int, int], timeout: float, child: Child | None = None) -> str | None:
        """Until `key` is heard ("heard"), the process `child` runs exits ("exited"), or `timeout` s
        pass (None)."""
        deadline = time.monotonic() + timeout
        while key not in self._heard:
            self._changed.clear()  # every waiter wakes on the next news, whoever cleared it
            waits: dict[str, Any] = {"heard": self._changed.wait()}
            if child is not None and child.process is not None:
                waits["exited"] = child.process.wait()
            first = await first_of(max(0.0, deadline - time.monotonic()), **waits)
            if first != "heard":
                return first
        return "heard"


def devices_move(running: DaemonSettings, new: DaemonSettings) -> bool:
    """Whether a replica's GPUs change between two configs: it takes a run of tp_size of them."""
    on_gpus = "cpu" not in (running.model.device, new.model.device)
    return on_gpus and running.model.tp_size != new.model.tp_size


def replica_devices(settings: DaemonSettings, index: int, visible: str | None) -> dict[str, str]:
    """The environment that gives replica `index` its own run of the GPUs `visible`
    (CUDA_VISIBLE_DEVICES, None: all) when several replicas share a machine: each rank of a
    group takes device `rank` of what it sees. Nothing with one replica or on CPU."""
    if settings.model.dp_size == 1 or settings.model.device == "cpu":
        return {}
    per_replica = -(-settings.model.tp_size // settings.distributed.nnodes)
    devices = [d.strip() for d in visible.split(",")] if visible is not None else None
    if devices is None:  # all: numbered from 0
        devices = [str(i) for i in range((index + 1) * per_replica)]
    mine = devices[index * per_replica : (index + 1) * per_replica]
    # too few GPUs (device auto, or none at all): the replica shares what it sees
    return {"CUDA_VISIBLE_DEVICES": ",".join(mine)} if len(mine) == per_replica else {}


class Replicas:
    """Part of the Supervisor (a mixin): the workers of the model's replicas, and replacing them."""

    def replica_indexes(self) -> list[int]:
        return sorted({c.index for c in self.children if c.tier == "worker"})

    def settings_of(self, generation: int) -> DaemonSettings:
        """The settings of `generation` (a reload's new one is handed over before its tiers start)."""
        return self.settings if generation == self.generation else read_config(self.socket_dir, generation)

    async def replace_replicas(
        self,
        generation: int,
        count: int,
        mode: str,
        stale: Callable[[Child], bool] = lambda child: True,
        *,
        devices_move: bool = False,
    ) -> None:
        """Make the model `count` replicas running `generation`: the missing ones started, those
        `stale` replaced as `mode` says (runtime.model_reload), the surplus drained and stopped
        (with `devices_move`, the surplus first and the missing last). TierStartFailed at the first
        that does not come up: the caller undoes what was done."""
        running = self.replica_indexes()
        kept = [i for i in running if i < count and stale(self._child("worker", i))]
        if devices_move:
            await self._remove_surplus(running, count)
        else:
            await self._add_missing(running, count, generation)
        await self._replace_kept(kept, generation, mode)
        if devices_move:
            await self._add_missing(running, count, generation)
        else:
            await self._remove_surplus(running, count)

    async def _add_missing(self, running: list[int], count: int, generation: int) -> None:
        for index in range(count):
            if index not in running:
                self._unless_stopping()
                await self.add_replica(index, generation)

    async def _remove_surplus(self, running: list[int], count: int) -> None:
        for index in reversed([i for i in running if i >= count]):
            self._unless_stopping()
            await self.remove_replica(index)

    async def _replace_kept(self, kept: list[int], generation: int, mode: str) -> None:
        if mode == "drain":
            await self._drain_all(kept, generation)
        else:  # one at a time
            for index in kept:
                self._unless_stopping()
                if mode == "blue_green":
                    await self.replace_worker(index, generation, mode="blue_green")
                else:
                    await self.replace_replica_draining(index, generation)

    def _unless_stopping(self) -> None:
        """A stop ends a reload between two replicas: the next one is not drained for nothing."""
        if self.stopping.is_set():
            raise TierStartFailed("the daemon is stopping")

    async def _drain_all(self, indexes: list[int], generation: int) -> None:
        """Drain mode: every replica of `indexes` held, drained and replaced at once."""
        results = await asyncio.gather(
            *(self.replace_replica_draining(i, generation) for i in indexes), return_exceptions=True
        )
        if failed := next((r for r in results if isinstance(r, BaseException)), None):
            raise failed

    async def replace_worker(self, index: int, generation: int, *, mode: str = "drain") -> str:
        """Replace replica `index`'s worker with one running `generation` in `mode` (drain or
        blue_green), start to end; the mode it took (blue_green falls back to drain when the new
        worker has no room beside the old one)."""
        if mode == "blue_green" and (beside := await self.start_worker_beside(generation, index)) is not None:
            await self.owned(self.switch_worker, *beside)
            await self.retire_worker(beside[0])
            return "blue_green"
        await self.replace_replica_draining(index, generation)
        return "drain"

    async def replace_replica_draining(self, index: int, generation: int) -> None:
        """The scheduler places nothing new on replica `index` while its running requests finish
        (bounded by runtime.drain_timeout_s), then its worker stops and one running `generation`
        starts in its place. Returns once the scheduler drives the new one; TierStartFailed if it
        does not come up (its slot then holds the dead one: the caller puts a worker back)."""
        old = await self._drain_and_stop(index)
        new = Child(old.tier, old.index, old.module, epoch=old.epoch, deaths=old.deaths, restarts=old.restarts)
        await self.owned(self._start_in_place_of, old, new, generation)
        await self._come_up(new)
        log.info("reload.replica_replaced", replica=index, epoch=new.epoch)

    async def _drain_and_stop(self, index: int) -> Child:
        """Replica `index` takes nothing new, finishes what runs (bounded by runtime.drain_timeout_s)
        and its worker stops: the Child that was it."""
        old = self._child("worker", index)
        log.info("reload.replica_draining", replica=index, epoch=old.epoch)
        await self.owned(self._hold_replica, index)
        await self._until_engine_idle(index, 0)
        await self.owned(self._retire_one, old)
        await self._terminate([old], STOP_SIGNAL, STOP_GRACE_S)
        return old

    async def restart_node_worker(self, generation: int) -> None:
        """A node other than the head (nodes.py): its worker stops, which ends the group on every
        node, and one running `generation` starts, supervised at once. It joins the head's next
        group once the head runs the same config (perhaps after its own reload); until then it is
        refused and started again, as when the head is down."""
        old = self._child("worker")
        await self.owned(self._retire_one, old)
        await self._terminate([old], STOP_SIGNAL, STOP_GRACE_S)
        new = Child(old.tier, old.index, old.module, epoch=old.epoch, deaths=old.deaths, restarts=old.restarts)
        await self.owned(self._start_in_place_of, old, new, generation)
        await self.owned(self._supervise, new)

    async def remove_replica(self, index: int) -> None:
        """dp_size lowered: replica `index` is drained like a replaced one, then stops for good."""
        old = await self._drain_and_stop(index)
        await self.owned(self._forget_replica, old)
        log.info("reload.replica_removed", replica=index)

    async def add_replica(self, index: int, generation: int) -> None:
        """dp_size raised (or a removed replica put back): a worker for replica `index` starts; returns
        once the scheduler drives it, TierStartFailed if it does not come up."""
        new = Child("worker", index, "daemon.worker")
        await self.owned(self._start_replica, new, generation)
        await self._come_up(new)
        log.info("reload.replica_added", replica=index, epoch=new.epoch)

    async def _come_up(self, new: Child) -> None:
        """Until `new` (a worker just started in its slot) is ready, supervised and driven by the
        scheduler; TierStartFailed (it killed, its slot down) if it is not ready."""
        try:
            await self._until_ready(new)
        except StartupFailed as exc:
            await self.owned(kill, new)
            await new.process.wait()  # type: ignore[union-attr]
            await self.owned(self._publish, new, "down")  # its slot stays: the caller starts another in it
            raise TierStartFailed(str(exc)) from None
        await self.owned(self._supervise, new)
        if await self.joined.until((new.index, new.epoch), JOIN_TIMEOUT_S, new) is None:
            log.warning("reload.replica_not_joined", replica=new.index, epoch=new.epoch, timeout_s=JOIN_TIMEOUT_S)

    def _hold_replica(self, index: int) -> None:
        """The scheduler places nothing new on replica `index` and says when its worker's requests are done."""
        self.idle.forget((index, 0))
        self._broadcast(EngineHold(index))

    async def _start_in_place_of(self, old: Child, new: Child, generation: int) -> None:
        self.children[self.children.index(old)] = new
        await self._start(new, generation)

    async def _start_replica(self, new: Child, generation: int) -> None:
        """Start `new`, listed after the other workers."""
        workers = [i for i, c in enumerate(self.children) if c.tier == "worker"]
        self.children.insert(workers[-1] + 1 if workers else 0, new)
        await self._start(new, generation)

    def _forget_replica(self, child: Child) -> None:
        """Replica `child` was removed: the scheduler expects no worker for it any more."""
        self._forget(child)
        self._broadcast(EngineHoldAbandoned("the model replica was removed", replica=child.index))

    def abandon_holds(self, reason: str) -> None:
        """No worker will come back for the replicas held (the daemon stops in a model reload)."""
        self._broadcast(EngineHoldAbandoned(reason))

    async def _until_engine_idle(self, index: int, epoch: int, child: Child | None = None) -> None:
        """Until the scheduler says nothing runs on replica `index`'s worker of `epoch` (0: the one
        held), or `child` exited, or runtime.drain_timeout_s passed: what still runs fails when it stops."""
        if await self.idle.until((index, epoch), self.settings.runtime.drain_timeout_s, child) is None:
            log.warning(
                "reload.drain_timeout", tier="worker", replica=index, detail="requests still running are failed"
            )

    # --- blue-green ---------------------------------------------------------------------------

    async def start_worker_beside(self, generation: int, index: int = 0) -> tuple[Child, Child] | None:
        """Blue-green prepare: start a worker running `generation` beside replica `index`'s serving
        one, which goes on serving alone; (serving, new), or None (nothing changed) if the new one
        does not fit in memory beside it. TierStartFailed (nothing changed) if it fails otherwise."""
        old = self._child("worker", index)
        new = Child(
            "worker", old.index, old.module, epoch=old.epoch, deaths=old.deaths, restarts=old.restarts, standby=True
        )
        try:
            await self.owned(self._start_beside, old, new, generation)
            await self._until_ready(new)
        except StartupFailed as exc:
            no_room = new.process is not None and new.process.returncode == EXIT_NO_ROOM_BESIDE
            await self.withdraw([new])
            if no_room:
                log.warning("reload.no_room_beside", replica=index, detail="the model worker is replaced in drain mode")
                return None
            raise TierStartFailed(str(exc)) from None
        return old, new

    async def _start_beside(self, old: Child, new: Child, generation: int) -> None:
        """Start `new` beside the worker `old`, the scheduler told first which epoch to expect."""
        self.children.insert(self.children.index(old) + 1, new)
        self.idle.forget((old.index, old.epoch))
        self._broadcast(EngineBeside(self._worker_epoch + 1, old.index))  # what _start makes the new one's epoch
        await self._start(new, generation, beside=True)

    def switch_worker(self, old: Child, new: Child) -> None:
        """Commit a blue-green worker: `new` serves in `old`'s place (published "up"), supervised
        from now on; `old` (perhaps restarted during the reload: the scheduler hears its epoch
        now) is not to be restarted."""
        old.retiring = True
        new.standby = False
        self.idle.forget((old.index, old.epoch))
        self._broadcast(EngineSwitch(new.epoch, old.epoch, old.index))
        self._publish(new, "up")
        self._supervise(new)

    async def retire_worker(self, old: Child) -> None:
        """Once the scheduler says the replaced worker `old` finished its requests (bounded by
        runtime.drain_timeout_s), stop it."""
        await self._until_engine_idle(old.index, old.epoch, old)
        if old.process is not None and old.process.returncode is not None:  # it died meanwhile
            await self.owned(self._publish, old, "down")  # the scheduler fails what still ran on it
        await self._terminate([old], STOP_SIGNAL, STOP_GRACE_S)
        await self.owned(self._forget, old)
