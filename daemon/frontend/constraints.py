"""What a request's output must match, from whichever field asked: OpenAI's response_format,
vLLM's structured_outputs and its older guided_* fields, or SGLang's regex / json_schema / ebnf.

Only the shape of each field is checked here (the front-end imports no engine code): whether a
schema, regex or grammar compiles is the tokenizer tier's check, where a 400 names the field
too. A request may ask for one constraint only.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from daemon.frontend.asgi import BadRequest
from daemon.frontend.request_models import ChatRequest, CompletionRequest
from daemon.ipc.messages import Constraint

# A schema or grammar longer than this is refused before anything compiles it: compiling takes
# time that grows with it, on a thread every constrained request of the tokenizer worker shares.
MAX_CONSTRAINT_CHARS = 128 * 1024
_STRUCTURED_KINDS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}
# structured_outputs options that would change what is allowed, which the engine does not do
_STRUCTURED_REFUSED = ("disable_additional_properties", "whitespace_pattern")
_STRUCTURED_NEUTRAL = ("disable_fallback",)  # there is one backend, which never falls back


def constraint_of(request: CompletionRequest | ChatRequest) -> Constraint | None:
    """The request's constraint, or None; a BadRequest naming the field whose value is not one."""
    found: list[Constraint] = []
    if request.response_format is not None:
        found += _response_format(request.response_format)
    if request.structured_outputs is not None:
        found.append(_structured_outputs(request.structured_outputs))
    for field, kind in (
        ("guided_json", "json_schema"),
        ("guided_regex", "regex"),
        ("guided_choice", "choice"),
        ("guided_grammar", "grammar"),
        ("json_schema", "json_schema"),
        ("regex", "regex"),
        ("ebnf", "grammar"),
    ):
        value = getattr(request, field)
        if value is not None:
            found.append(_constraint(kind, value, field))
    if len(found) > 1:
        raise BadRequest(
            f"`{found[1].param}` cannot be combined with `{found[0].param}`: a request may ask for one constraint",
            found[1].param,
        )
    return found[0] if found else None


def check_beside_min_tokens(constraint: Constraint, min_tokens: int | None) -> None:
    """A constraint refuses min_tokens: its grammar may allow nothing but the end-of-sequence token
    that min_tokens holds back."""
    if min_tokens:
        raise BadRequest(f"`min_tokens` cannot be combined with `{constraint.param}`", "min_tokens")


def _response_format(value: dict[str, Any]) -> list[Constraint]:
    kind = value.get("type")
    if kind == "text":
        return []
    if kind == "json_object":
        return [Constraint("json_object", "", "response_format")]
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise BadRequest(
                "`response_format` of type json_schema needs `json_schema: {name, schema: {...}}`", "response_format"
            )
        return [_constraint("json_schema", spec["schema"], "response_format")]
    if kind == "structural_tag":
        return [_structural_tag(value, "response_format")]
    raise BadRequest(
        f"`response_format.type` must be text, json_object, json_schema or structural_tag, not {kind!r}",
        "response_format",
    )


def _structured_outputs(value: dict[str, Any]) -> Constraint:
    param = "structured_outputs"
    for option in _STRUCTURED_REFUSED:
        if value.get(option) not in (None, False):
            raise BadRequest(f"`{param}.{option}` is not supported", param)
    known = {*_STRUCTURED_KINDS, "json_object", "structural_tag", "disable_any_whitespace"}
    unknown = sorted(set(value) - known - set(_STRUCTURED_REFUSED) - set(_STRUCTURED_NEUTRAL))
    if unknown:
        raise BadRequest(f"`{param}` has no option {unknown[0]!r}", param)
    asked = [key for key in _STRUCTURED_KINDS if value.get(key) is not None]
    asked += [key for key in ("json_object", "structural_tag") if value.get(key)]
    if len(asked) != 1:
        kinds = ", ".join([*_STRUCTURED_KINDS, "json_object", "structural_tag"])
        raise BadRequest(f"`{param}` must set exactly one of {kinds} (it sets {len(asked)})", param)
    compact = bool(value.get("disable_any_whitespace"))  # vLLM's: JSON without free whitespace
    if asked[0] == "json_object":
        return Constraint("json_object", "", param, compact=compact)
    if asked[0] == "structural_tag":  # vLLM's: the tag as JSON text
        try:
            tag = json.loads(value["structural_tag"]) if isinstance(value["structural_tag"], str) else None
        except ValueError as exc:
            raise BadRequest(f"`{param}.structural_tag` is not valid JSON: {exc}", param) from None
        if not isinstance(tag, dict):
            raise BadRequest(f"`{param}.structural_tag` must be a JSON object, as text", param)
        return _structural_tag(tag, param)
    return msgspec.structs.replace(_constraint(_STRUCTURED_KINDS[asked[0]], value[asked[0]], param), compact=compact)


def _structural_tag(value: dict[str, Any], param: str) -> Constraint:
    """A structural tag: text in which, after one of `triggers`, a tag's begin string, content
    valid for its schema and end string follow (vLLM's `structures` and `triggers`), or xgrammar's
    own format under `format`."""
    if "format" in value:
        tag = {"type": "structural_tag", "format": value["format"]}
    else:
        structures, triggers = value.get("structures"), value.get("triggers")
        if not isinstance(structures, list) or not structures or not isinstance(triggers, list) or not triggers:
            raise BadRequest(
                f"`{param}`: a structural tag needs `structures` ([{{begin, schema, end}}]) and `triggers`, "
                "or `format`",
                param,
            )
        for item in structures:
            if not (isinstance(item, dict) and isinstance(item.get("begin"), str) and isinstance(item.get("end"), str)):
                raise BadRequest(f"`{param}`: each structure needs a `begin` and an `end` string", param)
        tags = [
            {
                "type": "tag",
                "begin": item["begin"],
                "content": {"type": "json_schema", "json_schema": item.get("schema", {})},
                "end": item["end"],
            }
            for item in structures
        ]
        tag = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": triggers, "tags": tags}}
    spec = json.dumps(tag, ensure_ascii=False)
    return Constraint("structural_tag", _within_bound(spec, "structural tag", param), param)


def _constraint(kind: str, value: Any, param: str) -> Constraint:
    """The constraint of `kind` that `value` (as the client sent it) describes."""
    match kind:
        case "json_schema":
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError as exc:
                    raise BadRequest(f"`{param}`: the schema is not valid JSON: {exc}", param) from None
            if not isinstance(value, dict):
                raise BadRequest(f"`{param}`: a JSON schema must be an object", param)
            spec = json.dumps(value, ensure_ascii=False)
        case "choice":
            if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
                raise BadRequest(f"`{param}`: the choices must be a non-empty list of non-empty strings", param)
            spec = json.dumps(value, ensure_ascii=False)
        case _:  # regex, grammar
            if not isinstance(value, str) or not value:
                raise BadRequest(f"`{param}`: the {kind} must be a non-empty string", param)
            spec = value
    return Constraint(kind, _within_bound(spec, kind.replace("_", " "), param), param)  # type: ignore[arg-type]


def _within_bound(spec: str, what: str, param: str) -> str:
    if len(spec) > MAX_CONSTRAINT_CHARS:
        raise BadRequest(
            f"`{param}`: the {what} is {len(spec)} characters long, more than this server compiles "
            f"({MAX_CONSTRAINT_CHARS})",
            param,
        )
    return spec
