"""What stays open without the API key: /health_generate costs little, /server_info says little.

Real daemon with server.api_key set; probes from httpx over HTTP/1.1 and HTTP/2 and curl.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import httpx
import pytest
from harness.daemons import RunningDaemon, serving

from daemon.frontend.probes import HEALTH_GENERATE_REUSE_S

API_KEY = "pr0be-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, model_cache) -> RunningDaemon:
    # debug: the scheduler logs each request it queues, so the probes' tokens can be counted
    settings = {"logging.level": "debug"}
    env = {"DAEMON_SERVER__API_KEY": API_KEY}
    with serving(tmp_path_factory.mktemp("probes"), model_cache, settings, env=env) as running:
        yield running


def health_tokens(daemon: RunningDaemon) -> int:
    """Requests /health_generate has sent to the engine so far."""
    return sum(
        1
        for e in daemon.log_events()
        if e.get("event") == "request.queued" and str(e.get("request_id", "")).startswith("health-")
    )


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "http2"])
def test_many_readiness_probes_cost_one_token_a_second(daemon, http2):
    async def probe_for(seconds: float) -> list[int]:
        statuses: list[int] = []
        async with httpx.AsyncClient(base_url=daemon.url, http2=http2, http1=not http2, timeout=30) as http:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and len(statuses) < 2000:  # bounded in time and count
                answers = await asyncio.gather(*(http.get("/health_generate") for _ in range(20)))
                statuses += [a.status_code for a in answers]
        return statuses

    before, started = health_tokens(daemon), time.monotonic()
    statuses = asyncio.run(probe_for(3.0))
    elapsed = time.monotonic() - started
    assert statuses and set(statuses) == {200}, set(statuses)
    spent = health_tokens(daemon) - before
    assert len(statuses) >= 40  # they came in waves of 20, concurrently
    assert 1 <= spent <= elapsed / HEALTH_GENERATE_REUSE_S + 2, (spent, len(statuses), elapsed)


def test_a_probe_after_the_reuse_window_generates_again(daemon):
    with httpx.Client(base_url=daemon.url, timeout=30) as http:
        assert http.get("/health_generate").status_code == 200
        before = health_tokens(daemon)
        deadline = time.monotonic() + HEALTH_GENERATE_REUSE_S * 5
        while health_tokens(daemon) == before and time.monotonic() < deadline:
            assert http.get("/health_generate").json()["status"] == "ok"
    assert health_tokens(daemon) > before, "the probe never generated again: it would hide a stuck engine"


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "http2"])
def test_server_info_without_the_key_names_no_path_pid_or_config(daemon, http2):
    with httpx.Client(base_url=daemon.url, http2=http2, http1=not http2, timeout=30) as http:
        public = http.get("/server_info")
        full = http.get("/server_info", headers=AUTH).json()
        wrong = http.get("/server_info", headers={"Authorization": "Bearer nope"}).json()
    assert public.status_code == 200
    text = public.text
    for secret in (str(daemon.runtime_dir), str(daemon.config_path), "/tmp", "effective_config", '"pid"'):
        assert secret not in text, f"{secret} is shown without the key: {text}"
    assert wrong == public.json()
    body = public.json()
    assert body["config"]["generation"] == full["config"]["generation"] >= 1
    assert {t["tier"] for t in body["tiers"]} == {t["tier"] for t in full["tiers"]}
    assert all(t["state"] == "up" for t in body["tiers"])
    # with the key: everything, paths included
    assert full["supervisor"]["pid"] == daemon.pid and full["effective_config"]["server"]["api_key"] == "********"
    assert full["model"]["directory"].startswith("/")


def test_curl_sees_the_same_split(daemon):
    def curl(*args: str) -> dict:
        done = subprocess.run(
            ["curl", "-sS", "--max-time", "20", "--http2-prior-knowledge", *args, daemon.url + "/server_info"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    assert "effective_config" not in curl()
    assert "effective_config" in curl("-H", f"Authorization: Bearer {API_KEY}")
