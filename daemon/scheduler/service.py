"""The scheduler process: one loop that admits requests, plans steps and routes their tokens.

It holds no model. Requests and aborts come from tokenizers, step results and
announcements from the worker, all on one PULL socket; tier events from the
supervisor on a SUB socket. A step is planned as soon as the previous one
completes, so the worker never idles while there is work.
"""

from __future__ import annotations

import contextlib
import os
import time

import structlog
import zmq

from daemon.engine.blocks import BlockManager
from daemon.ipc.messages import (
    AbortRequest,
    Broadcast,
    ErrorInfo,
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
from daemon.scheduler.batcher import Batcher, Limits
from daemon.tier import Tier

log = structlog.get_logger("daemon.scheduler")
STATS_INTERVAL_S = 0.5
POLL_MS = 100


class SchedulerService:
    def __init__(self, tier: Tier):
        self.tier = tier
        endpoints, settings = tier.endpoints, tier.settings
        context = zmq.Context()
        self.inbox = Receiver(open_socket(context, zmq.PULL, bind=endpoints.scheduler), ToScheduler)
        self.events = Receiver(open_socket(context, zmq.SUB, connect=endpoints.events), Broadcast)
        self.worker = open_socket(context, zmq.PUSH, connect=endpoints.worker)
        self.stats = open_socket(context, zmq.PUB, bind=endpoints.stats)
        self.control = open_socket(context, zmq.DEALER, connect=endpoints.control)
        self.tokenizers = [
            open_socket(context, zmq.PUSH, connect=endpoints.tokenizer(i)) for i in range(settings.tokenizer.workers)
        ]
        self.poller = zmq.Poller()
        self.poller.register(self.inbox.socket, zmq.POLLIN)
        self.poller.register(self.events.socket, zmq.POLLIN)
        self.batcher: Batcher | None = None  # created when a worker announces its cache
        self.worker_epoch: int | None = None
        self._stats_sent = 0.0
        # A step's tokens, held until the next step is on its way: the worker computes while we route them.
        self._step_tokens: dict[int, list[SequenceUpdate]] = {}

    def limits(self) -> Limits:
        scheduler = self.tier.settings.scheduler
        return Limits(
            scheduler.max_running_requests,
            scheduler.max_queued_requests,
            scheduler.chunked_prefill_size,
            scheduler.policy,
        )

    def run(self) -> None:
        send(self.control, TierReady(self.tier.role, self.tier.index, os.getpid()))
        log.info("scheduler.ready")
        while True:
            ready = dict(self.poller.poll(POLL_MS))
            if self.events.socket in ready:
                for event in self.events.recv_ready():
                    if isinstance(event, TierEvent):
                        self._on_event(event)
            if self.inbox.socket in ready:
                for message in self.inbox.recv_ready():
                    self._on_message(message)
            self._step()
            self._route_step_tokens()
            self._publish_stats()

    def _on_message(self, message: object) -> None:
        match message:
            case ScheduleRequest():
                log.debug("request.queued", request_id=message.request_id, prompt_tokens=len(message.prompt_ids))
                if self.batcher is None:
                    error = ErrorInfo(503, "the model is still loading", type="server_overloaded")
                    self._send(message.tokenizer, [SequenceUpdate(message.request_id, [], "error", error)])
                else:
                    self.batcher.add(message)
            case AbortRequest(request_id=request_id):
                log.debug("request.aborted", request_id=request_id)
                if self.batcher is not None:
                    self.batcher.abort(request_id)
            case StepResult():
                if self.batcher is not None and message.worker_epoch == self.worker_epoch:
                    for tokenizer, updates in self.batcher.complete(message).items():
                        self._step_tokens.setdefault(tokenizer, []).extend(updates)
            case WorkerReady():
                self._on_worker(message)
            case TokenizerHello(index=index) if 0 <= index < len(self.tokenizers):
                with contextlib.suppress(PeerGone):  # not connected yet: it asks again
                    send(self.tokenizers[index], SchedulerHello(os.getpid()), grace_ms=0)

    def _on_worker(self, ready: WorkerReady) -> None:
        if ready.epoch == self.worker_epoch:
            return
        if self.batcher is not None:  # a new worker without our hearing the old one go
            self._fail_all("the worker restarted")
        self.worker_epoch = ready.epoch
        blocks = BlockManager(ready.num_blocks, ready.block_size)
        self.batcher = Batcher(blocks, self.limits(), ready.context_length, (), epoch=self.tier.epoch)
        log.info("scheduler.worker_up", epoch=ready.epoch, cache_tokens=ready.num_blocks * ready.block_size)

    def _on_event(self, event: TierEvent) -> None:
        if event.state != "down":
            return
        if event.tier == "worker" and event.epoch == self.worker_epoch:
            self._fail_all("the worker stopped")
            self.worker_epoch, self.batcher = None, None
        elif event.tier == "tokenizer" and self.batcher is not None:
            for seq in [*self.batcher.running, *self.batcher.waiting]:
                if seq.tokenizer == event.index:  # nobody is left to hear its tokens
                    self.batcher.abort(seq.request_id)

    def _fail_all(self, reason: str) -> None:
        assert self.batcher is not None
        self._route_step_tokens()  # what was produced before the failure goes first
        error = ErrorInfo(503, f"{reason}; the request was lost, retry it", type="server_error")
        for tokenizer, updates in self.batcher.fail_all(error).items():
            self._send(tokenizer, updates)
        log.warning("scheduler.requests_failed", reason=reason)

    def _step(self) -> None:
        batcher = self.batcher
        if batcher is None:
            return
        for tokenizer, update in batcher.take_rejections():
            self._send(tokenizer, [update])
        if batcher.busy:
            return
        plan = batcher.plan()
        if plan is None:
            return
        try:
            send(self.worker, plan)
        except PeerGone:
            self._fail_all("the worker is not reachable")
            self.worker_epoch, self.batcher = None, None

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
        if not 0 <= tokenizer < len(self.tokenizers):
            return
        try:
            send(self.tokenizers[tokenizer], StepTokens(updates))
        except PeerGone:  # that tokenizer is gone: its requests are lost with it
            if self.batcher is not None:
                for update in updates:
                    self.batcher.abort(update.request_id)

    def _publish_stats(self) -> None:
        now = time.monotonic()
        if now - self._stats_sent < STATS_INTERVAL_S:
            return
        self._stats_sent = now
        batcher = self.batcher
        if batcher is None:
            stats = SchedulerStats(running=0, queued=0, free_tokens=0, total_tokens=0)
        else:
            blocks = batcher.blocks
            stats = SchedulerStats(
                running=len(batcher.running),
                queued=len(batcher.waiting),
                free_tokens=blocks.free_tokens,
                total_tokens=blocks.num_blocks * blocks.block_size,
            )
        send(self.stats, stats)
