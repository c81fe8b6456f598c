"""The serving path end to end: the real daemon, real clients, HTTP/1.1 and HTTP/2."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time

import httpx
import openai
import pytest
from harness.daemons import RunningDaemon, serving, short_dir, start_daemon
from harness.procs import descendants


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, model_cache) -> RunningDaemon:
    with serving(tmp_path_factory.mktemp("daemon"), model_cache) as running:
        yield running


@pytest.fixture
def client(daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_completion_with_the_openai_client(client):
    completion = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=8, temperature=0)
    choice = completion.choices[0]
    assert choice.finish_reason in ("length", "stop") and isinstance(choice.text, str)
    assert completion.usage.completion_tokens <= 8 and completion.usage.prompt_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_chat_completion_streams_to_done(client):
    stream = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        temperature=0,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"] or finishes == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 6
    full = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "hello"}], max_tokens=6, temperature=0
    )
    assert full.choices[0].message.content == text  # greedy: the same tokens either way


# long enough that a stream outlasts the client opening the others, on a busy machine too
CONCURRENT, CONCURRENT_TOKENS = 16, 256


def test_async_client_runs_requests_concurrently(daemon):
    """16 streams sent at once run at once: every one has had its first token before any has had its last
    (one after another, each would end before the next began), and each generates all it was asked for."""

    async def one(client: openai.AsyncOpenAI, number: int) -> tuple[float, float, int, str | None]:
        stream = await client.completions.create(
            model="demo",
            prompt=f"item {number}",
            max_tokens=CONCURRENT_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        first = last = None
        tokens, reason = 0, None
        async for chunk in stream:
            if chunk.choices:  # a token (the last chunk holds the usage alone)
                last = time.monotonic()
                first = first or last
                reason = chunk.choices[0].finish_reason or reason
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        assert first is not None and last is not None, f"stream {number} had no token"
        return first, last, tokens, reason

    async def main() -> list[tuple[float, float, int, str | None]]:
        async with openai.AsyncOpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
            return await asyncio.gather(*(one(c, n) for n in range(CONCURRENT)))

    results = asyncio.run(main())
    assert [(tokens, reason) for _first, _last, tokens, reason in results] == [(CONCURRENT_TOKENS, "length")] * 16
    last_first_token = max(first for first, _last, _tokens, _reason in results)
    first_last_token = min(last for _first, last, _tokens, _reason in results)
    assert last_first_token < first_last_token, "the requests ran one after another, not at once"


def test_httpx_speaks_http2_with_prior_knowledge(daemon):
    with httpx.Client(http2=True, http1=False, base_url=daemon.url, timeout=30) as h2:
        response = h2.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
        assert response.status_code == 200 and response.http_version == "HTTP/2"
        assert response.headers["x-request-id"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_http2_prior_knowledge(daemon):
    result = subprocess.run(
        [
            "curl",
            "-s",
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
            daemon.url + "/health",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.stdout == "2 200"


def test_health_models_metrics_and_server_info(daemon):
    with httpx.Client(base_url=daemon.url, timeout=30) as http:
        assert http.get("/health").json() == {"status": "ok"}
        assert http.get("/health_generate").status_code == 200
        assert http.get("/v1/models").json()["data"][0]["id"] == "demo"
        metrics = http.get("/metrics").text
        for name in (
            "daemon_requests_total",
            "daemon_running_requests",
            "daemon_queued_requests",
            "daemon_time_to_first_token_seconds",
            "daemon_request_latency_seconds",
            "daemon_tier_restarts",
        ):
            assert name in metrics
        info = http.get("/server_info").json()
    assert info["config"]["generation"] == 1 and len(info["config"]["hash"]) == 16
    pids = {f"{t['tier']}-{t['index']}": t["pid"] for t in info["tiers"]}
    assert set(pids) == {"worker-0", "scheduler-0", "tokenizer-0", "frontend-0"}
    assert set(pids.values()) <= set(descendants(daemon.pid))
    assert info["effective_config"]["model"]["served_model_name"] == "demo"
    # the one process holding the model (tp_size 1, dp_size 1): the worker, in /server_info and /metrics
    (rank,) = info["model"]["ranks"]
    assert rank["rank"] == 0 and rank["pid"] == pids["worker-0"] and rank["device"] in ("cpu", "cuda:0"), rank
    series = f'daemon_worker_process{{device="{rank["device"]}",node="0",pid="{rank["pid"]}",rank="0",replica="0"}} 1.0'
    assert series in metrics, metrics


def test_request_id_is_kept_and_returned(daemon):
    with httpx.Client(base_url=daemon.url, timeout=30) as http:
        response = http.post(
            "/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers={"X-Request-Id": "abc-123"}
        )
    assert response.headers["x-request-id"] == "abc-123"
    assert response.json()["id"] == "cmpl-abc-123"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (json.dumps({"prompt": "x", "max_tokens": "many"}).encode(), 400, "max_tokens"),
        (json.dumps({"prompt": "x", "temperature": 7}).encode(), 400, "temperature"),
        (json.dumps({"max_tokens": 3}).encode(), 400, None),
        (json.dumps({"prompt": "x", "n": 999}).encode(), 400, "n"),
        (json.dumps({"prompt": "x", "model": "gpt-4"}).encode(), 404, "model"),
        (json.dumps({"prompt": "x", "max_tokens": 100000}).encode(), 400, "max_tokens"),
        (json.dumps({"prompt": [1.5]}).encode(), 400, "prompt"),
    ],
)
def test_bad_requests_get_openai_errors(daemon, body, status, param):
    with httpx.Client(base_url=daemon.url, timeout=30) as http:
        response = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"]
    if param:
        assert error["param"] == param


def test_oversized_body_gets_413(daemon):
    with httpx.Client(base_url=daemon.url, timeout=30) as http:
        response = http.post("/v1/completions", content=b"x" * (9 * 1024 * 1024))
    assert response.status_code == 413


def test_unknown_route_and_wrong_method(daemon):
    with httpx.Client(base_url=daemon.url, timeout=30) as http:
        assert http.get("/nope").status_code == 404
        assert http.get("/v1/completions").status_code == 405


def test_stop_strings_cut_the_text_across_chunks(client):
    free = client.completions.create(
        model="demo", prompt="The river", max_tokens=40, temperature=0, extra_body={"ignore_eos": True}
    )
    text = free.choices[0].text
    assert len(text) > 12
    stop = text[5:9]  # four characters from the middle: most likely split over several tokens
    cut = client.completions.create(
        model="demo", prompt="The river", max_tokens=40, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]
    stream = client.completions.create(
        model="demo",
        prompt="The river",
        max_tokens=40,
        temperature=0,
        stop=[stop],
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == text[: text.index(stop)]


def test_sampling_is_reproducible_under_a_seed(client):
    def sample(seed: int) -> str:
        response = client.completions.create(
            model="demo",
            prompt="A story",
            max_tokens=24,
            temperature=1.0,
            top_p=0.9,
            seed=seed,
            extra_body={"top_k": 50, "ignore_eos": True},
        )
        return response.choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first


@pytest.fixture(scope="module")
def secured(tmp_path_factory, model_cache) -> RunningDaemon:
    """TLS, an API key, debug logs and a tiny queue: one daemon for the tests of those."""
    from harness.files import make_certificate

    directory = tmp_path_factory.mktemp("secured")
    cert, key = make_certificate(directory)
    runtime = short_dir()
    settings = {
        "server.tls.certfile": cert,
        "server.tls.keyfile": key,
        "logging.level": "debug",
        "scheduler.max_running_requests": 1,
        "scheduler.max_queued_requests": 1,
    }
    running = start_daemon(directory, runtime, model_cache, settings, env={"DAEMON_SERVER__API_KEY": "s3cret"})
    yield running
    status = running.stop()
    shutil.rmtree(runtime, ignore_errors=True)
    assert status == 0, running.log_tail()


def test_tls_negotiates_http2_with_alpn(secured):
    with httpx.Client(http2=True, verify=False, base_url=secured.url, timeout=30) as client:
        response = client.get("/health")
    assert response.status_code == 200 and response.http_version == "HTTP/2"
    with httpx.Client(http2=False, verify=False, base_url=secured.url, timeout=30) as client:
        assert client.get("/health").http_version == "HTTP/1.1"


def test_api_key_guards_v1(secured):
    with httpx.Client(verify=False, base_url=secured.url, timeout=30) as http:
        body = {"prompt": "x", "max_tokens": 2}
        assert http.post("/v1/completions", json=body).status_code == 401
        wrong = http.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["message"]
        assert http.get("/v1/models").status_code == 401
        right = http.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert right.status_code == 200
        assert http.get("/health").status_code == 200  # probes stay open


def test_a_full_queue_answers_503_with_retry_after(secured):
    """max_running_requests 1, max_queued_requests 1: with one request generating (1,500 tokens: it
    outlasts the test) and one waiting, the next is refused at once, and the first goes on; once
    the first leaves, the one waiting is answered."""
    from prometheus_client.parser import text_string_to_metric_families

    auth = {"Authorization": "Bearer s3cret"}
    long = {"prompt": "x", "max_tokens": 1500, "ignore_eos": True, "stream": True}

    async def queued_requests(http: httpx.AsyncClient) -> float:
        families = text_string_to_metric_families((await http.get("/metrics")).raise_for_status().text)
        return next(s.value for f in families for s in f.samples if s.name == "daemon_queued_requests")

    async def main() -> tuple[int, list[str], httpx.Response, int]:
        async with httpx.AsyncClient(verify=False, base_url=secured.url, timeout=60, headers=auth) as http:
            async with http.stream("POST", "/v1/completions", json=long) as running:
                lines = running.aiter_lines()
                await anext(lines)  # generating now
                queued = asyncio.create_task(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 8}))
                deadline = time.monotonic() + 10
                while await queued_requests(http) < 1:  # until the second request is in the queue
                    assert time.monotonic() < deadline and not queued.done(), "the second request was not queued"
                    await asyncio.sleep(0.05)  # the polling interval
                refused = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
                after = [await anext(lines) for _ in range(4)]  # the first one goes on
            # it left (leaving the block closed its connection): the one waiting runs now
            return running.status_code, after, refused, (await queued).status_code

    running, after, refused, queued = asyncio.run(main())
    assert (running, refused.status_code, queued) == (200, 503, 200), refused.text
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["type"] == "server_overloaded"
    assert any(line.startswith("data: {") for line in after), after


def test_request_id_is_on_every_tiers_log_lines(secured):
    with httpx.Client(verify=False, base_url=secured.url, timeout=30) as http:
        response = http.post(
            "/v1/completions",
            json={"prompt": "x", "max_tokens": 3},
            headers={"Authorization": "Bearer s3cret", "X-Request-Id": "trace-me-42"},
        )
    assert response.status_code == 200
    # inside the daemon the request's own id starts with the client's (which need not be unique)
    traced = [e for e in secured.log_events() if str(e.get("request_id", "")).startswith("trace-me-42-")]
    assert len({e["request_id"] for e in traced}) == 1
    secured.wait_for_event("request.finished", request_id=traced[0]["request_id"], role="tokenizer")
    roles = {e["role"] for e in secured.log_events() if e.get("request_id") == traced[0]["request_id"]}
    assert roles >= {"frontend", "tokenizer", "scheduler"}
