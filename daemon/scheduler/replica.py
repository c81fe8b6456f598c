"""One data-parallel replica of the model as the scheduler drives it: the worker serving it
and the batcher of the requests placed on it.

A replica steps on its own: its next step is planned as soon as its previous one completes,
never waiting for another replica's. It drives one worker, except during a blue-green reload
of it: then the new worker takes its new requests while the old one finishes those it holds,
each with its own batcher and KV-cache bookkeeping.

While its worker is away (drained for a reload, or restarting after it crashed or hung), the
replica is on hold: nothing new is placed on it, and its requests not started go to the other
replicas or wait for its next worker (service.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Protocol

import structlog
import zmq

from daemon.ipc.messages import (
    EngineIdle,
    EngineJoined,
    EngineSwitch,
    ReplicaStats,
    ScheduleRequest,
    TierEvent,
    ToSupervisor,
    WorkerReady,
)
from daemon.scheduler.batcher import Batcher, Limits

log = structlog.get_logger("daemon.scheduler")


@dataclass
class Engine:
    """A worker the scheduler drives: where its plans go, and the batcher of the requests on it."""

    epoch: int
    plans: zmq.Socket
    batcher: Batcher


class ReplicaHost(Protocol):
    """What a replica needs of the scheduler around it (service.py)."""

    def plans_to(self, epoch: int) -> zmq.Socket: ...  # a PUSH connecting to the worker of `epoch`

    def batcher_for(self, ready: WorkerReady) -> Batcher: ...

    def tell_supervisor(self, message: ToSupervisor) -> None: ...

    def fail_all(self, engine: Engine, reason: str) -> None: ...  # every request on it ends with a 503

    def place_elsewhere(self, requests: list[ScheduleRequest], *, wait: bool, reason: str) -> None: ...

    def serve_waiting(self, replica: Replica, *, after_hold: bool) -> None: ...


class Replica:
    def __init__(self, index: int, host: ReplicaHost):
        self.index = index
        self.host = host
        self.engine: Engine | None = None  # new requests go to it; set when a worker announces its cache
        self.retiring: dict[int, Engine] = {}  # by epoch: replaced workers finishing their requests
        self.beside_epoch = 0  # the worker a blue-green reload is starting beside the running one
        self.standby: Engine | None = None  # that worker, connected, until the reload commits to it
        self._switch_to: EngineSwitch | None = None  # a switch told before we had connected to the new worker
        self._engaged_epoch = 0  # the newest worker driven: announcements of older ones are stale
        self._plan_sockets: dict[int, zmq.Socket] = {}  # by worker epoch, connected when it announces
        self.announced: WorkerReady | None = None  # a new worker we cannot reach yet
        self.hold_since: float | None = None  # on hold: its next worker is awaited (a reload, a restart)
        self.hold_reason = ""  # said to a request that waited too long: why there was no worker
        self._idle_said = False  # told the supervisor the worker being replaced has finished
        self.placed = 0  # requests placed on it since the scheduler started

    @property
    def accepting(self) -> bool:
        """New requests may be placed on it: its worker serves, and no reload drains it."""
        return self.engine is not None and not self.engine.batcher.hold

    @property
    def gone(self) -> bool:
        """Nothing of it is left, and no worker is awaited: it may be forgotten."""
        return not self.engines() and self.standby is None and self.hold_since is None

    def engines(self) -> list[Engine]:
        """The workers driven: the serving one and those finishing (not one on standby)."""
        return [*([self.engine] if self.engine else []), *self.retiring.values()]

    def engine_of(self, epoch: int) -> Engine | None:
        return next((e for e in self.engines() if e.epoch == epoch), None)

    # --- its workers --------------------------------------------------------------------------

    def on_worker(self, ready: WorkerReady) -> None:
        if self.standby is not None and ready.epoch == self.standby.epoch:  # on standby, still announcing
            return
        # The running worker, or one replaced, still announcing. (A worker restarted after a crash
        # during a blue-green reload may come up before the one beside it, with a higher epoch.)
        if ready.epoch <= self._engaged_epoch and ready.epoch != self.beside_epoch:
            if self.announced is ready:
                self.announced = None
            return
        if ready.epoch not in self._plan_sockets:
            self._plan_sockets[ready.epoch] = self.host.plans_to(ready.epoch)
        plans = self._plan_sockets[ready.epoch]
        if not plans.poll(0, zmq.POLLOUT):
            # Our path to a new worker is still connecting: a plan sent now would be refused.
            self.announced = ready  # taken up as soon as it is connected (see the service's loop)
            return
        self.announced = None
        self._engaged_epoch = max(self._engaged_epoch, ready.epoch)
        engine = Engine(ready.epoch, plans, self.host.batcher_for(ready))
        if not ready.prefix_cacheable:
            log.info("scheduler.prefix_caching_unavailable", epoch=ready.epoch, reason="its RoPE follows the length")
        if ready.epoch == self.beside_epoch:
            # Blue-green: it waits beside the serving one until the reload commits to it (also
            # if the serving one crashed meanwhile: the reload may still withdraw it).
            self.standby = engine
            log.info("scheduler.worker_standby", epoch=ready.epoch, replica=self.index)
            if self._switch_to is not None and self._switch_to.epoch == ready.epoch:
                self.commit_beside(self._switch_to)
            return
        if self.engine is not None:  # a new worker without our hearing the old one go
            self.worker_gone(self.engine, "the worker restarted")
        self.engine = engine
        self._serving(engine)
        self._end_hold()

    def _serving(self, engine: Engine) -> None:
        blocks = engine.batcher.blocks
        log.info(
            "scheduler.worker_up",
            epoch=engine.epoch,
            replica=self.index,
            cache_tokens=blocks.num_blocks * blocks.block_size,
        )
        self.host.tell_supervisor(EngineJoined(os.getpid(), engine.epoch, self.index))

    def _end_hold(self) -> None:
        """Its worker serves: what waited for a replica runs (placed by the service)."""
        if self.engine is not None:
            was_held, self.hold_since = self.hold_since is not None, None
            self.host.serve_waiting(self, after_hold=was_held)

    def expect_beside(self, epoch: int) -> None:
        """A blue-green reload starts the worker of `epoch` beside the serving one (0: none, it went)."""
        if epoch == 0 and self.standby is not None:
            self._plan_sockets.pop(self.standby.epoch).close(linger=0)
            self.standby = None
        self.beside_epoch, self._switch_to = epoch, None

    def commit_beside(self, switch: EngineSwitch) -> None:
        """The reload committed to the worker on standby: new requests, and those not started
        yet, go to it; the one it replaces finishes the requests it has started."""
        new = self.standby
        if new is None or new.epoch != switch.epoch:  # not connected yet: switched to as soon as it is
            self._switch_to = switch
            return
        old = self.engine
        self.engine, self.standby, self.beside_epoch, self._switch_to = new, None, 0, None
        # The replaced worker may have restarted during the reload and not be ours yet: it never will be.
        self._engaged_epoch = max(self._engaged_epoch, switch.replaced)
        self._serving(new)
        if old is not None and old.epoch == switch.replaced:
            old.batcher.hold = True
            for request in old.batcher.take_unstarted():
                new.batcher.add(request)
            self.retiring[old.epoch] = old
            finishing = len(old.batcher.running)
            log.info("scheduler.worker_switched", old_epoch=old.epoch, replica=self.index, finishing=finishing)
        else:  # nothing of ours runs on it: it may stop now
            if old is not None:
                self.worker_gone(old, "the worker was replaced")
            if (plans := self._plan_sockets.pop(switch.replaced, None)) is not None:
                plans.close(linger=0)
            self.host.tell_supervisor(EngineIdle(os.getpid(), switch.replaced, self.index))
            log.info("scheduler.worker_switched", old_epoch=switch.replaced, replica=self.index, finishing=0)
        self._end_hold()

    def let_idle_engines_go(self) -> None:
        """Tell the supervisor when a replaced worker has finished its requests: it may stop it."""
        for engine in [e for e in self.retiring.values() if e.batcher.idle]:
            self.host.tell_supervisor(EngineIdle(os.getpid(), engine.epoch, self.index))
            log.info("scheduler.worker_drained", old_epoch=engine.epoch, replica=self.index)
            self._forget(engine)

    def _forget(self, engine: Engine) -> None:
        if engine is self.engine:
            self.engine = None
        self.retiring.pop(engine.epoch, None)
        self._plan_sockets.pop(engine.epoch).close(linger=0)

    def on_stopped(self, event: TierEvent) -> None:
        """One of its workers went "down" or "stopped"."""
        if self.announced is not None and self.announced.epoch == event.epoch:
            self.announced = None  # it went before we could reach it
        if event.epoch == self.beside_epoch:
            self.expect_beside(0)  # it died on standby, or the reload withdrew it
            return
        if (engine := self.engine_of(event.epoch)) is None:
            return
        if event.restarting and engine is self.engine and self.hold_since is None:
            # it crashed or hung, and the supervisor starts it again
            self.hold("the model worker is restarting", reload=False)
        self.worker_gone(engine, "the worker stopped")

    def worker_gone(self, engine: Engine, reason: str) -> None:
        """A worker went: its requests fail, but those not started go to another replica (or, while
        this one is on hold, wait for its next worker)."""
        unstarted = engine.batcher.take_unstarted() if engine is self.engine else []
        self.host.fail_all(engine, reason)
        self._forget(engine)
        if unstarted:  # their wait starts now (the drain before it was bounded apart)
            self.host.place_elsewhere(unstarted, wait=self.hold_since is not None, reason=reason)

    # --- holds (reloads, restarts) --------------------------------------------------------------

    def hold(self, reason: str, *, reload: bool = True) -> None:
        """Nothing new is placed on it until its next worker serves. For a reload, the supervisor
        also hears when its running worker has finished what it started (it may stop it then)."""
        if self.hold_since is None:
            self.hold_since = time.monotonic()
            log.info("scheduler.hold", reason=reason, replica=self.index)
        # A reload asked while a crashed worker restarts hears at once that none is running.
        self._idle_said = not reload
        self.hold_reason = reason
        if self.engine is not None:
            self.engine.batcher.hold = True

    def while_held(self) -> None:
        if not self._idle_said and (self.engine is None or self.engine.batcher.idle):
            self.host.tell_supervisor(EngineIdle(os.getpid(), 0, self.index))
            self._idle_said = True

    def adopt(self, limits: Limits) -> None:
        if self.engine is not None:
            self.engine.batcher.adopt(limits)

    def stats(self) -> ReplicaStats:
        engines = self.engines()
        blocks = self.engine.batcher.blocks if self.engine else None
        return ReplicaStats(
            replica=self.index,
            epoch=self.engine.epoch if self.engine else 0,
            running=sum(len(e.batcher.running) for e in engines),
            queued=sum(len(e.batcher.waiting) for e in engines),
            free_tokens=blocks.free_tokens if blocks else 0,
            total_tokens=blocks.num_blocks * blocks.block_size if blocks else 0,
            placed=self.placed,
            state="serving" if self.accepting else "held" if self.engine else "away",
        )
