"""A front-end worker's link to the tokenizer pool: requests out, outputs back, by request id.

Each Granian worker process has one Gateway. It binds its own result endpoint
(named from its PID), spreads requests over the tokenizer workers round robin,
and delivers each output batch to the waiting requests. It also listens to the
supervisor's events (a tokenizer that dies takes its requests with it: they
end with a 503 at once) and to the scheduler's figures, for metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import AsyncIterator

import structlog
import zmq
import zmq.asyncio

from daemon.ipc.messages import (
    AbortRequest,
    Broadcast,
    ConfigApplied,
    ConfigUpdate,
    ErrorInfo,
    GenerateOutput,
    GenerateRequest,
    OutputBatch,
    SchedulerStats,
    TierEvent,
    ToFrontend,
)
from daemon.ipc.sockets import PeerGone, Receiver, configure, open_socket, send
from daemon.tier import Tier

log = structlog.get_logger("daemon.frontend")


def _error(request_id: str, status: int, message: str) -> GenerateOutput:
    return GenerateOutput(request_id, finish_reason="error", error=ErrorInfo(status, message, type="server_error"))


class Gateway:
    def __init__(self, tier: Tier):
        self.tier = tier
        self.endpoints = endpoints = tier.endpoints
        tokenizers = tier.settings.tokenizer.workers
        self.address = endpoints.frontend(os.getpid())
        self._sync = zmq.Context()
        self._control = open_socket(self._sync, zmq.DEALER, connect=endpoints.control)
        self._async = zmq.asyncio.Context()
        self._tokenizers = [
            open_socket(self._sync, zmq.PUSH, connect=endpoints.tokenizer(i)) for i in range(tokenizers)
        ]
        self._turn = itertools.count()
        self._waiting: dict[str, tuple[asyncio.Queue[GenerateOutput], int]] = {}
        self._tasks: list[asyncio.Task] = []
        self.draining = False
        self._down: set[int] = set()  # tokenizer workers the supervisor reported down
        self.stats = SchedulerStats(running=0, queued=0, free_tokens=0, total_tokens=0)

    async def start(self) -> None:
        results = configure(self._async.socket(zmq.PULL), zmq.PULL)
        results.bind(self.address)
        broadcasts = configure(self._async.socket(zmq.SUB), zmq.SUB)
        broadcasts.connect(self.endpoints.events)
        broadcasts.connect(self.endpoints.stats)
        self._tasks = [
            asyncio.create_task(self._read_outputs(Receiver(results, ToFrontend))),
            asyncio.create_task(self._read_broadcasts(Receiver(broadcasts, Broadcast))),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._async.destroy(linger=0)
        self._sync.destroy(linger=0)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        """The outputs of `request` as they come; an abandoned iteration aborts the request."""
        queue: asyncio.Queue[GenerateOutput] = asyncio.Queue()
        tokenizer = self._submit(request)
        if tokenizer is None:
            yield _error(request.request_id, 503, "no tokenizer worker is reachable")
            return
        self._waiting[request.request_id] = (queue, tokenizer)
        finished = False
        try:
            while not finished:
                output = await queue.get()
                finished = output.finish_reason is not None
                yield output
        finally:
            self._waiting.pop(request.request_id, None)
            if not finished:  # the client left, or the caller gave up: free the engine's work
                with contextlib.suppress(PeerGone):
                    send(self._tokenizers[tokenizer], AbortRequest(request.request_id))

    def _submit(self, request: GenerateRequest) -> int | None:
        """Send to the next tokenizer worker that takes it; its index, or None if none does.

        Workers the supervisor reported down are skipped without trying: a send to
        an absent peer waits for a connection, and this is the event loop's thread.
        """
        count = len(self._tokenizers)
        first = next(self._turn)
        for offset in range(count):
            index = (first + offset) % count
            if index in self._down:
                continue
            try:
                send(self._tokenizers[index], request)
            except PeerGone:
                continue
            return index
        return None

    async def _read_outputs(self, receiver: Receiver) -> None:
        while True:
            batch = receiver.decode(await receiver.socket.recv())
            if not isinstance(batch, OutputBatch):
                continue
            for output in batch.outputs:
                waiting = self._waiting.get(output.request_id)
                if waiting is not None:
                    waiting[0].put_nowait(output)

    async def _read_broadcasts(self, receiver: Receiver) -> None:
        while True:
            message = receiver.decode(await receiver.socket.recv())
            if isinstance(message, SchedulerStats):
                self.stats = message
            elif isinstance(message, TierEvent):
                self._on_event(message)
            elif isinstance(message, ConfigUpdate):
                self.tier.adopt(message.generation)
                with contextlib.suppress(PeerGone):
                    send(self._control, ConfigApplied("frontend", 0, os.getpid(), message.generation))
                log.info("frontend.config_applied")

    def _on_event(self, event: TierEvent) -> None:
        if event.tier == "frontend" and event.state == "draining":
            self.draining = True
        if event.tier == "tokenizer" and event.state == "up":
            self._down.discard(event.index)
        if event.tier == "tokenizer" and event.state == "down":
            self._down.add(event.index)
            lost = [rid for rid, (_queue, index) in self._waiting.items() if index == event.index]
            for request_id in lost:
                queue, _index = self._waiting[request_id]
                queue.put_nowait(
                    _error(request_id, 503, "the tokenizer worker stopped; the request was lost, retry it")
                )
            if lost:
                log.warning("frontend.requests_failed", reason="tokenizer stopped", count=len(lost))
