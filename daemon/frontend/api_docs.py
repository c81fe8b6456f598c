"""The API described from its own models: the README's field table and /openapi.json.

Both are generated from the request and response structs (types, bounds, descriptions,
field policies), so neither can drift from what the server parses and sends.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import msgspec

from daemon import __version__
from daemon.frontend.request_models import ChatRequest, CompletionRequest, FieldInfo, fields_of
from daemon.frontend.response_models import ChatCompletion, ChatCompletionChunk, Completion, ErrorResponse
from daemon.frontend.utility import ENDPOINTS


@dataclass(frozen=True)
class ApiRoute:
    method: str
    path: str
    summary: str
    response: Any  # the 200 body's type
    requests: tuple[Any, ...] = ()  # the JSON body takes one of these shapes; () for no body
    events: Any = None  # with stream = true: each server-sent event's type


GENERATION_ROUTES = [
    ApiRoute(
        "POST",
        "/v1/completions",
        "Text completion of one prompt or several (a choice each).",
        Completion,
        (CompletionRequest,),
        Completion,
    ),
    ApiRoute(
        "POST",
        "/v1/chat/completions",
        "Chat completion through the model's chat template.",
        ChatCompletion,
        (ChatRequest,),
        ChatCompletionChunk,
    ),
]

API_ROUTES = (  # every route /openapi.json describes
    *GENERATION_ROUTES,
    *(ApiRoute(e.method, e.path, e.summary, e.response, e.requests) for e in ENDPOINTS),
)


# --- the field table -------------------------------------------------------------------------------


def _type_text(schema: dict[str, Any]) -> str:
    if "anyOf" in schema:
        parts = [_type_text(s) for s in schema["anyOf"] if s.get("type") != "null"]
        return " or ".join(dict.fromkeys(parts))
    if "$ref" in schema:
        return "object"
    kind = schema.get("type", "any")
    if kind == "array" and "items" in schema:
        most = f" (at most {schema['maxItems']})" if "maxItems" in schema else ""
        return f"array of {_type_text(schema['items'])}{most}"
    return kind + _range_text(schema)


def _range_text(schema: dict[str, Any]) -> str:
    """A number's bounds as an interval: " in [0, 2]", " in (0, 1]", or one side: " ≥ 1"."""
    low = ("[", schema["minimum"]) if "minimum" in schema else ("(", schema.get("exclusiveMinimum"))
    high = ("]", schema["maximum"]) if "maximum" in schema else (")", schema.get("exclusiveMaximum"))
    if low[1] is None and high[1] is None:
        return ""
    if high[1] is None:
        return f" {'≥' if low[0] == '[' else '>'} {_number_text(low[1])}"
    if low[1] is None:
        return f" {'≤' if high[0] == ']' else '<'} {_number_text(high[1])}"
    return f" in {low[0]}{_number_text(low[1])}, {_number_text(high[1])}{high[0]}"


def _number_text(value: float) -> str:
    """Powers of two as such (2^63-1 is the largest integer the IPC carries), others as written."""
    for exponent in (31, 63):
        if value == 2**exponent - 1:
            return f"2^{exponent}-1"
        if value == -(2**exponent):
            return f"-2^{exponent}"
    return str(value)


def _status_text(info: FieldInfo) -> str:
    policy = info.policy
    if policy.status == "refused":
        neutral = ", ".join("null" if v is None else f"`{msgspec.json.encode(v).decode()}`" for v in policy.neutral)
        text = f"refused (400) unless {neutral}"
        if policy.planned:
            text += f"; planned: {policy.planned}"
    else:
        text = policy.status + (" (required)" if info.required else "")
    if policy.requires:
        text += f"; needs `{policy.requires}`"
    return text


def fields_markdown() -> str:
    """Markdown table of every request field of both generation endpoints and what the server does with it."""
    models = {"completions": CompletionRequest, "chat": ChatRequest}
    schemas = {
        name: msgspec.json.schema_components([model])[1][model.__name__]["properties"] for name, model in models.items()
    }
    rows: dict[str, dict[str, Any]] = {}
    for endpoint, model in models.items():
        for info in fields_of(model):
            row = rows.setdefault(info.name, {"endpoints": [], "infos": {}})
            row["endpoints"].append(endpoint)
            row["infos"][endpoint] = info
    lines = ["| field | endpoints | type | what the server does | meaning |", "|---|---|---|---|---|"]
    for name, row in rows.items():
        for endpoint in row["endpoints"]:
            info = row["infos"][endpoint]
            same = all(
                (i.policy, i.doc) == (info.policy, info.doc)
                and _type_text(schemas[e][name]) == _type_text(schemas[endpoint][name])
                for e, i in row["infos"].items()
            )
            shown = "both" if same and len(row["endpoints"]) == 2 else endpoint
            lines.append(
                f"| `{name}` | {shown} | {_type_text(schemas[endpoint][name])} | {_status_text(info)} | {info.doc} |"
            )
            if shown == "both":
                break
    return "\n".join(lines) + "\n"


# --- OpenAPI ---------------------------------------------------------------------------------------


@functools.cache
def openapi(routes: tuple[ApiRoute, ...]) -> dict[str, Any]:
    """An OpenAPI 3.1 document of `routes`, their bodies generated from their structs."""
    types = {ErrorResponse}
    for route in routes:
        types |= {t for t in (*route.requests, route.response, route.events) if t is not None}
    _refs, components = msgspec.json.schema_components(
        sorted(types, key=lambda t: t.__name__), ref_template="#/components/schemas/{name}"
    )
    error = {"description": "An OpenAI error object", "content": _json_body(ErrorResponse)}
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        ok: dict[str, Any] = {"description": "Success", "content": _json_body(route.response)}
        if route.events is not None:
            ok["content"]["text/event-stream"] = {
                "schema": _ref(route.events),
                "description": "With stream = true: `data: <event>` lines, ending with `data: [DONE]`",
            }
        operation: dict[str, Any] = {"summary": route.summary, "responses": {"200": ok, "default": error}}
        if route.requests:
            shapes = [_ref(kind) for kind in route.requests]
            schema = shapes[0] if len(shapes) == 1 else {"oneOf": shapes}
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
        if "{" in route.path:
            name = route.path.split("{")[1].split("}")[0]
            operation["parameters"] = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}]
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "daemon", "version": __version__},
        "paths": paths,
        "components": {"schemas": components},
    }


def _ref(kind: Any) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{kind.__name__}"}


def _json_body(kind: Any) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(kind)}}
