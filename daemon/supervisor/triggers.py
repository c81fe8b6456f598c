"""Watching the config file for changes, the way it really gets changed.

Editors and Ansible write a temporary file and rename it over the config;
Kubernetes swaps a `..data` symlink in the mounted directory. Either way the
file's inode changes, so the directory is watched, not the file, and any
event naming the file or a Kubernetes `..` entry counts. A burst of writes is
one change: events are collected until the directory has been quiet a while.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import structlog
import watchfiles

log = structlog.get_logger("daemon.supervisor")

QUIET_MS = 400  # a change is reported once the directory has been quiet this long ...
LONGEST_BURST_MS = 10_000  # ... or after this long, however busy it stays


async def file_changes(paths: list[Path], stop: asyncio.Event) -> AsyncIterator[set[str]]:
    """Yield the names of the changed entries, once per burst of changes to any of `paths`.

    A burst ends when no change has been seen for QUIET_MS (watchfiles' own `step` is not
    enough: rewriting the same file does not extend it), or after LONGEST_BURST_MS."""
    names = {p.name for p in paths}
    directories = sorted({p.parent for p in paths})
    batches: asyncio.Queue[set[str]] = asyncio.Queue()

    def relevant(_change: watchfiles.Change, changed: str) -> bool:
        entry = Path(changed).name
        return entry in names or entry.startswith("..")  # ..data, ..2026_11_24_... (Kubernetes)

    async def pump() -> None:
        async for changes in watchfiles.awatch(
            *directories, watch_filter=relevant, step=50, stop_event=stop, recursive=False
        ):
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
