"""Where each tier listens, derived from the supervisor's PID.

Every process of the tree gets `DAEMON_PARENT_PID` (the supervisor's PID) and
`DAEMON_RUNTIME_DIR` (the configured runtime.dir) in its environment, so any of
them, Granian's own worker processes included, finds its peers without being
told by its direct parent. All sockets live in one private directory,
`<runtime.dir>/daemon-<pid>`, created mode 0700 by the supervisor and removed
when it exits.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PARENT_PID_VAR = "DAEMON_PARENT_PID"
LISTEN_FD_VAR = "DAEMON_LISTEN_FD"  # the front-end's listening socket, inherited from the supervisor
RUNTIME_DIR_VAR = "DAEMON_RUNTIME_DIR"
SOCKET_DIR_PREFIX = "daemon-"
STATUS_FILE = "status.json"  # the supervisor's DaemonStatus, rewritten on every tier change


class EndpointError(RuntimeError):
    """This process was not started by a supervisor (its environment lacks the variables)."""


def socket_dir(runtime_dir: Path, supervisor_pid: int) -> Path:
    return runtime_dir / f"{SOCKET_DIR_PREFIX}{supervisor_pid}"


@dataclass(frozen=True)
class Endpoints:
    directory: Path

    @classmethod
    def for_supervisor(cls, runtime_dir: Path, supervisor_pid: int) -> Endpoints:
        return cls(socket_dir(runtime_dir, supervisor_pid))

    @classmethod
    def from_environment(cls) -> Endpoints:
        try:
            pid = int(os.environ[PARENT_PID_VAR])
            runtime_dir = Path(os.environ[RUNTIME_DIR_VAR])
        except (KeyError, ValueError):
            raise EndpointError(f"{PARENT_PID_VAR} and {RUNTIME_DIR_VAR} must name the supervisor") from None
        return cls.for_supervisor(runtime_dir, pid)

    def _ipc(self, name: str) -> str:
        return f"ipc://{self.directory / name}"

    @property
    def control(self) -> str:
        """The supervisor's ROUTER: readiness and heartbeats in, commands out."""
        return self._ipc("control")

    @property
    def events(self) -> str:
        """The supervisor's PUB: tier up, down and draining events for every tier."""
        return self._ipc("events")

    @property
    def scheduler(self) -> str:
        """The scheduler's PULL: requests and aborts from tokenizers, step results from workers."""
        return self._ipc("scheduler")

    def worker(self, epoch: int) -> str:
        """The PULL of the worker started as `epoch`: step plans from the scheduler. One per
        epoch, as a new worker may run beside the one it replaces (blue-green reload)."""
        return self._ipc(f"worker-{epoch}")

    @property
    def stats(self) -> str:
        """Where the scheduler PUBlishes its queue and cache figures for the front-ends' metrics."""
        return self._ipc("stats")

    def tokenizer(self, index: int) -> str:
        """Tokenizer worker `index`'s PULL: requests from front-ends, tokens from the scheduler."""
        return self._ipc(f"tokenizer-{index}")

    def frontend(self, pid: int) -> str:
        """A front-end worker process's PULL: outputs from tokenizers."""
        return self._ipc(f"frontend-{pid}")

    @property
    def metrics(self) -> Path:
        """Prometheus' multiprocess files of every front-end process the daemon ever ran: kept
        for the daemon's life, so that counters go on across front-end restarts."""
        return self.directory / "metrics"

    def bound_by(self, tier: str, *, epoch: int, frontend_workers: Iterable[int] = ()) -> list[Path]:
        """The socket files a tier process binds that no successor binds again (a worker's is
        named by its epoch, a front-end worker's by its PID): to remove once it is gone."""
        if tier == "worker":
            return [self.directory / f"worker-{epoch}"]
        if tier == "frontend":
            return [self.directory / f"frontend-{pid}" for pid in frontend_workers]
        return []
