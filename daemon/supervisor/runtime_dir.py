"""The private directory holding this supervisor's sockets and handed-over config."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import structlog

from daemon.ipc.endpoints import SOCKET_DIR_PREFIX, socket_dir
from daemon.pids import pid_alive

log = structlog.get_logger("daemon.supervisor")


def create_socket_dir(runtime_dir: Path, pid: int) -> Path:
    """Make `<runtime_dir>/daemon-<pid>` (mode 0700), after removing those of dead supervisors."""
    runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    remove_stale_socket_dirs(runtime_dir)
    directory = socket_dir(runtime_dir, pid)
    shutil.rmtree(directory, ignore_errors=True)  # a previous process with our PID left it
    directory.mkdir(mode=0o700)
    os.chmod(directory, 0o700)  # whatever the umask
    return directory


def remove_stale_socket_dirs(runtime_dir: Path) -> None:
    for candidate in runtime_dir.glob(f"{SOCKET_DIR_PREFIX}*"):
        suffix = candidate.name[len(SOCKET_DIR_PREFIX) :]
        if not suffix.isdigit() or pid_alive(int(suffix)):
            continue
        shutil.rmtree(candidate, ignore_errors=True)
        log.info("supervisor.stale_socket_dir_removed", path=str(candidate))
