"""Which tiers are hung: alive, but their main loop no longer turns.

Every back-end tier sends a Heartbeat at least every HEARTBEAT_INTERVAL_S from its
main loop (daemon/ipc/heartbeat.py); becoming ready counts as one. A process whose
last beat is older than runtime.hang_timeout_s is hung: the supervisor kills it, and
its death is handled like any crash (its requests end with a 503, it restarts with
backoff). The front-end is not watched here: its Granian workers are restarted by
Granian, and its event loop never waits on IPC.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from daemon.supervisor.supervisor import Child

WATCHED_TIERS = ("worker", "scheduler", "tokenizer")


class Heartbeats:
    def __init__(self) -> None:
        self._last: dict[int, float] = {}  # PID -> when it last beat (time.monotonic())

    def heard(self, pid: int | None) -> None:
        if pid is not None:
            self._last[pid] = time.monotonic()

    def forget(self, pid: int | None) -> None:
        self._last.pop(pid, None)  # type: ignore[arg-type]

    def silent_for(self, pid: int | None) -> float:
        """Seconds since `pid` last beat; 0 for one not heard yet (still starting)."""
        last = self._last.get(pid) if pid is not None else None  # type: ignore[arg-type]
        return 0.0 if last is None else time.monotonic() - last

    def hung(self, children: Iterable[Child], timeout: float) -> list[Child]:
        """Those of `children` silent for longer than `timeout` (0: none ever is)."""
        if timeout <= 0:
            return []
        return [c for c in children if c.tier in WATCHED_TIERS and not c.retiring and self.silent_for(c.pid) > timeout]
