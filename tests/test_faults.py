"""Fault injection on the real daemon: killed tiers, clients that leave, a crash loop, damaged
model directories, stale socket directories, a killed supervisor and SIGTERM under load.

Every test runs real processes and real clients. Every load is bounded in count and in
time (a request that hangs is recorded as a hang, never waited on forever), and every
daemon is stopped by the `launch` fixture even when the test fails; the fixture also
checks that nothing carrying DAEMON_PARENT_PID=<supervisor pid> outlives it.

A start takes seconds, most of a short fault test: the tests whose fault the daemon recovers
from share one daemon for each set of settings (`shared`, from the module's Pool), each
leaving it serving again for the next, and at the end the tests that kill or stop a daemon
`take` the one the tests before them shared (so the supervisor and SIGTERM tests come last).
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from harness.daemons import RunningDaemon, popen_daemon, run_daemon, short_dir, start_daemon, stop_daemons
from harness.load import Client, Options, Outcome, Requests, request, request_body
from harness.metrics import engine_figures, scrape, wait_engine_busy, wait_engine_idle
from harness.procs import children, descendants, describe, free_port, kill_leftovers, parent, taken_port, wait_gone
from harness.raw_h2 import RawH2
from harness.wait import never, until

from daemon.pids import pid_alive

KILL_BOUND_S = 10.0  # every request in flight ends within this long of a kill
READ_TIMEOUT_S = 20.0  # a client read that waits this long is a hang (longer than KILL_BOUND_S on purpose)
# long enough that a burst is surely all running at once, in the 0.5 s stats /metrics shows, however fast the
# engine: 400 tokens, which once lasted seconds, ended before CI saw all 8 of a burst running together
LOAD_MAX_TOKENS = 1200
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


def unaccounted(daemon: RunningDaemon) -> list[int]:
    """Processes of the daemon's tree that are neither a tier in status.json (a tensor-parallel
    worker's ranks included) nor a child of the front-end tier."""
    tiers = set(daemon.tier_pids().values()) | {r["pid"] for r in worker_ranks(daemon)}
    frontend = daemon.tier_pids()["frontend-0"]
    return [p for p in descendants(daemon.pid) if p not in tiers and parent(p) != frontend]


def worker_ranks(daemon: RunningDaemon) -> list[dict]:
    """The processes of the worker's tensor-parallel group, as status.json shows them (the worker
    alone at tp_size 1)."""
    model = tier_state(daemon)["worker-0"].get("model") or {}
    return model.get("ranks", [])


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
    runtime_dir = short_dir()
    launcher = Launcher(tmp_path, runtime_dir, model_cache, [])
    try:
        yield launcher
    finally:
        stop_daemons(launcher.started, runtime_dir, drain_s=30)


def tier_state(daemon: RunningDaemon) -> dict[str, dict]:
    status = json.loads((daemon.socket_dir / "status.json").read_text())
    return {f"{t['tier']}-{t['index']}": t for t in status["tiers"]}


@dataclass
class Pool:
    """The daemons tests share, one for each set of settings (a start costs seconds, most of a short
    fault test). A test that shares one leaves it as it found it: serving, every tier up, its engine
    idle, every process accounted for; else the daemon is stopped and dropped (the next test gets a
    new one) and the test fails in its teardown. A test that ends a daemon takes it out of the pool.
    At the module's end each daemon left stops cleanly (exit 0) and leaves no process behind."""

    base: Path
    cache_dir: Path
    daemons: dict[tuple, RunningDaemon] = dataclasses.field(default_factory=dict)
    runtime_dirs: list[Path] = dataclasses.field(default_factory=list)

    @staticmethod
    def key(settings: dict[str, object]) -> tuple:
        return tuple(sorted((k, str(v)) for k, v in settings.items()))

    def get(self, settings: dict[str, object]) -> RunningDaemon:
        key = self.key(settings)
        if key not in self.daemons:
            directory = self.base / f"d{len(list(self.base.iterdir()))}"
            directory.mkdir()
            runtime_dir = short_dir()
            self.runtime_dirs.append(runtime_dir)
            self.daemons[key] = start_daemon(directory, runtime_dir, self.cache_dir, settings)
        return self.daemons[key]

    def take(self, settings: dict[str, object], launcher: Launcher) -> RunningDaemon:
        """The daemon shared so far with `settings` (else a new one), for a test that ends it: it leaves the
        pool for `launcher`, whose fixture stops it and checks that nothing outlives it."""
        daemon = self.get(settings)
        del self.daemons[self.key(settings)]
        launcher.started.append(daemon)
        return daemon

    def check_recovered(self, daemon: RunningDaemon) -> None:
        """The daemon serves again with every tier up and its engine idle (within RECOVERY_S), else
        it is stopped, dropped from the pool, and the test's teardown fails."""

        def recovered() -> bool:
            if daemon.process.poll() is not None:
                raise AssertionError(f"the shared daemon exited ({daemon.process.returncode})")
            tiers = tier_state(daemon)
            if not all(t["state"] == "up" for t in tiers.values()):
                return False
            if get_completion(daemon).kind != "complete":
                return False
            running, free, total = engine_figures(daemon)
            return running == 0 and free == total > 0

        try:
            until(recovered, RECOVERY_S, interval=0.2, what="the shared daemon serving again, its engine idle")
            assert not unaccounted(daemon), describe(unaccounted(daemon))
        except AssertionError as exc:
            self.daemons = {k: d for k, d in self.daemons.items() if d is not daemon}
            stopped = self._stop(daemon)
            raise AssertionError(f"{exc}\n{daemon.log_tail(25)}\nstopped: {stopped}") from None

    @staticmethod
    def _stop(daemon: RunningDaemon) -> str | None:
        """Stop it (SIGTERM, SIGKILL after 30 s); what went wrong, if anything: an exit status
        other than 0, processes still there ORPHAN_BOUND_S after the supervisor exited."""
        status = daemon.terminate(30)
        left = describe(wait_gone(daemon.pid, ORPHAN_BOUND_S))
        daemon.stop()
        return None if status == 0 and not left else f"exit {status}, outlived it: {left}"

    def close(self) -> None:
        failures = {d.pid: problem for d in self.daemons.values() if (problem := self._stop(d))}
        self.daemons.clear()
        for runtime_dir in self.runtime_dirs:
            shutil.rmtree(runtime_dir, ignore_errors=True)
        assert not failures, f"shared daemons that did not stop cleanly: {failures}"


@pytest.fixture(scope="module")
def daemon_pool(tmp_path_factory, model_cache: Path) -> Iterator[Pool]:
    pool = Pool(tmp_path_factory.mktemp("pool"), model_cache)
    try:
        yield pool
    finally:
        pool.close()


# The settings of the daemon most recoverable faults share: the model reload test's drain, long
# enough that a reload waiting it out would show.
SHARED = {"runtime.drain_timeout_s": 30}


@pytest.fixture
def shared(daemon_pool: Pool) -> Iterator[Callable[..., RunningDaemon]]:
    """shared(settings): the pool's daemon for `settings`, serving; after the test, it must serve again."""
    used: dict[int, RunningDaemon] = {}

    def get(settings: dict[str, object] = SHARED) -> RunningDaemon:
        daemon = daemon_pool.get(settings)
        used[daemon.pid] = daemon
        return daemon

    yield get
    for daemon in used.values():
        daemon_pool.check_recovered(daemon)


# --- clients ---------------------------------------------------------------------------------------


# Every request of the load is bounded: a read that waits READ_TIMEOUT_S is a hang, and so is a stream still
# going KILL_BOUND_S + READ_TIMEOUT_S after it was sent.
LOAD = Options(
    max_tokens=LOAD_MAX_TOKENS,
    read_timeout=READ_TIMEOUT_S,
    connect_timeout=5.0,
    give_up_after_s=KILL_BOUND_S + READ_TIMEOUT_S,
)


def burst(daemon: RunningDaemon, *, copies: int = 1, max_tokens: int = LOAD_MAX_TOKENS, http2: bool = True) -> Requests:
    """A fixed set of concurrent requests, one connection each: streaming and not, HTTP/1.1 and HTTP/2, chat and
    not (`copies` times each)."""
    protocols = ("h1", "h2") if http2 else ("h1",)
    clients = [
        Client(protocol, stream, chat)
        for _copy in range(copies)
        for stream in (True, False)
        for protocol in protocols
        for chat in (False, True)
    ]
    return Requests(daemon.url, clients, dataclasses.replace(LOAD, max_tokens=max_tokens))


def wait_in_flight(daemon: RunningDaemon, load: Requests, timeout: float = 15.0) -> None:
    """Until every stream of `load` has had a first chunk, and every request, streamed or not, is in the engine:
    none still on its way in, which a fault (or a drain, which closes connections whose request was not read
    yet) would race. None may have ended."""
    load.wait_streaming(timeout)
    until(
        lambda: engine_figures(daemon)[0] >= len(load.outcomes),
        timeout,
        interval=0.05,
        what=f"{len(load.outcomes)} requests running in the engine",
    )
    load.assert_none_ended()


def get_completion(
    daemon: RunningDaemon, *, stream: bool = False, http2: bool = False, label: str = "probe"
) -> Outcome:
    body = request_body(chat=False, stream=stream, max_tokens=8, index=0)
    return request(daemon.url, body, http2=http2, label=label, options=LOAD)


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
def test_kill_one_tier_under_load(shared, tier):
    """One daemon for the four: each kill is recovered from before the next (checked by `shared`),
    and the daemon, four restarts later, stops cleanly at the module's end (checked by the pool)."""
    daemon = shared()
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
    load = burst(daemon)
    wait_in_flight(daemon, load)
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
        assert all(o.kind == "complete" or o.connection_lost for o in load.outcomes), report
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
    assert daemon.events("tier.died", child_pid=old_pid), daemon.log_tail()

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


TENSOR_PARALLEL = {**SHARED, "model.tp_size": 2}


@pytest.mark.parametrize("rank", [1, 0])
def test_kill_one_tensor_parallel_rank_under_load(shared, rank):
    """tp_size 2: a kill -9 of either rank ends the whole group, which the supervisor starts again
    (a new worker epoch, new processes for both ranks); requests in flight end with a 503 (or an
    error event), and the service comes back."""
    daemon = shared(TENSOR_PARALLEL)
    ranks = worker_ranks(daemon)
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["pid"] == daemon.tier_pids()["worker-0"], ranks
    assert parent(ranks[1]["pid"]) == ranks[0]["pid"], "rank 1 is not rank 0's child"
    old_epoch = tier_state(daemon)["worker-0"]["epoch"]
    load = burst(daemon)
    wait_in_flight(daemon, load)
    killed_at = time.monotonic()
    os.kill(ranks[rank]["pid"], signal.SIGKILL)
    load.join(KILL_BOUND_S + READ_TIMEOUT_S + 5)

    report = f"after kill -9 of rank {rank}:\n{load.report()}\n{daemon.log_tail(25)}"
    assert any(o.explicit_error for o in load.outcomes), f"the kill hit no request in flight\n{report}"
    for outcome in load.outcomes:
        assert outcome.kind == "complete" or outcome.explicit_error, report
        if outcome.explicit_error:
            assert outcome.ended_at - killed_at <= KILL_BOUND_S, f"{outcome.label} took too long\n{report}"
        if outcome.kind == "http-error":
            assert outcome.status == 503, report
    daemon.wait_for_event("tier.ready", timeout=RECOVERY_S, tier="worker", index=0, epoch=old_epoch + 1)
    wait_serving(daemon)
    new_ranks = worker_ranks(daemon)
    assert len(new_ranks) == 2 and not {r["pid"] for r in new_ranks} & {r["pid"] for r in ranks}, new_ranks
    assert not [r["pid"] for r in ranks if pid_alive(r["pid"])], "a rank of the old group outlived it"


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


# Two front-end worker processes (and two tokenizers, more of a tree for the supervisor's kill to take).
TWO_FRONTEND_WORKERS = {"server.workers": 2, "tokenizer.workers": 2}


def test_kill_one_frontend_worker_process_under_load(shared):
    """Granian's own worker processes: one dies, its clients see the connection go, the other's finish."""
    daemon = shared(TWO_FRONTEND_WORKERS)
    tiers = set(daemon.tier_pids().values())
    workers = sorted(set(descendants(daemon.pid)) - tiers)
    assert len(workers) == 2, describe(workers)

    load = burst(daemon, copies=2)  # in flight at the kill (LOAD_MAX_TOKENS); the survivors are waited for
    wait_in_flight(daemon, load)

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
        assert outcome.kind == "complete" or outcome.connection_lost, report
        assert outcome.kind == "complete" or outcome.ended_at - killed_at <= KILL_BOUND_S, report
    assert sum(o.connection_lost for o in load.outcomes) == held[victim], report
    assert sum(o.kind == "complete" for o in load.outcomes) == held[survivor], report

    # Granian starts a new worker, which stays up (it dies with its parent only) and serves
    def respawned() -> list[int]:
        return sorted(set(descendants(daemon.pid)) - tiers - set(workers))

    replacement = until(respawned, 15, what="a new front-end worker process")
    never(lambda: set(replacement) - set(descendants(daemon.pid)), 1.0, "the new front-end worker died")
    assert daemon.tier_pids()["frontend-0"] in descendants(daemon.pid)
    wait_serving(daemon)
    wait_engine_idle(daemon, timeout=5.0)  # the dead worker's requests were aborted in the engine


HANG_TIMEOUT_S = 3.0
FROZEN = {"runtime.hang_timeout_s": HANG_TIMEOUT_S}


@pytest.mark.parametrize("tier", ["worker-0", "scheduler-0", "tokenizer-0"])
def test_frozen_tier_is_declared_hung_killed_and_restarted_under_load(shared, tier):
    """SIGSTOP of a back-end tier under load: once it has been silent for runtime.hang_timeout_s it
    is declared hung and killed; every request in flight ends (an answer, or an explicit 503) within
    that plus the kill bound; then the tier is back and serves. One daemon for the three tiers."""
    daemon = shared(FROZEN)
    name, index = tier.rsplit("-", 1)
    frozen = daemon.tier_pids()[tier]
    epoch = tier_state(daemon)[tier]["epoch"]
    mark = daemon.log.mark()
    load = burst(daemon)
    wait_in_flight(daemon, load)
    frozen_at = time.monotonic()
    os.kill(frozen, signal.SIGSTOP)
    try:
        hung = daemon.log.wait("tier.hung", since=mark, timeout=HANG_TIMEOUT_S + 10, tier=name, index=int(index))
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
    died = daemon.events("tier.died", child_pid=frozen)
    assert died and died[0]["status"] == -signal.SIGKILL, daemon.log_tail()
    daemon.wait_for_event("tier.ready", timeout=RECOVERY_S, tier=name, index=int(index), epoch=epoch + 1)
    wait_serving(daemon)


def held_while_the_worker_restarts(daemon: RunningDaemon) -> tuple[Requests, int]:
    """kill -9 of the model worker, its successor stopped (SIGSTOP) as soon as it starts, so that it
    is surely not back; then a burst of requests: (the burst, the successor's PID, still stopped)
    once every request of it waits in the scheduler."""
    epoch, mark = tier_state(daemon)["worker-0"]["epoch"], daemon.log.mark()
    os.kill(daemon.tier_pids()["worker-0"], signal.SIGKILL)
    started = daemon.log.wait("tier.started", since=mark, tier="worker", index=0, epoch=epoch + 1, timeout=RECOVERY_S)
    successor = started["child_pid"]
    os.kill(successor, signal.SIGSTOP)
    daemon.log.wait("scheduler.hold", since=mark, reason="the model worker is restarting", timeout=10)
    load = burst(daemon, max_tokens=8)
    until(
        lambda: scrape(daemon)[("daemon_queued_requests", ())] >= len(load.outcomes),
        15,
        interval=0.05,
        what=f"{len(load.outcomes)} requests waiting for the worker",
    )
    load.assert_none_ended()
    return load, successor


def test_requests_sent_while_the_worker_restarts_wait_for_it(shared):
    """A request that comes while the model worker restarts after a crash waits for it, as one does
    during a reload, rather than being refused: it is answered once the worker is back."""
    daemon = shared()
    mark = daemon.log.mark()
    load, successor = held_while_the_worker_restarts(daemon)
    os.kill(successor, signal.SIGCONT)
    load.join(RECOVERY_S + READ_TIMEOUT_S)
    assert all(o.kind == "complete" for o in load.outcomes), f"{load.report()}\n{daemon.log_tail(20)}"
    ended = daemon.log.wait("scheduler.hold_ended", since=mark, timeout=5)
    assert ended["waited"] == len(load.outcomes), ended


def test_requests_waiting_for_a_worker_that_does_not_come_back_end_with_a_503(shared, long_context_model):
    """The wait is bounded by runtime.drain_timeout_s: then each request gets a 503 that says why."""
    drain_timeout = SHORT_DRAIN_S
    daemon = shared(clients_settings(long_context_model))  # runtime.drain_timeout_s = SHORT_DRAIN_S
    load, successor = held_while_the_worker_restarts(daemon)
    try:
        outcomes = load.join(drain_timeout + KILL_BOUND_S)
    finally:
        os.kill(successor, signal.SIGCONT)
    report = f"{load.report()}\n{daemon.log_tail(20)}"
    expected = f"the model worker is restarting and was not back within {drain_timeout:g} s"
    for outcome in outcomes:
        assert outcome.kind in ("http-error", "sse-error") and expected in outcome.detail, report
        assert outcome.kind == "sse-error" or outcome.status == 503, report
    wait_serving(daemon)  # and the worker, once thawed, serves


def test_model_reload_while_the_worker_restarts_does_not_wait_out_a_drain(shared):
    """A drain-mode model reload asked while a crashed worker restarts: no worker runs anything, so
    the scheduler says so at once and the reload goes on (it once waited out runtime.drain_timeout_s
    for a worker that was not there); the requests held meanwhile run on the new worker."""
    daemon = shared(SHARED)  # runtime.drain_timeout_s = 30
    load, successor = held_while_the_worker_restarts(daemon)
    mark = daemon.log.mark()
    text = daemon.config_path.read_text()
    assert "seed" not in text
    daemon.config_path.write_text(text.replace('path = "builtin:demo"', 'path = "builtin:demo"\nseed = 7'))
    os.kill(daemon.pid, signal.SIGHUP)
    try:
        reload = daemon.log.wait("config.reload", since=mark, timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):  # stopped by the reload, or still to be thawed
            os.kill(successor, signal.SIGCONT)
    assert reload["result"] == "applied" and reload["plan"]["restart"] == ["worker"], reload
    assert not daemon.log.since(mark, "reload.drain_timeout"), daemon.log_tail()
    load.join(RECOVERY_S + READ_TIMEOUT_S)
    assert all(o.kind == "complete" for o in load.outcomes), f"{load.report()}\n{daemon.log_tail(20)}"


def test_frontend_workers_never_outlive_their_tier_process(shared):
    daemon = shared()
    epoch = tier_state(daemon)["frontend-0"]["epoch"]
    os.kill(daemon.tier_pids()["frontend-0"], signal.SIGKILL)
    started = daemon.wait_for_event("tier.started", timeout=15, tier="frontend", epoch=epoch + 1)
    frontend = started["child_pid"]
    # catch the new front-end's first worker process as it is born, before it has run any of our code
    worker = until(lambda: children(frontend), 15, interval=0.001, what="a front-end worker process").pop()
    os.kill(worker, signal.SIGSTOP)
    try:
        os.kill(frontend, signal.SIGKILL)  # the front-end tier dies while its worker starts
        until(lambda: parent(worker) != frontend, 5, interval=0.01, what="the worker orphaned")
    finally:
        os.kill(worker, signal.SIGCONT)
    daemon.wait_for_event("tier.ready", timeout=20, tier="frontend", epoch=epoch + 2)
    # thawed, it dies with its parent (or, the bug, starts serving): gone within 3 s
    deadline = time.monotonic() + 3.0
    until(
        lambda: worker not in descendants(daemon.pid),
        3.0,
        interval=0.05,
        what="the orphaned front-end worker gone",
        detail=lambda: describe([worker]),
    )
    until(
        lambda: not unaccounted(daemon),
        max(0.0, deadline - time.monotonic()),
        interval=0.05,
        what="every process accounted for",
        detail=lambda: describe(unaccounted(daemon)),
    )


# Two tokenizers, one front-end worker process.
TWO_TOKENIZERS = {"tokenizer.workers": 2}


def tokenizer_restarts(daemon: RunningDaemon) -> tuple[float, float]:
    samples = scrape(daemon)
    return tuple(samples[("daemon_tier_restarts_total", (("index", i), ("tier", "tokenizer")))] for i in "01")


def test_kill_one_of_two_tokenizers_fails_only_its_requests(shared):
    daemon = shared(TWO_TOKENIZERS)
    old_pid = daemon.tier_pids()["tokenizer-1"]
    epoch, restarts = tier_state(daemon)["tokenizer-1"]["epoch"], tokenizer_restarts(daemon)
    load = burst(daemon)  # one front-end worker sends requests to the tokenizers in turn
    wait_in_flight(daemon, load)
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

    daemon.wait_for_event("tier.ready", timeout=10, tier="tokenizer", index=1, epoch=epoch + 1)
    assert daemon.tier_pids()["tokenizer-1"] != old_pid
    wait_serving(daemon)
    wait_engine_idle(daemon, timeout=5.0)
    assert tokenizer_restarts(daemon) == (restarts[0], restarts[1] + 1)  # tokenizer-1's, not tokenizer-0's


# --- 2. clients that leave ------------------------------------------------------------------------


SHORT_DRAIN_S = 2.0


def clients_settings(model: Path) -> dict[str, object]:
    """The long-context model; one request runs at a time, a second one waits in the queue. A short
    drain: for the requests that wait for a worker in vain, and for the SIGTERM test that cuts a
    request at the drain timeout (it takes this daemon, last)."""
    return {
        **long_context_settings(model),
        "scheduler.max_running_requests": 1,
        "runtime.drain_timeout_s": SHORT_DRAIN_S,
    }


@pytest.fixture
def shared_daemon(shared, long_context_model) -> RunningDaemon:
    return shared(clients_settings(long_context_model))


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

        def stopped() -> tuple[float, float, float] | None:
            running, free, total = engine_figures(daemon)
            return None if running == 1 and free < total else (running, free, total)

        # the control: a client still connected, even one not reading, keeps its request running (watched
        # for as long as a request of a client that left may take to be freed)
        never(stopped, ABORT_BOUND_S, "the request stopped while its client was still connected", interval=0.25)
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
        body = {**LONGEST, "prompt": "queued behind the first"}
        leaving: list[Outcome] = []
        options = Options(read_timeout=2.0)
        leaver = threading.Thread(
            target=lambda: leaving.append(request(daemon.url, body, label="queued", options=options)), daemon=True
        )
        leaver.start()
        until(lambda: scrape(daemon)[("daemon_queued_requests", ())] == 1, 5, what="a queued request")
        leaver.join(10)
        assert not leaver.is_alive() and leaving[0].kind == "hang", leaving  # the client's own timeout
        left_at = time.monotonic()
        until(
            lambda: engine_figures(daemon)[0] == 1 and scrape(daemon)[("daemon_queued_requests", ())] == 0,
            ABORT_BOUND_S,
            what="the queue emptied while the first request runs",
        )
        assert time.monotonic() - left_at <= ABORT_BOUND_S
    took = wait_engine_idle(daemon, 10)
    assert took <= ABORT_BOUND_S


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


# --- 3. crash loop --------------------------------------------------------------------------------


def test_worker_crash_loop_stops_the_daemon_with_an_error(launch):
    """The worker killed once it serves, then each new one as soon as it starts: more than 5 restarts
    within 60 s is a crash loop (a death while starting counts as one after serving would)."""
    daemon = launch()
    os.kill(daemon.tier_pids()["worker-0"], signal.SIGKILL)
    kills = 1
    while kills < 8:  # the supervisor gives up at the 6th death
        started = daemon.log.wait("tier.started", tier="worker", epoch=kills + 1, timeout=30, or_exit=True)
        if started is None:
            break
        os.kill(started["child_pid"], signal.SIGKILL)
        kills += 1
    exited = daemon.process.wait(20)
    assert exited != 0, daemon.log_tail()
    assert kills == 6, f"{kills} kills\n{daemon.log_tail()}"
    failed = daemon.events("daemon.failed")
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
        time.sleep(0.5)  # the probes' pace, while the daemon restarts the tokenizer (or gives up)
    status = daemon.process.wait(60)
    assert status != 0, daemon.log_tail()
    failed = daemon.events("daemon.failed")
    assert failed and "crash-loop" in failed[0]["reason"], daemon.log_tail()
    assert len(daemon.events("tier.restart_failed")) >= 5
    assert not wait_gone(daemon.pid, ORPHAN_BOUND_S), describe(descendants(daemon.pid))
    assert not daemon.socket_dir.exists()


# --- 4. damaged model directories -----------------------------------------------------------------


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
    process = popen_daemon(["-c", str(config), "--set", f"model.path={model}"], tmp_path / "run.log")
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
    failed = daemon.events("daemon.failed")
    assert failed and "worker-0" in failed[0]["reason"], daemon.log_tail()
    load_failed = daemon.events("worker.load_failed")
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
    # every restart refuses it (two are enough to see): none comes up
    until(lambda: len(daemon.events("tier.handoff_refused")) >= 2, 30, what="two restarts refusing it")
    refused = daemon.events("tier.handoff_refused")[0]
    assert not [e for e in daemon.events("tier.ready", tier="tokenizer") if e["epoch"] > 1], daemon.log_tail()
    assert daemon.process.poll() is None, daemon.log_tail()  # not a crash loop yet: the fixture stops it
    expected = "is a symlink" if tampering == "symlink" else "writable by others (mode 0666)"
    assert str(handoff) in refused["reason"] and expected in refused["reason"], refused


# --- the port -------------------------------------------------------------------------------------


def test_port_held_by_another_program_fails_the_start_promptly(launch):
    with taken_port() as held:
        daemon = launch({"server.port": held}, wait=False)
        status = daemon.process.wait(60)
    assert status != 0, daemon.log_tail()
    failed = daemon.events("daemon.failed")
    assert failed and f"cannot listen on 127.0.0.1:{held}" in failed[0]["reason"], daemon.log_tail()
    assert "Address already in use" in failed[0]["reason"]
    assert not wait_gone(daemon.pid, ORPHAN_BOUND_S)
    assert not daemon.socket_dir.exists()


def test_second_daemon_on_a_port_in_use_refuses_to_start(launch, shared):
    first = shared()
    second = launch({"server.port": first.port}, wait=False)

    def settled() -> str | None:
        if second.process.poll() is not None:
            return "exited"
        if second.events("daemon.ready"):
            return "ready"
        return None

    outcome = until(settled, 60, interval=0.05, what="the second daemon exiting or ready")
    served_by = set()
    for _ in range(12):  # fresh connections: the kernel spreads them over every listener of the port
        served_by.add(httpx.get(first.url + "/server_info", timeout=10).json()["supervisor"]["pid"])
    assert outcome == "exited" and second.process.returncode != 0, second.log_tail()
    assert served_by == {first.pid}


# --- 5. stale socket directories ------------------------------------------------------------------


def test_stale_socket_dirs_of_a_killed_supervisor_are_removed_at_next_start(shared, tmp_path, model_cache):
    second = shared()  # a live daemon on the runtime dir: the directory of each is left alone
    launch = Launcher(tmp_path, second.runtime_dir, model_cache, [])  # the shared daemon's runtime dir
    unrelated = second.runtime_dir / "daemon-notapid"
    try:
        first = launch()  # beside the live one
        assert first.socket_dir.is_dir() and get_completion(first).kind == "complete"
        first.process.kill()
        first.process.wait(5)
        assert not wait_gone(first.pid, ORPHAN_BOUND_S)
        stale = first.socket_dir
        assert stale.is_dir() and any(stale.iterdir()), "a killed supervisor cannot clean up: its directory stays"
        unrelated.mkdir()

        third = launch()
        assert not stale.exists()
        assert second.socket_dir.is_dir() and unrelated.is_dir()
        removed = third.events("supervisor.stale_socket_dir_removed")
        assert [e["path"] for e in removed] == [str(stale)]
        assert get_completion(third).kind == "complete"
        assert get_completion(second).kind == "complete"
    finally:  # the launch fixture's teardown, but the runtime dir stays: the shared daemon's
        survivors = {d.pid: left for d in launch.started if (left := d.stop_checked(30)[1])}
        with contextlib.suppress(OSError):
            unrelated.rmdir()
    assert not survivors, f"processes outlived their supervisor: {survivors}"


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


# --- 6. kill -9 of the supervisor -----------------------------------------------------------------


@pytest.mark.parametrize(
    "settings", [TWO_TOKENIZERS, TWO_FRONTEND_WORKERS], ids=["one-frontend-worker", "two-frontend-workers"]
)
def test_kill_supervisor_takes_every_process_with_it(launch, daemon_pool, settings):
    daemon = daemon_pool.take(settings, launch)  # the one the tests before shared, restarted tiers and all
    tiers = set(daemon.tier_pids().values())
    tree = set(descendants(daemon.pid))
    granian_workers = tree - tiers
    assert tiers <= tree
    assert len(granian_workers) >= settings.get("server.workers", 1), describe(sorted(tree))

    client = Requests(daemon.url, [Client("h2", stream=True)], dataclasses.replace(LOAD, max_tokens=1500))
    client.wait_streaming(10)

    killed_at = time.monotonic()
    daemon.process.kill()
    daemon.process.wait(5)
    left = wait_gone(daemon.pid, ORPHAN_BOUND_S)
    assert not left, f"still alive {ORPHAN_BOUND_S} s after the supervisor died: {describe(left)}"
    (stream,) = client.join(KILL_BOUND_S)
    assert stream.kind == "cut", stream  # the connection went in the middle of the answer
    assert stream.ended_at - killed_at <= KILL_BOUND_S


@pytest.mark.parametrize("tier", ["worker", "frontend"])
def test_kill_supervisor_while_tiers_start(launch, tier):
    """The worker is still importing torch, or the front-end still spawning its workers: they go too."""
    daemon = launch(wait=False)
    started = until(
        lambda: daemon.events("tier.started", tier=tier),
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


# --- 7. SIGTERM under load ------------------------------------------------------------------------


def draining(daemon: RunningDaemon) -> bool:
    """The front-end says it is stopping (/health_generate answers 503), or takes no connection any more."""
    try:
        return httpx.get(daemon.url + "/health_generate", timeout=10).status_code == 503
    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
        return True


def test_sigterm_drains_requests_in_flight_then_exits_cleanly(launch, tmp_path):
    # a drain long enough for the load even on a slow, shared machine
    daemon = launch({"runtime.drain_timeout_s": 40})
    # HTTP/2 by curl (nghttp2): Python's h2 treats the GOAWAY of a graceful shutdown as the end of the
    # connection, so httpx loses its streams in flight on every drain
    clients = [Client("h1", stream, chat) for stream in (True, False) for chat in (False, True)]
    clients += [Client("curl", stream) for stream in (True, False)] if shutil.which("curl") else []
    load = Requests(daemon.url, clients, dataclasses.replace(LOAD, directory=tmp_path, curl_max_time=60))
    wait_in_flight(daemon, load)

    daemon.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    daemon.wait_for_event("daemon.stopping", timeout=5)
    until(lambda: draining(daemon), 5, interval=0.02, what="the front-end draining", retry_on=(httpx.TimeoutException,))
    late: list[Outcome] = []
    while daemon.process.poll() is None and len(late) < 6:  # requests started during the drain
        stream, http2 = len(late) % 2 == 0, len(late) % 3 == 0
        late.append(get_completion(daemon, stream=stream, http2=http2, label=f"late-{len(late)}"))
        time.sleep(0.3)  # the late requests' pace: spread over the drain

    outcomes = load.join(60)
    report = f"{load.report()}\nlate: {late}\n{daemon.log_tail(30)}"
    assert all(o.kind == "complete" for o in outcomes), report
    assert late, "the daemon exited before any request could be tried during the drain"
    for outcome in late:
        assert outcome.kind == "http-error" or outcome.connection_lost, report
        assert outcome.kind != "http-error" or outcome.status == 503, report
        assert outcome.ended_at - signalled < 10, report

    assert daemon.process.wait(30) == 0, daemon.log_tail()
    assert not wait_gone(daemon.pid, 2.0), describe(descendants(daemon.pid))
    assert not daemon.socket_dir.exists()
    assert daemon.events("daemon.stopped"), daemon.log_tail()
    with pytest.raises(httpx.ConnectError):  # nothing listens any more
        httpx.get(daemon.url + "/health", timeout=2)


def test_sigterm_cuts_requests_that_outlast_the_drain_timeout(launch, daemon_pool, long_context_model):
    daemon = daemon_pool.take(clients_settings(long_context_model), launch)  # the clients' daemon, last
    drain_timeout = SHORT_DRAIN_S  # its runtime.drain_timeout_s
    options = dataclasses.replace(LOAD, max_tokens=LONG["max_tokens"])
    client = Requests(daemon.url, [Client("h1", stream=True)], options)
    client.wait_streaming(10)
    daemon.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    (stream,) = client.join(KILL_BOUND_S + 5)  # else: the stream outlived the drain timeout by far
    # cut at the drain timeout: the client sees the stream end without [DONE]
    assert stream.kind in ("cut", "incomplete", "sse-error"), stream
    assert drain_timeout / 2 < stream.ended_at - signalled < drain_timeout + 5, stream
    assert daemon.process.wait(15) == 0, daemon.log_tail()
    assert time.monotonic() - signalled < drain_timeout + 5 + 5
    assert not wait_gone(daemon.pid, 2.0), describe(descendants(daemon.pid))
    assert not daemon.socket_dir.exists()


def test_tier_dying_during_the_drain_fails_its_requests_at_once(launch):
    daemon = launch({"runtime.drain_timeout_s": 8})
    load = burst(daemon, max_tokens=1500, http2=False)
    wait_in_flight(daemon, load)
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
def test_sigterm_while_starting_or_restarting_a_tier(launch, daemon_pool, moment):
    if moment == "starting":
        daemon = launch(wait=False)
        daemon.wait_for_event("tier.started", timeout=30, tier="worker")
    else:  # a daemon the tests before shared: any serving daemon will do, what is under test is its stop
        daemon = daemon_pool.take(SHARED if moment == "restarting" else FROZEN, launch)
        epoch, mark = tier_state(daemon)["worker-0"]["epoch"], daemon.log.mark()
        os.kill(daemon.tier_pids()["worker-0"], signal.SIGKILL)
        daemon.log.wait("tier.died", since=mark, timeout=10, tier="worker")
        if moment == "restarting":
            daemon.log.wait("tier.started", since=mark, timeout=10, tier="worker", epoch=epoch + 1)
    daemon.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert daemon.process.wait(15) == 0, daemon.log_tail()
    assert time.monotonic() - signalled < 10
    assert not wait_gone(daemon.pid, ORPHAN_BOUND_S), describe(descendants(daemon.pid))
    assert not daemon.socket_dir.exists()
    assert not daemon.events("daemon.failed"), daemon.log_tail()
