"""A front-end worker's link to the tokenizer pool: requests out, outputs back, by request id.

Each Granian worker process has one Gateway. It binds its own result endpoint
(named from its PID), spreads requests over the tokenizer workers round robin,
and delivers each output batch to the waiting requests (/tokenize and /detokenize
go the same way, and get one reply each). It also listens to the
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
    Detokenize,
    Detokenized,
    ErrorInfo,
    FrontendRetiring,
    FrontendWorkerReady,
    GenerateOutput,
    GenerateRequest,
    OutputBatch,
    SchedulerStats,
    TierEvent,
    ToFrontend,
    Tokenize,
    Tokenized,
    read_status_file,
)
from daemon.ipc.sockets import READY_GRACE_MS, PeerGone, Receiver, configure, open_socket, send_async
from daemon.tier import Tier

log = structlog.get_logger("daemon.frontend")
# A tokenizer worker answers /tokenize and /detokenize at once; one that has not within this long is
# stuck (a huge chat template?), and the client gets a 503 rather than waiting on it forever.
ASK_TIMEOUT_S = 30.0
# What msgspec raises for a message it cannot encode: an integer beyond 64 bits, or nesting past
# the recursion limit, in a field the request models leave free (a chat message's extra keys, the
# template's variables). The request itself is at fault, so it is a 400, not a 500.
UNSENDABLE_ERRORS = (OverflowError, RecursionError)
NOT_SENT = -1  # the tokenizer index of a request whose send has not returned yet
TOKENIZER_STOPPED = "the tokenizer worker stopped; the request was lost, retry it"
UNSENDABLE = ErrorInfo(
    400, "the request holds an integer beyond 64 bits, or nests too deeply, for this server to pass it on"
)


def _error(request_id: str, status: int, message: str) -> GenerateOutput:
    return GenerateOutput(request_id, finish_reason="error", error=ErrorInfo(status, message, type="server_error"))


def _unavailable(message: str) -> ErrorInfo:
    return ErrorInfo(503, message, type="server_error")


def current_tokenizers(tier: Tier) -> list[int]:
    """The tokenizer indices of the pool serving now, from the supervisor's status file."""
    status = read_status_file(tier.endpoints.directory)
    if status is None:
        return list(range(tier.settings.tokenizer.workers))
    return sorted(t.index for t in status.tiers if t.tier == "tokenizer" and t.state in ("starting", "up", "down"))


class Gateway:
    def __init__(self, tier: Tier):
        self.tier = tier
        self.endpoints = endpoints = tier.endpoints
        self.address = endpoints.frontend(os.getpid())
        # Asyncio sockets only: a send that waits for a connection must not stop the event loop,
        # which serves every other request of this worker meanwhile.
        self._async = zmq.asyncio.Context()
        self._control = open_socket(self._async, zmq.DEALER, connect=endpoints.control)
        self._tokenizers: dict[int, zmq.Socket] = {}  # by index, connected on first use
        # The tokenizer workers new requests go to. A reload replaces the pool: new indices join
        # when they are up, old ones leave when they start draining (and finish what they hold).
        self._pool: list[int] = current_tokenizers(tier)
        self._turn = itertools.count()
        self._waiting: dict[str, tuple[asyncio.Queue[GenerateOutput], int]] = {}
        # /tokenize and /detokenize requests waiting for their reply, and the tokenizer worker that has them
        self._asked: dict[str, tuple[asyncio.Future[Tokenized | Detokenized | ErrorInfo], int]] = {}
        self._tasks: list[asyncio.Task] = []
        self.draining = False  # the daemon is stopping: new requests get a 503
        self.retiring = False  # a new front-end took over: ask HTTP/1.1 clients to reconnect
        self._down: set[int] = set()  # pool members the supervisor reported down (they come back)
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
        # Granian starts accepting right after the lifespan startup this runs in.
        with contextlib.suppress(PeerGone):
            await send_async(self._control, FrontendWorkerReady(os.getpid(), os.getppid()), READY_GRACE_MS)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._async.destroy(linger=0)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        """The outputs of `request` as they come; an abandoned iteration aborts the request."""
        queue: asyncio.Queue[GenerateOutput] = asyncio.Queue()
        self._waiting[request.request_id] = (queue, NOT_SENT)  # before the send: outputs may come first
        tokenizer, finished = NOT_SENT, False
        try:
            try:
                tokenizer = await self._submit(request)
            except UNSENDABLE_ERRORS:
                yield GenerateOutput(request.request_id, finish_reason="error", error=UNSENDABLE)
                return
            if tokenizer is None:
                yield _error(request.request_id, 503, "no tokenizer worker is reachable")
                return
            self._waiting[request.request_id] = (queue, tokenizer)
            if tokenizer in self._down:  # it went while the send returned: its down event missed us
                queue.put_nowait(_error(request.request_id, 503, TOKENIZER_STOPPED))
            while not finished:
                output = await queue.get()
                finished = output.finish_reason is not None
                yield output
        finally:
            self._waiting.pop(request.request_id, None)
            if tokenizer is not None and tokenizer != NOT_SENT and not finished:
                # the client left, or the caller gave up: free the engine's work
                with contextlib.suppress(PeerGone):
                    await send_async(self._tokenizer(tokenizer), AbortRequest(request.request_id))

    async def tokenize(self, request: Tokenize) -> Tokenized:
        """The tokenizer pool's answer; one with a 503 error if no worker gives it."""
        reply = await self._ask(request)
        if isinstance(reply, ErrorInfo):
            return Tokenized(request.request_id, error=reply)
        assert isinstance(reply, Tokenized)  # replies are matched by request id
        return reply

    async def detokenize(self, request: Detokenize) -> Detokenized:
        reply = await self._ask(request)
        if isinstance(reply, ErrorInfo):
            return Detokenized(request.request_id, error=reply)
        assert isinstance(reply, Detokenized)
        return reply

    async def _ask(self, request: Tokenize | Detokenize) -> Tokenized | Detokenized | ErrorInfo:
        """Send one request, wait for its one reply: an ErrorInfo (503) if no tokenizer worker
        takes it, or the one that did stops or does not answer in time."""
        answer: asyncio.Future[Tokenized | Detokenized | ErrorInfo] = asyncio.get_running_loop().create_future()
        self._asked[request.request_id] = (answer, NOT_SENT)  # before the send: the reply may come first
        try:
            try:
                tokenizer = await self._submit(request)
            except UNSENDABLE_ERRORS:
                return UNSENDABLE
            if tokenizer is None:
                return _unavailable("no tokenizer worker is reachable")
            self._asked[request.request_id] = (answer, tokenizer)
            if tokenizer in self._down and not answer.done():
                answer.set_result(_unavailable(TOKENIZER_STOPPED))
            log.debug("tokenizer.asked", kind=type(request).__name__, tokenizer=tokenizer)
            async with asyncio.timeout(ASK_TIMEOUT_S):
                return await answer
        except TimeoutError:
            return _unavailable(f"the tokenizer worker did not answer within {ASK_TIMEOUT_S:.0f} s")
        finally:
            self._asked.pop(request.request_id, None)

    async def _submit(self, request: GenerateRequest | Tokenize | Detokenize) -> int | None:
        """Send to the next tokenizer worker that takes it; its index, or None if none does.

        Workers the supervisor reported down are skipped without trying: a send to an
        absent peer waits for a connection (CONNECT_GRACE_MS), which this request would wait.
        """
        first = next(self._turn)
        for attempt in range(2):
            pool = self._pool
            for offset in range(len(pool)):
                index = pool[(first + offset) % len(pool)]
                if index in self._down:
                    continue
                try:
                    await send_async(self._tokenizer(index), request)
                except PeerGone:
                    continue
                return index
            if attempt == 0:  # we may have missed a pool change: the supervisor's status file has it
                self._pool, self._down = current_tokenizers(self.tier), set()
        return None

    def _tokenizer(self, index: int) -> zmq.Socket:
        if index not in self._tokenizers:
            self._tokenizers[index] = open_socket(self._async, zmq.PUSH, connect=self.endpoints.tokenizer(index))
        return self._tokenizers[index]

    async def _read_outputs(self, receiver: Receiver) -> None:
        while True:
            batch = receiver.decode(await receiver.socket.recv())
            if isinstance(batch, Tokenized | Detokenized):
                asked = self._asked.get(batch.request_id)
                if asked is not None and not asked[0].done():
                    asked[0].set_result(batch)
                continue
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
            elif isinstance(message, FrontendRetiring) and message.main_pid == os.getppid():
                self.retiring = True
            elif isinstance(message, ConfigUpdate):
                self.tier.adopt(message.generation)
                with contextlib.suppress(PeerGone):
                    await send_async(self._control, ConfigApplied("frontend", 0, os.getpid(), message.generation))
                log.info("frontend.config_applied")

    def _on_event(self, event: TierEvent) -> None:
        if event.tier == "frontend" and event.state == "draining":
            self.draining = True
        if event.tier != "tokenizer":
            return
        if event.state == "up":
            self._down.discard(event.index)
            if event.index not in self._pool:
                self._pool = sorted([*self._pool, event.index])
        elif event.state == "draining" and event.index in self._pool:
            self._pool = [i for i in self._pool if i != event.index]
        elif event.state == "down":  # it died: the supervisor restarts it
            self._down.add(event.index)
        elif event.state == "stopped":  # for good
            self._pool = [i for i in self._pool if i != event.index]
            self._down.discard(event.index)
        if event.state in ("down", "stopped"):
            lost = [rid for rid, (_queue, index) in self._waiting.items() if index == event.index]
            for request_id in lost:
                queue, _index = self._waiting[request_id]
                queue.put_nowait(_error(request_id, 503, TOKENIZER_STOPPED))
            if lost:
                log.warning("frontend.requests_failed", reason="tokenizer stopped", count=len(lost))
            for answer, index in self._asked.values():
                if index == event.index and not answer.done():
                    answer.set_result(_unavailable(TOKENIZER_STOPPED))
