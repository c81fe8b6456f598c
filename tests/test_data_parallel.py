"""Data parallelism (model.dp_size) on the real daemon: two replicas of the demo model, each its own
worker process, placed on by the scheduler, supervised one by one, replaced one at a time by a reload.

One daemon (`replicated`, dp_size 2, reloaded only when asked) serves the whole module: a start costs
seconds. Every test leaves it as it found it: the base config, both replicas serving. Loads are the
harness's (Traffic, Requests): bounded in count and in time, every outcome kept. The placement rule
itself is tested without processes, on its pure function.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from harness.daemons import run_daemon, short_dir
from harness.load import Client, Options, Requests, Traffic, request, request_body
from harness.logs import logged_at
from harness.metrics import scrape
from harness.procs import free_port
from harness.reloadable import READ_TIMEOUT_S, RELOAD_TIMEOUT_S, Reloadable, running, server_toml_settings
from harness.wait import until

from daemon.config.schema import DaemonSettings
from daemon.scheduler.placement import PREFIX_LOAD_SLACK, Candidate, choose
from daemon.supervisor.replicas import replica_devices

LOAD = Options(max_tokens=24, read_timeout=READ_TIMEOUT_S, give_up_after_s=3 * READ_TIMEOUT_S)
STOP_S = 3 * READ_TIMEOUT_S + 10  # the load's clients have all stopped this long after being told to
SERVING_S = 30.0  # a replica restarted or replaced serves again within this long


# --- the placement rule, alone ------------------------------------------------------------------------


def candidate(index: int, running: int = 0, waiting: int = 0, cached: int = 0, **figures: int) -> Candidate:
    free = figures.get("free_tokens", 4096)
    return Candidate(index, running, waiting, free, figures.get("context_length", 2048), cached)


def test_placement_prefers_the_least_loaded_then_the_cached_prefix_within_a_slack():
    assert choose([candidate(0, running=3), candidate(1, running=1)], 10).index == 1
    assert choose([candidate(0), candidate(1)], 10).index == 0  # a tie: the first
    assert choose([candidate(0, free_tokens=10), candidate(1)], 100).index == 1  # room for the prompt now
    # a cached prefix draws the request while its replica is at most the slack busier ...
    busier = candidate(0, running=PREFIX_LOAD_SLACK, cached=64)
    assert choose([busier, candidate(1)], 100).index == 0
    # ... and no further: prompts that share a prefix do not all pile onto one replica
    assert choose([candidate(0, running=PREFIX_LOAD_SLACK + 1, cached=64), candidate(1)], 100).index == 1
    assert choose([candidate(0, cached=16), candidate(1, cached=48)], 100).index == 1  # the longer prefix
    # a prompt the context of one replica cannot hold (a reload changing it, half done) goes to the other
    assert choose([candidate(0, context_length=64), candidate(1, running=5)], 100).index == 1


def test_each_replica_on_cuda_sees_its_own_run_of_gpus():
    def devices(index: int, visible: str | None, **model: object) -> dict[str, str]:
        settings = DaemonSettings(model={"path": "builtin:demo", "device": "cuda", **model})
        return replica_devices(settings, index, visible)

    assert devices(0, None) == {}  # one replica: nothing changes
    assert devices(1, None, dp_size=2) == {"CUDA_VISIBLE_DEVICES": "1"}
    assert devices(1, None, dp_size=2, tp_size=2) == {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert devices(1, "4,5,6,7", dp_size=2, tp_size=2) == {"CUDA_VISIBLE_DEVICES": "6,7"}
    assert devices(1, "4", dp_size=2) == {}  # too few GPUs: it shares what it sees
    cpu = DaemonSettings(model={"path": "builtin:demo", "device": "cpu", "dp_size": 2})
    assert replica_devices(cpu, 1, None) == {}


# --- the daemon ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory, model_cache) -> Path:
    """The demo model as a plain directory: a reload can point model.path at another."""
    from daemon.engine.demo_model import ensure_demo_model

    target = tmp_path_factory.mktemp("models") / "demo"
    shutil.copytree(ensure_demo_model(model_cache), target)
    return target


@pytest.fixture(scope="module")
def replicated(tmp_path_factory, model_cache, demo_dir) -> Iterator[Reloadable]:
    """configs/server.toml with model.dp_size = 2, reloaded by `daemon reload` only."""
    runtime_dir = short_dir()
    settings = server_toml_settings(
        free_port(),
        runtime_dir,
        model_cache,
        runtime={"watch_config": False, "drain_timeout_s": 10},
        # explicit, so that a new model.path changes nothing else (both derive from it when unset)
        model={"path": str(demo_dir), "served_model_name": "demo", "dp_size": 2},
        tokenizer={"path": str(demo_dir)},
    )
    with running(tmp_path_factory.mktemp("replicated") / "etc", settings, runtime_dir) as handle:
        yield handle


@pytest.fixture
def daemon(replicated) -> Iterator[Reloadable]:
    """The module's daemon with its base config and both replicas serving, before and after the test."""
    replicated.reset()
    wait_both_serving(replicated)
    yield replicated
    replicated.reset()
    wait_both_serving(replicated)


def workers(handle: Reloadable) -> dict[int, dict]:
    """The worker tiers in status.json, by replica."""
    return {t["index"]: t for t in handle.status()["tiers"] if t["tier"] == "worker"}


def replica_figure(handle: Reloadable, name: str) -> dict[int, float]:
    """One per-replica series of /metrics, by replica."""
    return {int(dict(labels)["replica"]): value for (sample, labels), value in scrape(handle).items() if sample == name}


def wait_both_serving(handle: Reloadable, timeout: float = SERVING_S) -> None:
    def serving() -> bool:
        up = [t for t in workers(handle).values() if t["state"] == "up"]
        return len(up) == 2 and replica_figure(handle, "daemon_replica_serving") == {0: 1.0, 1: 1.0}

    until(serving, timeout, what="both replicas serving", detail=lambda: handle.log.tail(15))


def steady_load(handle: Reloadable) -> Traffic:
    clients = [Client(protocol, stream=None, chat=None) for protocol in ("h1", "h2", "h1", "h2")]
    return Traffic(handle.url, clients, LOAD, requests=2000, time_limit_s=150.0, pause_s=0.01)


# --- serving -----------------------------------------------------------------------------------------


def test_both_replicas_serve_and_requests_spread_over_them(daemon):
    status = workers(daemon)
    assert sorted(status) == [0, 1] and len({t["pid"] for t in status.values()}) == 2, status
    assert len({t["epoch"] for t in status.values()}) == 2, "worker epochs are unique over the replicas"
    before = replica_figure(daemon, "daemon_replica_requests_placed_total")

    clients = [Client(protocol, stream) for protocol in ("h1", "h2") for stream in (True, False)] * 2
    burst = Requests(daemon.url, clients, dataclasses.replace(LOAD, max_tokens=64))
    outcomes = burst.join(60)
    assert all(o.kind == "complete" for o in outcomes), burst.report()

    def placed_since() -> dict[int, float] | None:
        after = replica_figure(daemon, "daemon_replica_requests_placed_total")
        spread = {i: after[i] - before.get(i, 0) for i in after}
        return spread if sum(spread.values()) >= len(clients) else None

    spread = until(placed_since, 10, what="the burst counted by replica")
    assert all(spread[i] >= 1 for i in (0, 1)), f"the requests did not spread over the replicas: {spread}"

    # every replica shows: status.json, /server_info, `daemon status`
    info = daemon.server_info()
    assert [(r["replica"], r["state"]) for r in info["replicas"]] == [(0, "serving"), (1, "serving")], info
    assert sum(r["total_tokens"] for r in info["replicas"]) > 0
    text = run_daemon("status", "--runtime-dir", str(daemon.daemon.runtime_dir)).stdout
    assert "worker-0" in text and "worker-1" in text, text


def test_a_repeated_prompt_goes_where_its_prefix_is_cached(daemon):
    prompt = " ".join(f"item {i}," for i in range(90))  # many full cache blocks
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0}
    before = replica_figure(daemon, "daemon_replica_requests_placed_total")
    with httpx.Client(base_url=daemon.url, timeout=READ_TIMEOUT_S) as http:
        first = http.post("/v1/completions", json=body).raise_for_status().json()
        assert first["usage"]["prompt_tokens"] > 64, first["usage"]
        for _ in range(4):  # whichever replica is idle too: the one holding the prefix takes it
            answer = http.post("/v1/completions", json=body).raise_for_status().json()
            cached = answer["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert cached >= 64, f"the prompt was placed where its prefix is not cached: {answer['usage']}"

    def placed_since() -> dict[int, float] | None:
        after = replica_figure(daemon, "daemon_replica_requests_placed_total")
        spread = {i: after[i] - before.get(i, 0) for i in after}
        return spread if sum(spread.values()) >= 5 else None

    assert sorted(until(placed_since, 10, what="the five counted").values()) == [0, 5]


# --- faults ------------------------------------------------------------------------------------------


def test_kill_one_replica_under_load_the_other_serves_throughout(daemon):
    victim = workers(daemon)[1]
    mark = daemon.log.mark()
    clients = [
        Client(protocol, stream, chat)
        for protocol in ("h1", "h2")
        for stream in (True, False)
        for chat in (False, True)
    ]
    burst = Requests(daemon.url, clients, dataclasses.replace(LOAD, max_tokens=600))
    burst.wait_streaming(30)

    def on_both() -> bool:  # every request running, some on each replica
        figures = replica_figure(daemon, "daemon_replica_running_requests")
        return sum(figures.values()) == len(clients) and min(figures.values()) >= 1

    until(on_both, 15, interval=0.05, what="the burst running on both replicas")
    killed_at = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)

    # requests sent while it is away run on the other replica, at once
    after_kill = []
    deadline = time.monotonic() + SERVING_S
    while not daemon.log.since(mark, "tier.ready", tier="worker", index=1) and time.monotonic() < deadline:
        body = request_body(chat=False, stream=len(after_kill) % 2 == 0, max_tokens=4, index=len(after_kill))
        after_kill.append(request(daemon.url, body, options=LOAD, label=f"after-kill#{len(after_kill)}"))
        assert len(after_kill) < 500, "the replica never came back"
    back = daemon.log.wait("tier.ready", since=mark, tier="worker", index=1, timeout=SERVING_S)
    assert after_kill and all(o.kind == "complete" for o in after_kill), [str(o) for o in after_kill]

    outcomes = burst.join(STOP_S)
    report = f"{burst.report()}\n{daemon.log.tail(20)}"
    lost = [o for o in outcomes if o.kind != "complete"]
    assert lost and len(lost) < len(outcomes), f"the kill must end the dead replica's requests only:\n{report}"
    for outcome in lost:  # said in the protocol, promptly: a 503, or an error event in a stream
        assert outcome.explicit_error and outcome.ended_at - killed_at < 10, report
        assert outcome.status == 503 or json.loads(outcome.detail)["message"], report

    assert back["child_pid"] != victim["pid"] and workers(daemon)[0]["pid"] != victim["pid"]
    assert daemon.log.since(mark, "tier.died", child_pid=victim["pid"]), daemon.log.tail()
    wait_both_serving(daemon)


# --- reloads -----------------------------------------------------------------------------------------


def worker_timeline(handle: Reloadable, mark: int) -> list[tuple[str, int]]:
    """The workers' stops and readinesses since `mark`, in order: ("stopped" | "ready", replica)."""
    events = handle.log.since(mark)
    return [
        (e["event"].removeprefix("tier."), e["index"])
        for e in events
        if e.get("event") in ("tier.stopped", "tier.ready") and e.get("tier") == "worker"
    ]


def held_intervals(handle: Reloadable, mark: int) -> list[tuple[float, float, int]]:
    """(start, end, replica) of each hold of a replica since `mark`."""
    intervals = []
    for hold in handle.log.since(mark, "scheduler.hold"):
        ended = [e for e in handle.log.since(mark, "scheduler.hold_ended", replica=hold["replica"])]
        ends = [logged_at(e) for e in ended if logged_at(e) >= logged_at(hold)]
        intervals.append((logged_at(hold), min(ends, default=float("inf")), hold["replica"]))
    return intervals


def test_rolling_model_reload_under_load_fails_nothing(daemon):
    before = workers(daemon)
    generation = daemon.generation()
    load = steady_load(daemon)
    try:
        load.wait_completed(8)
        daemon.write({"model.seed": 1234})
        mark = daemon.log.mark()
        started = time.monotonic()
        status, report, output = daemon.reload_command()
        ended = time.monotonic()
        load.more(8)
    finally:
        load.stop(STOP_S)
    assert status == 0 and report is not None, output
    assert report["result"] == "applied" and report["restarted"] == ["worker"], report
    assert "the model's replicas were replaced in rolling mode" in report["notes"], report
    assert not load.failures(), f"requests failed during the rolling reload:\n{load.report()}\n{daemon.log.tail(20)}"
    assert load.completed_between(started, ended), "nothing completed while the replicas were replaced"

    # one replica at a time: the next stops only once the one before is back
    assert worker_timeline(daemon, mark) == [("stopped", 0), ("ready", 0), ("stopped", 1), ("ready", 1)], (
        worker_timeline(daemon, mark)
    )
    holds = sorted(held_intervals(daemon, mark))
    assert [replica for _start, _end, replica in holds] == [0, 1], holds
    assert holds[0][1] <= holds[1][0], f"both replicas were held at once: {holds}"
    after = workers(daemon)
    assert all(after[i]["pid"] != before[i]["pid"] for i in (0, 1)), (before, after)
    ready = daemon.log.since(mark, "worker.ready")
    assert sorted(e["generation"] for e in ready) == [generation + 1] * 2, ready
    assert daemon.server_info()["effective_config"]["model"]["seed"] == 1234


@pytest.fixture
def swappable_model(tmp_path, demo_dir) -> tuple[Path, bytes]:
    """A copy of the demo model, and its weights with one tensor renamed in the safetensors header
    (same length: the header stays valid), which only loading the weights finds wrong."""
    target = tmp_path / "model"
    shutil.copytree(demo_dir, target)
    data = bytearray((target / "model.safetensors").read_bytes())
    size = int.from_bytes(data[:8], "little")
    header = bytes(data[8 : 8 + size])
    assert header.count(b'"model.norm.weight"') == 1
    data[8 : 8 + size] = header.replace(b'"model.norm.weight"', b'"model.norx.weight"')
    return target, bytes(data)


def test_a_replica_that_fails_to_load_rolls_the_replaced_ones_back(daemon, swappable_model):
    """The first replica's new worker loads; the model's weights then break under the second one's,
    which fails: the first is replaced again with the running config, the second put back, and the
    reload is rolled back, with no failed request."""
    model, broken = swappable_model
    before = workers(daemon)
    generation = daemon.generation()
    load = steady_load(daemon)
    outcome: dict = {}
    try:
        load.wait_completed(8)
        daemon.write({"model.path": str(model)})
        mark = daemon.log.mark()
        reloading = threading.Thread(target=lambda: outcome.update(run=daemon.reload_command()), daemon=True)
        reloading.start()
        first = daemon.log.wait("reload.replica_replaced", since=mark, replica=0, timeout=RELOAD_TIMEOUT_S)
        staged = model / ".broken"
        staged.write_bytes(broken)
        os.replace(staged, model / "model.safetensors")  # before replica 1's new worker reads it
        reloading.join(2 * RELOAD_TIMEOUT_S)
        load.more(8)
    finally:
        load.stop(STOP_S)
    status, report, output = outcome["run"]
    assert status == 1 and report is not None, output
    assert report["result"] == "rolled_back" and report["generation"] == generation, report
    assert "the new worker did not start" in report["reason"], report
    failed = daemon.log.since(mark, "worker.load_failed")
    assert failed and "unexpected tensors model.norx.weight" in failed[0]["error"], daemon.log.tail()
    assert not load.failures(), f"requests failed during the rollback:\n{load.report()}\n{daemon.log.tail(20)}"

    started = [(e["index"], e["child_generation"]) for e in daemon.log.since(mark, "tier.started", tier="worker")]
    # replica 0 replaced, replica 1's new one failing, then both put back with the running config
    assert started == [(0, generation + 1), (1, generation + 1), (0, generation), (1, generation)], started
    assert logged_at(first) < logged_at(failed[0])
    after = workers(daemon)
    assert all(after[i]["pid"] != before[i]["pid"] and after[i]["state"] == "up" for i in (0, 1)), after
    assert daemon.server_info()["effective_config"]["model"]["path"] == str(daemon.base["model"]["path"])


def test_dp_size_reloads_from_two_to_one_and_back_under_load(daemon):
    """Lowering dp_size drains and stops the surplus replica; raising it starts one; no request fails."""
    load = steady_load(daemon)
    try:
        load.wait_completed(8)
        for dp_size in (1, 2):
            daemon.write({"model.dp_size": dp_size} if dp_size == 1 else None)
            mark = daemon.log.mark()
            status, report, output = daemon.reload_command()
            assert status == 0 and report["result"] == "applied", output
            assert f"model.dp_size {3 - dp_size} -> {dp_size}" in "; ".join(report["notes"]), report
            assert sorted(workers(daemon)) == list(range(dp_size))
            event = "reload.replica_removed" if dp_size == 1 else "reload.replica_added"
            assert daemon.log.since(mark, event, replica=1), daemon.log.tail()
            load.more(8)
    finally:
        load.stop(STOP_S)
    assert not load.failures(), f"requests failed:\n{load.report()}\n{daemon.log.tail(20)}"
