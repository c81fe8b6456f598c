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

CLASSES = ("live", "tokenizer", "frontend", "model", "model-bg")
DESCRIPTION = {
    "live": "live field (scheduler.max_queued_requests 1024 <-> 1000)",
    "tokenizer": "tokenizer (tokenizer.workers 1 <-> 2)",
    "frontend": "front-end (server.workers 1 <-> 2, same port)",
    "model": "model worker, drain (model.seed + 1)",
    "model-bg": "model worker, blue-green (model.seed + 1)",
}
EXPECTED_RESTART = {
    "live": [],
    "tokenizer": ["tokenizer"],
    "frontend": ["frontend"],
    "model": ["worker"],
    "model-bg": ["worker"],
}
GOAL_S = {"live": 1.0, "tokenizer": 3.0, "frontend": 3.0}  # model: its load time + MODEL_GOAL_EXTRA_S
MODEL_GOAL_EXTRA_S = 2.0


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
    elif kind in ("model", "model-bg"):
        new["runtime"]["model_reload"] = "blue_green" if kind == "model-bg" else "drain"
        old = new["model"]["seed"]
        new["model"]["seed"] = old + 1
        key, value = "model.seed", new["model"]["seed"]
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
        """The new model worker's start to ready (nan: none)."""
        workers = [s["ready"] - s["started"] for s in self.startups if s["tier"] == "worker"]
        return workers[-1] if workers else float("nan")

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
        if self.kind.startswith("model"):
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


async def run_trial(
    kind: str,
    repeat: int,
    values: dict[str, dict],
    new_values: dict[str, dict],
    change: str,
    config_path: Path,
    log: LogTail,
    daemon: Server,
    runtime_dir: Path,
    args: argparse.Namespace,
) -> tuple[Trial, dict[str, dict]]:
    import aiohttp

    log.poll()
    written = write_atomically(config_path, config_text(new_values))
    trial = Trial(kind, repeat, change, written)
    deadline = time.monotonic() + args.reload_timeout
    command = None
    if args.trigger == "command":
        command = asyncio.create_task(reload_by_command(runtime_dir, args.reload_timeout))
    event = None
    while time.monotonic() < deadline:
        if not daemon.alive():
            raise RuntimeError(f"the daemon exited ({daemon.process.returncode}) during: {change}")
        log.poll()
        if found := log.find("config.reload", written):
            event = found[0]
            break
        await asyncio.sleep(0.05)
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

    # Settle: every tier up again, and --settle seconds after the event.
    settle_until = time.monotonic() + max(args.settle, args.window_tail)
    up_deadline = time.monotonic() + args.reload_timeout
    while time.monotonic() < up_deadline:
        status = read_status(runtime_dir, daemon.process.pid)
        all_up = status is not None and all(t["state"] == "up" for t in status["tiers"])
        if all_up and time.monotonic() >= settle_until:
            break
        await asyncio.sleep(0.1)
    log.poll()
    trial.startups = tier_startups(log.records, written)
    trial.stopped = [r for r in log.find("tier.stopped", written)]
    for r in log.records:
        level, name = str(r.get("level")), r.get("event")
        if r["ts"] >= written and level in ("warning", "error", "critical") and name not in WARNING_EVENTS_IGNORED:
            trial.warnings[f"{level} {name}"] = trial.warnings.get(f"{level} {name}", 0) + 1

    # What the front-end says now (a fresh connection: the load's are all busy).
    key = change.split()[0]
    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError):
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.get(daemon.url + "/server_info") as response,
        ):
            info = await response.json()
        seen = (info["config"]["generation"], lookup(info["effective_config"], key))
        wanted = (trial.generation, lookup(new_values, key))
        if trial.result == "applied" and seen != wanted:
            trial.server_info = f"/server_info: generation {seen[0]}, {key} = {seen[1]} (expected {wanted})"
    if trial.result != "applied":
        new_values = values  # a rejected or rolled back change: the running config is still the old one
    return trial, new_values
