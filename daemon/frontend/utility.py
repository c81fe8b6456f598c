"""The endpoints beside generation: the served model, /tokenize and /detokenize, /version.

The shapes are OpenAI's (the model object) and vLLM's (tokenize, detokenize,
version), so clients written for either work. Every body is a msgspec Struct,
and ENDPOINTS lists each route with its request and response structs: it is the
source for /openapi.json as well as for the route table.

The front-end resolves nothing about the model itself: the worker reports the
directory it loaded and the context it serves, the supervisor keeps them in its
status file, and /tokenize and /detokenize run in the tokenizer tier.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

import msgspec
import structlog

from daemon import __version__
from daemon.frontend.asgi import (
    BadRequest,
    ClientGone,
    Receive,
    Scope,
    Send,
    read_body,
    request_ids,
    send_error,
    send_json,
)
from daemon.frontend.parsing import Unknown, convert, json_object, parse
from daemon.frontend.response_models import ErrorResponse
from daemon.frontend.tools import checked_tool
from daemon.ipc.messages import (
    ChatOptions,
    DaemonStatus,
    Detokenize,
    ErrorInfo,
    Tokenize,
    read_status_file,
    serving_worker,
)

if TYPE_CHECKING:
    from daemon.frontend.gateway import Gateway
    from daemon.tier import Tier

__all__ = [
    "ENDPOINTS",
    "Call",
    "DetokenizeRequest",
    "DetokenizeResponse",
    "Endpoint",
    "ErrorResponse",
    "ModelCard",
    "ModelList",
    "Routes",
    "TokenizeChatRequest",
    "TokenizeCompletionRequest",
    "TokenizeResponse",
    "VersionResponse",
    "serving_worker",
]

log = structlog.get_logger("daemon.frontend")
# Beyond any vocabulary, and what a MessagePack integer to the tokenizer tier always holds.
TokenId = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
ModelName = Annotated[
    str | None, msgspec.Meta(description="The served model (model.served_model_name); any other is a 404.")
]


def _doc(text: str) -> msgspec.Meta:
    return msgspec.Meta(description=text)


# --- the served model ------------------------------------------------------------------------------


class ModelCard(msgspec.Struct, kw_only=True):
    """The served model: OpenAI's model object, with vLLM's root and max_model_len."""

    id: Annotated[str, _doc("The name requests use (model.served_model_name).")]
    object: Literal["model"] = "model"
    created: Annotated[
        int, _doc("Unix time the worker serving the model finished loading it; 0 while none serves (a restart).")
    ]
    owned_by: str = "daemon"
    root: Annotated[str | None, _doc("The model directory the worker loaded (absolute).")] = None
    max_model_len: Annotated[int | None, _doc("The longest request served: prompt plus completion tokens.")] = None


class ModelList(msgspec.Struct, kw_only=True):
    """The models served: one."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- /tokenize, /detokenize ------------------------------------------------------------------------


class TokenizeCompletionRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A prompt to token ids, as /v1/completions would tokenize it."""

    model: ModelName = None
    prompt: Annotated[str, _doc("The text to tokenize.")]
    add_special_tokens: Annotated[bool, _doc("Add the tokenizer's special tokens (BOS), as for a prompt.")] = True
    return_token_strs: Annotated[bool, _doc("Also return each token's string in the vocabulary.")] = False


class TokenizeChatRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A conversation to token ids through the model's chat template, as /v1/chat/completions would."""

    model: ModelName = None
    messages: Annotated[list[dict[str, Any]], _doc("OpenAI-shaped messages: role and content.")]
    add_generation_prompt: Annotated[bool, _doc("End with the opening of the assistant's turn.")] = True
    continue_final_message: Annotated[
        bool, _doc("Leave the last message open, for the model to continue it (add_generation_prompt false).")
    ] = False
    add_special_tokens: Annotated[
        bool, _doc("Also add the tokenizer's special tokens; the template usually writes them.")
    ] = False
    chat_template_kwargs: Annotated[
        dict[str, Any] | None, _doc("Extra variables for the chat template (e.g. enable_thinking).")
    ] = None
    tools: Annotated[
        list[dict[str, Any]] | None, _doc("Functions the model may call, given to the chat template as chat's are.")
    ] = None
    return_token_strs: Annotated[bool, _doc("Also return each token's string in the vocabulary.")] = False


class TokenizeResponse(msgspec.Struct, kw_only=True):
    """The token ids, as generation would see them."""

    count: Annotated[int, _doc("How many tokens.")]
    max_model_len: Annotated[int, _doc("The longest request served: prompt plus completion tokens.")]
    tokens: list[int]
    token_strs: Annotated[list[str] | None, _doc("Each token's string, when return_token_strs.")] = None


class DetokenizeRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Token ids to text."""

    model: ModelName = None
    tokens: Annotated[list[TokenId], _doc("Token ids of the model's vocabulary.")]


class DetokenizeResponse(msgspec.Struct, kw_only=True):
    """The text of the token ids, special tokens included."""

    prompt: str


class VersionResponse(msgspec.Struct):
    """The daemon's version."""

    version: str


# --- parsing -------------------------------------------------------------------------------------------

_TOKENIZE_FORMS = {
    TokenizeCompletionRequest: (TokenizeChatRequest, "the conversation form of /tokenize (with messages)"),
    TokenizeChatRequest: (TokenizeCompletionRequest, "the prompt form of /tokenize (with prompt)"),
}


def parse_tokenize(body: bytes, unknown: Unknown = "reject") -> TokenizeCompletionRequest | TokenizeChatRequest:
    """Either form of /tokenize, told apart by `messages` as vLLM does."""
    fields = json_object(body)
    if "messages" in fields and "prompt" in fields:
        raise BadRequest("give either prompt or messages, not both", "prompt")
    if "messages" not in fields and "prompt" not in fields:
        raise BadRequest("`prompt` (a text) or `messages` (a conversation) is required", "prompt")
    kind = TokenizeChatRequest if "messages" in fields else TokenizeCompletionRequest
    return convert(fields, kind, unknown, sibling=_TOKENIZE_FORMS[kind])


# --- the routes ------------------------------------------------------------------------------------------

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


class Host(Protocol):
    """What the routes need of the application: set up by its ASGI lifespan."""

    tier: Tier | None
    gateway: Gateway | None


@dataclass(frozen=True)
class Call:
    """One request, as a handler sees it."""

    scope: Scope
    receive: Receive
    request_id: str  # its own inside the daemon (asgi.request_ids)


class Routes:
    """The handlers of ENDPOINTS. Each answers with its response struct, or the ErrorInfo a tier
    answered with (a BadRequest, for what the request itself gets wrong); `table` wraps them
    with the API key check, the X-Request-Id and the error responses."""

    def __init__(self, host: Host, authorized: Callable[[Scope, Receive, Send, list], Awaitable[bool]]):
        self.host = host
        self.authorized = authorized  # the application's API key check: one for every route

    def table(self) -> dict[str, tuple[str, Handler]]:
        """{path template: (method, ASGI handler)} for the application's router."""
        return {e.path: (e.method, functools.partial(self._serve, e)) for e in ENDPOINTS}

    async def _serve(self, endpoint: Endpoint, scope: Scope, receive: Receive, send: Send) -> None:
        echoed, own = request_ids(scope)
        headers = [(b"x-request-id", echoed.encode())]
        with structlog.contextvars.bound_contextvars(request_id=own):
            if endpoint.authorized and not await self.authorized(scope, receive, send, headers):
                return
            if endpoint.tokenizer and self._gateway().draining:
                return await send_error(send, ErrorInfo(503, "the server is shutting down"), headers)
            try:
                answer = await endpoint.handler(self, Call(scope, receive, own))
            except BadRequest as exc:
                answer = exc.error
            except ClientGone:
                return
        if isinstance(answer, ErrorInfo):
            return await send_error(send, answer, headers)
        await send_json(send, 200, answer, headers)

    # --- the served model ----------------------------------------------------------------------------

    async def list_models(self, call: Call) -> ModelList:
        return ModelList(data=[self._card()])

    async def retrieve_model(self, call: Call) -> ModelCard:
        self._check_model(call.scope["path_params"]["model"])
        return self._card()

    def _card(self) -> ModelCard:
        tier = self._tier()
        worker = serving_worker(read_status_file(tier.endpoints.directory))
        loaded = worker.model if worker else None
        return ModelCard(
            id=tier.settings.model.served_model_name,
            created=int(worker.since) if worker else 0,
            root=loaded.directory if loaded else None,
            max_model_len=loaded.max_model_len if loaded else None,
        )

    # --- /tokenize, /detokenize ---------------------------------------------------------------------

    async def tokenize(self, call: Call) -> TokenizeResponse | ErrorInfo:
        request = parse_tokenize(await self._body(call), self._tier().settings.server.unknown_request_fields)
        self._check_model(request.model)
        gateway = self._gateway()
        if isinstance(request, TokenizeChatRequest):
            options = ChatOptions(
                add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
                template_kwargs=request.chat_template_kwargs or {},
                add_special_tokens=request.add_special_tokens,
                tools=[checked_tool(i, tool) for i, tool in enumerate(request.tools)] if request.tools else None,
            )
            job = Tokenize(
                call.request_id,
                gateway.address,
                messages=request.messages,
                chat=options,
                return_token_strs=request.return_token_strs,
            )
        else:
            job = Tokenize(
                call.request_id,
                gateway.address,
                prompt=request.prompt,
                add_special_tokens=request.add_special_tokens,
                return_token_strs=request.return_token_strs,
            )
        reply = await gateway.tokenize(job)
        if reply.error is not None:
            return reply.error
        return TokenizeResponse(
            count=len(reply.tokens), max_model_len=reply.max_model_len, tokens=reply.tokens, token_strs=reply.token_strs
        )

    async def detokenize(self, call: Call) -> DetokenizeResponse | ErrorInfo:
        unknown = self._tier().settings.server.unknown_request_fields
        request = parse(await self._body(call), DetokenizeRequest, unknown)
        self._check_model(request.model)
        gateway = self._gateway()
        reply = await gateway.detokenize(Detokenize(call.request_id, gateway.address, request.tokens))
        if reply.error is not None:
            return reply.error
        return DetokenizeResponse(prompt=reply.text)

    # --- the daemon -----------------------------------------------------------------------------------

    async def version(self, call: Call) -> VersionResponse:
        return VersionResponse(__version__)

    # --- helpers -----------------------------------------------------------------------------------------

    def _tier(self) -> Tier:
        assert self.host.tier is not None  # set up before Granian accepts a connection
        return self.host.tier

    def _gateway(self) -> Gateway:
        assert self.host.gateway is not None  # set up with the tier
        return self.host.gateway

    async def _body(self, call: Call) -> bytes:
        server = self._tier().settings.server
        return await read_body(call.scope, call.receive, server.max_request_body_bytes, server.body_read_timeout_s)

    def _check_model(self, name: str | None) -> None:
        served = self._tier().settings.model.served_model_name
        if name is not None and name != served:
            raise BadRequest(f"The model `{name}` does not exist; this server serves `{served}`", "model", status=404)


def loaded_model(status: DaemonStatus | None) -> dict[str, Any] | None:
    """/server_info's `model`: the directory the serving worker loaded, its context, and when."""
    worker = serving_worker(status)
    if worker is None or worker.model is None:
        return None
    return {**msgspec.to_builtins(worker.model), "loaded_at": worker.since, "worker_pid": worker.pid}


# --- the endpoints ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str  # {name} is a path parameter, matched by the application's router
    summary: str
    requests: tuple[type[msgspec.Struct], ...]  # the body takes one of these shapes; () for none
    response: type[msgspec.Struct]  # with status 200; errors are ErrorResponse (response_models.py)
    handler: Callable[[Routes, Call], Awaitable[msgspec.Struct | ErrorInfo]]
    authorized: bool = True  # behind server.api_key, when one is set
    tokenizer: bool = False  # answered by the tokenizer tier: refused (503) while the daemon stops


ENDPOINTS: list[Endpoint] = [
    Endpoint("GET", "/v1/models", "List the served model", (), ModelList, Routes.list_models),
    Endpoint("GET", "/v1/models/{model}", "The served model by name", (), ModelCard, Routes.retrieve_model),
    Endpoint(
        "POST",
        "/tokenize",
        "Token ids of a prompt, or of a conversation through the chat template",
        (TokenizeCompletionRequest, TokenizeChatRequest),
        TokenizeResponse,
        Routes.tokenize,
        tokenizer=True,
    ),
    Endpoint(
        "POST",
        "/detokenize",
        "The text of token ids",
        (DetokenizeRequest,),
        DetokenizeResponse,
        Routes.detokenize,
        tokenizer=True,
    ),
    Endpoint("GET", "/version", "The daemon's version", (), VersionResponse, Routes.version, authorized=False),
]
