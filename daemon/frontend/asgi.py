"""Plain ASGI plumbing shared by the front-end's routes: bodies in, JSON, errors and events out.

Granian's send() never fails after a client disconnects, so every long answer runs
beside a watch on receive() (`until_disconnected`): an abandoned request is cancelled,
which aborts its work in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import structlog

from daemon.ipc.messages import ErrorInfo

log = structlog.get_logger("daemon.frontend")
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

_json = msgspec.json.Encoder()
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class ClientGone(Exception):
    """The client disconnected before we could answer."""


class BadRequest(Exception):
    """A request the client must change: answered with its status and OpenAI's error object."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, type: str | None = None):
        super().__init__(message)
        default_type = "not_found_error" if status == 404 else "invalid_request_error"
        self.error = ErrorInfo(status, message, type=type or default_type, param=param)


def error_body(error: ErrorInfo) -> dict[str, Any]:
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": None}}


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def request_ids(scope: Scope) -> tuple[str, str]:
    """(the id the response echoes: the client's X-Request-Id when it is a sane one, the request's
    own id inside the daemon). The client's is never trusted to be unique (retrying proxies reuse
    them): the daemon's own starts with it."""
    supplied = header(scope, b"x-request-id")
    client = supplied if supplied and _REQUEST_ID.match(supplied) else None
    own = f"{client}-{uuid.uuid4().hex[:12]}" if client else uuid.uuid4().hex
    return client or own, own


async def read_body(scope: Scope, receive: Receive, limit: int, timeout_s: float) -> bytes:
    """The whole body, within `limit` bytes (413) and `timeout_s` seconds (408: a body shorter than
    its Content-Length, or trickled, would otherwise hold the request open forever)."""
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(f"the request body exceeds {limit} bytes", status=413)
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_chunks(receive, limit)
    except TimeoutError:
        raise BadRequest(f"the request body did not arrive within {timeout_s:g} s", status=408) from None


async def drain_body(receive: Receive, limit: int, timeout_s: float) -> None:
    """Read and drop up to `limit` bytes of a body we refuse, within `timeout_s`: over HTTP/2, a
    response sent before the request body is read makes the stream end in a reset that curl and
    httpx report instead of the response."""
    with contextlib.suppress(TimeoutError, BadRequest, ClientGone):
        async with asyncio.timeout(timeout_s):
            await _read_chunks(receive, limit)


async def _read_chunks(receive: Receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"the request body exceeds {limit} bytes", status=413)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def send_bytes(send: Send, status: int, body: bytes, content_type: str, headers: Headers | None = None) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_json(send: Send, status: int, body: Any, headers: Headers | None = None) -> None:
    await send_bytes(send, status, _json.encode(body), "application/json", headers)


async def send_error(send: Send, error: ErrorInfo, headers: Headers | None = None) -> None:
    extra = list(headers or [])
    if error.status == 503:
        extra.append((b"retry-after", b"1"))
    await send_bytes(send, error.status, _json.encode(error_body(error)), "application/json", extra)


async def start_events(send: Send, headers: Headers | None = None) -> None:
    """Open a server-sent event stream."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), *(headers or [])],
        }
    )


async def send_event(send: Send, body: Any, final: bool = False) -> None:
    await send({"type": "http.response.body", "body": b"data: " + _json.encode(body) + b"\n\n", "more_body": not final})


async def end_events(send: Send) -> None:
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


async def until_disconnected(receive: Receive, work: Awaitable[None]) -> None:
    """Run `work`; if the client disconnects first, cancel it (which aborts its request)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(receive))
    done, _pending = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        watch.cancel()
        task.result()
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    log.info("frontend.client_gone")


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
