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
    """Yield the names of the changed entries, once per burst of changes to any of `paths`."""
    names = {p.name for p in paths}
    directories = sorted({p.parent for p in paths})

    def relevant(_change: watchfiles.Change, changed: str) -> bool:
        entry = Path(changed).name
        return entry in names or entry.startswith("..")  # ..data, ..2026_11_24_... (Kubernetes)

    async for changes in watchfiles.awatch(
        *directories,
        watch_filter=relevant,
        debounce=LONGEST_BURST_MS,
        step=QUIET_MS,
        stop_event=stop,
        recursive=False,
    ):
        yield {Path(changed).name for _change, changed in changes}
