"""Watching the config file for changes, the way it really gets changed.

Editors and Ansible write a temporary file and rename it over the config;
Kubernetes swaps a `..data` symlink in the mounted directory. Either way the
file's inode changes, so the directory is watched, not the file, and any
event naming the file or a Kubernetes `..` entry counts. A burst of writes is
one change: events are collected until the directory has been quiet a while.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import structlog
import watchfiles

log = structlog.get_logger("daemon.supervisor")

QUIET_MS = 400  # a change is reported once the directory has been quiet this long ...
LONGEST_BURST_MS = 10_000  # ... or after this long, however busy it stays
ARMED_POLL_MS = 200  # how soon after it is set up the watch is known to be (then how often it wakes)


async def file_changes(
    paths: list[Path], stop: asyncio.Event, on_armed: Callable[[], None] = lambda: None
) -> AsyncIterator[set[str]]:
    """Yield the names of the changed entries, once per burst of changes to any of `paths`;
    call `on_armed` once the watch is in place (a change made after that is seen).

    A burst ends when no change has been seen for QUIET_MS (watchfiles' own `step` is not
    enough: rewriting the same file does not extend it), or after LONGEST_BURST_MS."""
    names = {p.name for p in paths}
    directories = sorted({p.parent for p in paths})
    batches: asyncio.Queue[set[str]] = asyncio.Queue()

    def relevant(_change: watchfiles.Change, changed: str) -> bool:
        entry = Path(changed).name
        return entry in names or entry.startswith("..")  # ..data, ..2026_11_24_... (Kubernetes)

    async def pump() -> None:
        armed = False
        # The watch is set up before awatch first waits, so its first yield, at the latest
        # after ARMED_POLL_MS of quiet (yield_on_timeout), proves it armed.
        async for changes in watchfiles.awatch(
            *directories,
            watch_filter=relevant,
            step=50,
            stop_event=stop,
            recursive=False,
            rust_timeout=ARMED_POLL_MS,
            yield_on_timeout=True,
        ):
            if not armed:
                armed = True
                on_armed()
            if changes:
                batches.put_nowait({Path(changed).name for _change, changed in changes})

    pumping = asyncio.create_task(pump())
    try:
        while True:
            burst = await batches.get()
            ends = asyncio.get_running_loop().time() + LONGEST_BURST_MS / 1000
            while asyncio.get_running_loop().time() < ends:
                try:
                    async with asyncio.timeout(QUIET_MS / 1000):
                        burst |= await batches.get()
                except TimeoutError:
                    break
            yield burst
    finally:
        pumping.cancel()
