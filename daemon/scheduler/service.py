"""The scheduler process: one loop that admits requests, plans steps and routes their tokens.

It holds no model. Requests and aborts come from tokenizers, step results and
announcements from the workers, all on one PULL socket; tier events from the
supervisor on a SUB socket. A replica's next step is planned as soon as its previous
one completes, so no worker idles while it has work, and none waits for another.

The model has model.dp_size replicas (replica.py), each its own worker, batcher and
KV cache. A new request is placed on one of those taking requests (placement.py: by
load, and by the prompt prefix each one's cache holds) and stays there.

While no replica takes requests (every worker replaced by a reload, or restarting after
it crashed or hung), new requests and those not started wait for the next one, each for
at most runtime.drain_timeout_s, rather than being refused.
"""

from __future__ import annotations

import contextlib
import os
import time

import structlog
import zmq

from daemon.engine.blocks import BlockManager, extend_hashes
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
    ToSupervisor,
    WorkerReady,
)
from daemon.ipc.sockets import READY_GRACE_MS, PeerGone, Receiver, open_socket, send
from daemon.scheduler.batcher import QUEUE_FULL, Batcher, CacheCounts, Limits, StepCounts
from daemon.scheduler.placement import Candidate, choose
from daemon.scheduler.replica import Engine, Replica
from daemon.tier import Tier

log = structlog.get_logger("daemon.scheduler")
STATS_INTERVAL_S = 0.5
POLL_MS = 100


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
        self.replicas: dict[int, Replica] = {}  # by index, made when first heard of
        self._gone_epochs: set[int] = set()  # workers that went: a late announcement of theirs is stale
        self._stats_sent = 0.0
        # A step's tokens, held until the next step is on its way: the worker computes while we route them.
        self._step_tokens: dict[int, list[SequenceUpdate]] = {}
        # While no replica takes requests, new ones wait here for the next (one on hold: a reload, a restart).
        self.held: list[tuple[float, ScheduleRequest]] = []  # (received, request), with no batcher
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
        send(self.control, TierReady(self.tier.role, self.tier.index, os.getpid()), READY_GRACE_MS)
        log.info("scheduler.ready")
        while True:
            self.pulse.beat()
            ready = dict(self.poller.poll(POLL_MS))
            if self.events.socket in ready:
                for event in self.events.recv_ready():
                    self._on_broadcast(event)
            if self.inbox.socket in ready:
                for message in self.inbox.recv_ready():
                    self._on_message(message)
            for replica in list(self.replicas.values()):
                if replica.announced is not None:
                    replica.on_worker(replica.announced)
                for engine in replica.engines():
                    self._step(replica, engine)
            self._route_step_tokens()
            for replica in list(self.replicas.values()):
                replica.let_idle_engines_go()
                if replica.hold_since is not None:
                    replica.while_held()
            self._expire_held()
            self._publish_stats()

    def _on_broadcast(self, event: object) -> None:
        match event:
            case TierEvent():
                self._on_event(event)
            case ConfigUpdate(generation=generation):
                self._adopt(generation)
            case EngineHold(replica=index):
                self._hold(self._replica(index))
            case EngineHoldAbandoned(reason=reason, replica=index):
                self._abandon_hold(reason, index)
            case EngineBeside(epoch=epoch, replica=index):
                self._replica(index).expect_beside(epoch)
            case EngineSwitch(replica=index):
                self._replica(index).commit_beside(event)

    def _on_message(self, message: object) -> None:
        match message:
            case ScheduleRequest():
                log.debug("request.queued", request_id=message.request_id, prompt_tokens=len(message.prompt_ids))
                self._place(message)
            case AbortRequest(request_id=request_id):
                log.debug("request.aborted", request_id=request_id)
                for engine in self._engines():
                    engine.batcher.abort(request_id)
                self.held = [(t, r) for t, r in self.held if r.request_id != request_id]
            case StepResult():
                if (engine := self._engine(message.worker_epoch)) is not None:
                    for tokenizer, updates in engine.batcher.complete(message).items():
                        self._step_tokens.setdefault(tokenizer, []).extend(updates)
            case WorkerReady() if message.epoch not in self._gone_epochs:
                self._replica(message.replica).on_worker(message)
            case PrepareConstraint(constraint=constraint):  # a head start: the request follows, to any replica
                for replica in self.replicas.values():
                    if replica.engine is not None:
                        replica.engine.batcher.want_constraint(constraint)
            case ConstraintReady(worker_epoch=epoch, constraint=constraint):
                if (engine := self._engine(epoch)) is not None:
                    engine.batcher.constraint_ready(constraint)
            case TokenizerHello(index=index) if index >= 0:
                with contextlib.suppress(PeerGone):  # not connected yet: it asks again
                    send(self._tokenizer(index), SchedulerHello(os.getpid()), grace_ms=0)

    def _replica(self, index: int) -> Replica:
        if index not in self.replicas:
            self.replicas[index] = Replica(index, self)
        return self.replicas[index]

    def _engines(self) -> list[Engine]:
        return [engine for replica in self.replicas.values() for engine in replica.engines()]

    def _engine(self, epoch: int) -> Engine | None:
        return next((e for e in self._engines() if e.epoch == epoch), None)

    def _on_event(self, event: TierEvent) -> None:
        if event.state not in ("down", "stopped"):
            return
        if event.tier == "worker":
            self._gone_epochs.add(event.epoch)
            if (replica := self.replicas.get(event.index)) is not None:
                replica.on_stopped(event)
        elif event.tier == "tokenizer":
            for engine in self._engines():
                for seq in [*engine.batcher.running, *engine.batcher.waiting]:
                    if seq.tokenizer == event.index:  # nobody is left to hear its tokens
                        engine.batcher.abort(seq.request_id)

    # --- placing requests -----------------------------------------------------------------------

    def _place(self, request: ScheduleRequest) -> None:
        """Put `request` on the best replica taking requests; else let it wait (in the batcher of
        a replica being drained, or here while a worker is on its way); else refuse it."""
        accepting = [r for r in self.replicas.values() if r.accepting]
        if accepting:
            replica, hashes = self._best(accepting, request)
            replica.placed += 1
            replica.engine.batcher.add(request, hashes)  # type: ignore[union-attr]
            log.debug("request.placed", request_id=request.request_id, replica=replica.index)
            return
        on_hold = [r for r in self.replicas.values() if r.hold_since is not None]
        if draining := [r for r in on_hold if r.engine is not None]:
            draining[0].engine.batcher.add(request)  # type: ignore[union-attr]
        elif not on_hold:
            self._refuse(request, ErrorInfo(503, "the model is still loading", type="server_overloaded"))
        elif len(self.held) >= self.tier.settings.scheduler.max_queued_requests:
            self._refuse(request, QUEUE_FULL)
        else:
            self.held.append((time.monotonic(), request))

    def _best(self, accepting: list[Replica], request: ScheduleRequest) -> tuple[Replica, list[bytes] | None]:
        """The replica for `request`, and its prompt's block hashes where they were made to find
        it (its sequence starts with them: they are not made twice)."""
        if len(accepting) == 1:
            return accepting[0], None
        prompt = request.prompt_ids
        hashes: dict[int, list[bytes]] = {}  # by block size
        candidates = []
        for replica in accepting:
            batcher = replica.engine.batcher  # type: ignore[union-attr]
            blocks, cached = batcher.blocks, 0
            if blocks.caching and request.sampling.prompt_logprobs is None:  # those compute every token
                size = blocks.block_size
                if size not in hashes:
                    hashes[size] = extend_hashes([], prompt[: (len(prompt) - 1) // size * size], size)
                cached = batcher.prefix_on_hand(hashes[size], len(prompt))
            waiting = len(batcher.waiting)
            running = len(batcher.running)
            candidates.append(
                Candidate(replica.index, running, waiting, blocks.free_tokens, batcher.context_length, cached)
            )
        best = self.replicas[choose(candidates, len(prompt)).index]
        return best, hashes.get(best.engine.batcher.blocks.block_size)  # type: ignore[union-attr]

    def place_elsewhere(self, requests: list[ScheduleRequest], *, wait: bool, reason: str) -> None:
        """Requests not started of a replica whose worker went: to a replica taking requests, else
        they wait here (`wait`: its next worker is awaited), else they fail for `reason`."""
        error = ErrorInfo(503, f"{reason}; the request was lost, retry it", type="server_error")
        for request in requests:
            if any(r.accepting for r in self.replicas.values()):
                self._place(request)
            elif wait:
                self.held.append((time.monotonic(), request))
            else:
                self._refuse(request, error)

    def serve_waiting(self, replica: Replica, *, after_hold: bool) -> None:
        """`replica` takes requests again: those waiting here, and those not started on replicas
        being drained, are placed again."""
        waiting = [request for _received, request in self.held]
        self.held = []
        for other in self.replicas.values():
            if other.hold_since is not None and other.engine is not None:
                waiting += other.engine.batcher.take_unstarted()
        if after_hold:
            log.info("scheduler.hold_ended", replica=replica.index, waited=len(waiting))
        for request in waiting:
            self._place(request)

    def _expire_held(self) -> None:
        if not self.held:
            return
        bound = self.tier.settings.runtime.drain_timeout_s
        now = time.monotonic()
        expired = [r for received, r in self.held if now - received > bound]
        if expired:
            self.held = [(t, r) for t, r in self.held if now - t <= bound]
            on_hold = [r for r in self.replicas.values() if r.hold_since is not None]
            reason = max(on_hold, key=lambda r: r.hold_since).hold_reason if on_hold else "no model replica serves"
            error = ErrorInfo(503, f"{reason} and was not back within {bound:g} s", type="server_error")
            for request in expired:
                self._refuse(request, error)

    # --- reloads ------------------------------------------------------------------------------

    def _adopt(self, generation: int) -> None:
        self.tier.adopt(generation)
        for replica in self.replicas.values():
            replica.adopt(self.limits())
        send(self.control, ConfigApplied(self.tier.role, self.tier.index, os.getpid(), generation))
        log.info("scheduler.config_applied")

    def _hold(self, replica: Replica) -> None:
        """A reload drains `replica`: its requests not started go to the replicas taking requests."""
        replica.hold("the model is reloading")
        if replica.engine is not None and any(r.accepting for r in self.replicas.values()):
            for request in replica.engine.batcher.take_unstarted():
                self._place(request)

    def _abandon_hold(self, reason: str, index: int | None) -> None:
        """No worker comes back for replica `index` (None: any): what waits for one is answered."""
        for replica in [r for r in self.replicas.values() if index is None or r.index == index]:
            replica.hold_since = None
            if replica.gone:
                del self.replicas[replica.index]
        if accepting := [r for r in self.replicas.values() if r.accepting]:
            if self.held:
                self.serve_waiting(accepting[0], after_hold=False)
            return
        if any(r.hold_since is not None for r in self.replicas.values()):
            return  # another replica's worker is on its way: they wait for it
        held, self.held = self.held, []
        error = ErrorInfo(503, reason, type="server_error")
        for _received, request in held:
            self._refuse(request, error)
        log.warning("scheduler.hold_abandoned", reason=reason, requests=len(held), replica=index)

    # --- what the replicas ask for (ReplicaHost) ------------------------------------------------

    def plans_to(self, epoch: int) -> zmq.Socket:
        return open_socket(self._context, zmq.PUSH, connect=self.tier.endpoints.worker(epoch))

    def batcher_for(self, ready: WorkerReady) -> Batcher:
        return Batcher(
            BlockManager(ready.num_blocks, ready.block_size),
            self.limits(),
            ready.context_length,
            (),
            epoch=self.tier.epoch,
            counts=self.cache_counts,
            steps=self.step_counts,
            prefix_cacheable=ready.prefix_cacheable,
        )

    def tell_supervisor(self, message: ToSupervisor) -> None:
        send(self.control, message)

    def fail_all(self, engine: Engine, reason: str) -> None:
        self._route_step_tokens()  # what was produced before the failure goes first
        error = ErrorInfo(503, f"{reason}; the request was lost, retry it", type="server_error")
        failed = engine.batcher.fail_all(error)
        for tokenizer, updates in failed.items():
            self._send(tokenizer, updates)
        if failed:
            log.warning("scheduler.requests_failed", reason=reason, count=sum(len(u) for u in failed.values()))

    # --- steps and tokens -----------------------------------------------------------------------

    def _refuse(self, request: ScheduleRequest, error: ErrorInfo) -> None:
        self._send(request.tokenizer, [SequenceUpdate(request.request_id, [], "error", error)])

    def _step(self, replica: Replica, engine: Engine) -> None:
        batcher = engine.batcher
        for tokenizer, update in batcher.take_rejections():
            self._send(tokenizer, [update])
        for constraint in batcher.take_preparations():
            try:
                send(engine.plans, PrepareConstraint(constraint))
            except PeerGone:
                return replica.worker_gone(engine, "the worker is not reachable")
        if batcher.busy:
            return
        plan = batcher.plan()
        if plan is None:
            return
        try:
            send(engine.plans, plan)
        except PeerGone:
            replica.worker_gone(engine, "the worker is not reachable")

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
        replicas = [self.replicas[i].stats() for i in sorted(self.replicas)]
        serving = [r.engine.batcher.blocks for r in self.replicas.values() if r.engine is not None]
        stats = SchedulerStats(
            running=sum(r.running for r in replicas),
            queued=len(self.held) + sum(r.queued for r in replicas),
            free_tokens=sum(r.free_tokens for r in replicas),
            total_tokens=sum(r.total_tokens for r in replicas),
            prefix_cache_queried_tokens=self.cache_counts.queried,
            prefix_cache_hit_tokens=self.cache_counts.hits,
            prefix_cache_blocks=sum(blocks.cached_blocks for blocks in serving),
            steps=self.step_counts.steps,
            step_seconds=self.step_counts.seconds,
            step_tokens=self.step_counts.tokens,
            replicas=replicas,
        )
        send(self.stats, stats)
