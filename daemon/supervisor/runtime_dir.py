"""The private directory holding this supervisor's sockets and handed-over config.

A supervisor holds an exclusive lock on `lock` in its directory while it
lives; the kernel releases it when the process dies, however it dies. A
directory whose lock can be taken belongs to a dead supervisor, even if its
PID was reused since, and is removed at the next start.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path
from typing import IO

import structlog

from daemon.config.ownership import RUNTIME_DIR_FIX, unsafe_directory
from daemon.ipc.endpoints import SOCKET_DIR_PREFIX, socket_dir
from daemon.pids import pid_alive

log = structlog.get_logger("daemon.supervisor")
LOCK_FILE = "lock"


class RuntimeDirError(Exception):
    """The runtime directory cannot be used; the message says why and where."""


def create_socket_dir(runtime_dir: Path, pid: int) -> tuple[Path, IO[bytes]]:
    """Make and lock `<runtime_dir>/daemon-<pid>` (mode 0700), after removing those of dead supervisors.

    Returns the directory and its lock file, which must stay open while we live.
    """
    if problem := unsafe_directory(runtime_dir):
        raise RuntimeDirError(f"error[runtime.dir-unsafe] runtime.dir {problem}; fix: {RUNTIME_DIR_FIX}")
    try:
        runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        remove_stale_socket_dirs(runtime_dir)
        directory = socket_dir(runtime_dir, pid)
        shutil.rmtree(directory, ignore_errors=True)  # a previous process with our PID left it
        directory.mkdir(mode=0o700)
        os.chmod(directory, 0o700)  # whatever the umask
        # O_EXCL|O_NOFOLLOW: in a directory just made, a file already there was planted
        descriptor = os.open(directory / LOCK_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        lock = os.fdopen(descriptor, "wb")  # held open for our whole life
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        raise RuntimeDirError(f"cannot use runtime.dir {runtime_dir}: {exc.strerror or exc}") from None
    return directory, lock


def live_socket_dirs(runtime_dir: Path) -> list[tuple[int, Path]]:
    """(supervisor PID, socket directory) of every daemon running under `runtime_dir`."""
    found = []
    for candidate in sorted(runtime_dir.glob(f"{SOCKET_DIR_PREFIX}*")):
        suffix = candidate.name[len(SOCKET_DIR_PREFIX) :]
        if suffix.isdigit() and candidate.is_dir() and _in_use(candidate, int(suffix)):
            found.append((int(suffix), candidate))
    return found


def remove_stale_socket_dirs(runtime_dir: Path) -> None:
    for candidate in runtime_dir.glob(f"{SOCKET_DIR_PREFIX}*"):
        suffix = candidate.name[len(SOCKET_DIR_PREFIX) :]
        if suffix.isdigit() and candidate.is_dir() and not _in_use(candidate, int(suffix)):
            shutil.rmtree(candidate, ignore_errors=True)
            log.info("supervisor.stale_socket_dir_removed", path=str(candidate))


def _in_use(directory: Path, pid: int) -> bool:
    try:
        with open(directory / LOCK_FILE, "rb") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            return False
    except FileNotFoundError:
        return pid_alive(pid)  # no lock file: judge by the PID alone
    except OSError:
        return True  # cannot tell: leave it
