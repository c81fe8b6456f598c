"""The serving path end to end: the real daemon, real clients, HTTP/1.1 and HTTP/2."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx
import openai
import pytest
from daemon_process import RunningDaemon, descendants, start_daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, model_cache) -> RunningDaemon:
    runtime = Path(tempfile.mkdtemp(prefix="dm-", dir="/tmp"))
    running = start_daemon(tmp_path_factory.mktemp("daemon"), runtime, model_cache)
    yield running
    status = running.stop()
    shutil.rmtree(runtime, ignore_errors=True)
    assert status == 0, running.log_tail()


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


def test_async_client_runs_requests_concurrently(daemon):
    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        requests = [client.completions.create(model="demo", prompt=f"item {i}", max_tokens=5) for i in range(16)]
        results = await asyncio.gather(*requests)
        await client.close()
        return [r.choices[0].finish_reason for r in results]

    assert set(asyncio.run(main())) <= {"length", "stop"}


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
        (json.dumps({"prompt": "x", "n": 2}).encode(), 400, "n"),
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
