"""Process primitives of the supervisor: a tier process (Child), its listening socket, kill.

Everything here acts on one process or socket and keeps no state of the tree;
the Supervisor (supervisor.py) decides when.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field

from daemon.config.schema import ServerSettings
from daemon.ipc.messages import LoadedModel

STARTUP_TIMEOUT_S = {"worker": 900.0, "scheduler": 60.0, "tokenizer": 120.0, "frontend": 60.0}
STOP_GRACE_S = 5.0  # after SIGTERM, how long a back-end tier may take before SIGKILL


class StartupFailed(Exception):
    pass


class TierStartFailed(Exception):
    """A tier started by a reload did not come up; the message says why."""


@dataclass
class Child:
    tier: str
    index: int
    module: str
    epoch: int = 0
    state: str = "starting"
    since: float = field(default_factory=time.time)
    process: asyncio.subprocess.Process | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    restarts: deque[float] = field(default_factory=deque)
    generation: int = 1  # the config generation it runs
    started_generation: int = 1  # the one its process started with (a worker's model settings come from it)
    supervised: bool = False  # restarted when it dies: set once it first came up in its slot
    standby: bool = False  # started by a reload beside the serving one: ready is "standby" until it commits
    retiring: bool = False  # stopped on purpose (a reload replaces it): not to be restarted
    exit_handled: bool = False  # the death of its current process was handled
    deaths: int = 0
    serving_workers: set[int] = field(default_factory=set)  # a front-end's Granian workers that are up
    expected_workers: int = 1
    listener: socket.socket | None = None  # a front-end's listening socket
    model: LoadedModel | None = None  # a worker's, from its TierReady
    hung: bool = False  # declared hung and killed; true until its process is reaped

    @property
    def name(self) -> str:
        return f"{self.tier}-{self.index}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None


def listen(server: ServerSettings) -> socket.socket:
    """The front-end's listening socket, owned here for the daemon's life and handed to each
    front-end instance: a new one accepts on it while the old one drains, so no connection
    is refused or reset in between. No SO_REUSEPORT: no other server can share the port."""
    family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # our own TIME_WAITs only
        listener.bind((server.host, server.port))
        listener.listen(server.backlog)
    except OSError as exc:
        listener.close()
        raise StartupFailed(f"cannot listen on {server.host}:{server.port}: {exc.strerror or exc}") from None
    return listener


def address(server: ServerSettings) -> tuple[str, int, int]:
    """What a listening socket is bound with."""
    return server.host, server.port, server.backlog


def kill(child: Child) -> None:
    """SIGKILL `child`, retired first so that its death is not taken for a crash."""
    child.retiring = True
    if child.process is not None and child.process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.process.pid, signal.SIGKILL)  # it and whatever it started


async def first_of(timeout: float, **waits: Awaitable[object]) -> str | None:
    """The name of the first of `waits` to finish within `timeout` s (None: none did); the
    others are cancelled."""
    tasks = {asyncio.ensure_future(wait): name for name, wait in waits.items()}
    try:
        done, _pending = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
    return tasks[next(iter(done))] if done else None
