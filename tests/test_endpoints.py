"""The endpoints beside generation, end to end: the served model (/v1/models, /v1/models/{id}),
/tokenize, /detokenize, /version, and the model directory in /server_info. Real daemon, real
clients (the openai client sync and async, httpx over HTTP/1.1 and HTTP/2)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import msgspec
import openai
import pytest
from harness.daemons import RunningDaemon, run_daemon, serving
from harness.wait import until
from tokenizers import Tokenizer

import daemon as daemon_package
from daemon.engine.demo_model import demo_model_dir
from daemon.frontend.response_models import ErrorResponse
from daemon.ipc.messages import ChatOptions
from daemon.tokenizer.loading import TextTokenizer, load_text_tokenizer

API_KEY = "k3y-endpoints"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a river."},
    {"role": "assistant", "content": "The Rhine"},
]
HEALTHY_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, model_cache) -> RunningDaemon:
    # the reload test reloads by command, once its file is written; debug logs say when a
    # tokenizer worker has a request
    settings = {"runtime.watch_config": False, "logging.level": "debug"}
    env = {"DAEMON_SERVER__API_KEY": API_KEY}
    with serving(tmp_path_factory.mktemp("endpoints"), model_cache, settings, env=env) as running:
        yield running


@pytest.fixture(params=["HTTP/1.1", "HTTP/2"])
def http(request, daemon) -> httpx.Client:
    """httpx over each protocol; HTTP/2 in cleartext is h2c with prior knowledge."""
    h2 = request.param == "HTTP/2"
    with httpx.Client(http2=h2, http1=not h2, base_url=daemon.url, headers=AUTH, timeout=30) as client:
        assert client.get("/health").http_version == request.param  # the connection the test's requests reuse
        yield client


@pytest.fixture
def client(daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key=API_KEY, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def text(model_cache) -> TextTokenizer:
    """The demo model's tokenizer, loaded here: what the daemon's answers are held to."""
    return load_text_tokenizer(demo_model_dir(model_cache))


def status(daemon: RunningDaemon) -> dict:
    return json.loads((daemon.socket_dir / "status.json").read_text())


def serving_worker(daemon: RunningDaemon) -> dict:
    (worker,) = [t for t in status(daemon)["tiers"] if t["tier"] == "worker" and t["state"] == "up"]
    return worker


def assert_error(response: httpx.Response, status: int, param: str | None, kind: str = "invalid_request_error"):
    assert response.status_code == status, response.text
    msgspec.json.decode(response.content, type=ErrorResponse)  # the shape /openapi.json declares for errors
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == (kind, param, None), error
    assert error["message"]
    return error


def wait_for_log(daemon: RunningDaemon, event: str, request_prefix: str, timeout: float = 30.0) -> dict:
    """The log line `event` about the request whose own id starts with the client's `request_prefix`."""

    def found() -> list[dict]:
        return [e for e in daemon.events(event) if str(e.get("request_id", "")).startswith(request_prefix)]

    return until(found, timeout, 0.05, f"{event} for {request_prefix}", retry_on=(), detail=daemon.log_tail)[0]


# --- the served model --------------------------------------------------------------------------------


def test_models_retrieve_with_the_sync_client(client, daemon):
    model = client.models.retrieve("demo")
    assert (model.id, model.object, model.owned_by) == ("demo", "model", "daemon")
    assert model.created == int(serving_worker(daemon)["since"])
    assert model.model_extra["max_model_len"] == 2048  # the demo model's context


def test_models_retrieve_with_the_async_client(daemon):
    async def main() -> openai.types.Model:
        async with openai.AsyncOpenAI(base_url=daemon.url + "/v1", api_key=API_KEY, max_retries=0) as client:
            return await client.models.retrieve("demo")

    model = asyncio.run(main())
    assert (model.id, model.object, model.owned_by) == ("demo", "model", "daemon")
    assert model.created == int(serving_worker(daemon)["since"])


def test_another_model_is_not_found_with_the_openai_client(client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.models.retrieve("gpt-4o")
    assert raised.value.status_code == 404
    assert raised.value.body == {
        "message": "The model `gpt-4o` does not exist; this server serves `demo`",
        "type": "not_found_error",
        "param": "model",
        "code": None,
    }


def test_another_model_is_not_found_over_http(http):
    assert_error(http.get("/v1/models/gpt-4o"), 404, "model", "not_found_error")
    # an id with a slash, percent-encoded as the openai client sends it, is matched whole
    error = assert_error(http.get("/v1/models/org%2Fname"), 404, "model", "not_found_error")
    assert "`org/name`" in error["message"]


def test_retrieve_agrees_with_the_list(http):
    listed = http.get("/v1/models").json()
    card = http.get("/v1/models/demo").json()
    assert listed == {"object": "list", "data": [card]}
    assert set(card) == {"id", "object", "created", "owned_by", "root", "max_model_len"}


def test_created_is_when_the_worker_finished_loading(http, daemon):
    card = http.get("/v1/models/demo").json()
    worker = serving_worker(daemon)
    assert card["created"] == int(worker["since"]) > 0
    # the worker is up after the daemon started, and before now
    assert status(daemon)["started"] <= worker["since"] <= time.time()


def test_model_routes_need_the_api_key(daemon):
    with httpx.Client(base_url=daemon.url, timeout=30) as anonymous:
        for path in ("/v1/models", "/v1/models/demo"):
            response = anonymous.get(path)
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert anonymous.get("/v1/models/demo", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_server_info_shows_the_resolved_model_directory(http, daemon, model_cache):
    info = http.get("/server_info").json()
    directory = Path(info["model"]["directory"])
    assert directory == demo_model_dir(model_cache).resolve()  # builtin:demo's build in the cache
    assert directory.is_absolute() and (directory / "config.json").is_file()
    assert info["model"]["max_model_len"] == 2048
    assert info["model"]["worker_pid"] == serving_worker(daemon)["pid"]
    assert http.get("/v1/models/demo").json()["root"] == str(directory)
    worker = [t for t in info["tiers"] if t["tier"] == "worker"]
    assert [t["model"]["directory"] for t in worker] == [str(directory)]


# --- /tokenize, /detokenize ------------------------------------------------------------------------------


def test_tokenize_a_prompt(http, text):
    prompt = "Once upon a time, the river"
    body = http.post("/tokenize", json={"model": "demo", "prompt": prompt}).json()
    expected = text.encode(prompt, add_special_tokens=True)
    assert body == {"count": len(expected), "max_model_len": 2048, "tokens": expected, "token_strs": None}
    assert expected[0] == text.bos_token_id  # a plain prompt starts with BOS, as /v1/completions sees it
    bare = http.post("/tokenize", json={"prompt": prompt, "add_special_tokens": False}).json()
    assert bare["tokens"] == text.encode(prompt, add_special_tokens=False) == expected[1:]


def test_tokenize_returns_token_strings_when_asked(http, model_cache):
    body = http.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    vocabulary = Tokenizer.from_file(str(demo_model_dir(model_cache) / "tokenizer.json"))
    assert body["token_strs"] == [vocabulary.id_to_token(i) for i in body["tokens"]]
    assert body["token_strs"][0] == "<|begin_of_text|>" and len(body["token_strs"]) == body["count"]


def test_tokenize_a_conversation(http, text):
    body = http.post("/tokenize", json={"messages": MESSAGES[:2]}).json()
    expected = text.render_chat_prompt(MESSAGES[:2], ChatOptions())
    assert body["tokens"] == expected and body["count"] == len(expected) and body["token_strs"] is None
    # the chat options reach the template: the final message left open, to be continued
    options = {"add_generation_prompt": False, "continue_final_message": True}
    continued = http.post("/tokenize", json={"messages": MESSAGES, **options, "return_token_strs": True}).json()
    assert continued["tokens"] == text.render_chat_prompt(
        MESSAGES, ChatOptions(add_generation_prompt=False, continue_final_message=True)
    )
    assert text.decode(continued["tokens"]).endswith("The Rhine")
    assert len(continued["token_strs"]) == continued["count"]


def test_detokenize_round_trip(http, text):
    prompt = "The quick brown fox, twice: the quick brown fox."
    tokens = http.post("/tokenize", json={"prompt": prompt, "add_special_tokens": False}).json()["tokens"]
    assert http.post("/detokenize", json={"model": "demo", "tokens": tokens}).json() == {"prompt": prompt}
    # special tokens are part of the text, as vLLM's /detokenize shows them
    with_bos = http.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    assert http.post("/detokenize", json={"tokens": with_bos}).json()["prompt"] == "<|begin_of_text|>" + prompt
    assert http.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize("tokens", [[5, -1], [5, 1024], [2**40], ["5"], [1.5]])
def test_bad_token_ids_are_a_400_naming_tokens(http, tokens):
    assert_error(http.post("/detokenize", json={"tokens": tokens}), 400, "tokens")  # the demo vocabulary: 0..1023


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/detokenize", {}, "tokens"),
        ("/detokenize", {"model": "demo"}, "tokens"),
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"model": "demo", "return_token_strs": True}, "prompt"),
    ],
)
def test_a_missing_field_is_a_400_naming_it(http, path, body, param):
    error = assert_error(http.post(path, json=body), 400, param)
    assert f"`{param}`" in error["message"] and "required" in error["message"]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/tokenize", {"prompt": "x", "temperature": 0}, "temperature"),
        ("/tokenize", {"messages": MESSAGES, "chat_template": "{{ x }}"}, "chat_template"),
        ("/tokenize", {"prompt": "x", "add_generation_prompt": True}, "add_generation_prompt"),  # chat only
        ("/detokenize", {"tokens": [1], "skip_special_tokens": True}, "skip_special_tokens"),
    ],
)
def test_an_unknown_field_is_a_400_naming_it(http, path, body, field):
    error = assert_error(http.post(path, json=body), 400, field)
    assert f"`{field}`" in error["message"]


def test_an_unknown_field_is_named_with_what_was_meant(http):
    typo = assert_error(http.post("/tokenize", json={"prompt": "x", "return_token_str": True}), 400, "return_token_str")
    assert "did you mean `return_token_strs`?" in typo["message"]
    other_form = http.post("/tokenize", json={"prompt": "x", "chat_template_kwargs": {}})
    other_form = assert_error(other_form, 400, "chat_template_kwargs")
    assert "it belongs to the conversation form of /tokenize" in other_form["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x", "return_token_strs": "yes"}, "return_token_strs"),
        ({"messages": "hello"}, "messages"),
        ({"prompt": "x", "messages": MESSAGES}, "prompt"),
    ],
)
def test_a_bad_value_is_a_400_naming_its_field(http, body, param):
    assert_error(http.post("/tokenize", json=body), 400, param)


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user"}]},  # no content
        {"messages": []},
        {"messages": MESSAGES, "continue_final_message": True},  # and add_generation_prompt, by default
    ],
)
def test_messages_the_template_refuses_are_a_400_naming_messages(http, body):
    assert_error(http.post("/tokenize", json=body), 400, "messages")


@pytest.mark.parametrize(("path", "body"), [("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})])
def test_another_model_is_a_404_naming_model(http, path, body):
    assert_error(http.post(path, json={**body, "model": "gpt-4o"}), 404, "model", "not_found_error")


def test_malformed_bodies_are_400s(http):
    for content in (b"{not json", b"[1, 2]"):
        response = http.post("/tokenize", content=content, headers={"content-type": "application/json"})
        assert_error(response, 400, None)
    assert http.get("/tokenize").status_code == 405


def test_tokenize_and_detokenize_need_the_api_key(daemon):
    with httpx.Client(base_url=daemon.url, timeout=30) as anonymous:
        assert anonymous.post("/tokenize", json={"prompt": "x"}).status_code == 401
        assert anonymous.post("/detokenize", json={"tokens": [1]}).status_code == 401


def test_request_id_is_returned(http):
    response = http.post("/tokenize", json={"prompt": "x"}, headers={"X-Request-Id": "tok-7"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "tok-7"


# --- /version ------------------------------------------------------------------------------------------------


def test_version(daemon, http):
    with httpx.Client(base_url=daemon.url, timeout=30) as anonymous:  # open, like the probes
        response = anonymous.get("/version")
    assert response.json() == {"version": daemon_package.__version__}
    assert http.get("/version").json() == {"version": daemon_package.__version__}


# --- tiers that go away ---------------------------------------------------------------------------------------
# These restart a tier of the module's daemon; each waits until everything serves again.


def wait_healthy(daemon: RunningDaemon, tier: str, old_pid: int) -> dict:
    """Until a new process of `tier` is up and a token goes through every tier; its status entry."""

    def healthy() -> dict | None:
        entries = [t for t in status(daemon)["tiers"] if t["tier"] == tier and t["state"] == "up"]
        if entries and entries[-1]["pid"] != old_pid:
            with httpx.Client(base_url=daemon.url, timeout=30) as probe:
                if probe.get("/health_generate").status_code == 200:
                    return entries[-1]
        return None

    return until(healthy, HEALTHY_TIMEOUT_S, what=f"a new {tier}", retry_on=(), detail=daemon.log_tail)


def test_a_tokenizer_that_dies_is_a_503_not_a_hang(daemon):
    """The tokenizer is frozen (SIGSTOP), so the /tokenize it was given gets no answer; then it is
    killed: the request ends with a 503 at once, long before the gateway's own time limit."""
    (tokenizer,) = [t for t in status(daemon)["tiers"] if t["tier"] == "tokenizer"]
    outcome: dict = {}

    def ask() -> None:
        with httpx.Client(base_url=daemon.url, headers={**AUTH, "X-Request-Id": "lost-1"}, timeout=60) as http:
            started = time.monotonic()
            outcome["response"] = http.post("/tokenize", json={"prompt": "lost"})
            outcome["seconds"] = time.monotonic() - started

    os.kill(tokenizer["pid"], signal.SIGSTOP)
    asking = threading.Thread(target=ask)
    try:
        asking.start()
        assert wait_for_log(daemon, "tokenizer.asked", "lost-1-")["tokenizer"] == tokenizer["index"]
    finally:
        os.kill(tokenizer["pid"], signal.SIGKILL)
        asking.join(60)
    response = outcome["response"]
    error = assert_error(response, 503, None, "server_error")
    assert "the tokenizer worker stopped" in error["message"]
    assert response.headers["retry-after"] == "1" and outcome["seconds"] < 15
    wait_healthy(daemon, "tokenizer", tokenizer["pid"])
    with httpx.Client(base_url=daemon.url, headers=AUTH, timeout=30) as http:
        assert http.post("/tokenize", json={"prompt": "back"}).status_code == 200


def reload(daemon: RunningDaemon, config: str) -> dict:
    """Write `config` and reload it by command; the reload's report."""
    daemon.config_path.write_text(config)
    result = run_daemon("reload", "--runtime-dir", str(daemon.runtime_dir), "--format", "json", timeout=300)
    assert result.stdout, result.stderr
    return json.loads(result.stdout)


def test_unknown_fields_are_ignored_and_logged_when_the_operator_says_so(daemon):
    config = daemon.config_path.read_text()
    report = reload(daemon, config.replace("[server]\n", '[server]\nunknown_request_fields = "ignore"\n'))
    try:
        assert (report["result"], report["restarted"]) == ("applied", []), report
        with httpx.Client(base_url=daemon.url, headers=AUTH, timeout=30) as http:
            plain = http.post("/tokenize", json={"prompt": "odd one"})
            extra = http.post("/tokenize", json={"prompt": "odd one", "vendor_extra": 1})
            assert extra.status_code == 200 and extra.json() == plain.json()
            assert http.post("/detokenize", json={"tokens": [5], "vendor_extra": 1}).status_code == 200
        daemon.wait_for_event("request.field_ignored", field="vendor_extra", body="TokenizeCompletionRequest")
    finally:
        assert reload(daemon, config)["result"] == "applied"
    with httpx.Client(base_url=daemon.url, headers=AUTH, timeout=30) as http:  # strict again
        assert http.post("/tokenize", json={"prompt": "x", "vendor_extra": 1}).status_code == 400


def test_created_changes_when_a_reload_replaces_the_worker(daemon, client):
    before = serving_worker(daemon)
    created = client.models.retrieve("demo").created
    assert created == int(before["since"])
    config = daemon.config_path.read_text()
    try:
        report = reload(daemon, config.replace("[model]\n", "[model]\nseed = 4242\n"))
        assert (report["result"], report["restarted"]) == ("applied", ["worker"]), report
        after = wait_healthy(daemon, "worker", before["pid"])
        model = client.models.retrieve("demo")
        assert model.created == int(after["since"]) and after["since"] > before["since"]
        assert model.created != created  # the new worker loaded seconds later
        assert model.model_extra["root"] == before["model"]["directory"]  # the same model, loaded again
    finally:
        daemon.config_path.write_text(config)
