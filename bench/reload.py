"""Hot reload under load: how long each kind of config change takes to serve, and what it costs the clients.

    .venv/bin/pip install -e '.[bench]'      # aiohttp, uvloop (the load client)
    .venv/bin/python bench/reload.py         # --help for the knobs; ~3 minutes on 2 cores

What it does, in order (every wait is bounded, the whole run by --total-time-limit;
every process it starts is stopped at the end, on errors and SIGTERM too, by PID):

1. Writes a config file into a directory of its own (configs/server.toml with a free
   port, runtime.dir and runtime.cache_dir in temp directories, JSON logs,
   runtime.watch_config = true) and starts `daemon -c <that file>` on the demo model.
   The model load time is read from the daemon's log at start: the worker's
   tier.started to its tier.ready.
2. Warms up, then starts a closed-loop load that runs until the end: --clients
   clients (64), each sending its next completion when the last one is answered
   (max_tokens 16, ignore_eos, prompts of 3-9 words; every other client streams,
   with usage), over aiohttp HTTP/1.1 keep-alive connections. Clients never retry:
   a failed request is counted, the client pauses --error-pause seconds and sends
   its next one. After a lead-in it measures --steady seconds of steady state.
3. For each repeat, for each class of change, while the load runs: edits the config
   file the way editors do (write a temp file, os.replace it over the config) and
   waits for the supervisor's config.reload log event that follows:
     live       scheduler.max_queued_requests 1024 <-> 1000   (pushed to every tier)
     tokenizer  tokenizer.workers 1 <-> 2                      (a new pool; the old one drains)
     frontend   server.workers 1 <-> 2                         (a new Granian on the same socket; the old drains)
     model      model.seed +1                                  (the worker is replaced; new requests are held)
     model-bg   model.seed +1, runtime.model_reload blue_green (the new worker loads beside the old one)
   Then it waits until every tier is up again and --settle seconds have passed.
   After the last round, one change back to the starting config (every class that
   differs at once: reported per change, not in the table), and --steady seconds of
   steady state again, on the same config as the first.
4. Stops the load, runs `daemon reload --runtime-dir DIR --format json` once (the
   file has not changed since: "unchanged" expected), stops the daemon, and prints
   the commands, the machine, the versions, the daemon's log findings, per-trial
   details and a markdown table (medians over the repeats).

Definitions (also printed with the table):
- time to new generation: from the os.replace of the config file to the timestamp
  of the supervisor's config.reload event (result "applied"), which it logs once the
  whole transaction is done: file watch debounce, check, new tiers up, old ones
  drained and gone, live settings acknowledged by every tier. It is cross-checked
  by the first request that started after that event and succeeded (it can only
  have been served by the new generation's processes): the goals are checked
  against that one. /server_info is read after
  each change to check that the front-end reports the new generation and value.
- reload window: from the write to 1 s (--window-tail) after the config.reload
  event. A request is in the window when its lifetime overlaps it. Failed requests
  are counted by kind (HTTP status, connection closed before/while answering,
  reset, error event in a stream, timeout); p99 is over the window's successes.
- steady p99: the successful requests wholly inside the steady-state measurement
  before the first change (and, for comparison, after the last one).

The load client runs on the same cores as the daemon (2 on the build machines),
and other work on the machine moves the figures: read them as rough.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path

# bench/ is on sys.path as the script's directory: what both benchmarks share.
from common import (
    BIN,
    CONFIG,
    REPO,
    REQUEST_TIMEOUT_S,
    START_TIMEOUT_S,
    Server,
    clean_env,
    cpu_model,
    daemon_log_findings,
    daemon_processes,
    free_port,
    limit_run,
    make_prompts,
    marked_pids,
    percentile,
    print_header,
    print_notes,
    remove_work,
    use_uvloop,
    versions,
    wait_http_ok,
    warm_up,
)

STOP_LOAD_GRACE_S = 40.0  # after the last change, how long requests in flight may take to finish

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


class Overtime(KeyboardInterrupt):
    """--total-time-limit ran out (a KeyboardInterrupt, so that it also leaves an asyncio loop)."""


# --- the config file ------------------------------------------------------------------------------


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for anything JSON escapes the same way
    raise TypeError(f"no TOML for {value!r}")


def config_text(values: dict[str, dict]) -> str:
    lines = ["# written by bench/reload.py"]
    for section, keys in values.items():
        lines.append(f"\n[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> float:
    """Write `text` to a temp file beside `path` and rename it over `path`; the time.time() right after."""
    staging = path.with_name(f".{path.name}.new")
    with open(staging, "w") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(staging, path)
    return time.time()


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


def lookup(values: dict, dotted: str) -> object:
    for part in dotted.split("."):
        values = values[part]
    return values


# --- the daemon's log -------------------------------------------------------------------------------


def log_time(record: dict) -> float:
    """A log line's timestamp (structlog, ISO 8601 UTC) as time.time() seconds; nan if it has none."""
    with contextlib.suppress(KeyError, ValueError, TypeError):
        return datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()
    return float("nan")


class LogTail:
    """The daemon's JSON log, read as it grows; every parsed line is kept with its time in `ts`."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = b""
        self.records: list[dict] = []

    def poll(self) -> list[dict]:
        with contextlib.suppress(OSError), open(self.path, "rb") as stream:
            stream.seek(self.offset)
            chunk = stream.read()
            self.offset += len(chunk)
            self.partial += chunk
        *complete, self.partial = self.partial.split(b"\n")
        new = []
        for line in complete:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    record["ts"] = log_time(record)
                    new.append(record)
        self.records += new
        return new

    def find(self, event: str, since: float, **fields: object) -> list[dict]:
        return [
            r
            for r in self.records
            if r.get("event") == event and r["ts"] >= since and all(r.get(k) == v for k, v in fields.items())
        ]


def tier_startups(records: list[dict], since: float = 0.0) -> list[dict]:
    """Each tier process the supervisor started after `since`: tier, pid, started, ready (nan: never)."""
    started = {
        r["child_pid"]: r for r in records if r.get("event") == "tier.started" and r["ts"] >= since and "child_pid" in r
    }
    ready = {r["child_pid"]: r["ts"] for r in records if r.get("event") == "tier.ready" and "child_pid" in r}
    return [
        {"tier": r["tier"], "pid": pid, "started": r["ts"], "ready": ready.get(pid, float("nan"))}
        for pid, r in started.items()
    ]


def read_status(runtime_dir: Path, supervisor_pid: int) -> dict | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((runtime_dir / f"daemon-{supervisor_pid}" / "status.json").read_text())
    return None


# --- the load ---------------------------------------------------------------------------------------


@dataclass
class Record:
    started: float  # time.time()
    ended: float
    stream: bool
    failure: str | None  # None: a complete 200 answer with max_tokens tokens


def error_message(body: bytes) -> str:
    """': <the error message>' of an OpenAI-style error body (cut short), or ''."""
    try:
        message = str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return ""
    return f" ({message[:60]}{'...' if len(message) > 60 else ''})"


def check_plain(body: bytes, max_tokens: int) -> str | None:
    try:
        tokens = int(json.loads(body)["usage"]["completion_tokens"])
    except (ValueError, KeyError, TypeError):
        return "200 with a bad body"
    return None if tokens == max_tokens else f"200 with {tokens} tokens"


def check_stream(body: bytes, max_tokens: int) -> str | None:
    events = [e for e in body.split(b"\n\n") if e.strip()]
    if not events or events[-1].strip() != b"data: [DONE]":
        if any(b'"error"' in e[:40] for e in events):
            return "stream: error event"
        return "stream: ended without [DONE]"
    if any(e.startswith(b'data: {"error"') for e in events):
        return "stream: error event"
    try:
        tokens = int(json.loads(events[-2][len(b"data: ") :])["usage"]["completion_tokens"])
    except (ValueError, KeyError, TypeError, IndexError):
        return "stream: no usage chunk"
    return None if tokens == max_tokens else f"stream: {tokens} tokens"


def classify(exc: BaseException) -> str:
    import aiohttp

    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"connect failed ({exc.os_error.strerror or exc.os_error})"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "connection closed before an answer"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "connection closed during the answer"
    if isinstance(exc, aiohttp.ClientOSError):
        cause = exc.__cause__
        if "write request" in str(exc):  # the server closed the (keep-alive) connection as the request went out
            how = f"errno {errno.errorcode.get(exc.errno, exc.errno)}" if exc.errno else type(cause).__name__
            return f"connection closed as the request was sent ({how})"
        if exc.errno in (errno.ECONNRESET, errno.EPIPE):
            return "connection reset"
        return f"socket error ({exc.strerror or exc})"
    return type(exc).__name__


class Load:
    """Closed loop over HTTP/1.1 keep-alive: each client sends its next request when the last is answered."""

    def __init__(self, url: str, prompts: list[str], args: argparse.Namespace):
        self.url = url + "/v1/completions"
        self.prompts = prompts
        self.args = args
        self.records: list[Record] = []
        self.issued = 0
        self.stopping = False
        self.tasks: list[asyncio.Task] = []
        self.session = None
        self.description = ""
        self.crashes: list[str] = []

    async def start(self) -> None:
        import aiohttp

        clients = self.args.clients
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=clients, limit_per_host=clients),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
        )
        self.description = f"aiohttp {metadata.version('aiohttp')}, up to {clients} HTTP/1.1 keep-alive connections"
        self.deadline = time.monotonic() + self.args.load_time_limit
        self.tasks = [asyncio.create_task(self._client(i)) for i in range(clients)]

    async def _client(self, index: int) -> None:
        args = self.args
        stream = (index * 100 // args.clients) < args.stream_percent  # the first stream_percent% of clients
        while not self.stopping and time.monotonic() < self.deadline:
            if args.max_requests and self.issued >= args.max_requests:
                return
            n = self.issued
            self.issued += 1
            body = {
                "prompt": self.prompts[n % len(self.prompts)],
                "max_tokens": args.max_tokens,
                "temperature": 0.0,
                "ignore_eos": True,
            }
            if stream:
                body["stream"] = True
                body["stream_options"] = {"include_usage": True}
            started = time.time()
            try:
                async with self.session.post(self.url, json=body) as response:
                    content = await response.read()
                    if response.status != 200:
                        failure = f"HTTP {response.status}{error_message(content)}"
                    elif stream:
                        failure = check_stream(content, args.max_tokens)
                    else:
                        failure = check_plain(content, args.max_tokens)
            except Exception as exc:  # noqa: BLE001  (each kind is counted)
                failure = classify(exc)
            self.records.append(Record(started, time.time(), stream, failure))
            if failure is not None and args.error_pause > 0:
                await asyncio.sleep(args.error_pause)

    async def stop(self, grace: float) -> None:
        """Let the requests in flight finish (bounded by `grace`), then close."""
        self.stopping = True
        done, pending = await asyncio.wait(self.tasks, timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                self.crashes.append(repr(task.exception()))
        if pending:
            self.crashes.append(f"{len(pending)} client(s) still waiting {grace:g} s after the load stopped")
        if self.session is not None:
            await self.session.close()

    def between(self, start: float, end: float) -> list[Record]:
        """The requests whose lifetime overlaps [start, end]."""
        return [r for r in self.records if r.started < end and r.ended > start]

    def inside(self, start: float, end: float) -> list[Record]:
        return [r for r in self.records if r.started >= start and r.ended <= end]


def failures_by_kind(records: list[Record]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for r in records:
        if r.failure is not None:
            kinds[r.failure] = kinds.get(r.failure, 0) + 1
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


def ok_latencies(records: list[Record]) -> list[float]:
    return [r.ended - r.started for r in records if r.failure is None]


# --- one change -------------------------------------------------------------------------------------


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


# --- main ---------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Hot reload of the daemon under a closed-loop load: time to the new generation, failed "
        "requests and p99 latency while each class of config change (live field, tokenizer, front-end, model "
        "worker) is applied by editing the watched config file.",
    )
    p.add_argument("--clients", type=int, default=64, help="closed-loop clients (HTTP/1.1 keep-alive connections)")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens of every completion (with ignore_eos)")
    p.add_argument(
        "--stream-percent", type=int, default=50, help="share of the clients that stream (SSE, with usage), in %%"
    )
    p.add_argument("--repeats", type=int, default=3, help="changes of each class; the table shows medians")
    p.add_argument(
        "--classes",
        default=",".join(CLASSES),
        help=f"comma-separated classes of change to run, in this order (default: {','.join(CLASSES)})",
    )
    p.add_argument("--lead-in", type=float, default=5.0, help="seconds of load before the steady-state measurement")
    p.add_argument("--steady", type=float, default=6.0, help="seconds of steady-state measurement (before and after)")
    p.add_argument("--settle", type=float, default=2.0, help="seconds after a reload before the next change")
    p.add_argument(
        "--window-tail", type=float, default=1.0, help="seconds after the config.reload event still in its window"
    )
    p.add_argument(
        "--trigger",
        choices=("file", "command"),
        default="file",
        help="file: the daemon's watcher (runtime.watch_config) sees the new file; command: watch_config off, "
        "and `daemon reload --format json` is run after each write",
    )
    p.add_argument("--reload-timeout", type=float, default=120.0, help="longest wait for one reload, in seconds")
    p.add_argument("--error-pause", type=float, default=0.1, help="seconds a client waits after a failed request")
    p.add_argument(
        "--max-requests", type=int, default=0, help="stop the load after this many requests (0: only by time)"
    )
    p.add_argument("--load-time-limit", type=float, default=600.0, help="seconds the load may run, at most")
    p.add_argument("--total-time-limit", type=int, default=900, help="seconds for the whole run, at most")
    p.add_argument("--warmup-rounds", type=int, default=2, help="bursts of --clients completions before the load")
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the work directory afterwards: config, daemon log, and every request in requests.csv",
    )
    args = p.parse_args()
    args.classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    if unknown := [c for c in args.classes if c not in CLASSES]:
        p.error(f"unknown class(es) {unknown}; choose from {', '.join(CLASSES)}")
    # What common.warm_up reads.
    args.concurrency, args.temperature, args.h1_client = args.clients, 0.0, "aiohttp"
    return args


def fmt_s(x: float) -> str:
    return "-" if x != x else f"{x:.2f}"


def fmt_ms(x: float) -> str:
    return "-" if x != x else f"{x * 1000:.0f}"


def med(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], f=fmt_s) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "-"
    if len(values) == 1:
        return f(values[0])
    return f"{f(statistics.median(values))} ({f(min(values))}-{f(max(values))})"


def kinds_text(kinds: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in kinds.items())


async def measure(
    args: argparse.Namespace,
    daemon: Server,
    values: dict[str, dict],
    config_path: Path,
    runtime_dir: Path,
    log: LogTail,
    prompts: list[str],
    out: dict,
) -> None:
    """The load and the changes; results go into `out` as they come (an abort keeps what was measured)."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    for signum in (signal.SIGTERM, signal.SIGALRM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda s=signum: (out.setdefault("cancelled_by", s), main.cancel()))

    load = Load(daemon.url, prompts, args)
    out["load"] = load
    await load.start()
    try:
        print(f"\nload running: {args.clients} clients; lead-in {args.lead_in:g} s", flush=True)
        await asyncio.sleep(args.lead_in)
        out["steady_before"] = (time.time(), time.time() + args.steady)
        await asyncio.sleep(args.steady)
        steady = load.inside(*out["steady_before"])
        print(
            f"steady state: {len(steady)} requests in {args.steady:g} s, p50 "
            f"{fmt_ms(percentile(ok_latencies(steady), 0.5))} ms, p99 {fmt_ms(percentile(ok_latencies(steady), 0.99))} "
            f"ms, failures {failures_by_kind(steady) or 0}",
            flush=True,
        )
        trials: list[Trial] = out["trials"]
        initial = values

        async def one(kind: str, repeat: int, new_values: dict[str, dict], change: str) -> None:
            nonlocal values
            label = f"change {repeat + 1}/{args.repeats}, {kind}" if kind in CLASSES else kind
            print(f"\n{label}: ", end="", flush=True)
            trial, values = await run_trial(
                kind, repeat, values, new_values, change, config_path, log, daemon, runtime_dir, args
            )
            trials.append(trial)
            print(
                f"{trial.change}: {trial.result} generation {trial.generation}, restarted "
                f"{trial.restarted or 'nothing'}, config.reload {fmt_s(trial.to_generation)} s after the write "
                f"(watcher {fmt_s(trial.detected - trial.written)} s, transaction {fmt_s(trial.duration_s)} s)"
                + (f"; {trial.reason}" if trial.reason else "")
                + (f"; daemon reload: {trial.command_report}" if trial.command_report else ""),
                flush=True,
            )

        for repeat in range(args.repeats):
            for kind in args.classes:
                await one(kind, repeat, *changed(values, kind))
        # Back to the starting config (one change of everything that differs), so that the steady
        # state after the changes runs the same config as the one before them.
        if differs := [
            f"{section}.{key} {values[section][key]} -> {wanted}"
            for section, keys in initial.items()
            for key, wanted in keys.items()
            if values[section][key] != wanted
        ]:
            await one("restore", 0, initial, "back to the start: " + ", ".join(differs))
        out["steady_after"] = (time.time(), time.time() + args.steady)
        await asyncio.sleep(args.steady)
    finally:
        print("\nstopping the load ...", flush=True)
        await load.stop(STOP_LOAD_GRACE_S)
        for signum in (signal.SIGTERM, signal.SIGALRM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def main() -> int:
    args = parse_args()
    client_loop = use_uvloop()

    t_begin = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="dm-reload-", dir="/tmp"))
    runtime_dir = Path(tempfile.mkdtemp(prefix="dm-", dir="/tmp"))  # short: Unix socket paths
    cache_dir = work / "cache"
    etc = work / "etc"  # the watched directory holds the config file alone
    etc.mkdir()
    config_path = etc / "server.toml"
    prompts = make_prompts(1024)
    daemon: Server | None = None
    log: LogTail | None = None
    out: dict = {"trials": []}
    notes: list[str] = []
    stop_line = ""
    reload_command = ""
    startup_load = float("nan")
    exit_code = 0

    reinstall_limits = limit_run(args.total_time_limit, Overtime)
    client = f"aiohttp {metadata.version('aiohttp')}, load client loop {client_loop}"
    print_header("hot reload", work, runtime_dir, f"{versions()}, {client}")
    print(f"bench command: {shlex.join([sys.executable, *sys.argv])}")

    try:
        from daemon.engine.demo_model import ensure_demo_model

        print(f"demo model: {ensure_demo_model(cache_dir)}")
        port = free_port()
        values = tomllib.loads(CONFIG.read_text())
        values["server"]["port"] = port
        values["server"]["workers"] = 1
        values["tokenizer"]["workers"] = 1
        values["scheduler"]["max_queued_requests"] = 1024
        values["model"]["seed"] = 0
        values["runtime"]["model_reload"] = "drain"
        values["logging"]["format"] = "json"
        values["runtime"].update(dir=str(runtime_dir), cache_dir=str(cache_dir))
        values["runtime"]["watch_config"] = args.trigger == "file"
        write_atomically(config_path, config_text(values))
        daemon = Server("daemon", [str(BIN / "daemon"), "-c", str(config_path)], clean_env(), port, work / "daemon.log")
        daemon.is_daemon = True
        log = LogTail(daemon.log_path)

        print("\n## commands")
        print(f"daemon: {shlex.join(daemon.argv)}  (cwd {REPO}; no DAEMON_* variables)")
        print(f"config ({config_path}), as started:\n")
        print("    " + config_text(values).strip().replace("\n", "\n    "))
        print(
            f"\nload: {args.clients} closed-loop clients, POST /v1/completions, max_tokens {args.max_tokens}, "
            f"ignore_eos, greedy, prompts of 3-9 words (seeded), {args.stream_percent}% of the clients streaming "
            f"(SSE with usage); aiohttp HTTP/1.1 keep-alive on {client_loop}, one client process; no retries "
            f"(a client pauses {args.error_pause:g} s after a failure); bounded to {args.load_time_limit:g} s"
            + (f" and {args.max_requests} requests" if args.max_requests else "")
        )
        how = (
            "the daemon's watcher (runtime.watch_config) reloads it"
            if args.trigger == "file"
            else f"then `{shlex.join(reload_argv(runtime_dir))}` reloads it"
        )
        print(
            f"changes: the config file is rewritten (temp file + os.replace) and {how}; classes "
            f"{', '.join(args.classes)}, {args.repeats} rounds, then one change back to the starting config"
        )

        deadline = time.monotonic() + START_TIMEOUT_S
        daemon.start()
        waited = wait_http_ok(daemon, "/health", deadline, ready_event='"daemon.ready"')
        print(f"\ndaemon ready after {waited:.1f} s on {daemon.url} (supervisor PID {daemon.process.pid})")
        log.poll()
        workers = [s for s in tier_startups(log.records) if s["tier"] == "worker"]
        if workers:
            startup_load = workers[0]["ready"] - workers[0]["started"]
            print(f"model load time at start (worker tier.started -> tier.ready, idle machine): {startup_load:.2f} s")

        t0 = time.monotonic()
        asyncio.run(asyncio.wait_for(warm_up(daemon.url, prompts, args, True, args.warmup_rounds), 120))
        print(f"warm-up: {time.monotonic() - t0:.1f} s")

        with contextlib.suppress(asyncio.CancelledError):  # a signal cancelled it: see out["cancelled_by"]
            asyncio.run(measure(args, daemon, values, config_path, runtime_dir, log, prompts, out))
        reinstall_limits()  # the loop's handlers are gone with it
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if (signum := out.get("cancelled_by")) == signal.SIGALRM:
            raise Overtime(f"the whole run took longer than --total-time-limit {args.total_time_limit} s")
        if signum is not None:
            raise KeyboardInterrupt(signal.Signals(signum).name)

        roles = daemon_processes(daemon, runtime_dir)
        out["processes"] = {role: len(pids) for role, pids in roles.items()}

        # One reload by command: nothing changed since the last one.
        reload_command = shlex.join(reload_argv(runtime_dir))
        done = subprocess.run(
            reload_argv(runtime_dir), capture_output=True, text=True, timeout=120, env=clean_env(), cwd=REPO
        )
        out["command_reload"] = describe_report(done.returncode, done.stdout, done.stderr)
    except Overtime as exc:
        exit_code = 1
        notes.append(f"benchmark aborted: {exc}")
    except KeyboardInterrupt as exc:
        exit_code = 130
        notes.append(f"interrupted ({exc or 'SIGINT'})")
    except Exception as exc:  # report what happened, still stop everything and print what was measured
        exit_code = 1
        notes.append(f"benchmark aborted: {type(exc).__name__}: {exc}")
        import traceback

        traceback.print_exc()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the stop below finish
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if daemon is not None:
            stop_line = daemon.stop()

    # --- report --------------------------------------------------------------------------------------
    trials: list[Trial] = out["trials"]
    load: Load | None = out.get("load")
    if load is not None:
        for trial in trials:
            trial.in_window = load.between(trial.written, trial.window_end)
            after = [r.ended for r in load.records if r.failure is None and r.started >= trial.applied]
            trial.first_ok = min(after) if after else float("nan")

    if load is not None and args.keep:
        with open(work / "requests.csv", "w") as stream:
            stream.write("started,ended,stream,failure\n")
            for r in load.records:
                stream.write(f"{r.started:.6f},{r.ended:.6f},{int(r.stream)},{json.dumps(r.failure or '')}\n")

    print("\n## shutdown")
    print(f"- daemon: {stop_line or 'not started'}")
    if daemon is not None and daemon.process is not None:
        still = marked_pids(daemon.process.pid)
        print(f"- processes left with the daemon's marker: {still or 'none'}")
    if "processes" in out:
        print(f"- the daemon's processes after the last change, by role: {out['processes']}")
    if "command_reload" in out:
        print(f"- `{reload_command}`: {out['command_reload']}")
    if load is not None and load.crashes:
        print(f"- load clients: {load.crashes}")
    if daemon is not None:
        findings = daemon_log_findings(daemon.log_path)
        print(f"\n## daemon log ({daemon.log_path}): {'nothing notable' if not findings else ''}")
        for line in findings[:25]:
            print(f"- {line}")

    if trials:
        print("\n## each change")
        print(
            "| # | change | result | restarted | watcher saw it | config.reload (time to new generation) | "
            "transaction (duration_s) | new tier(s) ready | new worker start -> ready | first OK request started "
            "after the event, done at | requests in window | failed | failures ended at | p99 in window ms | "
            "log warnings |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for i, t in enumerate(trials, 1):
            print(
                f"| {i} | {t.change} | {t.result} | {', '.join(t.restarted) or '-'} | "
                f"{fmt_s(t.detected - t.written)} | {fmt_s(t.to_generation)} | {fmt_s(t.duration_s)} | "
                f"{fmt_s(t.new_ready)} | {fmt_s(t.load_time)} | {fmt_s(t.first_ok - t.written)} | "
                f"{len(t.in_window)} | {kinds_text(t.failures) or 0} | {t.failed_at()} | {fmt_ms(t.p99)} | "
                f"{kinds_text(t.warnings) or '-'} |"
            )
        print("\n(all times in seconds from the os.replace of the config file)")
        for t in trials:
            if t.server_info:
                notes.append(f"after '{t.change}': {t.server_info}")
            if t.result != "applied":
                notes.append(f"'{t.change}' was {t.result}: {t.reason}")
            expected = EXPECTED_RESTART.get(t.kind)
            if expected is not None and sorted(t.restarted) != sorted(expected) and t.result == "applied":
                notes.append(f"'{t.change}' restarted {t.restarted}, expected {expected}")

    print("\n## results")
    steady_before = load.inside(*out["steady_before"]) if load and "steady_before" in out else []
    steady_after = load.inside(*out["steady_after"]) if load and "steady_after" in out else []
    steady_p99 = percentile(ok_latencies(steady_before), 0.99)
    if load is not None:
        span = (max(r.ended for r in load.records) - min(r.started for r in load.records)) if load.records else 0.0
        windows = [r for t in trials for r in t.in_window]
        seen = {id(r) for r in windows}
        outside = [r for r in load.records if id(r) not in seen]
        print(
            f"Machine: nproc {os.cpu_count()} ({cpu_model()}); the load client shares its cores with the daemon. "
            f"Load: {args.clients} closed-loop clients over aiohttp HTTP/1.1 keep-alive, completions with "
            f"max_tokens {args.max_tokens} (ignore_eos), {args.stream_percent}% of the clients streaming, no "
            f"retries; {len(load.records)} requests in {span:.0f} s, {len(windows)} of them in reload windows; "
            f"failures outside the windows: {kinds_text(failures_by_kind(outside)) or 0}. "
            f"Steady state ({args.steady:g} s before the first change): "
            f"{len(steady_before) / args.steady:.0f} req/s, p50 {fmt_ms(percentile(ok_latencies(steady_before), 0.5))}"
            f" ms, p99 {fmt_ms(steady_p99)} ms; after the changes and the change back to it: "
            + (
                f"{len(steady_after) / args.steady:.0f} req/s, p50 "
                f"{fmt_ms(percentile(ok_latencies(steady_after), 0.5))} ms, p99 "
                f"{fmt_ms(percentile(ok_latencies(steady_after), 0.99))} ms"
                if steady_after
                else "not measured"
            )
            + ". Model load time at start "
            f"(worker tier.started -> tier.ready, idle): {fmt_s(startup_load)} s. {args.repeats} changes per "
            f"class: medians (min-max)."
        )
    print()
    print(
        "| change class | restarted tier | time to new generation (config.reload), s | first OK request "
        "after it, s | goal, s | met | failed requests (all changes) | p99 during reload vs steady p99, ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for kind in args.classes:
        of_kind = [t for t in trials if t.kind == kind]
        if not of_kind:
            continue
        restarted = sorted({tier for t in of_kind for tier in t.restarted}) or ["none (live)"]
        times = [t.to_generation for t in of_kind]
        if kind.startswith("model"):
            goal = f"< load + {MODEL_GOAL_EXTRA_S:g} s (load {spread([t.load_time for t in of_kind])})"
        else:
            goal = f"< {GOAL_S[kind]:g}"
        met = sum(1 for t in of_kind if t.result == "applied" and t.to_serving < t.goal())
        failed: dict[str, int] = {}
        for t in of_kind:
            for k, n in t.failures.items():
                failed[k] = failed.get(k, 0) + n
        total_failed = sum(failed.values())
        in_windows = sum(len(t.in_window) for t in of_kind)
        failed_cell = f"{total_failed} of {in_windows}" + (f": {kinds_text(failed)}" if failed else "")
        p99s = [t.p99 for t in of_kind]
        ratio = f" ({med(p99s) / steady_p99:.1f}x)" if steady_p99 == steady_p99 and steady_p99 else ""
        print(
            f"| {DESCRIPTION[kind]} | {', '.join(restarted)} | {spread(times)} | "
            f"{spread([t.to_serving for t in of_kind])} | {goal} | {met}/{len(of_kind)} | "
            f"{failed_cell} | {spread(p99s, fmt_ms)} vs {fmt_ms(steady_p99)}{ratio} |"
        )
    delay = "the file watch's debounce" if args.trigger == "file" else "the start of the `daemon reload` client"
    print(
        "\nTime to new generation: from the os.replace of the config file to the supervisor's config.reload "
        f"event ({delay} included; the transaction ends once old tiers have drained); first OK "
        "request after it: to the end of the first request that started after that event and succeeded (served by "
        "the new generation's processes); the goal counts as met when that request ended within it. Reload "
        f"window: from the write to {args.window_tail:g} s after that event; a request counts when its lifetime "
        "overlaps it. Steady p99: the requests wholly inside the steady-state measurement before the first change."
    )
    print_notes(notes)
    print(f"\nwhole run: {time.monotonic() - t_begin:.0f} s")
    if remove_work(work, runtime_dir, keep=bool(args.keep or exit_code)):
        print(f"logs kept in {work}")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
