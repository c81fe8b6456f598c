"""What every tier process does first: die with the supervisor, read its config, set up logs.

Tier processes are started by the supervisor with `DAEMON_PARENT_PID` and
`DAEMON_RUNTIME_DIR` in their environment, and find everything else from them:
the socket directory, the effective configuration the supervisor handed over,
the IPC endpoints. Granian's worker processes call this too, from the ASGI
lifespan, since Granian stands between them and the supervisor.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import threading
from dataclasses import dataclass

import structlog

from daemon.config.handoff import read_config
from daemon.config.schema import DaemonSettings
from daemon.ipc.endpoints import PARENT_PID_VAR, Endpoints
from daemon.logs import configure_logging
from daemon.pids import pid_alive

EPOCH_VAR = "DAEMON_TIER_EPOCH"  # how many times the supervisor has started this tier
_PR_SET_PDEATHSIG = 1
_EXIT_ORPHANED = 70


@dataclass(frozen=True)
class Tier:
    role: str
    index: int
    epoch: int
    supervisor_pid: int
    endpoints: Endpoints
    settings: DaemonSettings
    generation: int


def start_tier(role: str, index: int = 0) -> Tier:
    """Bootstrap a tier process: first thing in its entry point (spawned processes inherit nothing)."""
    endpoints = Endpoints.from_environment()
    supervisor_pid = int(os.environ[PARENT_PID_VAR])
    die_with_parent()
    watch_supervisor(supervisor_pid)
    settings, generation = read_config(endpoints.directory)
    configure_logging(role, level=settings.logging.level, fmt=settings.logging.format)
    structlog.contextvars.bind_contextvars(generation=generation)
    epoch = int(os.environ.get(EPOCH_VAR, "1"))
    return Tier(role, index, epoch, supervisor_pid, endpoints, settings, generation)


def die_with_parent() -> None:
    """Have the kernel kill this process when its parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return  # not Linux: the supervisor watch below still covers it
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(_EXIT_ORPHANED)


def watch_supervisor(supervisor_pid: int) -> None:
    """Exit at once when the supervisor dies, however many processes stand between us.

    A daemon thread waits on a pidfd (or polls, where pidfds are unavailable);
    no work happens in a signal handler.
    """

    def wait_then_exit() -> None:
        try:
            descriptor = os.pidfd_open(supervisor_pid)
        except (AttributeError, OSError):
            descriptor = None
        if descriptor is not None:
            select.select([descriptor], [], [])
        else:
            while pid_alive(supervisor_pid):
                threading.Event().wait(0.2)
        os._exit(_EXIT_ORPHANED)

    if not pid_alive(supervisor_pid):
        os._exit(_EXIT_ORPHANED)
    threading.Thread(target=wait_then_exit, name="supervisor-watch", daemon=True).start()
