"""Constrained decoding through the whole daemon: the demo model is random, so every valid
answer below is the grammar's doing.

Sampled at temperature 1 with several seeds; schemas bound what a random model could
otherwise run on with (string lengths, item counts), so answers end well within max_tokens.
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pydantic
import pytest
from harness.daemons import RunningDaemon, serving

from daemon.engine.demo_model import ensure_demo_model
from daemon.tokenizer.loading import load_text_tokenizer

SEEDS = range(4)
MAX_TOKENS = 500
CHAT = [{"role": "user", "content": "Describe a person."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 5}, "zip": {"type": "integer"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{2,5}-\d{3}( [A-Z]+)?"
CHOICES = ["red", "green", "blue", "dark red"]
GRAMMAR = 'root ::= "(" expr ")"\nexpr ::= [0-9] | [0-9] ("+" | "*") [0-9]'


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, model_cache) -> RunningDaemon:
    with serving(tmp_path_factory.mktemp("daemon"), model_cache) as running:
        yield running


@pytest.fixture(scope="module")
def client(daemon) -> openai.OpenAI:
    with openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def _chat_texts(client: openai.OpenAI, **body) -> list[tuple[str, str]]:
    """(text, finish_reason) of a chat answer per seed."""
    answers = []
    for seed in SEEDS:
        answer = client.chat.completions.create(
            model="demo", messages=CHAT, temperature=1.0, seed=seed, max_tokens=MAX_TOKENS, **body
        )
        answers.append((answer.choices[0].message.content, answer.choices[0].finish_reason))
    return answers


def test_json_schema_answers_validate_against_their_schema(client):
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for text, finish in _chat_texts(client, response_format=response_format):
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), PERSON)


def test_json_object_answers_are_objects(client, model_cache):
    # A random model left alone writes strings of hundreds of tokens (nothing bounds them here): the
    # tokens that close a string or an object are made likelier, as a model that knows JSON has them.
    tokenizer = load_text_tokenizer(ensure_demo_model(model_cache))
    closing = {str(i): 6.0 for i in range(tokenizer.vocab_size) if tokenizer.token_text(i).strip() in ('"', "}", '"}')}
    assert closing
    for text, finish in _chat_texts(client, response_format={"type": "json_object"}, logit_bias=closing):
        assert finish == "stop", text
        assert isinstance(json.loads(text), dict), text


@pytest.mark.parametrize(
    ("field", "value", "check"),
    [
        ("structured_outputs", {"regex": REGEX}, lambda text: re.fullmatch(REGEX, text)),
        ("guided_regex", REGEX, lambda text: re.fullmatch(REGEX, text)),
        ("regex", REGEX, lambda text: re.fullmatch(REGEX, text)),
        ("structured_outputs", {"choice": CHOICES}, lambda text: text in CHOICES),
        ("guided_choice", CHOICES, lambda text: text in CHOICES),
        ("structured_outputs", {"grammar": GRAMMAR}, lambda text: re.fullmatch(r"\(\d([+*]\d)?\)", text)),
        ("guided_grammar", GRAMMAR, lambda text: re.fullmatch(r"\(\d([+*]\d)?\)", text)),
        ("ebnf", GRAMMAR, lambda text: re.fullmatch(r"\(\d([+*]\d)?\)", text)),
        ("structured_outputs", {"json": PERSON}, lambda text: jsonschema.validate(json.loads(text), PERSON) is None),
        ("guided_json", json.dumps(PERSON), lambda text: jsonschema.validate(json.loads(text), PERSON) is None),
        ("json_schema", PERSON, lambda text: jsonschema.validate(json.loads(text), PERSON) is None),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 24 else None,
)
def test_each_constraint_field_holds_on_completions_and_chat(daemon, field, value, check):
    with httpx.Client(base_url=daemon.url, timeout=120) as http:
        for seed in SEEDS:
            for path, prompt in (("/v1/completions", {"prompt": "Once"}), ("/v1/chat/completions", {"messages": CHAT})):
                body = {**prompt, field: value, "temperature": 1.0, "seed": seed, "max_tokens": MAX_TOKENS}
                response = http.post(path, json=body)
                assert response.status_code == 200, response.text
                choice = response.json()["choices"][0]
                text = choice["text"] if "text" in choice else choice["message"]["content"]
                assert choice["finish_reason"] == "stop" and check(text), (path, seed, text)


def test_a_structural_tag_holds_its_tags_content_to_its_schema(daemon):
    """xgrammar's format (the answer is one tag), and vLLM's structures and triggers (free text,
    in which a tag, once triggered, holds JSON valid for its schema)."""
    tag = {
        "type": "tag",
        "begin": "<item>",
        "content": {"type": "json_schema", "json_schema": PERSON},
        "end": "</item>",
    }
    triggered = {"structures": [{"begin": "<item>", "schema": PERSON, "end": "</item>"}], "triggers": ["<item>"]}
    with httpx.Client(base_url=daemon.url, timeout=120) as http:
        for seed in SEEDS:
            body = {"messages": CHAT, "temperature": 1.0, "seed": seed, "max_tokens": MAX_TOKENS}
            format_ = {"type": "structural_tag", "format": tag}
            choice = http.post("/v1/chat/completions", json={**body, "response_format": format_}).json()["choices"][0]
            text = choice["message"]["content"]
            assert choice["finish_reason"] == "stop" and text.startswith("<item>") and text.endswith("</item>"), text
            jsonschema.validate(json.loads(text[len("<item>") : -len("</item>")]), PERSON)
            legacy = {"type": "structural_tag", **triggered}
            answer = http.post("/v1/chat/completions", json={**body, "max_tokens": 20, "response_format": legacy})
            assert answer.status_code == 200, answer.text


def test_constrained_and_free_requests_share_a_batch(daemon):
    """Constrained and unconstrained requests at once, over HTTP/2, streamed: each holds its own."""
    with httpx.Client(base_url=daemon.url, http2=True, http1=False, timeout=120) as http:
        import concurrent.futures

        def run(i: int) -> tuple[int, str, str | None]:
            body = {"prompt": "Once", "temperature": 1.0, "seed": i, "max_tokens": 40, "stream": True}
            if i % 2:
                body["structured_outputs"] = {"regex": REGEX}
            text, finish = "", None
            with http.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        choice = json.loads(line[6:])["choices"][0]
                        text += choice["text"]
                        finish = choice["finish_reason"] or finish
            return i, text, finish

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(run, range(16)))
    for i, text, finish in results:
        if i % 2:
            assert finish == "stop" and re.fullmatch(REGEX, text), text
        else:
            assert finish in ("stop", "length")
    free = [text for i, text, _finish in results if not i % 2]
    assert not all(re.fullmatch(REGEX, text) for text in free)  # the constraint stayed with its requests


class Person(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    name: str = pydantic.Field(max_length=6)
    age: int = pydantic.Field(ge=0, le=120)
    admin: bool


def test_openai_parse_with_a_pydantic_model(client):
    for seed in SEEDS:
        answer = client.chat.completions.parse(
            model="demo", messages=CHAT, response_format=Person, temperature=1.0, seed=seed, max_tokens=MAX_TOKENS
        )
        person = answer.choices[0].message.parsed
        assert isinstance(person, Person) and 0 <= person.age <= 120


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
            "response_format",
            "nonsense",
        ),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs", "not valid JSON"),
        ({"guided_regex": "(?<=a)b"}, "guided_regex", "Lookbehind"),
        ({"regex": "a(b"}, "regex", "parenthesis"),
        ({"guided_grammar": "root ::= foo"}, "guided_grammar", '"foo"'),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
        ({"guided_choice": []}, "guided_choice", "non-empty"),
        ({"guided_regex": "a", "regex": "b"}, "regex", "one constraint"),
        ({"response_format": {"type": "yaml"}}, "response_format", "yaml"),
        ({"response_format": {"type": "structural_tag", "structures": []}}, "response_format", "triggers"),
        ({"structured_outputs": {"structural_tag": "{nope"}}, "structured_outputs", "not valid JSON"),
        ({"guided_regex": "a", "min_tokens": 2}, "min_tokens", "min_tokens"),
        ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "structured_outputs", "whitespace"),
    ],
)
def test_a_constraint_that_cannot_be_used_is_a_400_naming_its_field(daemon, body, param, words):
    with httpx.Client(base_url=daemon.url, timeout=120) as http:
        response = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 5, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_a_complete_grammar_ends_the_answer_even_with_ignore_eos(daemon):
    """Without end-of-sequence token to wait for, the grammar's completion itself ends the answer."""
    with httpx.Client(base_url=daemon.url, timeout=120) as http:
        for seed in SEEDS:
            body = {"prompt": "Once", "guided_choice": CHOICES, "ignore_eos": True, "temperature": 1.0, "seed": seed}
            choice = http.post("/v1/completions", json={**body, "max_tokens": 50}).json()["choices"][0]
            assert choice["finish_reason"] == "stop" and choice["text"] in CHOICES, choice


def test_logprobs_of_a_constrained_answer_are_the_models_own(daemon):
    """A constrained row that asks for logprobs gets them from the raw logits, one per token."""
    with httpx.Client(base_url=daemon.url, timeout=120) as http:
        body = {"prompt": "Once", "regex": REGEX, "temperature": 1.0, "seed": 1, "max_tokens": 50, "logprobs": 3}
        choice = http.post("/v1/completions", json=body).json()["choices"][0]
    logprobs = choice["logprobs"]
    assert choice["finish_reason"] == "stop" and re.fullmatch(REGEX, choice["text"])
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) > 1
    # the 3 likeliest, and the token chosen when it is not among them (keyed by text: may coincide)
    assert all(lp <= 0 for lp in logprobs["token_logprobs"]) and all(1 <= len(t) <= 4 for t in logprobs["top_logprobs"])
    # raw: the chosen token was forced among few, so it is not always the model's likeliest
    assert any(
        lp < max(top.values()) for lp, top in zip(logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True)
    )
