"""Tests for daemon/logs.py: every scenario runs in a real child process.

Logging configuration is process-global (root handlers, structlog's global config,
the module's `_role`), so each test starts a fresh interpreter with
`sys.executable -c SCRIPT`, lets it log to a pipe or a pseudo-terminal, and checks
what actually came out. Children print their own PID on stdout so the `pid` field
can be compared with the real one.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness.daemons import REPO, clean_environ

CHILD_TIMEOUT = 30.0  # seconds; every wait on a child is bounded by this
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

PRELUDE = """\
import logging, os, sys
import structlog
from daemon.logs import configure_logging, get_logger
print(os.getpid(), flush=True)
"""


@dataclass
class Child:
    pid: int
    returncode: int
    stdout: str
    stderr: str  # for a TTY child: what was read from the pty master, CRs removed

    @property
    def reported_pid(self) -> int:
        return int(self.stdout.splitlines()[0])

    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    def records(self) -> list[dict]:
        """Every stderr line, parsed as a JSON object (fails the test if one is not)."""
        out = []
        for line in self.lines():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:  # pragma: no cover - the assertion message is the point
                pytest.fail(f"stderr line is not JSON: {line!r}\nfull stderr:\n{self.stderr}")
            assert isinstance(obj, dict), line
            out.append(obj)
        return out

    def by_event(self, event: str) -> list[dict]:
        return [r for r in self.records() if r.get("event") == event]


def _env(extra_pythonpath: Path | None = None) -> dict[str, str]:
    env = clean_environ(PYTHONUNBUFFERED="1")
    for key in ("NO_COLOR", "FORCE_COLOR", "PYTHONWARNINGS"):
        env.pop(key, None)
    if extra_pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(extra_pythonpath), env.get("PYTHONPATH", "")) if p)
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the child and anything it started (it runs in its own session)."""
    # killpg even when the child itself has exited: a grandchild may still be running
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def run_child(body: str, *, tty: bool = False, pythonpath: Path | None = None, timeout: float = CHILD_TIMEOUT) -> Child:
    """Run PRELUDE + body in a fresh interpreter; stderr is a pipe, or a pty slave when `tty`."""
    script = PRELUDE + textwrap.dedent(body)
    master = slave = None
    if tty:
        master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave if tty else subprocess.PIPE,
        cwd=REPO,
        env=_env(pythonpath),
        start_new_session=True,
    )
    try:
        if not tty:
            out, err = proc.communicate(timeout=timeout)
            return Child(proc.pid, proc.returncode, out.decode(), err.decode())
        os.close(slave)
        slave = None
        chunks: list[bytes] = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"child on a pty did not finish within {timeout}s; got so far: {b''.join(chunks)!r}")
            ready, _, _ = select.select([master], [], [], remaining)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError as exc:  # Linux: EIO once every slave end is closed
                if exc.errno == errno.EIO:
                    break
                raise
            if not data:
                break
            chunks.append(data)
        out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        text = b"".join(chunks).decode(errors="replace").replace("\r", "")
        return Child(proc.pid, proc.returncode, out.decode(), text)
    finally:
        _kill_group(proc)
        if master is not None:
            os.close(master)
        if slave is not None:
            os.close(slave)


def assert_ok(child: Child) -> None:
    assert child.returncode == 0, (
        f"child failed (rc={child.returncode})\nstdout:\n{child.stdout}\nstderr:\n{child.stderr}"
    )
    assert child.reported_pid == child.pid


def assert_iso_utc(value: str) -> None:
    assert isinstance(value, str)
    assert "T" in value, value
    parsed = datetime.datetime.fromisoformat(value)
    assert parsed.utcoffset() == datetime.timedelta(0), f"timestamp not UTC: {value}"
    now = datetime.datetime.now(datetime.UTC)
    assert abs((now - parsed).total_seconds()) < 600, f"timestamp far from now: {value}"


def is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


# --------------------------------------------------------------------------- JSON on a pipe


def test_json_on_pipe_structlog_and_stdlib_lines_share_shape():
    child = run_child("""
        configure_logging("gateway")
        log = get_logger("daemon.test")
        structlog.contextvars.bind_contextvars(request_id="req-42")
        log.info("structlog hello", model="tiny", attempt=3)
        log.bind(tenant="acme").warning("bound warning")
        logging.getLogger("granian").warning("granian says %s", "hi")
        logging.getLogger("some.lib").info("lib info %d", 7)
        structlog.contextvars.clear_contextvars()
        log.info("after clear")
    """)
    assert_ok(child)
    # stdout carries only the PID: nothing leaked to structlog's default PrintLogger on stdout
    assert child.stdout.split() == [str(child.pid)]
    records = child.records()
    assert [r["event"] for r in records] == [
        "structlog hello",
        "bound warning",
        "granian says hi",
        "lib info 7",
        "after clear",
    ]
    for r in records:
        assert r["role"] == "gateway"
        assert r["pid"] == child.pid
        assert_iso_utc(r["timestamp"])
        assert r["level"] in {"info", "warning"}

    # the keys every line has come first, in a fixed order (readable JSON in a terminal too)
    for r in records:
        assert list(r)[:6] == ["timestamp", "level", "role", "pid", "logger", "event"], r

    hello, bound, granian, lib, after = records
    assert hello["level"] == "info"
    assert hello["model"] == "tiny" and hello["attempt"] == 3
    assert hello["request_id"] == "req-42"
    assert hello["logger"] == "daemon.test"
    assert bound["level"] == "warning" and bound["tenant"] == "acme" and bound["request_id"] == "req-42"
    assert granian["level"] == "warning" and granian["logger"] == "granian"
    assert granian["request_id"] == "req-42"  # contextvars reach stdlib records too
    assert lib["level"] == "info" and lib["logger"] == "some.lib" and lib["request_id"] == "req-42"
    assert "request_id" not in after


def test_logger_obtained_before_configure_follows_configuration():
    """The module-level `log = get_logger(__name__)` pattern: obtained before configure_logging runs."""
    child = run_child("""
        log = get_logger("early.module")
        configure_logging("early")
        log.info("early logger event", k="v")
    """)
    assert_ok(child)
    assert child.stdout.split() == [str(child.pid)]
    [rec] = child.by_event("early logger event")
    assert rec["role"] == "early" and rec["pid"] == child.pid and rec["k"] == "v"


def test_logger_used_before_configure_is_not_stuck_on_the_default_config():
    """An import-time log call happens before configure_logging; later calls through the
    same logger object must still be routed to the configured handler as JSON."""
    child = run_child("""
        log = get_logger("import.time")
        log.info("pre-configure event")  # structlog's default config: printed to stdout
        configure_logging("late")
        log.info("post-configure event")
    """)
    assert_ok(child)
    assert "pre-configure event" in child.stdout
    assert "post-configure event" not in child.stdout
    [rec] = child.records()
    assert rec["event"] == "post-configure event" and rec["role"] == "late" and rec["pid"] == child.pid


def test_explicit_stream_argument_is_used():
    child = run_child("""
        configure_logging("streamed", stream=sys.stdout)
        get_logger().warning("to stdout")
        logging.getLogger("some.lib").warning("lib to stdout")
        sys.stdout.flush()
    """)
    assert_ok(child)
    assert child.stderr.strip() == ""
    lines = child.stdout.splitlines()[1:]
    recs = [json.loads(line) for line in lines if line.strip()]
    assert [r["event"] for r in recs] == ["to stdout", "lib to stdout"]
    assert all(r["role"] == "streamed" and r["pid"] == child.pid for r in recs)


# --------------------------------------------------------------------------- exceptions


def test_exception_renders_as_single_json_line_with_traceback():
    child = run_child("""
        configure_logging("worker")
        log = get_logger("daemon.worker")
        def fail_inner():
            raise ValueError("inner-marker-123")
        try:
            fail_inner()
        except ValueError:
            log.exception("structlog failure", step="load")
        try:
            {}["missing-key-marker"]
        except KeyError:
            logging.getLogger("some.lib").exception("stdlib failure")
        log.info("after failures")
    """)
    assert_ok(child)
    lines = child.lines()
    records = child.records()  # every line is JSON: the traceback did not spill onto its own lines
    assert len(lines) == 3
    assert [r["event"] for r in records] == ["structlog failure", "stdlib failure", "after failures"]

    s, lib, after = records
    assert s["level"] == "error" and s["step"] == "load"
    assert s["role"] == "worker" and s["pid"] == child.pid
    assert "Traceback (most recent call last)" in s["exception"]
    assert "fail_inner" in s["exception"]
    assert "ValueError: inner-marker-123" in s["exception"]
    assert "exc_info" not in s

    assert lib["level"] == "error" and lib["logger"] == "some.lib"
    assert lib["role"] == "worker" and lib["pid"] == child.pid
    assert "Traceback (most recent call last)" in lib["exception"]
    assert "KeyError: 'missing-key-marker'" in lib["exception"]
    assert "exc_info" not in lib

    assert "exception" not in after


# --------------------------------------------------------------------------- levels and reconfiguration


def test_level_filtering_and_live_reconfiguration():
    child = run_child("""
        lib = logging.getLogger("some.lib")
        log = get_logger("daemon.lvl")
        configure_logging("lvl", level="warning")
        bound_before = get_logger("daemon.bound").bind(b=1)  # bound while level is warning
        log.debug("s-debug-1"); log.info("s-info-1"); log.warning("s-warn-1"); log.error("s-error-1")
        lib.debug("l-debug-1"); lib.info("l-info-1"); lib.warning("l-warn-1")
        bound_before.info("b-info-1")

        configure_logging("lvl", level="debug")
        log.debug("s-debug-2"); log.info("s-info-2")
        lib.debug("l-debug-2"); lib.info("l-info-2")
        bound_before.debug("b-debug-2")

        configure_logging("lvl", level="error")
        log.warning("s-warn-3"); lib.warning("l-warn-3"); bound_before.warning("b-warn-3")
        log.error("s-error-3"); lib.error("l-error-3")
        print("handlers", len(logging.getLogger().handlers), flush=True)
    """)
    assert_ok(child)
    assert "handlers 1" in child.stdout, child.stdout
    events = [r["event"] for r in child.records()]
    expected = [
        "s-warn-1",
        "s-error-1",
        "l-warn-1",
        "s-debug-2",
        "s-info-2",
        "l-debug-2",
        "l-info-2",
        "b-debug-2",
        "s-error-3",
        "l-error-3",
    ]
    # exactly these, in order, each exactly once: no dropped-but-expected lines, no duplicates
    assert events == expected, child.stderr
    for r in child.records():
        assert r["role"] == "lvl" and r["pid"] == child.pid
    [dbg] = child.by_event("s-debug-2")
    assert dbg["level"] == "debug"


def test_reconfigure_changes_format_and_role_without_duplicates():
    child = run_child("""
        configure_logging("first", fmt="json")
        get_logger().info("json-line")
        logging.getLogger("some.lib").warning("json-lib-line")
        configure_logging("second", fmt="console")
        get_logger().info("console-line")
        logging.getLogger("some.lib").warning("console-lib-line")
    """)
    assert_ok(child)
    lines = child.lines()
    assert len(lines) == 4, child.stderr
    first = [json.loads(line) for line in lines[:2]]
    assert [r["event"] for r in first] == ["json-line", "json-lib-line"]
    assert all(r["role"] == "first" for r in first)
    for line, event in zip(lines[2:], ["console-line", "console-lib-line"], strict=True):
        assert not is_json_object(line), line
        assert event in line
        assert "role=second" in ANSI.sub("", line)
    assert sum("console-line" in line for line in lines) == 1


# --------------------------------------------------------------------------- console vs JSON by TTY / fmt


CONSOLE_BODY = """
    configure_logging("tty-role", fmt={fmt!r})
    structlog.contextvars.bind_contextvars(request_id="rq-tty")
    get_logger("daemon.tty").info("tty structlog event", answer=42)
    logging.getLogger("granian").warning("tty granian event")
    print("isatty", sys.stderr.isatty(), flush=True)
"""


def test_auto_on_tty_renders_console_not_json():
    child = run_child(CONSOLE_BODY.format(fmt="auto"), tty=True)
    assert_ok(child)
    assert "isatty True" in child.stdout  # the child really had a terminal on stderr
    lines = child.lines()
    assert len(lines) == 2, child.stderr
    assert not any(is_json_object(line) for line in lines), child.stderr
    assert ANSI.search(child.stderr), "console output on a terminal is coloured"
    plain = [ANSI.sub("", line) for line in lines]
    assert "tty structlog event" in plain[0] and "tty granian event" in plain[1]
    for line in plain:
        assert "role=tty-role" in line
        assert f"pid={child.pid}" in line
        assert "request_id=rq-tty" in line
    assert "answer=42" in plain[0]
    assert "info" in plain[0] and "warning" in plain[1]


def test_console_fmt_on_pipe_renders_console_without_colour():
    child = run_child(CONSOLE_BODY.format(fmt="console"))
    assert_ok(child)
    assert "isatty False" in child.stdout
    lines = child.lines()
    assert len(lines) == 2, child.stderr
    assert not any(is_json_object(line) for line in lines), child.stderr
    assert not ANSI.search(child.stderr), "no colour codes when the stream is not a terminal"
    assert "tty structlog event" in lines[0] and "tty granian event" in lines[1]
    assert all("role=tty-role" in line and f"pid={child.pid}" in line for line in lines)


def test_json_fmt_on_tty_renders_json():
    child = run_child(CONSOLE_BODY.format(fmt="json"), tty=True)
    assert_ok(child)
    assert "isatty True" in child.stdout
    assert not ANSI.search(child.stderr)
    records = child.records()
    assert [r["event"] for r in records] == ["tty structlog event", "tty granian event"]
    for r in records:
        assert r["role"] == "tty-role" and r["pid"] == child.pid and r["request_id"] == "rq-tty"
        assert_iso_utc(r["timestamp"])
    assert records[0]["answer"] == 42


# --------------------------------------------------------------------------- child processes


ENTRY_MODULE = """\
import logging, os, sys
from daemon.logs import configure_logging, get_logger

log = get_logger(__name__)  # module level, before configure_logging: the tier pattern


def tier_main(role):
    configure_logging(role)
    log.info("tier started", tier_pid=os.getpid())
    logging.getLogger("some.lib").warning("tier lib warning")
    try:
        raise RuntimeError("tier-crash-marker")
    except RuntimeError:
        log.exception("tier failure")
"""


def test_spawned_child_configures_its_own_logging(tmp_path: Path):
    (tmp_path / "tier_entry.py").write_text(ENTRY_MODULE)
    child = run_child(
        """
        import multiprocessing
        import tier_entry
        configure_logging("supervisor")
        log = get_logger("daemon.supervisor")
        log.info("supervisor starting tier")
        ctx = multiprocessing.get_context("spawn")
        proc = ctx.Process(target=tier_entry.tier_main, args=("engine-0",))
        proc.start()
        try:
            proc.join(20)
            print("tier", proc.pid, proc.exitcode, flush=True)
        finally:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        log.info("supervisor done")
    """,
        pythonpath=tmp_path,
    )
    assert_ok(child)
    tier_line = [line for line in child.stdout.splitlines() if line.startswith("tier ")]
    assert len(tier_line) == 1, child.stdout
    _, tier_pid, exitcode = tier_line[0].split()
    tier_pid = int(tier_pid)
    assert exitcode == "0", child.stderr
    assert tier_pid != child.pid

    records = child.records()  # every line, from both processes, is JSON
    sup = [r for r in records if r["role"] == "supervisor"]
    tier = [r for r in records if r["role"] == "engine-0"]
    assert len(sup) + len(tier) == len(records)
    assert [r["event"] for r in sup] == ["supervisor starting tier", "supervisor done"]
    assert all(r["pid"] == child.pid for r in sup)
    assert [r["event"] for r in tier] == ["tier started", "tier lib warning", "tier failure"]
    for r in tier:
        assert r["pid"] == tier_pid
        assert_iso_utc(r["timestamp"])
    assert tier[0]["tier_pid"] == tier_pid
    assert tier[0]["logger"] == "tier_entry"
    assert tier[1]["logger"] == "some.lib" and tier[1]["level"] == "warning"
    assert "RuntimeError: tier-crash-marker" in tier[2]["exception"]


def test_forked_child_logs_its_own_pid():
    """The module's comment promises forked children log their own PID (read per line)."""
    child = run_child("""
        configure_logging("parent-role")
        log = get_logger()
        log.info("before fork")
        pid = os.fork()
        if pid == 0:
            try:
                log.info("in forked child", child_pid=os.getpid())
                logging.getLogger("some.lib").info("lib in forked child")
                sys.stderr.flush()
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        print("forked", pid, status, flush=True)
        log.info("after fork")
    """)
    assert_ok(child)
    forked = [line for line in child.stdout.splitlines() if line.startswith("forked ")]
    assert len(forked) == 1
    _, fork_pid, status = forked[0].split()
    fork_pid = int(fork_pid)
    assert status == "0"
    records = child.records()
    assert [r["event"] for r in records] == ["before fork", "in forked child", "lib in forked child", "after fork"]
    assert records[0]["pid"] == records[3]["pid"] == child.pid
    assert records[1]["pid"] == records[2]["pid"] == records[1]["child_pid"] == fork_pid
    assert all(r["role"] == "parent-role" for r in records)


def test_reserved_keys_always_describe_the_writing_process():
    child = run_child(
        """
        configure_logging("supervisor", fmt="json")
        get_logger("daemon.test").info("tier.started", pid=12345, role="frontend", child_pid=12345)
        """
    )
    assert child.returncode == 0, child.stderr
    (record,) = child.by_event("tier.started")
    assert record["pid"] == child.reported_pid and record["role"] == "supervisor"
    assert record["child_pid"] == 12345


def test_warnings_and_uncaught_exceptions_are_log_lines_too():
    child = run_child(
        """
        import warnings
        configure_logging("tokenizer", fmt="json")
        warnings.warn("this option is deprecated")
        raise RuntimeError("boom")
        """
    )
    assert child.returncode == 1
    records = child.records()  # fails if any stderr line is not JSON
    warning = next(r for r in records if "this option is deprecated" in r["event"])
    assert warning["level"] == "warning" and warning["role"] == "tokenizer"
    crash = next(r for r in records if r["event"] == "uncaught exception")
    assert crash["level"] == "critical" and "RuntimeError: boom" in crash["exception"]


# --------------------------------------------------------------------------- the daemon's own processes


# Put first on PYTHONPATH, this runs at the start of every Python process of the daemon. It warns
# once as a process starts importing the module that makes it what it is, before that module's own
# imports run (as torch warns about a missing numpy while the worker imports it), and once as the
# supervisor opens the config file, before the config has said how to log.
WARN_EARLY = """\
import sys, warnings

MODULES = {
    "daemon.supervisor.supervisor", "daemon.worker.service", "daemon.scheduler.service",
    "daemon.tokenizer.service", "daemon.frontend.server", "daemon.frontend.app",
}
warned = set()


def warn_early(event, args):
    if event == "import" and args[0] in MODULES and args[0] not in warned:
        warned.add(args[0])
        warnings.warn(f"early warning while importing {args[0]}")
    elif event == "open" and str(args[0]).endswith("server.toml") and "config" not in warned:
        warned.add("config")
        warnings.warn("early warning while reading server.toml")


sys.addaudithook(warn_early)
"""


def test_early_warnings_in_every_process_are_json_log_lines(tmp_path: Path, short_tmp: Path, model_cache: Path):
    from harness.daemons import start_daemon

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(WARN_EARLY)
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(hooks), os.environ.get("PYTHONPATH", "")) if p)}
    daemon = start_daemon(tmp_path, short_tmp, model_cache, env=env)
    try:
        lines = daemon.log_path.read_text().splitlines()
        raw = [line for line in lines if not is_json_object(line)]
        assert not raw, "lines that are not JSON log lines:\n" + "\n".join(raw)
        warned = {}
        for record in map(json.loads, lines):
            if "early warning while " in record["event"]:
                assert record["level"] == "warning" and record["logger"] == "py.warnings", record
                warned[record["event"].split("early warning while ")[1].split("\n")[0]] = record["role"]
        assert warned == {
            "reading server.toml": "supervisor",
            "importing daemon.supervisor.supervisor": "supervisor",
            "importing daemon.worker.service": "worker",
            "importing daemon.scheduler.service": "scheduler",
            "importing daemon.tokenizer.service": "tokenizer",
            "importing daemon.frontend.server": "frontend",
            "importing daemon.frontend.app": "frontend",
        }, daemon.log_tail()
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
