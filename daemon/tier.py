"""What every tier process does first: die with its parents, read its config, set up logs.

Tier processes are started by the supervisor with `DAEMON_PARENT_PID` and
`DAEMON_RUNTIME_DIR` in their environment, and find everything else from them:
the socket directory, the effective configuration the supervisor handed over,
the IPC endpoints. Granian's worker processes call this too, from the ASGI
lifespan, since Granian stands between them and the supervisor.

Only the supervisor decides when a back-end tier stops: those tiers ignore
SIGTERM and SIGINT (under systemd's default KillMode every process of the unit
gets the SIGTERM, and the back end must outlive the front-end's drain) and
exit on STOP_SIGNAL, which the supervisor sends once the front-end is done.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from daemon.ipc.endpoints import PARENT_PID_VAR, Endpoints
from daemon.pids import pid_alive

if TYPE_CHECKING:
    from daemon.config.schema import DaemonSettings

EPOCH_VAR = "DAEMON_TIER_EPOCH"  # how many times the supervisor has started this tier
SPAWNER_VAR = "DAEMON_SPAWNER_PID"  # the PID of the process that started this one
BESIDE_VAR = "DAEMON_WORKER_BESIDE"  # set for a worker started beside the running one (blue-green)
EXIT_NO_ROOM_BESIDE = 75  # such a worker's exit status when it would not fit (EX_TEMPFAIL)
# A worker of a group over several nodes whose group ended elsewhere, or that node 0 refused:
# its supervisor starts it again without counting a crash (worker/nodes.py)
EXIT_REGROUP = 76
STOP_SIGNAL = signal.SIGUSR2
_PR_SET_PDEATHSIG = 1
_EXIT_ORPHANED = 70
_guarded_pid: int | None = None


@dataclass
class Tier:
    role: str
    index: int
    epoch: int
    supervisor_pid: int
    endpoints: Endpoints
    settings: DaemonSettings  # replaced by `adopt` when a reload changes live settings
    generation: int

    def adopt(self, generation: int) -> DaemonSettings:
        """Switch to the settings of `generation` (a live reload); returns the previous ones.

        Logging follows at once; each service applies the rest of what changed."""
        from daemon.config.handoff import read_config
        from daemon.logs import configure_logging, set_generation

        previous = self.settings
        self.settings, self.generation = read_config(self.endpoints.directory, generation), generation
        logging = self.settings.logging
        if (logging.level, logging.format) != (previous.logging.level, previous.logging.format):
            configure_logging(self.role, level=logging.level, fmt=logging.format)
        set_generation(generation)
        return previous


def guard() -> None:
    """Die with the spawning process and with the supervisor. Call before any slow import.

    The kernel kills us when our parent dies (PR_SET_PDEATHSIG); if it died
    before that took effect, our parent is no longer the process that started
    us, and we exit. A thread also watches the supervisor, for processes with
    another process (Granian's main) between them and it.
    """
    global _guarded_pid
    if _guarded_pid == os.getpid():  # not inherited: a forked child (Granian's workers) guards itself
        return
    _guarded_pid = os.getpid()
    spawner = int(os.environ.get(SPAWNER_VAR) or os.environ[PARENT_PID_VAR])
    supervisor = int(os.environ[PARENT_PID_VAR])
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the watches below still cover it
    if os.getppid() != spawner:
        os._exit(_EXIT_ORPHANED)
    for pid in {spawner, supervisor}:
        _watch(pid)


def start_tier(role: str, index: int = 0, *, stopped_by_supervisor: bool = True) -> Tier:
    """Bootstrap a tier process: guard it, read the handed-over config, set up its logging.

    `stopped_by_supervisor`: ignore SIGTERM/SIGINT and exit on STOP_SIGNAL (the
    back-end tiers); the front-end leaves signals to Granian.
    """
    from daemon.config.handoff import UntrustedHandoff, generation_from_environment, read_config
    from daemon.ipc.messages import read_status_file
    from daemon.logs import configure_logging, set_generation

    guard()
    if stopped_by_supervisor:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(STOP_SIGNAL, _exit_cleanly)
    endpoints = Endpoints.from_environment()
    generation = generation_from_environment()
    # A process Granian respawns inherits the environment its instance started with: the
    # generation the daemon runs now (status file) may be newer.
    if (status := read_status_file(endpoints.directory)) is not None:
        generation = max(generation, status.generation)
    try:
        settings = read_config(endpoints.directory, generation)
    except UntrustedHandoff as exc:  # planted by someone else: run nothing it says
        import structlog

        configure_logging(role)
        structlog.get_logger(f"daemon.{role}").error("tier.handoff_refused", reason=str(exc))
        raise SystemExit(2) from None
    configure_logging(role, level=settings.logging.level, fmt=settings.logging.format)
    set_generation(generation)
    epoch = int(os.environ.get(EPOCH_VAR, "1"))
    return Tier(role, index, epoch, int(os.environ[PARENT_PID_VAR]), endpoints, settings, generation)


def _exit_cleanly(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def _watch(pid: int) -> None:
    """Exit at once when process `pid` ends: a daemon thread waits on its pidfd (or polls)."""

    def wait_then_exit() -> None:
        try:
            descriptor = os.pidfd_open(pid)
        except (AttributeError, OSError):
            descriptor = None
        if descriptor is not None:
            select.select([descriptor], [], [])
        else:
            while pid_alive(pid):
                threading.Event().wait(0.2)
        os._exit(_EXIT_ORPHANED)

    if not pid_alive(pid):
        os._exit(_EXIT_ORPHANED)
    threading.Thread(target=wait_then_exit, name=f"watch-{pid}", daemon=True).start()
