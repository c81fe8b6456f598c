"""Running the real daemon in tests: start it, wait until it serves, stop it and everything it started.

Every process the daemon starts carries DAEMON_PARENT_PID in its environment; cleanup finds them
by that, through /proc, and kills any that outlive the supervisor, so a failing test never leaves
processes behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from harness.logs import READY_TIMEOUT_S, Log
from harness.procs import describe, free_port, kill_leftovers, wait_gone

REPO = Path(__file__).resolve().parents[2]
DAEMON = Path(sys.executable).parent / "daemon"  # the installed console script


def clean_environ(**extra: str) -> dict[str, str]:
    """The test process's environment without DAEMON_* overrides, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("DAEMON_")}
    env.update(extra)
    return env


def run_daemon(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    """Run the installed `daemon` command to completion and capture its output."""
    return subprocess.run(
        [str(DAEMON), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_environ(**(env or {})),
        cwd=cwd or REPO,
    )


def short_dir() -> Path:
    """A new temporary directory with a short path, for runtime dirs: Unix socket paths must fit in 107 bytes."""
    return Path(tempfile.mkdtemp(prefix="dm-", dir="/tmp"))


def popen_daemon(args: list[str], log_path: Path, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """`daemon ARGS` in a session of its own, its output (the JSON log) into `log_path`."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [str(DAEMON), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=clean_environ(**(env or {})),
            cwd=cwd,
            start_new_session=True,
        )


@dataclass
class RunningDaemon:
    process: subprocess.Popen
    port: int
    config_path: Path
    runtime_dir: Path
    log_path: Path
    scheme: str = "http"
    log: Log = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.log = Log(self.log_path, self.process)

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
        return list(self.log.poll())

    def events(self, name: str, **fields: object) -> list[dict]:
        """The log events named `name` with `fields` of these values, so far."""
        return self.log.since(0, name, **fields)

    def wait_for_event(self, event: str, timeout: float = READY_TIMEOUT_S, **fields) -> dict:
        """The first `event` with `fields` in the log, once there; AssertionError if the daemon exits first."""
        return self.log.wait(event, timeout=timeout, **fields)

    def tier_pids(self) -> dict[str, int]:
        status = json.loads((self.socket_dir / "status.json").read_text())
        return {f"{t['tier']}-{t['index']}": t["pid"] for t in status["tiers"]}

    def log_tail(self, lines: int = 40) -> str:
        return self.log.tail(lines)

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

    def stop_checked(self, timeout: float = 60.0) -> tuple[int, list[str]]:
        """stop(), noting what outlived the supervisor by 5 s: (its exit status, those processes)."""
        self.terminate(timeout)
        left = describe(wait_gone(self.pid, 5.0))
        return self.stop(), left


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
    process = popen_daemon(["-c", str(config_path), *sets], log_path, env)
    scheme = "https" if (settings or {}).get("server.tls.certfile") else "http"
    daemon = RunningDaemon(process, port, config_path, runtime_dir, log_path, scheme)
    if wait:
        try:
            daemon.wait_for_event("daemon.ready")
        except BaseException:
            daemon.stop()
            raise
    return daemon


def stop_daemons(started: list[RunningDaemon], runtime_dir: Path, *, drain_s: float) -> None:
    """A fixture's teardown: SIGTERM each daemon still running (SIGKILL after `drain_s`), kill
    whatever it left by PID, remove the runtime dir; fail if any process outlived its supervisor."""
    survivors = {}
    for daemon in started:
        _status, left = daemon.stop_checked(drain_s)
        if left:
            survivors[daemon.pid] = left
    shutil.rmtree(runtime_dir, ignore_errors=True)
    assert not survivors, f"processes outlived their supervisor: {survivors}"


@contextlib.contextmanager
def serving(
    directory: Path, cache_dir: Path, settings: dict[str, object] | None = None, *, env: dict | None = None
) -> Iterator[RunningDaemon]:
    """A daemon serving for the length of the block (a module fixture's body), in its own short
    runtime dir; afterwards it must have stopped cleanly (exit 0), and the dir is removed."""
    runtime = short_dir()
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
