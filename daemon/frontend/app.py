"""The ASGI application: OpenAI-compatible API, health, metrics and server info.

Plain ASGI, no framework: the routes are few, and the app must watch every
client for disconnects itself (Granian's send() never fails after one), so an
abandoned request is aborted in the engine instead of generating for nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import structlog

from daemon import __version__
from daemon.config.schema import config_hash, flat_values, nested_values
from daemon.frontend import metrics, openai
from daemon.frontend.gateway import Gateway
from daemon.ipc.messages import (
    DaemonStatus,
    ErrorInfo,
    GenerateOutput,
    GenerateRequest,
    Sampling,
    read_status_file,
)
from daemon.tier import Tier, start_tier

log = structlog.get_logger("daemon.frontend")
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

HEALTH_GENERATE_TIMEOUT_S = 20.0
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_json = msgspec.json.Encoder()


class ClientGone(Exception):
    """The client disconnected before we could answer."""


class Application:
    def __init__(self) -> None:
        self.tier: Tier | None = None
        self.gateway: Gateway | None = None
        self.routes: dict[str, tuple[str, Callable[..., Awaitable[None]]]] = {
            "/health": ("GET", self._health),
            "/health_generate": ("GET", self._health_generate),
            "/metrics": ("GET", self._metrics),
            "/server_info": ("GET", self._server_info),
            "/v1/models": ("GET", self._models),
            "/v1/completions": ("POST", self._completions),
            "/v1/chat/completions": ("POST", self._chat_completions),
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    # --- lifespan -----------------------------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self._start()
                except Exception as exc:
                    log.exception("frontend.start_failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.gateway is not None:
                    await self.gateway.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _start(self) -> None:
        self.tier = start_tier("frontend", stopped_by_supervisor=False)
        self.gateway = Gateway(self.tier)
        await self.gateway.start()
        log.info("frontend.worker_ready", address=self.gateway.address)

    # --- routing ------------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        route = self.routes.get(path.rstrip("/") or "/")
        answered: list[int] = []

        async def counted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answered.append(message["status"])
                if self.gateway is not None and self.gateway.retiring and scope.get("http_version") == "1.1":
                    # the client's next request goes on a new connection, to the new front-end
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        if route is None:
            await _send_error(counted, ErrorInfo(404, f"no route {path}", type="not_found_error"))
        elif method != route[0]:
            await _send_error(counted, ErrorInfo(405, f"{path} takes {route[0]}"))
        else:
            try:
                await route[1](scope, receive, counted)
            except Exception:
                log.exception("frontend.request_failed", path=path)
                if not answered:
                    await _send_error(
                        counted, ErrorInfo(500, "internal error; see the server log", type="server_error")
                    )
        # 499: the client left before any answer (nginx's convention)
        metrics.REQUESTS.labels(path if route else "other", str(answered[0] if answered else 499)).inc()

    # --- probes and info ----------------------------------------------------------------------

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_json(send, 200, {"status": "ok"})

    async def _health_generate(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Ready when one real token has gone through every tier."""
        assert self.gateway is not None
        if self.gateway.draining:
            return await _send_error(send, ErrorInfo(503, "the server is shutting down"))
        probe = GenerateRequest(
            f"health-{uuid.uuid4().hex}",
            self.gateway.address,
            Sampling(max_tokens=1, temperature=0.0, ignore_eos=True),
            prompt="health",
        )
        last = None
        try:
            async with asyncio.timeout(HEALTH_GENERATE_TIMEOUT_S):
                async for output in self.gateway.generate(probe):
                    last = output
        except TimeoutError:
            return await _send_error(send, ErrorInfo(503, "no token within the health check's time"))
        if last is None or last.error is not None:
            error = last.error if last and last.error else ErrorInfo(503, "the engine is not ready")
            return await _send_error(send, ErrorInfo(503, error.message, type=error.type))
        await _send_json(send, 200, {"status": "ok", "completion_tokens": last.completion_tokens})

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.gateway is not None
        stats = self.gateway.stats
        metrics.RUNNING.set(stats.running)
        metrics.QUEUED.set(stats.queued)
        metrics.CACHE_FREE.set(stats.free_tokens)
        metrics.CACHE_TOTAL.set(stats.total_tokens)
        body = metrics.render(self._status())
        await _send_bytes(send, 200, body, "text/plain; version=0.0.4; charset=utf-8")

    async def _server_info(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.tier is not None and self.gateway is not None
        settings = self.tier.settings
        status = self._status()
        tiers = msgspec.to_builtins(status.tiers) if status else []
        supervisor = {"pid": status.supervisor_pid, "started": status.started} if status else {}
        last_reload = msgspec.to_builtins(status.last_reload) if status and status.last_reload else None
        info = {
            "version": __version__,
            "config": {"generation": self.tier.generation, "hash": config_hash(settings), "last_reload": last_reload},
            "supervisor": supervisor,
            "tiers": tiers,
            "effective_config": nested_values(flat_values(settings)),
        }
        await _send_json(send, 200, info)

    def _status(self) -> DaemonStatus | None:
        """The supervisor's status file: tier PIDs, epochs and states."""
        assert self.tier is not None
        return read_status_file(self.tier.endpoints.directory)

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not await self._authorized(scope, send):
            return
        assert self.tier is not None
        name = self.tier.settings.model.served_model_name
        model = {"id": name, "object": "model", "created": 0, "owned_by": "daemon"}
        await _send_json(send, 200, {"object": "list", "data": [model]})

    # --- generation ---------------------------------------------------------------------------

    async def _completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._generate(scope, receive, send, chat=False)

    async def _chat_completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._generate(scope, receive, send, chat=True)

    async def _generate(self, scope: Scope, receive: Receive, send: Send, *, chat: bool) -> None:
        assert self.tier is not None and self.gateway is not None
        supplied = _header(scope, b"x-request-id")
        request_id = supplied if supplied and _REQUEST_ID.match(supplied) else uuid.uuid4().hex
        headers = [(b"x-request-id", request_id.encode())]
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            log.debug("request.received", path=scope["path"], http_version=scope.get("http_version"))
            if not await self._authorized(scope, send, headers):
                return
            if self.gateway.draining:
                return await _send_error(send, ErrorInfo(503, "the server is shutting down"), headers)
            try:
                body = await _read_body(scope, receive, self.tier.settings.server.max_request_body_bytes)
                parsed = openai.parse(body, openai.ChatRequest if chat else openai.CompletionRequest)
                served = self.tier.settings.model.served_model_name
                if parsed.model is not None and parsed.model != served:
                    error = ErrorInfo(
                        404,
                        f"The model `{parsed.model}` does not exist; this server serves `{served}`",
                        type="not_found_error",
                        param="model",
                    )
                    return await _send_error(send, error, headers)
                request = openai.to_generate_request(parsed, request_id, self.gateway.address)
            except openai.BadRequest as exc:
                return await _send_error(send, exc.error, headers)
            except ClientGone:
                return
            responder = openai.Responder(chat, request_id, served)
            started = time.monotonic()
            if parsed.stream:
                include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
                work = self._stream(send, request, responder, headers, include_usage, started)
            else:
                work = self._respond(send, request, responder, headers, started)
            await _until_disconnected(receive, work)

    async def _respond(
        self, send: Send, request: GenerateRequest, responder: openai.Responder, headers: list, started: float
    ) -> None:
        assert self.gateway is not None
        text, last, first = [], None, None
        async for output in self.gateway.generate(request):
            first = first or time.monotonic()
            text.append(output.text)
            last = output
        assert last is not None
        endpoint = "/v1/chat/completions" if responder.chat else "/v1/completions"
        if last.error is not None:
            return await _send_error(send, last.error, headers)
        _observe(endpoint, started, first, last)
        await _send_json(send, 200, responder.full("".join(text), last), headers)

    async def _stream(
        self,
        send: Send,
        request: GenerateRequest,
        responder: openai.Responder,
        headers: list,
        include_usage: bool,
        started: float,
    ) -> None:
        assert self.gateway is not None
        endpoint = "/v1/chat/completions" if responder.chat else "/v1/completions"
        outputs = self.gateway.generate(request)
        first_output = await anext(outputs)
        if first_output.error is not None:  # refused before anything was generated: a plain error response
            await outputs.aclose()
            return await _send_error(send, first_output.error, headers)
        first = time.monotonic()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), *headers],
            }
        )
        if (opening := responder.first_chunk()) is not None:
            await _send_event(send, opening)
        last = first_output
        async for output in _prepend(first_output, outputs):
            last = output
            if output.error is not None:
                await _send_event(send, openai.error_body(output.error), final=True)
                return
            if output.text or output.finish_reason:
                await _send_event(send, responder.chunk(output))
        if include_usage:
            await _send_event(send, responder.usage_chunk(last))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        _observe(endpoint, started, first, last)

    async def _authorized(self, scope: Scope, send: Send, headers: list | None = None) -> bool:
        assert self.tier is not None
        key = self.tier.settings.server.api_key
        if key is None:
            return True
        supplied = _header(scope, b"authorization") or ""
        token = supplied[7:] if supplied[:7].lower() == "bearer " else ""
        if hmac.compare_digest(token.encode(), key.get_secret_value().encode()):
            return True
        error = ErrorInfo(401, "Incorrect API key provided", type="invalid_request_error")
        await _send_error(send, error, [*(headers or []), (b"www-authenticate", b"Bearer")])
        return False


# --- helpers -------------------------------------------------------------------------------------


def _observe(endpoint: str, started: float, first: float | None, last: GenerateOutput) -> None:
    now = time.monotonic()
    if first is not None:
        metrics.TIME_TO_FIRST_TOKEN.observe(first - started)
    metrics.LATENCY.labels(endpoint).observe(now - started)
    metrics.PROMPT_TOKENS.observe(last.prompt_tokens)
    metrics.COMPLETION_TOKENS.observe(last.completion_tokens)
    metrics.TOKENS.labels("prompt").inc(last.prompt_tokens)
    metrics.TOKENS.labels("completion").inc(last.completion_tokens)


async def _prepend(first: GenerateOutput, rest: AsyncIterator[GenerateOutput]) -> AsyncIterator[GenerateOutput]:
    yield first
    if first.finish_reason is None:
        async for output in rest:
            yield output


async def _until_disconnected(receive: Receive, work: Awaitable[None]) -> None:
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


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    declared = _header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise openai.BadRequest(f"the request body exceeds {limit} bytes", status=413)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise openai.BadRequest(f"the request body exceeds {limit} bytes", status=413)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _send_bytes(send: Send, status: int, body: bytes, content_type: str, headers: list | None = None) -> None:
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


async def _send_json(send: Send, status: int, body: Any, headers: list | None = None) -> None:
    await _send_bytes(send, status, _json.encode(body), "application/json", headers)


async def _send_error(send: Send, error: ErrorInfo, headers: list | None = None) -> None:
    extra = list(headers or [])
    if error.status == 503:
        extra.append((b"retry-after", b"1"))
    await _send_bytes(send, error.status, _json.encode(openai.error_body(error)), "application/json", extra)


async def _send_event(send: Send, body: Any, final: bool = False) -> None:
    await send({"type": "http.response.body", "body": b"data: " + _json.encode(body) + b"\n\n", "more_body": not final})


app = Application()
