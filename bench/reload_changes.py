"""The classes of config change bench/reload.py makes, and one change under load: what each class
edits in the config, the tiers it should restart, its goal, and what one change measured (Trial).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import BIN, REPO, Server, clean_env, percentile, read_status
from daemon_files import LogTail, config_text, lookup, tier_startups, write_atomically
from reload_load import Load, Record, failures_by_kind, ok_latencies

CLASSES = ("live", "tokenizer", "frontend", "model", "model-bg", "model-rolling", "context")
DESCRIPTION = {
    "live": "live field (scheduler.max_queued_requests 1024 <-> 1000)",
    "tokenizer": "tokenizer (tokenizer.workers 1 <-> 2)",
    "frontend": "front-end (server.workers 1 <-> 2, same port)",
    "model": "model worker, drain (model.seed + 1)",
    "model-bg": "model worker, blue-green (model.seed + 1)",
    "model-rolling": "model replicas, rolling (model.seed + 1; one replica at a time with --dp-size 2)",
    "context": "model worker, drain (model.context_length 2048 <-> 1024)",
}
EXPECTED_RESTART = {
    "live": [],
    "tokenizer": ["tokenizer"],
    "frontend": ["frontend"],
    "model": ["worker"],
    "model-bg": ["worker"],
    "model-rolling": ["worker"],
    "context": ["worker"],
}
GOAL_S = {"live": 1.0, "tokenizer": 3.0, "frontend": 3.0}  # a new model worker: its load time + MODEL_GOAL_EXTRA_S
MODEL_GOAL_EXTRA_S = 2.0
# The demo model's own maximum and half of it: both far above what the load needs (a prompt of at most
# 9 words and 16 tokens out), so no request is refused by the limit either way.
CONTEXT_LENGTHS = (2048, 1024)


def replaces_worker(kind: str) -> bool:
    """Whether a change of class `kind` loads a new model worker (its goal counts from that load)."""
    return EXPECTED_RESTART.get(kind) == ["worker"]


def changed(values: dict[str, dict], kind: str) -> tuple[dict[str, dict], str]:
    """A copy of `values` with the change of class `kind`, and that change in words."""
    new = {section: dict(keys) for section, keys in values.items()}
    if kind == "live":
        old = new["scheduler"]["max_queued_requests"]
        new["scheduler"]["max_queued_requests"] = 1000 if old != 1000 else 1024
        key, value = "scheduler.max_queued_requests", new["scheduler"]["max_queued_requests"]
    elif kind == "tokenizer":
        old = new["tokenizer"]["workers"]
        new["tokenizer"]["workers"] = 2 if old == 1 else 1
        key, value = "tokenizer.workers", new["tokenizer"]["workers"]
    elif kind == "frontend":
        old = new["server"]["workers"]
        new["server"]["workers"] = 2 if old == 1 else 1
        key, value = "server.workers", new["server"]["workers"]
    elif kind in ("model", "model-bg", "model-rolling"):
        new["runtime"]["model_reload"] = {"model-bg": "blue_green", "model-rolling": "rolling"}.get(kind, "drain")
        old = new["model"]["seed"]
        new["model"]["seed"] = old + 1
        key, value = "model.seed", new["model"]["seed"]
    elif kind == "context":
        new["runtime"]["model_reload"] = "drain"
        old = new["model"]["context_length"]
        new["model"]["context_length"] = CONTEXT_LENGTHS[1] if old == CONTEXT_LENGTHS[0] else CONTEXT_LENGTHS[0]
        key, value = "model.context_length", new["model"]["context_length"]
    else:
        raise ValueError(kind)
    return new, f"{key} {old} -> {value}"


@dataclass
class Trial:
    kind: str
    repeat: int
    change: str
    written: float
    result: str = "no config.reload event"
    reason: str | None = None
    generation: int | None = None
    restarted: list[str] = field(default_factory=list)
    duration_s: float = float("nan")  # the supervisor's own measure of the transaction (ReloadReport)
    detected: float = float("nan")  # config.changed: the watcher saw the file change
    applied: float = float("nan")  # config.reload event
    startups: list[dict] = field(default_factory=list)  # tier processes started by this change
    stopped: list[dict] = field(default_factory=list)  # tier.stopped events
    warnings: dict[str, int] = field(default_factory=dict)  # warning/error log events meanwhile
    server_info: str = ""  # what /server_info said afterwards, when it disagreed
    first_ok: float = float("nan")  # end of the first successful request started after `applied`
    window_end: float = float("nan")
    in_window: list[Record] = field(default_factory=list)
    command_report: str = ""  # --trigger command: what `daemon reload` printed

    @property
    def to_generation(self) -> float:
        return self.applied - self.written

    @property
    def to_serving(self) -> float:
        """From the write to the end of the first successful request started after the config.reload event."""
        return self.first_ok - self.written

    @property
    def new_ready(self) -> float:
        """From the write to the last new tier process being ready (nan: none started)."""
        ready = [s["ready"] for s in self.startups]
        return max(ready) - self.written if ready else float("nan")

    @property
    def load_time(self) -> float:
        """The new model worker's start to ready (nan: none); of a rolling reload, the sum over its
        replicas, which load one after another."""
        workers = [s["ready"] - s["started"] for s in self.startups if s["tier"] == "worker"]
        if not workers:
            return float("nan")
        return sum(workers) if self.kind == "model-rolling" else workers[-1]

    @property
    def failures(self) -> dict[str, int]:
        return failures_by_kind(self.in_window)

    @property
    def p99(self) -> float:
        return percentile(ok_latencies(self.in_window), 0.99)

    def failed_at(self) -> str:
        """When the failed requests of the window ended, in seconds after the write."""
        ends = [r.ended - self.written for r in self.in_window if r.failure is not None]
        return f"{min(ends):.2f}-{max(ends):.2f}" if ends else "-"

    def attach(self, load: Load) -> None:
        """Take its requests from the load, once it has stopped: those of its window, and the first answer after."""
        self.in_window = load.between(self.written, self.window_end)
        after = [r.ended for r in load.records if r.failure is None and r.started >= self.applied]
        self.first_ok = min(after) if after else float("nan")

    def goal(self) -> float:
        if replaces_worker(self.kind):
            return self.load_time + MODEL_GOAL_EXTRA_S
        return GOAL_S.get(self.kind, float("nan"))


def reload_argv(runtime_dir: Path) -> list[str]:
    return [str(BIN / "daemon"), "reload", "--runtime-dir", str(runtime_dir), "--format", "json"]


def describe_report(returncode: int, stdout: str, stderr: str) -> str:
    try:
        report = json.loads(stdout)
        return (
            f"exit {returncode}: result {report.get('result')}, generation {report.get('generation')}, "
            f"duration_s {report.get('duration_s')}, restarted {report.get('restarted')}"
        )
    except ValueError:
        return f"exit {returncode}: {(stdout + stderr).strip()[:400]}"


async def reload_by_command(runtime_dir: Path, timeout: float) -> str:
    """Run `daemon reload --format json` and say what it answered."""
    process = await asyncio.create_subprocess_exec(
        *reload_argv(runtime_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
        cwd=REPO,
    )
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        return f"no answer within {timeout:g} s"
    return describe_report(process.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace"))


WARNING_EVENTS_IGNORED = {"config.changed"}


@dataclass
class Bench:
    """What every trial acts on and reads: the run's options, the daemon, its config file, log and runtime dir."""

    args: argparse.Namespace
    daemon: Server
    config_path: Path
    runtime_dir: Path
    log: LogTail


async def wait_for_event(bench: Bench, event: str, since: float, timeout: float, **fields: object) -> dict | None:
    """The first `event` with `fields` the daemon logged at or after `since` (time.time()); None after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        if not bench.daemon.alive():
            raise RuntimeError(f"the daemon exited ({bench.daemon.process.returncode}) while waiting for {event}")
        bench.log.poll()
        if found := bench.log.find(event, since, **fields):
            return found[0]
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(0.05)


async def settle(bench: Bench) -> None:
    """Until every tier is up again and --settle seconds (at least the window's tail) have passed from now;
    at most --reload-timeout."""
    args = bench.args
    settle_until = time.monotonic() + max(args.settle, args.window_tail)
    up_deadline = time.monotonic() + args.reload_timeout
    while time.monotonic() < up_deadline:
        status = read_status(bench.runtime_dir, bench.daemon.process.pid)
        all_up = status is not None and all(t["state"] == "up" for t in status["tiers"])
        if all_up and time.monotonic() >= settle_until:
            return
        await asyncio.sleep(0.1)


def log_warnings(log: LogTail, since: float) -> dict[str, int]:
    """The warning and error events logged since `since`, counted by level and name."""
    counts: dict[str, int] = {}
    for r in log.records:
        level, name = str(r.get("level")), r.get("event")
        if r["ts"] >= since and level in ("warning", "error", "critical") and name not in WARNING_EVENTS_IGNORED:
            counts[f"{level} {name}"] = counts.get(f"{level} {name}", 0) + 1
    return counts


async def served_disagreement(daemon: Server, generation: int | None, key: str, wanted: object) -> str:
    """What the daemon serves after an applied change, where it disagrees with the change: /server_info's
    generation and value of `key`, and for model.context_length the limit /tokenize reports (the tokenizer
    follows the limit the new worker announces). '' when all agree."""
    import aiohttp

    disagreements = []
    # A fresh connection: the load's are all busy.
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.get(daemon.url + "/server_info") as response:
                info = await response.json()
            seen = (info["config"]["generation"], lookup(info["effective_config"], key))
            if seen != (generation, wanted):
                disagreements.append(
                    f"/server_info: generation {seen[0]}, {key} = {seen[1]} (expected {(generation, wanted)})"
                )
            if key == "model.context_length":
                async with session.post(daemon.url + "/tokenize", json={"prompt": "hello"}) as response:
                    limit = (await response.json())["max_model_len"]
                if limit != wanted:
                    disagreements.append(f"/tokenize: max_model_len {limit} (expected {wanted})")
    except (TimeoutError, aiohttp.ClientError, ValueError, KeyError) as exc:
        disagreements.append(f"could not read what it serves: {exc!r}")
    return "; ".join(disagreements)


async def run_trial(
    bench: Bench, kind: str, repeat: int, values: dict[str, dict], new_values: dict[str, dict], change: str
) -> tuple[Trial, dict[str, dict]]:
    """Write `new_values` over the config file and measure the reload that follows; the trial, and the
    values the daemon runs afterwards (`values` again unless the change was applied)."""
    args, log = bench.args, bench.log
    log.poll()
    written = write_atomically(bench.config_path, config_text(new_values))
    trial = Trial(kind, repeat, change, written)
    command = None
    if args.trigger == "command":
        command = asyncio.create_task(reload_by_command(bench.runtime_dir, args.reload_timeout))
    event = await wait_for_event(bench, "config.reload", written, args.reload_timeout)
    if command is not None:
        trial.command_report = await command
    if event is None:
        trial.window_end = written + args.reload_timeout
        return trial, values
    trial.applied = event["ts"]
    trial.result = event.get("result", "?")
    trial.reason = event.get("reason")
    trial.generation = event.get("generation")
    trial.restarted = list(event.get("plan", {}).get("restart", []))
    trial.duration_s = float(event.get("duration_s", float("nan")))
    if detected := log.find("config.changed", written):
        trial.detected = detected[0]["ts"]
    trial.window_end = trial.applied + args.window_tail

    await settle(bench)
    log.poll()
    trial.startups = tier_startups(log.records, written)
    trial.stopped = [r for r in log.find("tier.stopped", written)]
    trial.warnings = log_warnings(log, written)
    if trial.result != "applied":
        return trial, values  # a rejected or rolled back change: the running config is still the old one
    key = change.split()[0]
    with contextlib.suppress(KeyError):  # a change of several keys (back to the start) names none first
        wanted = lookup(new_values, key)
        trial.server_info = await served_disagreement(bench.daemon, trial.generation, key, wanted)
    return trial, new_values
