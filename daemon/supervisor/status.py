"""What the supervisor tells readers about the tree: status.json (read by `daemon status`,
the front-ends' /server_info and metrics), the systemd status line, and tier events."""

from __future__ import annotations

import os
import time

import msgspec
import structlog

from daemon.ipc.endpoints import STATUS_FILE
from daemon.ipc.messages import (
    DaemonStatus,
    TierEvent,
    TierStatus,
)
from daemon.supervisor.process import Child

log = structlog.get_logger("daemon.supervisor")


class StatusReports:
    """Part of the Supervisor (a mixin): publishing the state of each tier."""

    def status_line(self) -> str:
        """One line for humans (systemctl status): the generation, its hash, the last reload."""
        line = f"serving generation {self.generation} (config {self.config.hash})"
        if (last := self.reloader.last) is not None:
            line += f"; last reload {last.result}" + (f": {last.reason}" if last.reason else "")
        return line

    def _publish(self, child: Child, state: str, *, restarting: bool = False) -> None:
        """Tell every tier (events socket) and every reader of status.json what became of `child`."""
        self._broadcast(TierEvent(child.tier, child.index, child.epoch, state, child.model, restarting))  # type: ignore[arg-type]
        if state in ("starting", "standby", "up", "draining", "down", "stopped"):
            child.state, child.since = state, time.time()
            self.write_status()

    def write_status(self) -> None:
        tiers = [
            TierStatus(c.tier, c.index, c.pid, c.epoch, c.state, c.since, c.deaths, c.model)  # type: ignore[arg-type]
            for c in self.children
        ]
        status = DaemonStatus(
            supervisor_pid=os.getpid(),
            generation=self.generation,
            config_hash=self.config.hash,
            started=self.started,
            tiers=tiers,
            last_reload=self.reloader.last,
            reloads=dict(self.reloader.counts),
        )
        staging = self.socket_dir / f".{STATUS_FILE}"
        staging.write_bytes(msgspec.json.encode(status))
        os.replace(staging, self.socket_dir / STATUS_FILE)
