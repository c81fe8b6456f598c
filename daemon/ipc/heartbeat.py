"""Heartbeats: a tier's main loop tells the supervisor it is still turning.

A tier that stops sending them (frozen by SIGSTOP, deadlocked, stuck in a step or a
driver call that never returns) is declared hung by the supervisor after
runtime.hang_timeout_s, then killed and restarted like one that crashed. The beat
is sent from the loop itself, never from a thread: a thread would go on beating
while the loop is stuck.
"""

from __future__ import annotations

import contextlib
import os
import time

import zmq

from daemon.ipc.messages import Heartbeat
from daemon.ipc.sockets import PeerGone, send

HEARTBEAT_INTERVAL_S = 1.0


class Pulse:
    """Sends a Heartbeat on `control` at most once per HEARTBEAT_INTERVAL_S; call `beat` every
    turn of the main loop (whose waits must be shorter than the interval)."""

    def __init__(self, control: zmq.Socket, tier: str, index: int):
        self._control = control
        self._message = Heartbeat(tier, index, os.getpid())
        self._last = 0.0

    def beat(self) -> None:
        now = time.monotonic()
        if now - self._last < HEARTBEAT_INTERVAL_S:
            return
        self._last = now
        with contextlib.suppress(PeerGone):  # the supervisor is gone or busy: we die with it anyway
            send(self._control, self._message, grace_ms=0)
