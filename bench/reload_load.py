"""The closed-loop completion load of bench/reload.py, and the verdict on each answer: complete, or
which way it failed (HTTP status, a stream's error event, a connection closed, a timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import time
from dataclasses import dataclass
from importlib import metadata

from common import REQUEST_TIMEOUT_S


@dataclass
class Record:
    started: float  # time.time()
    ended: float
    stream: bool
    failure: str | None  # None: a complete 200 answer with max_tokens tokens


def error_message(body: bytes) -> str:
    """': <the error message>' of an OpenAI-style error body (cut short), or ''."""
    try:
        message = str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return ""
    return f" ({message[:60]}{'...' if len(message) > 60 else ''})"


def check_plain(body: bytes, max_tokens: int) -> str | None:
    try:
        tokens = int(json.loads(body)["usage"]["completion_tokens"])
    except (ValueError, KeyError, TypeError):
        return "200 with a bad body"
    return None if tokens == max_tokens else f"200 with {tokens} tokens"


def check_stream(body: bytes, max_tokens: int) -> str | None:
    events = [e for e in body.split(b"\n\n") if e.strip()]
    if not events or events[-1].strip() != b"data: [DONE]":
        if any(b'"error"' in e[:40] for e in events):
            return "stream: error event"
        return "stream: ended without [DONE]"
    if any(e.startswith(b'data: {"error"') for e in events):
        return "stream: error event"
    try:
        tokens = int(json.loads(events[-2][len(b"data: ") :])["usage"]["completion_tokens"])
    except (ValueError, KeyError, TypeError, IndexError):
        return "stream: no usage chunk"
    return None if tokens == max_tokens else f"stream: {tokens} tokens"


def classify(exc: BaseException) -> str:
    import aiohttp

    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"connect failed ({exc.os_error.strerror or exc.os_error})"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "connection closed before an answer"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "connection closed during the answer"
    if isinstance(exc, aiohttp.ClientOSError):
        cause = exc.__cause__
        if "write request" in str(exc):  # the server closed the (keep-alive) connection as the request went out
            how = f"errno {errno.errorcode.get(exc.errno, exc.errno)}" if exc.errno else type(cause).__name__
            return f"connection closed as the request was sent ({how})"
        if exc.errno in (errno.ECONNRESET, errno.EPIPE):
            return "connection reset"
        return f"socket error ({exc.strerror or exc})"
    return type(exc).__name__


class Load:
    """Closed loop over HTTP/1.1 keep-alive: each client sends its next request when the last is answered."""

    def __init__(self, url: str, prompts: list[str], args: argparse.Namespace):
        self.url = url + "/v1/completions"
        self.prompts = prompts
        self.args = args
        self.records: list[Record] = []
        self.issued = 0
        self.stopping = False
        self.tasks: list[asyncio.Task] = []
        self.session = None
        self.description = ""
        self.crashes: list[str] = []

    async def start(self) -> None:
        import aiohttp

        clients = self.args.clients
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=clients, limit_per_host=clients),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
        )
        self.description = f"aiohttp {metadata.version('aiohttp')}, up to {clients} HTTP/1.1 keep-alive connections"
        self.deadline = time.monotonic() + self.args.load_time_limit
        self.tasks = [asyncio.create_task(self._client(i)) for i in range(clients)]

    async def _client(self, index: int) -> None:
        args = self.args
        stream = (index * 100 // args.clients) < args.stream_percent  # the first stream_percent% of clients
        while not self.stopping and time.monotonic() < self.deadline:
            if args.max_requests and self.issued >= args.max_requests:
                return
            n = self.issued
            self.issued += 1
            body = {
                "prompt": self.prompts[n % len(self.prompts)],
                "max_tokens": args.max_tokens,
                "temperature": 0.0,
                "ignore_eos": True,
            }
            if stream:
                body["stream"] = True
                body["stream_options"] = {"include_usage": True}
            started = time.time()
            try:
                async with self.session.post(self.url, json=body) as response:
                    content = await response.read()
                    if response.status != 200:
                        failure = f"HTTP {response.status}{error_message(content)}"
                    elif stream:
                        failure = check_stream(content, args.max_tokens)
                    else:
                        failure = check_plain(content, args.max_tokens)
            except Exception as exc:  # noqa: BLE001  (each kind is counted)
                failure = classify(exc)
            self.records.append(Record(started, time.time(), stream, failure))
            if failure is not None and args.error_pause > 0:
                await asyncio.sleep(args.error_pause)

    async def stop(self, grace: float) -> None:
        """Let the requests in flight finish (bounded by `grace`), then close."""
        self.stopping = True
        done, pending = await asyncio.wait(self.tasks, timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                self.crashes.append(repr(task.exception()))
        if pending:
            self.crashes.append(f"{len(pending)} client(s) still waiting {grace:g} s after the load stopped")
        if self.session is not None:
            await self.session.close()

    def between(self, start: float, end: float) -> list[Record]:
        """The requests whose lifetime overlaps [start, end]."""
        return [r for r in self.records if r.started < end and r.ended > start]

    def inside(self, start: float, end: float) -> list[Record]:
        return [r for r in self.records if r.started >= start and r.ended <= end]


def failures_by_kind(records: list[Record]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for r in records:
        if r.failure is not None:
            kinds[r.failure] = kinds.get(r.failure, 0) + 1
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


def ok_latencies(records: list[Record]) -> list[float]:
    return [r.ended - r.started for r in records if r.failure is None]


def kinds_text(kinds: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in kinds.items())
