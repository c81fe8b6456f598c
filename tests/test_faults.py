"""Fault injection on the real daemon: killed tiers, a killed supervisor, SIGTERM under load,
clients that leave, a crash loop, damaged model directories and stale socket directories.

Every test runs real processes and real clients. Every load is bounded in count and in
time (a request that hangs is recorded as a hang, never waited on forever), and every
daemon is stopped by the `launch` fixture even when the test fails; the fixture also
checks that nothing carrying DAEMON_PARENT_PID=<supervisor pid> outlives it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import DAEMON, clean_environ, run_daemon
from daemon_process import (
    RunningDaemon,
    descendants,
    describe,
    kill_leftovers,
    read_completion_stream,
    scrape,
    start_daemon,
    stop_daemons,
    taken_port,
    wait_gone,
)
from raw_h2 import RawH2

KILL_BOUND_S = 10.0  # every request in flight ends within this long of a kill
READ_TIMEOUT_S = 20.0  # a client read that waits this long is a hang (longer than KILL_BOUND_S on purpose)
LOAD_MAX_TOKENS = 400
RECOVERY_S = 20.0  # how long a restarted tier may take until new requests succeed
ORPHAN_BOUND_S = 2.0  # children die this soon after the supervisor


# Long enough that no request ends on its own during a test, however fast the machine: the demo
# model with a longer context (its rotary embeddings work at any position), so that a freed engine
# can only mean an aborted request.
LONG_CONTEXT = 32768
LONG = {"prompt": "Once upon a time", "max_tokens": 20000, "ignore_eos": True, "temperature": 0}
LONGEST = {**LONG, "max_tokens": 30000}
ABORT_BOUND_S = 3.0  # the request is freed this soon after its client left (the figures lag 0.5 s)


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory, model_cache) -> Path:
    """The demo model, serving a context of LONG_CONTEXT tokens."""
    from daemon.engine.demo_model import ensure_demo_model

    target = tmp_path_factory.mktemp("models") / "long-context"
    shutil.copytree(ensure_demo_model(model_cache), target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "max_position_embeddings": LONG_CONTEXT}))
    return target


def long_context_settings(model: Path) -> dict[str, object]:
    return {"model.path": model, "scheduler.max_total_tokens": LONG_CONTEXT + 4096}


# --- daemons ---------------------------------------------------------------------------------------


def children(pid: int) -> set[int]:
    """The live child processes of `pid` (from /proc)."""
    found: set[int] = set()
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            found |= {int(child) for child in (task / "children").read_text().split()}
        except OSError:
            continue
    return found


def parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def unaccounted(daemon: RunningDaemon) -> list[int]:
    """Processes of the daemon's tree that are neither a tier in status.json nor a child of the front-end tier."""
    tiers = set(daemon.tier_pids().values())
    frontend = daemon.tier_pids()["frontend-0"]
    return [p for p in descendants(daemon.pid) if p not in tiers and parent(p) != frontend]


@dataclass
class Launcher:
    base: Path
    runtime_dir: Path
    cache_dir: Path
    started: list[RunningDaemon]

    def __call__(self, settings: dict[str, object] | None = None, *, wait: bool = True) -> RunningDaemon:
        directory = self.base / f"d{len(self.started)}"
        directory.mkdir()
        daemon = start_daemon(directory, self.runtime_dir, self.cache_dir, settings, wait=False)
        self.started.append(daemon)
        if wait:
            daemon.wait_for_event("daemon.ready")
        return daemon


@pytest.fixture
def launch(tmp_path: Path, model_cache: Path) -> Iterator[Launcher]:
    """Start daemons on one short runtime dir; stop them all afterwards and check none left a process."""
    runtime_dir = Path(tempfile.mkdtemp(prefix="dm-", dir="/tmp"))
    launcher = Launcher(tmp_path, runtime_dir, model_cache, [])
    try:
        yield launcher
    finally:
        stop_daemons(launcher.started, runtime_dir, drain_s=30)


def tier_state(daemon: RunningDaemon) -> dict[str, dict]:
    status = json.loads((daemon.socket_dir / "status.json").read_text())
    return {f"{t['tier']}-{t['index']}": t for t in status["tiers"]}


def until(predicate: Callable[[], object], timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; that value, or AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if value := predicate():
                return value
        except (OSError, ValueError, KeyError, httpx.HTTPError) as exc:
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"{what} not reached within {timeout} s (last error: {last_error!r})")


# --- metrics ---------------------------------------------------------------------------------------


def engine_figures(daemon: RunningDaemon) -> tuple[float, float, float]:
    """(running requests, free KV-cache tokens, KV-cache tokens) as the front-end reports them."""
    samples = scrape(daemon)
    return (
        samples[("daemon_running_requests", ())],
        samples[("daemon_kv_cache_free_tokens", ())],
        samples[("daemon_kv_cache_tokens", ())],
    )


def wait_engine_idle(daemon: RunningDaemon, timeout: float) -> float:
    """Seconds until /metrics shows no running request and the whole KV cache free."""
    started = time.monotonic()

    def idle() -> bool:
        running, free, total = engine_figures(daemon)
        return running == 0 and total > 0 and free == total

    try:
        until(idle, timeout, interval=0.1, what="an idle engine")
    except AssertionError:
        raise AssertionError(f"the engine is still busy {timeout} s later: {engine_figures(daemon)}") from None
    return time.monotonic() - started


def wait_engine_busy(daemon: RunningDaemon, timeout: float = 5.0) -> None:
    def busy() -> bool:
        running, free, total = engine_figures(daemon)
        return running >= 1 and free < total

    until(busy, timeout, what="a running request in /metrics")


# --- clients ---------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """How one client request ended."""

    label: str
    kind: str = "pending"  # complete | http-error | sse-error | connection-error | hang | incomplete | unexpected
    status: int | None = None
    detail: str = ""
    chunks: int = 0
    first_chunk_at: float | None = None
    ended_at: float | None = None

    @property
    def explicit_error(self) -> bool:
        return self.kind in ("http-error", "sse-error", "connection-error")


def request_body(chat: bool, stream: bool, max_tokens: int, index: int) -> dict:
    body: dict = {"max_tokens": max_tokens, "ignore_eos": True, "stream": stream, "temperature": 0}
    if chat:
        body["messages"] = [{"role": "user", "content": f"tell me story number {index}"}]
    else:
        body["prompt"] = f"Once upon a time, story {index}"
    return body


def one_request(base_url: str, outcome: Outcome, *, chat: bool, stream: bool, http2: bool, body: dict) -> None:
    """Run one request to its end, recording how it ended in `outcome`; never raises, never waits unbounded."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    timeout = httpx.Timeout(connect=5.0, read=READ_TIMEOUT_S, write=5.0, pool=5.0)
    started = time.monotonic()
    try:
        with httpx.Client(base_url=base_url, http1=not http2, http2=http2, timeout=timeout) as client:
            if not stream:
                response = client.post(path, json=body)
                outcome.status = response.status_code
                if response.status_code == 200:
                    choice = response.json()["choices"][0]
                    outcome.kind = "complete" if choice["finish_reason"] in ("length", "stop") else "unexpected"
                    outcome.detail = str(choice["finish_reason"])
                elif response.status_code >= 500:
                    outcome.kind, outcome.detail = "http-error", response.text[:300]
                else:
                    outcome.kind, outcome.detail = "unexpected", response.text[:300]
                return
            with client.stream("POST", path, json=body) as response:
                outcome.status = response.status_code
                if response.status_code != 200:
                    text = response.read().decode(errors="replace")[:300]
                    outcome.kind = "http-error" if response.status_code >= 500 else "unexpected"
                    outcome.detail = text
                    return
                read_completion_stream(response, outcome, give_up_after=started + KILL_BOUND_S + READ_TIMEOUT_S)
    except httpx.TimeoutException as exc:
        outcome.kind, outcome.detail = "hang", repr(exc)
    except httpx.TransportError as exc:
        outcome.kind, outcome.detail = "connection-error", repr(exc)
    except Exception as exc:  # noqa: BLE001 - a test client must report, not die in its thread
        outcome.kind, outcome.detail = "unexpected", repr(exc)
    finally:
        outcome.ended_at = time.monotonic()


class Load:
    """A fixed set of concurrent requests (streaming and not, HTTP/1.1 and HTTP/2, chat and not), one thread each."""

    def __init__(
        self, daemon: RunningDaemon, *, copies: int = 1, max_tokens: int = LOAD_MAX_TOKENS, http2: bool = True
    ):
        self.daemon = daemon
        self.outcomes: list[Outcome] = []
        self.threads: list[threading.Thread] = []
        index = 0
        for _copy in range(copies):
            for stream in (True, False):
                for over_h2 in (False, True)[: 1 + http2]:
                    for chat in (False, True):
                        outcome = Outcome(
                            f"{'stream' if stream else 'full'}/{'h2' if over_h2 else 'h1'}/{'chat' if chat else 'text'}"
                        )
                        body = request_body(chat, stream, max_tokens, index)
                        index += 1
                        thread = threading.Thread(
                            target=one_request,
                            args=(daemon.url, outcome),
                            kwargs={"chat": chat, "stream": stream, "http2": over_h2, "body": body},
                            daemon=True,
                        )
                        self.outcomes.append(outcome)
                        self.threads.append(thread)
        for thread in self.threads:
            thread.start()

    @property
    def streams(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.label.startswith("stream")]

    def wait_streaming(self, timeout: float = 15.0) -> None:
        """Until every stream has had a first chunk: the load is in flight."""
        until(
            lambda: all(o.first_chunk_at is not None or o.ended_at is not None for o in self.streams),
            timeout,
            interval=0.02,
            what="first chunks of every stream",
        )
        # and every request, streamed or not, is in the engine: none still on its way in, which a
        # fault (or a drain, which closes connections whose request was not read yet) would race
        until(
            lambda: engine_figures(self.daemon)[0] >= len(self.outcomes),
            timeout,
            interval=0.05,
            what=f"{len(self.outcomes)} requests running in the engine",
        )
        early = [o for o in self.outcomes if o.ended_at is not None]
        assert not early, f"requests ended before the fault: {early}"

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [o for o, t in zip(self.outcomes, self.threads, strict=True) if t.is_alive()]
        assert not stuck, f"requests still running {timeout} s later (hung): {stuck}"

    def report(self) -> str:
        return "\n".join(f"  {o.label}: {o.kind} {o.status} {o.detail[:160]}" for o in self.outcomes)


def get_completion(daemon: RunningDaemon, *, stream: bool = False, http2: bool = False) -> Outcome:
    outcome = Outcome("probe")
    one_request(daemon.url, outcome, chat=False, stream=stream, http2=http2, body=request_body(False, stream, 8, 0))
    return outcome


PROBE_BOUND_S = 10.0  # a request sent while a tier is down ends this soon: a success or an explicit error


def wait_serving(daemon: RunningDaemon, timeout: float = RECOVERY_S) -> float:
    """Seconds until new requests succeed again, streaming and not, over HTTP/1.1 and HTTP/2.

    Every attempt on the way, sent while a tier may be down or starting, must end promptly,
    with a success or an explicit error: a request arriving during an outage never hangs.
    """
    started = time.monotonic()
    attempts: list[Outcome] = []

    def serving() -> bool:
        probes = []
        for stream in (False, True):
            for http2 in (False, True):
                sent = time.monotonic()
                probe = get_completion(daemon, stream=stream, http2=http2)
                assert probe.kind == "complete" or probe.explicit_error, f"during the outage: {probe}"
                assert probe.ended_at - sent <= PROBE_BOUND_S, f"a request during the outage hung: {probe}"
                probes.append(probe)
        attempts.extend(probes)
        return all(p.kind == "complete" for p in probes)

    try:
        until(serving, timeout, interval=0.2, what="serving again")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last attempts: {attempts[-4:]}\n{daemon.log_tail()}") from None
    return time.monotonic() - started


# --- 1. kill -9 of one tier under load ------------------------------------------------------------


@pytest.mark.parametrize("tier", ["worker-0", "scheduler-0", "tokenizer-0", "frontend-0"])
def test_kill_one_tier_under_load(launch, tier):
    daemon = launch()
    name, index = tier.rsplit("-", 1)
    old_pid = daemon.tier_pids()[tier]
    old_epoch = tier_state(daemon)[tier]["epoch"]
    if name == "frontend":  # its Granian workers go with it
        granian_workers = [p for p in descendants(daemon.pid) if p not in daemon.tier_pids().values()]
        assert granian_workers, "no Granian worker process found"

    with httpx.Client(base_url=daemon.url, timeout=30) as http:  # more than a restart's own probes
        for _ in range(10):
            assert http.post("/v1/completions", json={"prompt": "count me", "max_tokens": 1}).status_code == 200
    answered_before = requests_answered(daemon)
    assert answered_before >= 10
    load = Load(daemon)
    load.wait_streaming()
    sockets_before = {p.name for p in daemon.socket_dir.iterdir()}
    killed_at = time.monotonic()
    os.kill(old_pid, signal.SIGKILL)
    load.join(KILL_BOUND_S + READ_TIMEOUT_S + 5)

    report = f"after kill -9 of {tier}:\n{load.report()}\n{daemon.log_tail(25)}"
    for outcome in load.outcomes:
        assert outcome.kind == "complete" or outcome.explicit_error, report
        if outcome.explicit_error:
            assert outcome.ended_at - killed_at <= KILL_BOUND_S, f"{outcome.label} took too long\n{report}"
    assert any(o.explicit_error for o in load.outcomes), f"the kill hit no request in flight\n{report}"
    if name == "frontend":
        assert all(o.kind in ("complete", "connection-error") for o in load.outcomes), report
        assert not [p for p in granian_workers if p in descendants(daemon.pid)], "Granian workers outlived it"
    else:
        for outcome in load.outcomes:  # the back end's errors are 503-class, said in the protocol
            if outcome.kind == "http-error":
                assert outcome.status == 503, report
            elif outcome.kind == "sse-error":
                assert json.loads(outcome.detail)["message"], report

    # the tier is back: a new process, a higher epoch
    ready = daemon.wait_for_event("tier.ready", timeout=10, tier=name, index=int(index), epoch=old_epoch + 1)
    state = tier_state(daemon)[tier]
    assert state["pid"] == ready["child_pid"] != old_pid and state["state"] == "up", state
    assert any(e.get("event") == "tier.died" and e.get("child_pid") == old_pid for e in daemon.log_events())

    wait_serving(daemon)
    samples = scrape(daemon)
    restarts = samples[("daemon_tier_restarts_total", (("index", index), ("tier", name)))]
    assert restarts >= 1, samples
    # whatever the dead tier's requests held in the engine was given back
    wait_engine_idle(daemon, timeout=5.0)
    # its socket files are gone with it (a worker's is named by its epoch, a front-end worker's by
    # its PID: no successor binds them again), and the request counters went on from where they were
    left = {p.name for p in daemon.socket_dir.iterdir()}
    if name == "worker":
        assert f"worker-{old_epoch}" in sockets_before and f"worker-{old_epoch}" not in left, left
    if name == "frontend":
        gone = {f"frontend-{pid}" for pid in granian_workers}
        assert gone <= sockets_before and not gone & left, left
    assert requests_answered(daemon) >= answered_before, "the request counters started again from 0"

    assert daemon.stop() == 0, daemon.log_tail()
    assert not wait_gone(daemon.pid, 2.0)


def requests_answered(daemon: RunningDaemon) -> float:
    """daemon_requests_total over every endpoint and status: it survives front-end restarts."""
    return sum(v for (sample, _labels), v in scrape(daemon).items() if sample == "daemon_requests_total")


def connections_by_process(port: int, pids: list[int]) -> dict[int, int]:
    """How many established TCP connections to `port` each of `pids` holds (from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                inodes.add(f"socket:[{fields[9]}]")
    counts = {}
    for pid in pids:
        held = 0
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                held += os.readlink(fd) in inodes
            except OSError:
                continue
        counts[pid] = held
    return counts


def test_kill_one_frontend_worker_process_under_load(launch):
    """Granian's own worker processes: one dies, its clients see the connection go, the other's finish."""
    daemon = launch({"server.workers": 2})
    tiers = set(daemon.tier_pids().values())
    workers = sorted(set(descendants(daemon.pid)) - tiers)
    assert len(workers) == 2, describe(workers)

    load = Load(daemon, copies=2, max_tokens=1000)
    load.wait_streaming()

    # every client's connection accepted by one of the two workers (the last ones may still be connecting)
    def all_connected() -> dict[int, int] | None:
        counts = connections_by_process(daemon.port, workers)
        return counts if sum(counts.values()) == len(load.outcomes) else None

    held = until(all_connected, 10, what="every client connected")
    victim = max(held, key=held.get)
    (survivor,) = set(workers) - {victim}
    assert held[victim] >= 1 and sum(held.values()) == len(load.outcomes), held
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    load.join(KILL_BOUND_S + READ_TIMEOUT_S + 5)

    report = f"held {held}, killed {victim}:\n{load.report()}\n{daemon.log_tail(20)}"
    for outcome in load.outcomes:  # those the other worker serves finish at their own pace
        assert outcome.kind in ("complete", "connection-error"), report
        assert outcome.kind == "complete" or outcome.ended_at - killed_at <= KILL_BOUND_S, report
    assert sum(o.kind == "connection-error" for o in load.outcomes) == held[victim], report
    assert sum(o.kind == "complete" for o in load.outcomes) == held[survivor], report

    # Granian starts a new worker, which stays up (it dies with its parent only) and serves
    def respawned() -> list[int]:
        return sorted(set(descendants(daemon.pid)) - tiers - set(workers))

    replacement = until(respawned, 15, what="a new front-end worker process")
    time.sleep(1.0)
    assert set(replacement) <= set(descendants(daemon.pid)), "the new front-end worker died"
    assert daemon.tier_pids()["frontend-0"] in descendants(daemon.pid)
    wait_serving(daemon)
    wait_engine_idle(daemon, timeout=5.0)  # the dead worker's requests were aborted in the engine
    assert daemon.stop() == 0, daemon.log_tail()


HANG_TIMEOUT_S = 3.0


@pytest.mark.parametrize("tier", ["worker-0", "scheduler-0", "tokenizer-0"])
def test_frozen_tier_is_declared_hung_killed_and_restarted_under_load(launch, tier):
    """SIGSTOP of a back-end tier under load: once it has been silent for runtime.hang_timeout_s it
    is declared hung and killed; every request in flight ends (an answer, or an explicit 503) within
    that plus the kill bound; then the tier is back and serves."""
    daemon = launch({"runtime.hang_timeout_s": HANG_TIMEOUT_S})
    name, index = tier.rsplit("-", 1)
    frozen = daemon.tier_pids()[tier]
    load = Load(daemon)
    load.wait_streaming()
    frozen_at = time.monotonic()
    os.kill(frozen, signal.SIGSTOP)
    try:
        hung = daemon.wait_for_event("tier.hung", timeout=HANG_TIMEOUT_S + 10, tier=name, index=int(index))
        load.join(HANG_TIMEOUT_S + KILL_BOUND_S + READ_TIMEOUT_S + 5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGCONT)
    assert hung["child_pid"] == frozen and hung["silent_s"] >= HANG_TIMEOUT_S, hung
    report = f"after SIGSTOP of {tier}:\n{load.report()}\n{daemon.log_tail(25)}"
    for outcome in load.outcomes:
        assert outcome.kind == "complete" or outcome.explicit_error, report
        assert outcome.ended_at - frozen_at <= HANG_TIMEOUT_S + KILL_BOUND_S, f"{outcome.label} took too long\n{report}"
        if outcome.kind == "http-error":
            assert outcome.status == 503, report
    assert any(o.explicit_error for o in load.outcomes), f"the freeze hit no request in flight\n{report}"
    died = [e for e in daemon.log_events() if e.get("event") == "tier.died" and e.get("child_pid") == frozen]
    assert died and died[0]["status"] == -signal.SIGKILL, daemon.log_tail()
    daemon.wait_for_event("tier.ready", timeout=RECOVERY_S, tier=name, index=int(index), epoch=2)
    wait_serving(daemon)


def test_frontend_workers_never_outlive_their_tier_process(launch):
    daemon = launch()
    os.kill(daemon.tier_pids()["frontend-0"], signal.SIGKILL)
    started = daemon.wait_for_event("tier.started", timeout=15, tier="frontend", epoch=2)
    frontend = started["child_pid"]
    # catch the new front-end's first worker process as it is born, before it has run any of our code
    worker = until(lambda: children(frontend), 15, interval=0.001, what="a front-end worker process").pop()
    os.kill(worker, signal.SIGSTOP)
    try:
        os.kill(frontend, signal.SIGKILL)  # the front-end tier dies while its worker starts
        until(lambda: parent(worker) != frontend, 5, interval=0.01, what="the worker orphaned")
    finally:
        os.kill(worker, signal.SIGCONT)
    daemon.wait_for_event("tier.ready", timeout=20, tier="frontend", epoch=3)
    time.sleep(3.0)  # time to die with its parent, or to start serving
    assert worker not in descendants(daemon.pid), f"orphaned front-end worker {describe([worker])} still runs"
    assert not unaccounted(daemon), describe(unaccounted(daemon))


def test_kill_one_of_two_tokenizers_fails_only_its_requests(launch):
    daemon = launch({"tokenizer.workers": 2})
    old_pid = daemon.tier_pids()["tokenizer-1"]
    load = Load(daemon)  # one front-end worker sends requests to the tokenizers in turn
    load.wait_streaming()
    killed_at = time.monotonic()
    os.kill(old_pid, signal.SIGKILL)
    load.join(KILL_BOUND_S + READ_TIMEOUT_S + 5)

    report = f"{load.report()}\n{daemon.log_tail(20)}"
    for outcome in load.outcomes:
        assert outcome.kind == "complete" or outcome.kind in ("http-error", "sse-error"), report
        assert outcome.kind == "complete" or outcome.ended_at - killed_at <= KILL_BOUND_S, report
        if outcome.kind != "complete":
            assert "tokenizer" in outcome.detail and outcome.status in (200, 503), report
    failed = sum(o.kind != "complete" for o in load.outcomes)
    assert failed == len(load.outcomes) // 2, f"requests on tokenizer-0 must not suffer:\n{report}"

    daemon.wait_for_event("tier.ready", timeout=10, tier="tokenizer", index=1, epoch=2)
    assert daemon.tier_pids()["tokenizer-1"] != old_pid
    wait_serving(daemon)
    wait_engine_idle(daemon, timeout=5.0)
    samples = scrape(daemon)
    assert samples[("daemon_tier_restarts_total", (("index", "1"), ("tier", "tokenizer")))] == 1
    assert samples[("daemon_tier_restarts_total", (("index", "0"), ("tier", "tokenizer")))] == 0
    assert daemon.stop() == 0, daemon.log_tail()


# --- 2. kill -9 of the supervisor -----------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [{}, {"server.workers": 2, "tokenizer.workers": 2}],
    ids=["one-frontend-worker", "two-frontend-workers"],
)
def test_kill_supervisor_takes_every_process_with_it(launch, settings):
    daemon = launch(settings)
    tiers = set(daemon.tier_pids().values())
    tree = set(descendants(daemon.pid))
    granian_workers = tree - tiers
    assert tiers <= tree
    assert len(granian_workers) >= settings.get("server.workers", 1), describe(sorted(tree))

    stream = Outcome("stream")
    client = threading.Thread(
        target=one_request,
        args=(daemon.url, stream),
        kwargs={"chat": False, "stream": True, "http2": True, "body": request_body(False, True, 1500, 0)},
        daemon=True,
    )
    client.start()
    until(lambda: stream.first_chunk_at or stream.ended_at, 10, interval=0.02, what="a first chunk")

    killed_at = time.monotonic()
    daemon.process.kill()
    daemon.process.wait(5)
    left = wait_gone(daemon.pid, ORPHAN_BOUND_S)
    assert not left, f"still alive {ORPHAN_BOUND_S} s after the supervisor died: {describe(left)}"
    client.join(KILL_BOUND_S)
    assert not client.is_alive() and stream.kind == "connection-error", stream
    assert stream.ended_at - killed_at <= KILL_BOUND_S


@pytest.mark.parametrize("tier", ["worker", "frontend"])
def test_kill_supervisor_while_tiers_start(launch, tier):
    """The worker is still importing torch, or the front-end still spawning its workers: they go too."""
    daemon = launch(wait=False)
    started = until(
        lambda: [e for e in daemon.log_events() if e.get("event") == "tier.started" and e.get("tier") == tier],
        60,
        interval=0.005,
        what=f"{tier} starting",
    )
    if tier == "frontend":
        until(lambda: children(started[0]["child_pid"]), 10, interval=0.002, what="a front-end worker process")
    tree = descendants(daemon.pid)
    daemon.process.kill()
    daemon.process.wait(5)
    # a tier notices only once its imports are done (torch takes a second or so): a little more than 2 s
    left = wait_gone(daemon.pid, ORPHAN_BOUND_S + 1.0)
    assert not left, f"of {describe(tree)}, still alive: {describe(left)}"


# --- 3. SIGTERM under load ------------------------------------------------------------------------


class Curl:
    """One request by curl (nghttp2), for HTTP/2: Python's h2 treats the GOAWAY of a graceful
    shutdown as the end of the connection, so httpx loses its streams in flight on every drain."""

    def __init__(self, daemon: RunningDaemon, directory: Path, body: dict, name: str):
        self.output = directory / f"{name}.out"
        self.stream = body.get("stream", False)
        command = ["curl", "-sS", "-N", "--http2-prior-knowledge", "--max-time", "60", "-o", str(self.output)]
        command += ["-w", "%{http_code}", "-H", "content-type: application/json", "-d", json.dumps(body)]
        self.process = subprocess.Popen(
            [*command, daemon.url + "/v1/completions"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def started(self) -> bool:
        return self.output.exists() and b"data: " in self.output.read_bytes()

    def outcome(self, timeout: float) -> Outcome:
        outcome = Outcome(f"curl-h2-{'stream' if self.stream else 'full'}")
        try:
            status, error = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
            outcome.kind = "hang"
            return outcome
        body = self.output.read_text(errors="replace") if self.output.exists() else ""
        outcome.status = int(status) if status.isdigit() else None
        outcome.detail = f"curl exit {self.process.returncode} {error.strip()} {body[-200:]}"
        if self.process.returncode != 0:
            outcome.kind = "connection-error"
        elif outcome.status != 200:
            outcome.kind = "http-error"
        elif self.stream:
            outcome.kind = "complete" if body.rstrip().endswith("data: [DONE]") else "incomplete"
        else:
            outcome.kind = "complete" if json.loads(body)["choices"][0]["finish_reason"] else "unexpected"
        return outcome


def test_sigterm_drains_requests_in_flight_then_exits_cleanly(launch, tmp_path):
    # a drain long enough for the load even on a slow, shared machine
    daemon = launch({"runtime.drain_timeout_s": 40})
    load = Load(daemon, max_tokens=LOAD_MAX_TOKENS, http2=False)
    curls = []
    if shutil.which("curl"):
        for stream in (True, False):
            body = {**request_body(False, stream, LOAD_MAX_TOKENS, 50 + stream), "stream": stream}
            curls.append(Curl(daemon, tmp_path, body, f"h2-{stream}"))
        until(curls[0].started, 15, interval=0.02, what="curl's first chunk")
    load.wait_streaming()
    assert all(c.process.poll() is None for c in curls), "curl's requests ended before the signal"

    daemon.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    daemon.wait_for_event("daemon.stopping", timeout=5)
    late: list[Outcome] = []
    time.sleep(0.2)
    while daemon.process.poll() is None and len(late) < 6:  # requests started during the drain
        outcome = Outcome(f"late-{len(late)}")
        stream, http2 = len(late) % 2 == 0, len(late) % 3 == 0
        one_request(daemon.url, outcome, chat=False, stream=stream, http2=http2, body=request_body(False, stream, 8, 0))
        late.append(outcome)
        time.sleep(0.3)

    load.join(60)
    outcomes = load.outcomes + [c.outcome(60) for c in curls]
    report = "\n".join(f"  {o.label}: {o.kind} {o.status} {o.detail[:200]}" for o in outcomes)
    report += f"\nlate: {late}\n{daemon.log_tail(30)}"
    assert all(o.kind == "complete" for o in outcomes), report
    assert late, "the daemon exited before any request could be tried during the drain"
    for outcome in late:
        assert outcome.kind in ("http-error", "connection-error"), report
        assert outcome.kind != "http-error" or outcome.status == 503, report
        assert outcome.ended_at - signalled < 10, report

    assert daemon.process.wait(30) == 0, daemon.log_tail()
    assert not wait_gone(daemon.pid, 2.0), describe(descendants(daemon.pid))
    assert not daemon.socket_dir.exists()
    assert any(e.get("event") == "daemon.stopped" for e in daemon.log_events())
    with pytest.raises(httpx.ConnectError):  # nothing listens any more
        httpx.get(daemon.url + "/health", timeout=2)


def test_sigterm_cuts_requests_that_outlast_the_drain_timeout(launch, long_context_model):
    daemon = launch({**long_context_settings(long_context_model), "runtime.drain_timeout_s": 2})
    stream = Outcome("long stream")
    client = threading.Thread(
        target=one_request,
        args=(daemon.url, stream),
        kwargs={"chat": False, "stream": True, "http2": False, "body": {**LONG, "stream": True}},
        daemon=True,
    )
    client.start()
    until(lambda: stream.first_chunk_at or stream.ended_at, 10, interval=0.02, what="a first chunk")
    daemon.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    client.join(KILL_BOUND_S + 5)
    assert not client.is_alive(), "the stream outlived the drain timeout by far"
    # cut at the drain timeout: the client sees the stream end without [DONE]
    assert stream.kind in ("connection-error", "incomplete", "sse-error"), stream
    assert 1.0 < stream.ended_at - signalled < 2 + 5, stream
    assert daemon.process.wait(15) == 0, daemon.log_tail()
    assert time.monotonic() - signalled < 2 + 5 + 5
    assert not wait_gone(daemon.pid, 2.0), describe(descendants(daemon.pid))
    assert not daemon.socket_dir.exists()


def test_tier_dying_during_the_drain_fails_its_requests_at_once(launch):
    daemon = launch({"runtime.drain_timeout_s": 8})
    load = Load(daemon, max_tokens=1500, http2=False)
    load.wait_streaming()
    worker = daemon.tier_pids()["worker-0"]
    daemon.process.send_signal(signal.SIGTERM)
    daemon.wait_for_event("daemon.stopping", timeout=5)
    killed_at = time.monotonic()
    os.kill(worker, signal.SIGKILL)
    load.join(30)

    report = f"{load.report()}\n{daemon.log_tail(20)}"
    assert any(o.kind != "complete" for o in load.outcomes), f"the kill hit no request in flight\n{report}"
    for outcome in load.outcomes:
        assert outcome.kind == "complete" or outcome.kind in ("http-error", "sse-error"), report
        assert outcome.kind == "complete" or outcome.ended_at - killed_at <= 4.0, report
    assert daemon.process.wait(30) == 0, daemon.log_tail()
    assert not wait_gone(daemon.pid, ORPHAN_BOUND_S), describe(descendants(daemon.pid))


@pytest.mark.parametrize("moment", ["starting", "restart-backoff", "restarting"])
def test_sigterm_while_starting_or_restarting_a_tier(launch, moment):
    daemon = launch(wait=moment != "starting")
    if moment == "starting":
        daemon.wait_for_event("tier.started", timeout=30, tier="worker")
    else:
        os.kill(daemon.tier_pids()["worker-0"], signal.SIGKILL)
        daemon.wait_for_event("tier.died", timeout=10, tier="worker")
        if moment == "restarting":
            daemon.wait_for_event("tier.started", timeout=10, tier="worker", epoch=2)
    daemon.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert daemon.process.wait(15) == 0, daemon.log_tail()
    assert time.monotonic() - signalled < 10
    assert not wait_gone(daemon.pid, ORPHAN_BOUND_S), describe(descendants(daemon.pid))
    assert not daemon.socket_dir.exists()
    assert not [e for e in daemon.log_events() if e.get("event") == "daemon.failed"], daemon.log_tail()


# --- 4. clients that leave ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory, model_cache, long_context_model) -> Iterator[RunningDaemon]:
    runtime_dir = Path(tempfile.mkdtemp(prefix="dm-", dir="/tmp"))
    # one request runs at a time: a second one waits in the queue
    settings = {**long_context_settings(long_context_model), "scheduler.max_running_requests": 1}
    daemon = start_daemon(tmp_path_factory.mktemp("faults"), runtime_dir, model_cache, settings)
    try:
        yield daemon
    finally:
        status = daemon.stop()
        left = kill_leftovers(daemon.pid)
        shutil.rmtree(runtime_dir, ignore_errors=True)
        assert status == 0 and not left, daemon.log_tail()


def test_client_closing_a_stream_aborts_its_request(shared_daemon):
    daemon = shared_daemon
    wait_engine_idle(daemon, 10)
    with (
        httpx.Client(base_url=daemon.url, timeout=10) as client,
        client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()  # keep it: a discarded line iterator closes the connection
        chunks = 0
        deadline = time.monotonic() + 10
        while chunks < 5 and time.monotonic() < deadline:
            chunks += next(lines).startswith("data: ")
        wait_engine_busy(daemon)
        # the control: a client still connected, even one not reading, keeps its request running
        time.sleep(ABORT_BOUND_S)
        running, free, total = engine_figures(daemon)
        assert running == 1 and free < total
    # leaving the block closes the response and the connection
    took = wait_engine_idle(daemon, 10)
    assert took <= ABORT_BOUND_S, f"the request was freed only {took:.1f} s after the client left"


def test_client_timing_out_a_full_response_aborts_its_request(shared_daemon):
    daemon = shared_daemon
    wait_engine_idle(daemon, 10)
    with (
        httpx.Client(base_url=daemon.url, timeout=httpx.Timeout(10, read=1.0)) as client,
        pytest.raises(httpx.ReadTimeout),
    ):
        client.post("/v1/completions", json=LONG)
    took = wait_engine_idle(daemon, 10)
    assert took <= ABORT_BOUND_S, f"the request was freed only {took:.1f} s after the client left"


def test_client_leaving_a_queued_request_removes_it_from_the_queue(shared_daemon):
    daemon = shared_daemon
    wait_engine_idle(daemon, 10)
    with (
        httpx.Client(base_url=daemon.url, timeout=10) as client,
        client.stream("POST", "/v1/completions", json={**LONGEST, "stream": True}) as running,
    ):
        assert running.status_code == 200
        lines = running.iter_lines()  # keep it: a discarded line iterator closes the connection
        next(lines)
        waiting = Outcome("queued")
        body = {**LONGEST, "prompt": "queued behind the first"}
        leaver = threading.Thread(
            target=lambda: httpx_post_timing_out(daemon.url, body, waiting, read_timeout=2.0), daemon=True
        )
        leaver.start()
        until(lambda: scrape(daemon)[("daemon_queued_requests", ())] == 1, 5, what="a queued request")
        leaver.join(10)
        assert not leaver.is_alive() and waiting.kind == "hang", waiting  # the client's own timeout
        left_at = time.monotonic()
        until(
            lambda: engine_figures(daemon)[0] == 1 and scrape(daemon)[("daemon_queued_requests", ())] == 0,
            ABORT_BOUND_S,
            what="the queue emptied while the first request runs",
        )
        assert time.monotonic() - left_at <= ABORT_BOUND_S
    took = wait_engine_idle(daemon, 10)
    assert took <= ABORT_BOUND_S


def httpx_post_timing_out(url: str, body: dict, outcome: Outcome, read_timeout: float) -> None:
    try:
        with httpx.Client(base_url=url, timeout=httpx.Timeout(10, read=read_timeout)) as client:
            response = client.post("/v1/completions", json=body)
            outcome.kind, outcome.status = "complete", response.status_code
    except httpx.TimeoutException:
        outcome.kind = "hang"
    except httpx.HTTPError as exc:
        outcome.kind, outcome.detail = "unexpected", repr(exc)
    finally:
        outcome.ended_at = time.monotonic()


def test_request_ended_by_a_stop_string_frees_the_engine_at_once(shared_daemon):
    """The tokenizer sees the stop string, answers, and must abort the generation in the engine too."""
    daemon = shared_daemon
    wait_engine_idle(daemon, 10)
    with httpx.Client(base_url=daemon.url, timeout=30) as client:
        response = client.post("/v1/completions", json={**LONGEST, "stop": ["e", "a", "o", " "]})
    answered = time.monotonic()
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] == "stop", response.json()
    assert response.json()["usage"]["completion_tokens"] < 1000, response.json()
    took = wait_engine_idle(daemon, 15)
    assert time.monotonic() - answered <= ABORT_BOUND_S, f"the engine kept generating for {took:.1f} s"


def test_http2_stream_reset_aborts_its_request_and_keeps_the_connection(shared_daemon):
    daemon = shared_daemon
    wait_engine_idle(daemon, 10)
    client = RawH2(daemon.port)
    try:
        stream = client.request("POST", "/v1/completions", json.dumps({**LONG, "stream": True}).encode())
        status, body = client.read(stream, lambda body, ended: ended or body.count(b"data: ") >= 5)
        assert status == 200 and body.count(b"data: ") >= 5, body
        wait_engine_busy(daemon)
        client.reset(stream)
        took = wait_engine_idle(daemon, 10)
        assert took <= ABORT_BOUND_S, f"the request was freed only {took:.1f} s after RST_STREAM"
        # a full (non-streaming) response reset before it is ready
        full = client.request("POST", "/v1/completions", json.dumps(LONGEST).encode())
        wait_engine_busy(daemon)
        client.reset(full)
        took = wait_engine_idle(daemon, 10)
        assert took <= ABORT_BOUND_S, f"the request was freed only {took:.1f} s after RST_STREAM"
        # the connection is still usable
        probe = client.request("POST", "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 3}).encode())
        status, body = client.read(probe, lambda body, ended: ended)
        assert status == 200 and json.loads(body)["choices"][0]["finish_reason"] in ("length", "stop"), body
    finally:
        client.close()


# --- 5. crash loop --------------------------------------------------------------------------------


def ready_or_exit(daemon: RunningDaemon, tier: str, epoch: int, timeout: float) -> dict | None:
    """The tier.ready event of `tier` at `epoch`, or None once the daemon has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in daemon.log_events():
            if event.get("event") == "tier.ready" and event.get("tier") == tier and event.get("epoch") == epoch:
                return event
        if daemon.process.poll() is not None:
            return None
        time.sleep(0.05)
    raise AssertionError(f"{tier} epoch {epoch} neither ready nor the daemon gone in {timeout} s")


def test_worker_crash_loop_stops_the_daemon_with_an_error(launch):
    daemon = launch()
    kills = 0
    while kills < 8:  # the supervisor gives up after more than 5 restarts within 60 s: the 6th kill
        ready = ready_or_exit(daemon, "worker", epoch=kills + 1, timeout=30)
        if ready is None:
            break
        os.kill(ready["child_pid"], signal.SIGKILL)
        kills += 1
    exited = daemon.process.wait(20)
    assert exited != 0, daemon.log_tail()
    assert kills == 6, f"{kills} kills\n{daemon.log_tail()}"
    failed = [e for e in daemon.log_events() if e.get("event") == "daemon.failed"]
    assert failed and "crash-loop" in failed[0]["reason"], daemon.log_tail()
    assert not wait_gone(daemon.pid, ORPHAN_BOUND_S), describe(descendants(daemon.pid))
    assert not daemon.socket_dir.exists()


def test_tier_that_cannot_restart_ends_in_a_crash_loop(launch, tmp_path, model_cache):
    """The tokenizer's files go missing under a running daemon, then it dies: every restart fails."""
    from daemon.engine.demo_model import ensure_demo_model

    model = tmp_path / "model"
    shutil.copytree(ensure_demo_model(model_cache), model)
    daemon = launch({"model.path": model})
    (model / "tokenizer.json").unlink()
    os.kill(daemon.tier_pids()["tokenizer-0"], signal.SIGKILL)
    probes = []
    while daemon.process.poll() is None and len(probes) < 8:  # meanwhile, requests fail fast
        sent = time.monotonic()
        probe = get_completion(daemon, stream=len(probes) % 2 == 1)
        assert probe.explicit_error and probe.ended_at - sent <= PROBE_BOUND_S, probe
        assert probe.kind == "connection-error" or probe.status == 503, probe
        probes.append(probe)
        time.sleep(0.5)
    status = daemon.process.wait(60)
    assert status != 0, daemon.log_tail()
    events = daemon.log_events()
    failed = [e for e in events if e.get("event") == "daemon.failed"]
    assert failed and "crash-loop" in failed[0]["reason"], daemon.log_tail()
    assert len([e for e in events if e.get("event") == "tier.restart_failed"]) >= 5
    assert not wait_gone(daemon.pid, ORPHAN_BOUND_S), describe(descendants(daemon.pid))
    assert not daemon.socket_dir.exists()


# --- 6. damaged model directories -----------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_model(tmp_path_factory, model_cache) -> Path:
    """The demo model, its weights split into two safetensors shards with an index."""
    from safetensors.torch import load_file, save_file

    from daemon.engine.demo_model import ensure_demo_model

    source = ensure_demo_model(model_cache)
    target = tmp_path_factory.mktemp("models") / "sharded"
    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    (target / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, target / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard_names, shard))
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return target


def damaged_copy(model: Path, where: Path, damage: str) -> Path:
    target = where / f"model-{damage}"
    shutil.copytree(model, target)
    shard = target / "model-00002-of-00002.safetensors"
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        with shard.open("r+b") as f:
            f.truncate(shard.stat().st_size - 1000)
    elif damage == "truncated-header":
        with shard.open("r+b") as f:
            f.truncate(20)
    elif damage == "index-truncated":
        index = target / "model.safetensors.index.json"
        index.write_bytes(index.read_bytes()[:40])
    elif damage == "config-truncated":
        config = target / "config.json"
        config.write_bytes(config.read_bytes()[:40])
    return target


def server_toml(directory: Path, runtime_dir: Path, cache_dir: Path) -> Path:
    from daemon_process import free_port

    config = directory / "server.toml"
    config.write_text(
        f'[server]\nport = {free_port()}\n[model]\npath = "builtin:demo"\n'
        f'[runtime]\ndir = "{runtime_dir}"\ncache_dir = "{cache_dir}"\n'
    )
    return config


def test_intact_sharded_model_passes_check_and_serves(launch, sharded_model, tmp_path):
    config = server_toml(tmp_path, launch.runtime_dir, launch.cache_dir)
    result = run_daemon("check", "-c", str(config), "--set", f"model.path={sharded_model}")
    assert result.returncode == 0, result.stdout + result.stderr
    daemon = launch({"model.path": sharded_model})
    assert get_completion(daemon).kind == "complete"


@pytest.mark.parametrize(
    ("damage", "rule"),
    [
        ("missing", "model.weights-missing"),
        ("truncated", "model.weights-corrupt"),
        ("truncated-header", "model.weights-corrupt"),
        ("index-truncated", "model.weights-corrupt"),
        ("config-truncated", "model.config-invalid"),
    ],
)
def test_damaged_model_fails_check_and_start(launch, sharded_model, tmp_path, damage, rule):
    model = damaged_copy(sharded_model, tmp_path, damage)
    config = server_toml(tmp_path, launch.runtime_dir, launch.cache_dir)

    result = run_daemon("check", "-c", str(config), "--set", f"model.path={model}")
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error[{rule}] model.path" in result.stdout, result.stdout

    started = time.monotonic()
    with open(tmp_path / "run.log", "wb") as log:
        process = subprocess.Popen(
            [str(DAEMON), "-c", str(config), "--set", f"model.path={model}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=clean_environ(),
            start_new_session=True,
        )
    try:
        status = process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        left = wait_gone(process.pid, 2.0)
        kill_leftovers(process.pid)
    output = (tmp_path / "run.log").read_text()
    assert status != 0 and time.monotonic() - started < 30, output
    assert rule in output, output
    assert not left, describe(left)
    assert not (launch.runtime_dir / f"daemon-{process.pid}").exists()


def test_model_that_passes_check_but_fails_to_load_stops_the_start(launch, sharded_model, tmp_path):
    """Shards with valid headers and sizes, but one tensor renamed: only loading the weights finds it."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "renamed"
    shutil.copytree(sharded_model, model)
    shard = model / "model-00002-of-00002.safetensors"
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name + ".renamed"] = tensors.pop(name)
    save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"][name + ".renamed"] = index["weight_map"].pop(name)
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    config = server_toml(tmp_path, launch.runtime_dir, launch.cache_dir)
    assert run_daemon("check", "-c", str(config), "--set", f"model.path={model}").returncode == 0

    daemon = launch({"model.path": model}, wait=False)
    status = daemon.process.wait(60)
    assert status != 0, daemon.log_tail()
    failed = [e for e in daemon.log_events() if e.get("event") == "daemon.failed"]
    assert failed and "worker-0" in failed[0]["reason"], daemon.log_tail()
    load_failed = [e for e in daemon.log_events() if e.get("event") == "worker.load_failed"]
    assert load_failed and name in load_failed[0]["error"], daemon.log_tail()
    assert not wait_gone(daemon.pid, ORPHAN_BOUND_S)
    assert not daemon.socket_dir.exists()


def test_runtime_dir_that_is_a_file_is_reported_cleanly(tmp_path, model_cache):
    descriptor, name = tempfile.mkstemp(prefix="dm-", dir="/tmp")
    os.close(descriptor)
    not_a_dir = Path(name)
    try:
        config = server_toml(tmp_path, not_a_dir, model_cache)
        result = run_daemon("-c", str(config), timeout=60)
        assert result.returncode != 0
        assert "uncaught exception" not in result.stderr + result.stdout, result.stderr[-2000:]
        assert "runtime.dir" in result.stderr + result.stdout
    finally:
        not_a_dir.unlink()


# --- a runtime dir that is not ours alone ----------------------------------------------------------


def planted_runtime_dir(base: Path, kind: str) -> Path:
    """A runtime dir another local user could tamper with."""
    if kind == "world-writable":
        planted = base / "open"
        planted.mkdir()
        planted.chmod(0o777)
    elif kind == "symlink":
        target = base / "elsewhere"
        target.mkdir(mode=0o700)
        planted = base / "link"
        planted.symlink_to(target)
    else:  # another user's
        if os.geteuid() != 0:
            pytest.skip("only root can give a directory to another user")
        planted = base / "theirs"
        planted.mkdir(mode=0o700)
        os.chown(planted, 65534, 65534)
    return planted


@pytest.mark.parametrize("kind", ["world-writable", "symlink", "another-user"])
def test_planted_runtime_dir_is_refused_by_check_and_start(short_tmp, model_cache, kind):
    planted = planted_runtime_dir(short_tmp, kind)
    config = server_toml(short_tmp, planted, model_cache)
    checked = run_daemon("check", "-c", str(config))
    assert checked.returncode == 2 and "error[runtime.dir-unsafe] runtime.dir" in checked.stdout, checked
    why = {"world-writable": "writable by its group or by others", "symlink": "is a symlink"}.get(kind, "uid 65534")
    assert why in checked.stdout and "chmod 700" in checked.stdout, checked.stdout
    started = run_daemon("-c", str(config), timeout=30)
    assert started.returncode == 2 and "runtime.dir-unsafe" in started.stdout + started.stderr, started
    assert not list(planted.glob("daemon-*")), "the daemon made its socket directory there"


@pytest.mark.parametrize("tampering", ["symlink", "writable"])
def test_tier_refuses_a_tampered_config_hand_off(launch, tmp_path, tampering):
    """The per-generation config a restarted tier reads, replaced by a link or made writable by others:
    the restarted tier refuses it (and runs nothing it says) instead of reading it."""
    daemon = launch()
    handoff = daemon.socket_dir / "config-1.json"
    if tampering == "symlink":
        copy = tmp_path / "planted.json"
        copy.write_bytes(handoff.read_bytes())
        handoff.unlink()
        handoff.symlink_to(copy)
    else:
        handoff.chmod(0o666)
    os.kill(daemon.tier_pids()["tokenizer-0"], signal.SIGKILL)
    # every restart refuses it: a crash loop, and the daemon stops with an error
    assert daemon.process.wait(60) == 1, daemon.log_tail()
    refused = next(e for e in daemon.log_events() if e.get("event") == "tier.handoff_refused")
    assert "tokenizer-0 crash-looped" in daemon.log_events()[-1].get("reason", ""), daemon.log_tail()
    expected = "is a symlink" if tampering == "symlink" else "writable by others (mode 0666)"
    assert str(handoff) in refused["reason"] and expected in refused["reason"], refused


# --- the port -------------------------------------------------------------------------------------


def test_port_held_by_another_program_fails_the_start_promptly(launch):
    with taken_port() as held:
        daemon = launch({"server.port": held}, wait=False)
        status = daemon.process.wait(60)
    assert status != 0, daemon.log_tail()
    failed = [e for e in daemon.log_events() if e.get("event") == "daemon.failed"]
    assert failed and f"cannot listen on 127.0.0.1:{held}" in failed[0]["reason"], daemon.log_tail()
    assert "Address already in use" in failed[0]["reason"]
    assert not wait_gone(daemon.pid, ORPHAN_BOUND_S)
    assert not daemon.socket_dir.exists()


def test_second_daemon_on_a_port_in_use_refuses_to_start(launch):
    first = launch()
    second = launch({"server.port": first.port}, wait=False)

    def settled() -> str | None:
        if second.process.poll() is not None:
            return "exited"
        if any(e.get("event") == "daemon.ready" for e in second.log_events()):
            return "ready"
        return None

    outcome = until(settled, 60, interval=0.05, what="the second daemon exiting or ready")
    served_by = set()
    for _ in range(12):  # fresh connections: the kernel spreads them over every listener of the port
        served_by.add(httpx.get(first.url + "/server_info", timeout=10).json()["supervisor"]["pid"])
    assert outcome == "exited" and second.process.returncode != 0, second.log_tail()
    assert served_by == {first.pid}


# --- 7. stale socket directories ------------------------------------------------------------------


def test_stale_socket_dirs_of_a_killed_supervisor_are_removed_at_next_start(launch):
    first = launch()
    second = launch()  # beside a live daemon on the same runtime dir: its directory is left alone
    assert first.socket_dir.is_dir() and get_completion(first).kind == "complete"
    first.process.kill()
    first.process.wait(5)
    assert not wait_gone(first.pid, ORPHAN_BOUND_S)
    stale = first.socket_dir
    assert stale.is_dir() and any(stale.iterdir()), "a killed supervisor cannot clean up: its directory stays"
    unrelated = launch.runtime_dir / "daemon-notapid"
    unrelated.mkdir()

    third = launch()
    assert not stale.exists()
    assert second.socket_dir.is_dir() and unrelated.is_dir()
    removed = [e for e in third.log_events() if e.get("event") == "supervisor.stale_socket_dir_removed"]
    assert [e["path"] for e in removed] == [str(stale)]
    assert get_completion(third).kind == "complete"
    assert get_completion(second).kind == "complete"


def test_stale_socket_dir_whose_pid_was_reused_is_removed(tmp_path):
    from daemon.supervisor.runtime_dir import remove_stale_socket_dirs

    # the directory a supervisor with this PID left when it was killed; the PID now runs something else
    reused = subprocess.Popen(["sleep", "30"])
    try:
        stale = tmp_path / f"daemon-{reused.pid}"
        stale.mkdir()
        (stale / "status.json").write_text("{}")
        (stale / "lock").write_bytes(b"")  # a supervisor's lock file, which nobody holds any more
        remove_stale_socket_dirs(tmp_path)
        assert not stale.exists()
    finally:
        reused.kill()
        reused.wait()


def test_http2_connection_closed_with_streams_in_flight_aborts_them_all(shared_daemon):
    """One running and several queued requests on one HTTP/2 connection; the client drops the connection."""
    daemon = shared_daemon
    wait_engine_idle(daemon, 10)
    client = RawH2(daemon.port)
    try:
        for i in range(4):
            client.request("POST", "/v1/completions", json.dumps({**LONG, "stream": True, "prompt": f"n{i}"}).encode())
        until(lambda: scrape(daemon)[("daemon_queued_requests", ())] == 3, 5, what="three queued requests")
        wait_engine_busy(daemon)
    finally:
        client.close()
    took = wait_engine_idle(daemon, 10)
    assert took <= ABORT_BOUND_S, f"the running request was freed only {took:.1f} s after the client left"
    assert scrape(daemon)[("daemon_queued_requests", ())] == 0
