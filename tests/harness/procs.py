"""Processes and ports as /proc and the kernel tell them: a daemon's process tree, a process's children and
parent, the directories it watches, free and taken ports.

Every process the daemon starts carries DAEMON_PARENT_PID=<supervisor pid> in its environment: that is
how its tree is found, and killed, whatever became of the supervisor.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

from harness.wait import until


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


def children(pid: int) -> set[int]:
    """The live child processes of `pid`."""
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


def describe(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            out.append(f"{pid}: {command}")
        except OSError:
            out.append(f"{pid}: (gone)")
    return out


def kill_leftovers(supervisor_pid: int) -> list[int]:
    """SIGKILL every process of the supervisor's tree still there; their PIDs."""
    leftovers = descendants(supervisor_pid)
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return leftovers


def wait_gone(supervisor_pid: int, timeout: float) -> list[int]:
    """Wait until no process of `supervisor_pid`'s tree is left; those still there after `timeout`."""
    with contextlib.suppress(AssertionError):
        until(lambda: not descendants(supervisor_pid), timeout, interval=0.05)
    return descendants(supervisor_pid)


def watches(pid: int, directory: Path) -> bool:
    """Whether `pid` holds an inotify watch on `directory` (as a file watcher does once it is set up)."""
    wanted = f"ino:{directory.stat().st_ino:x} "
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        with contextlib.suppress(OSError):
            if any(line.startswith("inotify ") and wanted in line for line in info.read_text().splitlines()):
                return True
    return False
