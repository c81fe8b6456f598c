"""Running the real daemon in tests: start it, wait until it serves, stop it and everything it started.

Every process the daemon starts carries DAEMON_PARENT_PID in its environment;
cleanup finds them by that, through /proc, and kills any that outlive the
supervisor, so a failing test never leaves processes behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from conftest import DAEMON, clean_environ
from prometheus_client.parser import text_string_to_metric_families

READY_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def taken_port() -> Iterator[int]:
    """A port another program listens on, for as long as the block runs."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(8)
        yield holder.getsockname()[1]


def descendants(supervisor_pid: int) -> list[int]:
    """PIDs of live processes started by the supervisor (they carry DAEMON_PARENT_PID=<pid>)."""
    marker = f"DAEMON_PARENT_PID={supervisor_pid}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found


@dataclass
class RunningDaemon:
    process: subprocess.Popen
    port: int
    config_path: Path
    runtime_dir: Path
    log_path: Path
    scheme: str = "http"
    _log_offset: int = field(default=0)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def socket_dir(self) -> Path:
        return self.runtime_dir / f"daemon-{self.pid}"

    def log_events(self) -> list[dict]:
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                events.append(json.loads(line))
        return events

    def wait_for_event(self, event: str, timeout: float = READY_TIMEOUT_S, **fields) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.log_events():
                if record.get("event") == event and all(record.get(k) == v for k, v in fields.items()):
                    return record
            if self.process.poll() is not None:
                raise AssertionError(
                    f"the daemon exited ({self.process.returncode}) before {event}:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        raise AssertionError(f"no {event} {fields} within {timeout} s:\n{self.log_tail()}")

    def tier_pids(self) -> dict[str, int]:
        status = json.loads((self.socket_dir / "status.json").read_text())
        return {f"{t['tier']}-{t['index']}": t["pid"] for t in status["tiers"]}

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM the supervisor and wait for it (SIGKILL after `timeout`); its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode

    def stop(self, timeout: float = 60.0) -> int:
        """terminate(); then kill whatever is left, supervisor and descendants, by PID."""
        self.terminate(timeout)
        kill_leftovers(self.pid)
        return self.process.returncode


def kill_leftovers(supervisor_pid: int) -> list[int]:
    leftovers = descendants(supervisor_pid)
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return leftovers


def start_daemon(
    directory: Path,
    runtime_dir: Path,
    cache_dir: Path,
    settings: dict[str, object] | None = None,
    *,
    env: dict | None = None,
    wait: bool = True,
) -> RunningDaemon:
    """Start `daemon -c` on a free port, serving the demo model, with `settings` given as --set key=value."""
    port = free_port()
    config_path = directory / "server.toml"
    config_path.write_text(
        f'[server]\nport = {port}\n[model]\npath = "builtin:demo"\n'
        f'[runtime]\ndir = "{runtime_dir}"\ncache_dir = "{cache_dir}"\ndrain_timeout_s = 10\n'
    )
    sets = []
    for key, value in (settings or {}).items():
        sets += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    log_path = directory / "daemon.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(DAEMON), "-c", str(config_path), *sets],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=clean_environ(**(env or {})),
            start_new_session=True,
        )
    scheme = "https" if (settings or {}).get("server.tls.certfile") else "http"
    daemon = RunningDaemon(process, port, config_path, runtime_dir, log_path, scheme)
    if wait:
        try:
            daemon.wait_for_event("daemon.ready")
        except BaseException:
            daemon.stop()
            raise
    return daemon


def wait_gone(supervisor_pid: int, timeout: float) -> list[int]:
    """Wait until no process of `supervisor_pid`'s tree is left; those still there after `timeout`."""
    deadline = time.monotonic() + timeout
    while (left := descendants(supervisor_pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def describe(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            out.append(f"{pid}: {command}")
        except OSError:
            out.append(f"{pid}: (gone)")
    return out


def scrape(daemon: RunningDaemon) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    text = httpx.get(daemon.url + "/metrics", timeout=5).raise_for_status().text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def read_completion_stream(response, outcome, *, give_up_after: float) -> None:
    """Read an SSE completion stream into `outcome` (kind, detail, chunks, first_chunk_at):
    complete after `[DONE]` with a finish_reason, sse-error on an error event, incomplete when it
    just ends, hang when it goes on past `give_up_after` (a time.monotonic() deadline)."""
    finished = None
    for line in response.iter_lines():
        if time.monotonic() > give_up_after:
            outcome.kind, outcome.detail = "hang", "the stream went on too long"
            return
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            outcome.kind = "complete" if finished else "unexpected"
            outcome.detail = f"[DONE] after finish_reason {finished}"
            return
        event = json.loads(data)
        if "error" in event:
            outcome.kind, outcome.detail = "sse-error", json.dumps(event["error"])
            return
        outcome.chunks += 1
        if outcome.first_chunk_at is None:
            outcome.first_chunk_at = time.monotonic()
        finished = finished or (event.get("choices") or [{}])[0].get("finish_reason")
    outcome.kind, outcome.detail = "incomplete", "the stream ended with neither [DONE] nor an error"


def stop_daemons(started: list[RunningDaemon], runtime_dir: Path, *, drain_s: float) -> None:
    """A fixture's teardown: SIGTERM each daemon still running (SIGKILL after `drain_s`), kill
    whatever it left by PID, remove the runtime dir; fail if any process outlived its supervisor."""
    import shutil

    survivors = {}
    for daemon in started:
        daemon.terminate(drain_s)
        if left := wait_gone(daemon.pid, 5.0):
            survivors[daemon.pid] = describe(left)
        daemon.stop()  # kills whatever is left, by PID
    shutil.rmtree(runtime_dir, ignore_errors=True)
    assert not survivors, f"processes outlived their supervisor: {survivors}"


@contextlib.contextmanager
def serving(
    directory: Path, cache_dir: Path, settings: dict[str, object] | None = None, *, env: dict | None = None
) -> Iterator[RunningDaemon]:
    """A daemon serving for the length of the block (a module fixture's body), in its own short
    runtime dir; afterwards it must have stopped cleanly (exit 0), and the dir is removed."""
    import shutil
    import tempfile

    runtime = Path(tempfile.mkdtemp(prefix="dm-", dir="/tmp"))  # short: it holds Unix socket paths
    try:
        running = start_daemon(directory, runtime, cache_dir, settings, env=env)  # stopped if it fails
    except BaseException:
        shutil.rmtree(runtime, ignore_errors=True)
        raise
    try:
        yield running
    finally:
        status = running.stop()
        shutil.rmtree(runtime, ignore_errors=True)
    assert status == 0, running.log_tail()
