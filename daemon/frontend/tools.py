"""Tools in chat requests: the definitions checked and handed to the chat template, and
tool_choice turned into what the engine enforces and what the answer's text becomes.

- `none`: the model may not call; its text is content.
- `auto` (the default with tools): the model decides; its text is parsed for calls in its
  family's format (tool_parsers/, chosen by model.tool_parser). With parallel_tool_calls
  false, calls after the first are dropped.
- `required`: the answer is a JSON array of calls, `[{"name": ..., "parameters": {...}}]`, as
  vLLM has it, enforced by a grammar over every tool's parameters: even a random model
  returns valid calls. One call only with parallel_tool_calls false.
- a named function: the answer is that function's arguments, enforced by a grammar over its
  parameters' schema.

Both grammars write compact JSON (", " and ": " its only spaces): the answer is for a program.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from daemon.frontend.asgi import BadRequest
from daemon.frontend.request_models import ChatRequest
from daemon.ipc.messages import Constraint

TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
NO_PARAMETERS = {"type": "object", "properties": {}}  # OpenAI's meaning of a function without parameters


@dataclass(frozen=True)
class ToolPlan:
    choice: Literal["none", "auto", "required", "named"]
    names: tuple[str, ...]  # the tools offered, in order
    named: str | None  # the function tool_choice names
    template_tools: list[dict[str, Any]]  # as Hugging Face chat templates take them
    constraint: Constraint | None  # what the engine enforces (required, named)
    one_call: bool = False  # parallel_tool_calls false


def plan_tools(request: ChatRequest) -> ToolPlan | None:
    """The request's tools and what it asks of them; None without tools. BadRequest naming the field at fault."""
    if not request.tools:
        if request.tool_choice not in (None, "none"):
            raise BadRequest("`tool_choice` needs `tools`", "tool_choice")
        return None
    tools = [checked_tool(index, tool) for index, tool in enumerate(request.tools)]
    names = tuple(tool["function"]["name"] for tool in tools)
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise BadRequest(f"`tools` defines the function {duplicate!r} twice", "tools")
    parameters = {tool["function"]["name"]: tool["function"]["parameters"] for tool in tools}
    choice = request.tool_choice if request.tool_choice is not None else "auto"
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise BadRequest(
                '`tool_choice` must be none, auto, required or {"type": "function", "function": {"name": ...}}',
                "tool_choice",
            )
        if name not in parameters:
            raise BadRequest(f"`tool_choice` names the function {name!r}, which `tools` does not define", "tool_choice")
        schema = json.dumps(parameters[name], ensure_ascii=False)
        constraint = Constraint("json_schema", schema, "tool_choice", compact=True)
        return ToolPlan("named", names, name, tools, constraint, one_call=True)
    if choice not in ("none", "auto", "required"):
        raise BadRequest(f"`tool_choice` must be none, auto, required or a function, not {choice!r}", "tool_choice")
    constraint = None
    one_call = request.parallel_tool_calls is False
    if choice == "required":
        schema = _calls_schema(parameters, one=one_call)
        constraint = Constraint("json_schema", json.dumps(schema, ensure_ascii=False), "tool_choice", compact=True)
    return ToolPlan(choice, names, None, tools, constraint, one_call)  # type: ignore[arg-type]


def checked_tool(index: int, tool: Any) -> dict[str, Any]:
    """The tool as chat templates take it: {type: function, function: {name, description?, parameters}}."""
    where = f"tools[{index}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise BadRequest(f'`{where}` must be {{"type": "function", "function": {{"name": ...}}}}', "tools")
    function = dict(tool["function"])
    name = function.get("name")
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise BadRequest(f"`{where}.function.name` must be 1 to 64 letters, digits, _ . or -, not {name!r}", "tools")
    if "description" in function and not isinstance(function["description"], str | None):
        raise BadRequest(f"`{where}.function.description` must be a string", "tools")
    parameters = function.get("parameters")
    if parameters is None:
        parameters = NO_PARAMETERS
    elif not isinstance(parameters, dict):
        raise BadRequest(f"`{where}.function.parameters` must be a JSON schema (an object)", "tools")
    function["parameters"] = parameters
    return {"type": "function", "function": function}


def _calls_schema(parameters: dict[str, dict[str, Any]], *, one: bool) -> dict[str, Any]:
    call = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "parameters": schema},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for name, schema in parameters.items()
    ]
    items = call[0] if len(call) == 1 else {"anyOf": call}
    return {"type": "array", "items": items, "minItems": 1, **({"maxItems": 1} if one else {})}
