"""Chat templates: OpenAI-shaped messages to a prompt string, rendered the way Hugging Face does.

A model's chat template is a Jinja program shipped with its tokenizer. It is run in
Jinja's immutable sandbox with the same environment transformers builds (trim_blocks,
lstrip_blocks, raise_exception, tojson, strftime_now, its namespace and dict, loop controls,
the {% generation %} tag), and messages reach it as transformers hands them over (null
fields dropped, reasoning under each of its names), so a template renders here as it does
there; only a template that takes content as a string alone is given text parts already
joined, as vLLM does. Anything that goes wrong, from bad messages to a template that
refuses them, is a TokenizerError whose message can go back to the client as a 400.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TokenizerError(Exception):
    """A prompt cannot be tokenized: bad tokenizer files, no or failing chat template, bad messages.

    Defined here, the lowest module of the package, so the loader can raise it too.
    """


class ChatTemplate:
    """One model's chat template, compiled on first use.

    Compiling lazily keeps a model with a broken template usable for plain completions;
    the syntax error is reported to each chat request instead.
    """

    def __init__(self, source: str, origin: str, special_tokens: Mapping[str, str | None]):
        self.source = source
        self.origin = origin  # the file it came from, for error messages
        self.special_tokens = dict(special_tokens)

    def render(
        self,
        messages: Any,
        *,
        add_generation_prompt: bool = True,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        template = self._compiled()
        checked = [_as_transformers_gives_it(message) for message in check_messages(messages)]
        if not self._reads_content_parts:
            checked = [_flatten_parts(message) for message in checked]
        context = {
            **self.special_tokens,
            # transformers always defines these two; templates test them against none.
            "tools": None,
            "documents": None,
            **(template_kwargs or {}),
            "messages": checked,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return template.render(context)
        except _TemplateRaised as exc:
            raise TokenizerError(f"the chat template rejected the messages: {exc.message}") from None
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"the chat template from {self.origin} failed: {exc}") from None
        except Exception as exc:  # a template is a program run on client data: any failure is theirs or its
            raise TokenizerError(f"the chat template from {self.origin} failed: {type(exc).__name__}: {exc}") from None

    def _compiled(self) -> jinja2.Template:
        try:
            return _compile(self.source)
        except jinja2.TemplateSyntaxError as exc:
            raise TokenizerError(
                f"the chat template from {self.origin} has a syntax error at line {exc.lineno}: {exc.message}"
            ) from None

    @functools.cached_property
    def tool_call_format(self) -> str | None:
        """The format in which the template teaches its model to call tools (model.tool_parser
        auto), from the markers it writes; None when it shows none."""
        source = self.source
        if "[TOOL_CALLS]" in source:
            return "mistral"
        if "<tool_call>" in source:
            return "hermes"
        if "<|python_tag|>" in source or ("<|start_header_id|>" in source and re.search(r"\btools\b", source)):
            return "llama3_json"
        return None

    @functools.cached_property
    def _reads_content_parts(self) -> bool:
        """Whether the template loops over a message's content, i.e. understands a list of parts.

        Many templates only concatenate content as a string; they are given the text of
        the parts joined by newlines instead, as vLLM does.
        """
        tree = _environment().parse(self.source)
        return any(_mentions_content(loop.iter) for loop in tree.find_all(nodes.For))


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """`messages` as a list of plain dicts, or a TokenizerError naming the first bad message."""
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes) or not messages:
        raise TokenizerError("messages must be a non-empty list of {role, content} objects")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TokenizerError(f"message {index} must be an object with role and content, not {_kind(message)}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise TokenizerError(f"message {index}: role must be a non-empty string, not {role!r}")
        message = dict(message)
        if message.get("tool_calls") is not None:
            if role != "assistant":
                raise TokenizerError(f"message {index}: only an assistant message may have tool_calls")
            message["tool_calls"] = _checked_tool_calls(index, message["tool_calls"])
            if message.get("content") is None:  # an answer of calls alone: no text
                message["content"] = None
                checked.append(message)
                continue
        if "content" not in message:
            raise TokenizerError(f"message {index}: content is missing")
        _check_content(index, message["content"])
        checked.append(message)
    return checked


def _checked_tool_calls(index: int, calls: Any) -> list[dict[str, Any]]:
    """An assistant message's tool calls as templates read them: arguments as an object, as vLLM
    gives them (OpenAI sends them as JSON text; templates write them with tojson)."""
    if not isinstance(calls, list):
        raise TokenizerError(f"message {index}: tool_calls must be a list, not {_kind(calls)}")
    checked = []
    for number, call in enumerate(calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise TokenizerError(f"message {index}: tool call {number} must be {{function: {{name, arguments}}}}")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                raise TokenizerError(f"message {index}: tool call {number}'s arguments are not valid JSON") from None
        if not isinstance(arguments, Mapping):
            raise TokenizerError(f"message {index}: tool call {number}'s arguments must be a JSON object")
        checked.append({**call, "function": {**function, "arguments": dict(arguments)}})
    return checked


def _check_content(index: int, content: Any) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise TokenizerError(f"message {index}: content must be a string or a list of text parts, not {_kind(content)}")
    for number, part in enumerate(content):
        if not isinstance(part, Mapping):
            raise TokenizerError(f"message {index}: content part {number} must be an object, not {_kind(part)}")
        if part.get("type") != "text":
            raise TokenizerError(
                f"message {index}: content part {number} has type {part.get('type')!r}; only text parts are supported"
            )
        if not isinstance(part.get("text"), str):
            raise TokenizerError(f"message {index}: content part {number} must have a string text")


# The names a message's reasoning comes under; templates read the first (Qwen3's reasoning_content),
# gpt-oss's the second, and clients echo back vLLM's newer third.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _as_transformers_gives_it(message: dict[str, Any]) -> dict[str, Any]:
    """The message as transformers' apply_chat_template hands it to the template.

    Null fields are dropped: clients echo back whole OpenAI message objects ("tool_calls": null,
    "refusal": null), and a template that asks `'tool_calls' in message` must not see them.
    Reasoning under any of its names is given as reasoning_content, and as thinking unless the
    message has its own."""
    message = {key: value for key, value in message.items() if value is not None}
    reasoning = next((message[key] for key in REASONING_FIELDS if key in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def _flatten_parts(message: dict[str, Any]) -> dict[str, Any]:
    if isinstance(message.get("content"), list):
        return {**message, "content": "\n".join(part["text"] for part in message["content"])}
    return message


def _mentions_content(node: nodes.Node) -> bool:
    """Whether an expression reads `x['content']`, `x.content` or a variable named content."""
    for inner in [node, *node.find_all((nodes.Getitem, nodes.Getattr, nodes.Name))]:
        if isinstance(inner, nodes.Getitem) and isinstance(inner.arg, nodes.Const) and inner.arg.value == "content":
            return True
        if isinstance(inner, nodes.Getattr) and inner.attr == "content":
            return True
        if isinstance(inner, nodes.Name) and inner.name == "content":
            return True
    return False


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# --- the environment transformers renders templates in --------------------------------------------


class _TemplateRaised(jinja2.TemplateError):
    """The template called raise_exception: a deliberate refusal, reported in its own words."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes HTML characters and sorts keys; transformers replaced it with plain dumps.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _Namespace(jinja2.utils.Namespace):
    """namespace(...) as transformers gives it: no attribute starting with '_' may be stored, so
    a template cannot reach the interpreter's internals through `{% set ns.__x = ... %}`."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature trick: namespace(self=...) works
        self, args = args[0], args[1:]
        attributes = dict(*args, **kwargs)
        for name in attributes:
            _Namespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attributes)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template cannot store {name!r} on a namespace")


class _Dict:
    """dict(...) and dict.fromkeys(...) for templates, without the dict type itself (as transformers)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _GenerationTag(Extension):
    """{% generation %}...{% endgeneration %}: marks assistant text for training masks; here it just renders."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    return env


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    return _environment().from_string(source)
