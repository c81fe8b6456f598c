"""Tools and reasoning through the whole daemon, with the openai client and httpx over HTTP/2.

Two daemons on the demo model: one whose chat template teaches the Hermes tool-call format
(so model.tool_parser auto finds it), and the plain demo model, whose template shows none,
serving with model.reasoning_parser qwen3. The model is random: forced calls are valid
because a grammar made them so, and `auto` is shown parsing a call by asking the model,
through a regex constraint, to write one.
"""

from __future__ import annotations

import json
import re
import shutil

import httpx
import jsonschema
import openai
import pytest
from harness.daemons import RunningDaemon, serving

from daemon.engine.demo_model import ensure_demo_model

SEEDS = range(4)
HERMES_TEMPLATE = (
    "{{- bos_token }}{%- if tools %}<|im_start|>system\n<tools>{% for tool in tools %}{{ tool | tojson }}\n"
    "{% endfor %}</tools>\nCall a function as <tool_call>{json}</tool_call>.<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{%- for call in message.tool_calls %}<tool_call>\n"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}\n'
    "</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>{{ message.content }}</tool_response>"
    "<|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
CLOCK = {
    "type": "object",
    "properties": {"zone": {"type": "string", "maxLength": 3}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
HERMES_CALL = (
    r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", "days": [1-7]\}\}\n</tool_call>'
)


@pytest.fixture(scope="module")
def hermes(tmp_path_factory, model_cache) -> RunningDaemon:
    directory = tmp_path_factory.mktemp("hermes") / "hermes"
    shutil.copytree(ensure_demo_model(model_cache), directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = HERMES_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    with serving(tmp_path_factory.mktemp("daemon"), model_cache, {"model.path": str(directory)}) as running:
        yield running


THINK, END_THINK = 1022, 1023  # the ids the thinking model's tokenizer gives its markers


@pytest.fixture(scope="module")
def thinking(tmp_path_factory, model_cache) -> RunningDaemon:
    """The demo model with <think> and </think> as tokens of their own (two of its rarest tokens
    renamed), as reasoning models have them: a random model can be nudged to write them."""
    directory = tmp_path_factory.mktemp("thinking") / "thinking"
    shutil.copytree(ensure_demo_model(model_cache), directory)
    tokenizer = json.loads((directory / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    old = {text: i for text, i in vocab.items() if i in (THINK, END_THINK)}
    tokenizer["model"]["merges"] = [m for m in tokenizer["model"]["merges"] if not ({*m, "".join(m)} & old.keys())]
    for text, i in old.items():
        del vocab[text]
        marker = "<think>" if i == THINK else "</think>"
        vocab[marker] = i
        tokenizer["added_tokens"].append(
            {
                "id": i,
                "content": marker,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": False,
            }
        )
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    settings = {"model.path": str(directory), "model.reasoning_parser": "qwen3"}
    with serving(tmp_path_factory.mktemp("daemon"), model_cache, settings) as running:
        yield running


def client_of(daemon: RunningDaemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _valid(name: str, arguments: str) -> None:
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def _streamed(daemon: RunningDaemon, **body) -> tuple[str, str, list[dict], str | None]:
    """(content, reasoning, calls as {id, name, arguments}, finish_reason) of a chat stream over HTTP/2,
    checking the deltas' shape: a call's first delta has its id, type and name; later ones add arguments."""
    content, reasoning, calls, finish = "", "", [], None
    with (
        httpx.Client(base_url=daemon.url, http2=True, http1=False, timeout=120) as http,
        http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response,
    ):
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            delta = choice["delta"]
            content += delta.get("content") or ""
            reasoning += delta.get("reasoning_content") or ""
            for part in delta.get("tool_calls") or []:
                if part["index"] == len(calls):
                    assert part["id"].startswith("call_") and part["type"] == "function", part
                    calls.append({"id": part["id"], "name": part["function"]["name"], "arguments": ""})
                else:
                    assert "id" not in part and "name" not in part["function"], part
                calls[part["index"]]["arguments"] += part["function"].get("arguments") or ""
            finish = choice["finish_reason"] or finish
    return content, reasoning, calls, finish


def test_tools_reach_the_chat_template(hermes):
    with httpx.Client(base_url=hermes.url, timeout=60) as http:
        ids = http.post("/tokenize", json={"messages": ASK, "tools": TOOLS}).json()["tokens"]
        text = http.post("/detokenize", json={"tokens": ids}).json()["prompt"]
        plain = http.post("/tokenize", json={"messages": ASK}).json()["tokens"]
    assert '"name": "get_weather"' in text and '"maxLength": 3' in text and len(plain) < len(ids)


def answers(daemon: RunningDaemon, **fields) -> list:
    """The first choice of a chat answer with TOOLS, at temperature 1, per seed (the openai client)."""
    with client_of(daemon) as client:
        return [
            client.chat.completions.create(
                model="hermes", messages=ASK, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=300, **fields
            ).choices[0]
            for seed in SEEDS
        ]


def test_tool_choice_required_gives_valid_calls(hermes):
    for choice in answers(hermes, tool_choice="required"):
        calls = choice.message.tool_calls
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
        assert calls and len({c.id for c in calls}) == len(calls)
        for call in calls:
            _valid(call.function.name, call.function.arguments)


def test_parallel_tool_calls_false_gives_one_call(hermes):
    assert all(
        len(c.message.tool_calls) == 1 for c in answers(hermes, tool_choice="required", parallel_tool_calls=False)
    )


def test_a_named_tool_choice_calls_that_function(hermes):
    for choice in answers(hermes, tool_choice={"type": "function", "function": {"name": "get_time"}}):
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_time" and choice.finish_reason == "tool_calls"
        _valid("get_time", call.function.arguments)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_calls_reassemble_into_valid_calls(hermes, tool_choice):
    for seed in SEEDS:
        body = {"messages": ASK, "tools": TOOLS, "tool_choice": tool_choice, "temperature": 1.0, "seed": seed}
        content, _reasoning, calls, finish = _streamed(hermes, **body, max_tokens=300)
        assert content == "" and finish == "tool_calls" and calls
        for call in calls:
            _valid(call["name"], call["arguments"])
        whole = httpx.post(f"{hermes.url}/v1/chat/completions", json={**body, "max_tokens": 300}, timeout=120).json()
        message = whole["choices"][0]["message"]
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == [
            (c["name"], c["arguments"]) for c in calls
        ]


def test_auto_parses_a_call_the_model_writes_in_its_format(hermes):
    """The chat template shows <tool_call>: model.tool_parser auto is Hermes. The model is asked,
    by a regex, to write some text and then a call in that format."""
    regex = "Let me check\\.\\n" + HERMES_CALL
    body = {"messages": ASK, "tools": TOOLS, "regex": regex, "temperature": 1.0, "max_tokens": 200}
    for seed in SEEDS:
        answer = httpx.post(f"{hermes.url}/v1/chat/completions", json={**body, "seed": seed}, timeout=120).json()
        choice = answer["choices"][0]
        (call,) = choice["message"]["tool_calls"]
        assert choice["message"]["content"] == "Let me check.\n" and choice["finish_reason"] == "tool_calls"
        assert call["function"]["name"] == "get_weather"
        _valid("get_weather", call["function"]["arguments"])
        content, _reasoning, calls, finish = _streamed(hermes, **body, seed=seed)
        assert content == "Let me check.\n" and finish == "tool_calls"
        assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", call["function"]["arguments"])]


def test_auto_without_a_call_is_content(hermes):
    body = {"messages": ASK, "tools": TOOLS, "regex": "[a-z]{3,8}", "temperature": 1.0, "seed": 3, "max_tokens": 20}
    answer = httpx.post(f"{hermes.url}/v1/chat/completions", json=body, timeout=120).json()
    choice = answer["choices"][0]
    assert "tool_calls" not in choice["message"] and choice["finish_reason"] == "stop" and choice["message"]["content"]


def test_a_history_with_calls_and_their_results_is_accepted(hermes):
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
    ]
    with httpx.Client(base_url=hermes.url, timeout=60) as http:
        ids = http.post("/tokenize", json={"messages": history, "tools": TOOLS}).json()["tokens"]
        text = http.post("/detokenize", json={"tokens": ids}).json()["prompt"]
        answer = http.post("/v1/chat/completions", json={"messages": history, "tools": TOOLS, "max_tokens": 4})
    assert '{"name": "get_weather", "arguments": {"city": "Oslo"}}' in text and "<tool_response>rain" in text
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope'"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools", "parameters"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools", "name"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools", "tools[0]"),
        ({"tools": [*TOOLS, TOOLS[0]]}, "tools", "twice"),
        ({"tool_choice": "sometimes"}, "tool_choice", "sometimes"),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice", "combined"),
        ({"tool_choice": "required", "min_tokens": 3}, "min_tokens", "tool_choice"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
                "tool_choice": "required",
            },
            "tool_choice",
            "nonsense",
        ),
    ],
)
def test_bad_tools_are_a_400_naming_the_field(hermes, body, param, words):
    response = httpx.post(
        f"{hermes.url}/v1/chat/completions", json={"messages": ASK, "tools": TOOLS, "max_tokens": 4, **body}, timeout=60
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_auto_needs_a_known_format(thinking):
    """The demo model's template shows no tool-call format: auto cannot parse, and says what to set."""
    response = httpx.post(
        f"{thinking.url}/v1/chat/completions", json={"messages": ASK, "tools": TOOLS, "max_tokens": 4}, timeout=60
    )
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "tool_choice" and "model.tool_parser" in error["message"]


def test_thinking_goes_to_reasoning_content_and_a_constraint_starts_after_it(thinking):
    """With model.reasoning_parser, the text between <think> and </think> is reasoning_content, streamed
    as it comes; a constraint leaves the thinking free and holds for what follows. The random model
    is nudged to open its thinking, and to close it soon."""
    nudge = {str(THINK): 6.0, str(END_THINK): 6.0}
    body = {"messages": ASK, "regex": "[A-Z][a-z]{2,5}", "temperature": 1.0, "max_tokens": 200, "logit_bias": nudge}
    thoughts = 0
    for seed in range(6):
        answer = httpx.post(f"{thinking.url}/v1/chat/completions", json={**body, "seed": seed}, timeout=60).json()
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        message = choice["message"]
        assert re.fullmatch("[A-Z][a-z]{2,5}", message["content"]) and "think>" not in message["content"], message
        thoughts += message["reasoning_content"] is not None
        content, reasoning, calls, _finish = _streamed(thinking, **body, seed=seed)
        assert (content, reasoning or None, calls) == (message["content"], message["reasoning_content"], [])
    assert thoughts, "the model never thought: nothing was shown"


@pytest.mark.parametrize("parallel", [True, False])
def test_auto_parses_several_calls_or_keeps_the_first_without_parallel_calls(hermes, parallel):
    regex = HERMES_CALL + "\\n" + HERMES_CALL
    body = {"messages": ASK, "tools": TOOLS, "regex": regex, "temperature": 1.0, "max_tokens": 200}
    body["parallel_tool_calls"] = parallel
    for seed in SEEDS:
        answer = httpx.post(f"{hermes.url}/v1/chat/completions", json={**body, "seed": seed}, timeout=120).json()
        calls = answer["choices"][0]["message"]["tool_calls"]
        assert len(calls) == (2 if parallel else 1) and answer["choices"][0]["message"]["content"] is None
        _content, _reasoning, streamed, finish = _streamed(hermes, **body, seed=seed)
        assert [(c["name"], c["arguments"]) for c in streamed] == [
            (c["function"]["name"], c["function"]["arguments"]) for c in calls
        ]
        assert finish == "tool_calls"
