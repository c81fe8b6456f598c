"""The ASGI application: OpenAI-compatible API, health, metrics and server info.

Plain ASGI, no framework: the routes are few, and the app must watch every
client for disconnects itself (Granian's send() never fails after one), so an
abandoned request is aborted in the engine instead of generating for nobody.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from daemon.frontend import metrics, openai, probes, utility
from daemon.frontend.api_docs import API_ROUTES, openapi
from daemon.frontend.asgi import (
    BadRequest,
    ClientGone,
    Receive,
    Scope,
    Send,
    drain_body,
    header,
    read_body,
    request_ids,
    send_bytes,
    send_error,
    send_json,
    until_disconnected,
)
from daemon.frontend.chat_answer import AnswerShape
from daemon.frontend.gateway import Gateway
from daemon.frontend.generation import Generation
from daemon.frontend.request_models import ChatRequest, CompletionRequest, check_policy, logged_fields
from daemon.frontend.response_models import Responder
from daemon.frontend.tools import plan_tools
from daemon.ipc.messages import DaemonStatus, ErrorInfo, read_status_file
from daemon.tier import Tier, start_tier

log = structlog.get_logger("daemon.frontend")
# How much of a too-large body is read and dropped before the 413 (bodies larger still end in a reset)
DRAIN_BEYOND_LIMIT_BYTES = 16 * 1024 * 1024


class Application:
    def __init__(self) -> None:
        self.tier: Tier | None = None
        self.gateway: Gateway | None = None
        self.probe: probes.GenerationProbe | None = None
        # By path; a {name} in a path is a parameter, passed in scope["path_params"].
        self.routes: dict[str, tuple[str, Callable[..., Awaitable[None]]]] = {
            "/health": ("GET", self._health),
            "/health_generate": ("GET", self._health_generate),
            "/metrics": ("GET", self._metrics),
            "/server_info": ("GET", self._server_info),
            "/openapi.json": ("GET", self._openapi),
            "/v1/completions": ("POST", self._completions),
            "/v1/chat/completions": ("POST", self._chat_completions),
            # /v1/models, /v1/models/{model}, /tokenize, /detokenize, /version
            **utility.Routes(self, self._authorized).table(),
        }
        self._patterns = [(_path_pattern(path), path) for path in self.routes if "{" in path]

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
        self.probe = probes.GenerationProbe(self.gateway)
        await self.gateway.start()
        log.info("frontend.worker_ready", address=self.gateway.address)

    # --- routing ------------------------------------------------------------------------------

    def _match(self, path: str) -> tuple[str, dict[str, str]] | None:
        """The route `path` takes, by its path in the table, with its parameters."""
        path = path.rstrip("/") or "/"
        if path in self.routes:
            return path, {}
        for pattern, template in self._patterns:
            if (found := pattern.fullmatch(path)) is not None:
                return template, found.groupdict()
        return None

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        matched = self._match(path)
        route = self.routes[matched[0]] if matched else None
        if matched and matched[1]:
            scope = {**scope, "path_params": matched[1]}
        answered: list[int] = []

        async def counted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answered.append(message["status"])
                if self.gateway is not None and self.gateway.retiring and scope.get("http_version") == "1.1":
                    # the client's next request goes on a new connection, to the new front-end
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        if route is None:
            await send_error(counted, ErrorInfo(404, f"no route {path}", type="not_found_error"))
        elif method != route[0]:
            await send_error(counted, ErrorInfo(405, f"{path} takes {route[0]}"))
        else:
            try:
                await route[1](scope, receive, counted)
            except Exception:
                log.exception("frontend.request_failed", path=path)
                if not answered:
                    await send_error(counted, ErrorInfo(500, "internal error; see the server log", type="server_error"))
        # 499: the client left before any answer (nginx's convention)
        # by route, not by path: a path parameter must not make a label per value
        metrics.REQUESTS.labels(matched[0] if matched else "other", str(answered[0] if answered else 499)).inc()

    # --- probes and info ----------------------------------------------------------------------

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, {"status": "ok"})

    async def _health_generate(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Ready when one real token has gone through every tier (one shared by probes at once)."""
        assert self.probe is not None and self.gateway is not None
        if self.gateway.draining:
            return await send_error(send, ErrorInfo(503, "the server is shutting down"))
        result = await self.probe.check()
        if isinstance(result, ErrorInfo):
            return await send_error(send, result)
        await send_json(send, 200, result)

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.gateway is not None
        stats = self.gateway.stats
        metrics.RUNNING.set(stats.running)
        metrics.QUEUED.set(stats.queued)
        metrics.CACHE_FREE.set(stats.free_tokens)
        metrics.CACHE_TOTAL.set(stats.total_tokens)
        body = metrics.render(self._status(), stats)
        await send_bytes(send, 200, body, "text/plain; version=0.0.4; charset=utf-8")

    async def _server_info(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.tier is not None
        status = self._status()
        full = self._key_given(scope)
        replicas = self.gateway.stats.replicas if self.gateway is not None else []
        info = probes.server_info(self.tier, status, utility.loaded_model(status), full=full, replicas=replicas)
        await send_json(send, 200, info)

    def _status(self) -> DaemonStatus | None:
        """The supervisor's status file: tier PIDs, epochs and states."""
        assert self.tier is not None
        return read_status_file(self.tier.endpoints.directory)

    async def _openapi(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, openapi(API_ROUTES))

    # --- generation ---------------------------------------------------------------------------

    async def _completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._generate(scope, receive, send, chat=False)

    async def _chat_completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._generate(scope, receive, send, chat=True)

    async def _generate(self, scope: Scope, receive: Receive, send: Send, *, chat: bool) -> None:
        assert self.tier is not None and self.gateway is not None
        echoed, request_id = request_ids(scope)
        headers = [(b"x-request-id", echoed.encode())]
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            log.debug("request.received", path=scope["path"], http_version=scope.get("http_version"))
            if not await self._authorized(scope, receive, send, headers):
                return
            if self.gateway.draining:
                return await send_error(send, ErrorInfo(503, "the server is shutting down"), headers)
            server = self.tier.settings.server
            try:
                body = await read_body(scope, receive, server.max_request_body_bytes, server.body_read_timeout_s)
                model = ChatRequest if chat else CompletionRequest
                parsed = openai.parse(body, model, server.unknown_request_fields)
                if noted := logged_fields(parsed):
                    log.info("request.client_fields", **noted)
                served = self.tier.settings.model.served_model_name
                if parsed.model is not None and parsed.model != served:
                    message = f"The model `{parsed.model}` does not exist; this server serves `{served}`"
                    raise BadRequest(message, "model", status=404)
                check_policy(parsed)
                tools = plan_tools(parsed) if isinstance(parsed, ChatRequest) else None
                requests = openai.to_generate_requests(
                    parsed, request_id, self.gateway.address, self.tier.settings, tools
                )
            except BadRequest as exc:
                # (not over HTTP/1.1: there the 413 goes out at once and the connection closes,
                # and a client waiting on `Expect: 100-continue` never uploads the body)
                if exc.error.status == 413 and scope.get("http_version") == "2":
                    # over HTTP/2 an answer before the body is read ends in a reset that clients
                    # report instead of the 413: read and drop a bounded amount past the limit
                    bound = server.max_request_body_bytes + DRAIN_BEYOND_LIMIT_BYTES
                    await drain_body(receive, bound, server.body_read_timeout_s)
                return await send_error(send, exc.error, headers)
            except ClientGone:
                return
            responder = Responder(
                chat,
                echoed,
                served,
                choices=len(requests),
                per_prompt=parsed.n or 1,
                logprobs=requests[0].sampling.logprobs,
                prompt_logprobs=parsed.prompt_logprobs,
                echo=requests[0].echo,
                chat_echo=openai.chat_echo(parsed),
                shape=AnswerShape(tools, None, self.tier.settings.model.reasoning_parser) if chat else None,
            )
            generation = Generation(self.gateway, requests, responder, headers)
            if parsed.stream:
                options = parsed.stream_options
                include_usage = bool(options and options.include_usage)
                continuous = bool(options and options.continuous_usage_stats)
                await until_disconnected(receive, generation.stream(send, include_usage, continuous))
            else:
                await until_disconnected(receive, generation.respond(send))

    def _key_given(self, scope: Scope) -> bool:
        """Whether the request may see what server.api_key guards (always, when none is set)."""
        assert self.tier is not None
        key = self.tier.settings.server.api_key
        if key is None:
            return True
        supplied = header(scope, b"authorization") or ""
        token = supplied[7:] if supplied[:7].lower() == "bearer " else ""
        return hmac.compare_digest(token.encode(), key.get_secret_value().encode())

    async def _authorized(self, scope: Scope, receive: Receive, send: Send, headers: list | None = None) -> bool:
        if self._key_given(scope):
            return True
        error = ErrorInfo(401, "Incorrect API key provided", type="invalid_request_error")
        server = self.tier.settings.server
        await drain_body(receive, server.max_request_body_bytes, server.body_read_timeout_s)
        await send_error(send, error, [*(headers or []), (b"www-authenticate", b"Bearer")])
        return False


def _path_pattern(template: str) -> re.Pattern[str]:
    """`/v1/models/{model}` as a regular expression. A parameter takes the rest of the path,
    slashes included: served model names are often Hugging Face ids (`org/name`)."""
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>.+)" for i, p in enumerate(parts)))


app = Application()
