"""The scheduler process: one loop that admits requests, plans steps and routes their tokens.

It holds no model. Requests and aborts come from tokenizers, step results and
announcements from the worker, all on one PULL socket; tier events from the
supervisor on a SUB socket. A step is planned as soon as the previous one
completes, so the worker never idles while there is work.

It drives one worker, except during a blue-green model reload: then the new
worker takes new requests while the old one finishes those it holds, each with
its own batcher and KV-cache bookkeeping.

While the worker is away (replaced by a reload, or restarting after it crashed
or hung), new requests and those it had not started wait for the next one,
each for at most runtime.drain_timeout_s, rather than being refused.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import structlog
import zmq

from daemon.engine.blocks import BlockManager
from daemon.ipc.heartbeat import Pulse
from daemon.ipc.messages import (
    AbortRequest,
    Broadcast,
    ConfigApplied,
    ConfigUpdate,
    ConstraintReady,
    EngineBeside,
    EngineHold,
    EngineHoldAbandoned,
    EngineIdle,
    EngineSwitch,
    ErrorInfo,
    PrepareConstraint,
    ScheduleRequest,
    SchedulerHello,
    SchedulerStats,
    SequenceUpdate,
    StepResult,
    StepTokens,
    TierEvent,
    TierReady,
    TokenizerHello,
    ToScheduler,
    WorkerReady,
)
from daemon.ipc.sockets import PeerGone, Receiver, open_socket, send
from daemon.scheduler.batcher import QUEUE_FULL, Batcher, CacheCounts, Limits, StepCounts
from daemon.tier import Tier

log = structlog.get_logger("daemon.scheduler")
STATS_INTERVAL_S = 0.5
POLL_MS = 100


@dataclass
class Engine:
    """A worker the scheduler drives: where its plans go, and the batcher of the requests on it."""

    epoch: int
    plans: zmq.Socket
    batcher: Batcher


class SchedulerService:
    def __init__(self, tier: Tier):
        self.tier = tier
        endpoints = tier.endpoints
        context = zmq.Context()
        self.inbox = Receiver(open_socket(context, zmq.PULL, bind=endpoints.scheduler), ToScheduler)
        self.events = Receiver(open_socket(context, zmq.SUB, connect=endpoints.events), Broadcast)
        self.stats = open_socket(context, zmq.PUB, bind=endpoints.stats)
        self.control = open_socket(context, zmq.DEALER, connect=endpoints.control)
        self.pulse = Pulse(self.control, self.tier.role, self.tier.index)
        self._context = context
        self.tokenizers: dict[int, zmq.Socket] = {}  # by tokenizer index, connected on first use
        self.poller = zmq.Poller()
        self.poller.register(self.inbox.socket, zmq.POLLIN)
        self.poller.register(self.events.socket, zmq.POLLIN)
        self.engine: Engine | None = None  # new requests go to it; set when a worker announces its cache
        self.retiring: dict[int, Engine] = {}  # by epoch: replaced workers finishing their requests
        self.beside_epoch = 0  # the worker a blue-green reload is starting beside the running one
        self.standby: Engine | None = None  # that worker, connected, until the reload commits to it
        self._switch_to: EngineSwitch | None = None  # a switch told before we had connected to the new worker
        self._engaged_epoch = 0  # the newest worker driven: announcements of older ones are stale
        self._plan_sockets: dict[int, zmq.Socket] = {}  # by worker epoch, connected when it announces
        self._announced: WorkerReady | None = None  # a new worker we cannot reach yet
        self._stats_sent = 0.0
        # A step's tokens, held until the next step is on its way: the worker computes while we route them.
        self._step_tokens: dict[int, list[SequenceUpdate]] = {}
        # While the worker is away (a reload, a restart), new requests wait here for the next one.
        self.hold_since: float | None = None
        self.hold_reason = ""  # said to a request that waited too long: why there was no worker
        self.held: list[tuple[float, ScheduleRequest]] = []  # (received, request), with no batcher
        self._idle_said = False  # told the supervisor the worker being replaced has finished
        self.cache_counts = CacheCounts()  # every batcher's prefix-cache lookups, for the metrics
        self.step_counts = StepCounts()  # and every batcher's steps

    def limits(self) -> Limits:
        scheduler = self.tier.settings.scheduler
        return Limits(
            scheduler.max_running_requests,
            scheduler.max_queued_requests,
            scheduler.chunked_prefill_size,
            scheduler.policy,
            scheduler.enable_prefix_caching,
        )

    def run(self) -> None:
        send(self.control, TierReady(self.tier.role, self.tier.index, os.getpid()))
        log.info("scheduler.ready")
        while True:
            self.pulse.beat()
            ready = dict(self.poller.poll(POLL_MS))
            if self.events.socket in ready:
                for event in self.events.recv_ready():
                    match event:
                        case TierEvent():
                            self._on_event(event)
                        case ConfigUpdate(generation=generation):
                            self._adopt(generation)
                        case EngineHold():
                            self._hold("the model is reloading")
                        case EngineHoldAbandoned(reason=reason):
                            self._abandon_hold(reason)
                        case EngineBeside(epoch=epoch):
                            self._expect_beside(epoch)
                        case EngineSwitch():
                            self._commit_beside(event)
            if self.inbox.socket in ready:
                for message in self.inbox.recv_ready():
                    self._on_message(message)
            if self._announced is not None:
                self._on_worker(self._announced)
            for engine in self._engines():
                self._step(engine)
            self._route_step_tokens()
            self._let_idle_engines_go()
            if self.hold_since is not None:
                self._while_held()
            self._publish_stats()

    def _on_message(self, message: object) -> None:
        match message:
            case ScheduleRequest():
                log.debug("request.queued", request_id=message.request_id, prompt_tokens=len(message.prompt_ids))
                if self.engine is not None:
                    self.engine.batcher.add(message)
                elif self.hold_since is None:
                    self._refuse(message, ErrorInfo(503, "the model is still loading", type="server_overloaded"))
                elif len(self.held) >= self.tier.settings.scheduler.max_queued_requests:
                    self._refuse(message, QUEUE_FULL)
                else:
                    self.held.append((time.monotonic(), message))
            case AbortRequest(request_id=request_id):
                log.debug("request.aborted", request_id=request_id)
                for engine in self._engines():
                    engine.batcher.abort(request_id)
                self.held = [(t, r) for t, r in self.held if r.request_id != request_id]
            case StepResult():
                if (engine := self._engine(message.worker_epoch)) is not None:
                    for tokenizer, updates in engine.batcher.complete(message).items():
                        self._step_tokens.setdefault(tokenizer, []).extend(updates)
            case WorkerReady():
                self._on_worker(message)
            case PrepareConstraint(constraint=constraint):  # a head start: the request follows
                if self.engine is not None:
                    self.engine.batcher.want_constraint(constraint)
            case ConstraintReady(worker_epoch=epoch, constraint=constraint):
                if (engine := self._engine(epoch)) is not None:
                    engine.batcher.constraint_ready(constraint)
            case TokenizerHello(index=index) if index >= 0:
                with contextlib.suppress(PeerGone):  # not connected yet: it asks again
                    send(self._tokenizer(index), SchedulerHello(os.getpid()), grace_ms=0)

    def _engines(self) -> list[Engine]:
        """The workers driven: the serving one and those finishing (not one on standby)."""
        return [*([self.engine] if self.engine else []), *self.retiring.values()]

    def _engine(self, epoch: int) -> Engine | None:
        return next((e for e in self._engines() if e.epoch == epoch), None)

    def _on_worker(self, ready: WorkerReady) -> None:
        if self.standby is not None and ready.epoch == self.standby.epoch:  # on standby, still announcing
            return
        # The running worker, or one replaced, still announcing. (A worker restarted after a crash
        # during a blue-green reload may come up before the one beside it, with a higher epoch.)
        if ready.epoch <= self._engaged_epoch and ready.epoch != self.beside_epoch:
            if self._announced is ready:
                self._announced = None
            return
        if ready.epoch not in self._plan_sockets:
            endpoint = self.tier.endpoints.worker(ready.epoch)
            self._plan_sockets[ready.epoch] = open_socket(self._context, zmq.PUSH, connect=endpoint)
        plans = self._plan_sockets[ready.epoch]
        if not plans.poll(0, zmq.POLLOUT):
            # Our path to a new worker is still connecting: a plan sent now would be refused.
            self._announced = ready  # taken up as soon as it is connected (see run)
            return
        self._announced = None
        self._engaged_epoch = max(self._engaged_epoch, ready.epoch)
        blocks = BlockManager(ready.num_blocks, ready.block_size)
        batcher = Batcher(
            blocks,
            self.limits(),
            ready.context_length,
            (),
            epoch=self.tier.epoch,
            counts=self.cache_counts,
            steps=self.step_counts,
            prefix_cacheable=ready.prefix_cacheable,
        )
        if not ready.prefix_cacheable:
            log.info("scheduler.prefix_caching_unavailable", epoch=ready.epoch, reason="its RoPE follows the length")
        engine = Engine(ready.epoch, plans, batcher)
        if ready.epoch == self.beside_epoch:
            # Blue-green: it waits beside the serving one until the reload commits to it (also
            # if the serving one crashed meanwhile: the reload may still withdraw it).
            self.standby = engine
            log.info("scheduler.worker_standby", epoch=ready.epoch)
            if self._switch_to is not None and self._switch_to.epoch == ready.epoch:
                self._commit_beside(self._switch_to)
            return
        if self.engine is not None:  # a new worker without our hearing the old one go
            self._worker_gone(self.engine, "the worker restarted")
        self.engine = engine
        log.info("scheduler.worker_up", epoch=ready.epoch, cache_tokens=ready.num_blocks * ready.block_size)
        self._end_hold()

    def _end_hold(self) -> None:
        if self.hold_since is not None and self.engine is not None:
            batcher = self.engine.batcher
            log.info("scheduler.hold_ended", waited=len(self.held))
            for _received, request in self.held:
                batcher.add(request)
            self.hold_since, self.held = None, []

    def _expect_beside(self, epoch: int) -> None:
        """A blue-green reload starts the worker of `epoch` beside the serving one (0: none, it went)."""
        if epoch == 0 and self.standby is not None:
            self._plan_sockets.pop(self.standby.epoch).close(linger=0)
            self.standby = None
        self.beside_epoch, self._switch_to = epoch, None

    def _commit_beside(self, switch: EngineSwitch) -> None:
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
        blocks = new.batcher.blocks
        log.info("scheduler.worker_up", epoch=new.epoch, cache_tokens=blocks.num_blocks * blocks.block_size)
        if old is not None and old.epoch == switch.replaced:
            old.batcher.hold = True
            for request in old.batcher.take_unstarted():
                new.batcher.add(request)
            self.retiring[old.epoch] = old
            log.info("scheduler.worker_switched", old_epoch=old.epoch, finishing=len(old.batcher.running))
        else:  # nothing of ours runs on it: it may stop now
            if old is not None:
                self._worker_gone(old, "the worker was replaced")
            if (plans := self._plan_sockets.pop(switch.replaced, None)) is not None:
                plans.close(linger=0)
            send(self.control, EngineIdle(os.getpid(), switch.replaced))
            log.info("scheduler.worker_switched", old_epoch=switch.replaced, finishing=0)
        self._end_hold()

    def _let_idle_engines_go(self) -> None:
        """Tell the supervisor when a replaced worker has finished its requests: it may stop it."""
        for engine in [e for e in self.retiring.values() if e.batcher.idle]:
            send(self.control, EngineIdle(os.getpid(), engine.epoch))
            log.info("scheduler.worker_drained", old_epoch=engine.epoch)
            self._forget(engine)

    def _forget(self, engine: Engine) -> None:
        if engine is self.engine:
            self.engine = None
        self.retiring.pop(engine.epoch, None)
        self._plan_sockets.pop(engine.epoch).close(linger=0)

    def _on_event(self, event: TierEvent) -> None:
        if event.state not in ("down", "stopped"):
            return
        if event.tier == "worker" and event.epoch == self.beside_epoch:
            self._expect_beside(0)  # it died on standby, or the reload withdrew it
            return
        if event.tier == "worker" and (engine := self._engine(event.epoch)) is not None:
            if event.restarting and engine is self.engine and self.hold_since is None:
                # it crashed or hung, and the supervisor starts it again
                self._hold("the model worker is restarting", reload=False)
            self._worker_gone(engine, "the worker stopped")
        elif event.tier == "tokenizer":
            for engine in self._engines():
                for seq in [*engine.batcher.running, *engine.batcher.waiting]:
                    if seq.tokenizer == event.index:  # nobody is left to hear its tokens
                        engine.batcher.abort(seq.request_id)

    def _worker_gone(self, engine: Engine, reason: str) -> None:
        """A worker went: its requests fail, but during a hold those not started wait for the next."""
        if self.hold_since is not None and engine is self.engine:
            # their wait for the next worker starts now (the drain before it was bounded apart)
            self.held += [(time.monotonic(), request) for request in engine.batcher.take_unstarted()]
        self._fail_all(engine, reason)
        self._forget(engine)

    # --- reloads ------------------------------------------------------------------------------

    def _adopt(self, generation: int) -> None:
        self.tier.adopt(generation)
        if self.engine is not None:
            self.engine.batcher.adopt(self.limits())
        send(self.control, ConfigApplied(self.tier.role, self.tier.index, os.getpid(), generation))
        log.info("scheduler.config_applied")

    def _hold(self, reason: str, *, reload: bool = True) -> None:
        """New requests wait for the next worker. For a reload, the supervisor also hears when the
        running worker has finished what it started (it may stop it then)."""
        if self.hold_since is None:
            self.hold_since = time.monotonic()
            log.info("scheduler.hold", reason=reason)
        # A reload asked while a crashed worker restarts hears at once that none is running.
        self._idle_said = not reload
        self.hold_reason = reason
        if self.engine is not None:
            self.engine.batcher.hold = True

    def _while_held(self) -> None:
        if not self._idle_said and (self.engine is None or self.engine.batcher.idle):
            send(self.control, EngineIdle(os.getpid()))
            self._idle_said = True
        bound = self.tier.settings.runtime.drain_timeout_s
        now = time.monotonic()
        expired = [r for received, r in self.held if now - received > bound]
        if expired:
            self.held = [(t, r) for t, r in self.held if now - t <= bound]
            error = ErrorInfo(503, f"{self.hold_reason} and was not back within {bound:g} s", type="server_error")
            for request in expired:
                self._refuse(request, error)

    def _abandon_hold(self, reason: str) -> None:
        held, self.held, self.hold_since = self.held, [], None
        error = ErrorInfo(503, reason, type="server_error")
        for _received, request in held:
            self._refuse(request, error)
        log.warning("scheduler.hold_abandoned", reason=reason, requests=len(held))

    def _refuse(self, request: ScheduleRequest, error: ErrorInfo) -> None:
        self._send(request.tokenizer, [SequenceUpdate(request.request_id, [], "error", error)])

    def _fail_all(self, engine: Engine, reason: str) -> None:
        self._route_step_tokens()  # what was produced before the failure goes first
        error = ErrorInfo(503, f"{reason}; the request was lost, retry it", type="server_error")
        failed = engine.batcher.fail_all(error)
        for tokenizer, updates in failed.items():
            self._send(tokenizer, updates)
        if failed:
            log.warning("scheduler.requests_failed", reason=reason, count=sum(len(u) for u in failed.values()))

    def _step(self, engine: Engine) -> None:
        batcher = engine.batcher
        for tokenizer, update in batcher.take_rejections():
            self._send(tokenizer, [update])
        for constraint in batcher.take_preparations():
            try:
                send(engine.plans, PrepareConstraint(constraint))
            except PeerGone:
                return self._worker_gone(engine, "the worker is not reachable")
        if batcher.busy:
            return
        plan = batcher.plan()
        if plan is None:
            return
        try:
            send(engine.plans, plan)
        except PeerGone:
            self._worker_gone(engine, "the worker is not reachable")

    def _route_step_tokens(self) -> None:
        pending, self._step_tokens = self._step_tokens, {}
        for tokenizer, updates in pending.items():
            self._send(tokenizer, updates)

    def _send(self, tokenizer: int, updates: list[SequenceUpdate]) -> None:
        for update in updates:
            if update.finish_reason is not None:
                log.debug(
                    "request.finished",
                    request_id=update.request_id,
                    reason=update.finish_reason,
                    status=update.error.status if update.error else None,
                )
        if tokenizer < 0:
            return
        try:
            send(self._tokenizer(tokenizer), StepTokens(updates))
        except PeerGone:  # that tokenizer is gone: its requests are lost with it
            for engine in self._engines():
                for update in updates:
                    engine.batcher.abort(update.request_id)

    def _tokenizer(self, index: int) -> zmq.Socket:
        if index not in self.tokenizers:
            self.tokenizers[index] = open_socket(self._context, zmq.PUSH, connect=self.tier.endpoints.tokenizer(index))
        return self.tokenizers[index]

    def _publish_stats(self) -> None:
        now = time.monotonic()
        if now - self._stats_sent < STATS_INTERVAL_S:
            return
        self._stats_sent = now
        engines = self._engines()
        blocks = self.engine.batcher.blocks if self.engine else None
        stats = SchedulerStats(
            running=sum(len(e.batcher.running) for e in engines),
            queued=len(self.held) + sum(len(e.batcher.waiting) for e in engines),
            free_tokens=blocks.free_tokens if blocks else 0,
            total_tokens=blocks.num_blocks * blocks.block_size if blocks else 0,
            prefix_cache_queried_tokens=self.cache_counts.queried,
            prefix_cache_hit_tokens=self.cache_counts.hits,
            prefix_cache_blocks=blocks.cached_blocks if blocks else 0,
            steps=self.step_counts.steps,
            step_seconds=self.step_counts.seconds,
            step_tokens=self.step_counts.tokens,
        )
        send(self.stats, stats)
