"""Request parsing as clients meet it: unknown fields, explicit nulls, error shapes, /openapi.json.

Real daemon, the official openai client (sync, async, streaming) and httpx over HTTP/1.1 and HTTP/2.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest
from harness.daemons import RunningDaemon, run_daemon, serving

from daemon.frontend.request_models import ChatRequest, CompletionRequest, fields_of

CHAT = [{"role": "user", "content": "hello"}]
LONG = " ".join(str(n) for n in range(3000))  # far beyond the demo model's 2,048-token context
TRANSPORTS = pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "http2"])


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, model_cache) -> RunningDaemon:
    with serving(tmp_path_factory.mktemp("daemon"), model_cache) as running:
        yield running


@pytest.fixture(scope="module")
def client(daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(daemon: RunningDaemon, path: str, body: dict | bytes, *, http2: bool = False) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with httpx.Client(base_url=daemon.url, http2=http2, http1=not http2, timeout=60) as http:
        response = http.post(path, content=content, headers={"content-type": "application/json"})
    assert response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
    return response


def openai_error(response: httpx.Response, status: int) -> dict:
    """The error object of an OpenAI-shaped error answer, exactly its four fields."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] and body["error"]["type"]
    return body["error"]


# --- unknown fields ------------------------------------------------------------------------------


def test_an_unknown_field_is_refused_with_the_closest_known_one(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="demo", prompt="x", max_tokens=2, extra_body={"max_tokns": 3})
    assert raised.value.body["param"] == "max_tokns"
    assert "did you mean `max_tokens`" in raised.value.body["message"]


def test_the_async_client_sees_the_same_refusal_on_chat(daemon):
    async def run() -> dict:
        async with openai.AsyncOpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0) as client:
            with pytest.raises(openai.BadRequestError) as raised:
                await client.chat.completions.create(
                    model="demo", messages=CHAT, extra_body={"temprature": 0.5}, stream=True
                )
            return raised.value.body

    body = asyncio.run(run())
    assert body["param"] == "temprature" and "did you mean `temperature`" in body["message"]


@TRANSPORTS
def test_a_field_of_the_other_endpoint_is_named_as_such(daemon, http2):
    error = openai_error(post(daemon, "/v1/completions", {"prompt": "x", "messages": CHAT}, http2=http2), 400)
    assert error["param"] == "messages" and "/v1/chat/completions" in error["message"]
    error = openai_error(post(daemon, "/v1/chat/completions", {"messages": CHAT, "echo_prompt": 1}, http2=http2), 400)
    assert error["param"] == "echo_prompt"


# --- null means unset --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "model", "required"),
    [("/v1/completions", CompletionRequest, {"prompt": "Once upon"}), ("/v1/chat/completions", ChatRequest, {})],
    ids=["completions", "chat"],
)
@TRANSPORTS
def test_explicit_null_in_every_optional_field_means_unset(daemon, path, model, required, http2):
    required = required or {"messages": CHAT}
    nulls = {info.name: None for info in fields_of(model) if not info.required}
    greedy = {"temperature": 0, "max_tokens": 5}
    plain = post(daemon, path, {**required, **greedy}, http2=http2)
    nulled = post(daemon, path, {**nulls, **required, **greedy}, http2=http2)
    assert plain.status_code == nulled.status_code == 200, nulled.text
    assert plain.json()["choices"] == nulled.json()["choices"]
    # and a null max_tokens is the endpoint's default, not an error
    assert post(daemon, path, {**required, "max_tokens": None}, http2=http2).status_code == 200


# --- error shapes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
        ("/v1/chat/completions", {"max_tokens": 3}, 400, "messages"),
        ("/v1/completions", {"prompt": None}, 400, "prompt"),
        ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "stop": ["a", 1]}, 400, "stop"),
        ("/v1/chat/completions", {"messages": CHAT, "stream_options": {"include_usage": "yes"}}, 400, "stream_options"),
        ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, 400, "messages"),
        ("/v1/completions", {"prompt": LONG, "max_tokens": 1}, 400, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
        ("/v1/completions", b"[1, 2]", 400, None),
        ("/v1/completions", b"{not json", 400, None),
    ],
)
@TRANSPORTS
def test_every_refusal_is_an_openai_error_naming_its_field(daemon, path, body, status, param, http2):
    error = openai_error(post(daemon, path, body, http2=http2), status)
    assert error["param"] == param, error


@TRANSPORTS
def test_errors_outside_the_generation_routes_have_the_same_shape(daemon, http2):
    with httpx.Client(base_url=daemon.url, http2=http2, http1=not http2, timeout=30) as http:
        assert openai_error(http.get("/no/such/route"), 404)["type"] == "not_found_error"
        assert openai_error(http.get("/v1/completions"), 405)
        if not http2:  # httpx's HTTP/2 client sends the whole body before it reads an early answer
            assert openai_error(http.post("/v1/completions", content=b"x" * (9 * 1024 * 1024)), 413)


# --- /openapi.json ---------------------------------------------------------------------------------


def test_openapi_describes_the_real_request_and_response_bodies(daemon, client):
    with httpx.Client(base_url=daemon.url, timeout=30) as http:
        document = http.get("/openapi.json").json()
        completion = http.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 2}).json()
        chat = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2}).json()
        tokenized = http.post("/tokenize", json={"messages": CHAT, "return_token_strs": True}).json()
        model = http.get("/v1/models/demo").json()
    assert document["openapi"].startswith("3.1")
    operation = document["paths"]["/v1/completions"]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/CompletionRequest")

    def validator(name: str) -> jsonschema.Draft202012Validator:
        return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}", **document})

    assert set(document["paths"]) >= {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/v1/models/{model}",
        "/tokenize",
        "/detokenize",
        "/version",
    }
    validator("Completion").validate(completion)
    validator("TokenizeResponse").validate(tokenized)
    validator("ModelCard").validate(model)
    validator("ChatCompletion").validate(chat)
    validator("CompletionRequest").validate({"prompt": [[1, 2], [3]], "max_tokens": 2, "temperature": None})
    assert not validator("CompletionRequest").is_valid({"prompt": "x", "max_tokns": 2})  # unknown: refused
    error = post(daemon, "/v1/completions", {"prompt": "x", "n": 0}).json()
    validator("ErrorResponse").validate(error)
    described = document["components"]["schemas"]["ChatRequest"]["properties"]
    assert set(described) == {info.name for info in fields_of(ChatRequest)}
    assert all(prop.get("description") for prop in described.values())
    events = []
    for chunk in client.chat.completions.create(model="demo", messages=CHAT, max_tokens=3, stream=True):
        events.append(chunk.model_dump(exclude_unset=True))
    for event in events:
        validator("ChatCompletionChunk").validate(event)


# --- last: the module's daemon, made to ignore unknown fields --------------------------------------


def test_ignoring_unknown_fields_is_a_live_setting_and_each_is_logged_once(daemon):
    """The module's daemon (a start of its own costs seconds), reloaded: so this test comes last, as the
    tests before it expect unknown fields refused."""
    running, mark = daemon, daemon.log.mark()
    body = {"prompt": "x", "max_tokens": 2, "vendor_extra": {"a": 1}, "another_one": True}
    assert openai_error(post(running, "/v1/completions", body), 400)["param"] == "vendor_extra"
    pids = running.tier_pids()
    text = running.config_path.read_text().replace("[server]\n", '[server]\nunknown_request_fields = "ignore"\n')
    running.config_path.write_text(text)
    result = run_daemon("reload", "-c", str(running.config_path))
    assert result.returncode == 0, result.stdout + result.stderr
    for http2 in (False, True):
        answer = post(running, "/v1/completions", body, http2=http2)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] <= 2
    nested = {**body, "stream_options": {"include_usage": True, "nested_extra": 1}, "stream": True}
    assert openai_error(post(running, "/v1/completions", nested), 400)["param"] == "stream_options"
    assert running.tier_pids() == pids  # live: nothing restarted
    ignored = running.log.since(mark, "request.field_ignored")
    assert sorted(e["field"] for e in ignored) == ["another_one", "vendor_extra"]
