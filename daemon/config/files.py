"""Reading a config or env file without ever blocking on it.

An open() of a FIFO blocks until a writer appears, and a read of a device may never
end: a reload that did that would wedge the reloader (and a stop after it). So the
file is opened non-blocking, checked to be a regular file on the open descriptor
(no window between a check and the open in which it could be swapped), and read
up to a bound.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

MAX_CONFIG_BYTES = 16 * 1024 * 1024


class NotARegularFile(OSError):
    """The path names something other than a regular file; the message says what."""


def describe_mode(mode: int) -> str:
    kinds = [
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def read_regular_file(path: Path, limit: int = MAX_CONFIG_BYTES) -> bytes:
    """The bytes of `path` (symlinks followed), which must be a regular file of at most
    `limit` bytes: NotARegularFile or ValueError otherwise, OSError if it cannot be read."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:  # a socket cannot be opened at all (ENXIO): say what it is
        mode = _mode(path) if exc.errno != errno.ENOENT else None
        if mode is not None and not stat.S_ISREG(mode):
            raise NotARegularFile(f"{path} is {describe_mode(mode)}, not a regular file") from None
        raise
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise NotARegularFile(f"{path} is {describe_mode(mode)}, not a regular file")
        chunks, size = [], 0
        while chunk := os.read(descriptor, 1 << 20):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise ValueError(f"{path} is larger than {limit // (1024 * 1024)} MiB")
        return b"".join(chunks)
    finally:
        os.close(descriptor)


def _mode(path: Path) -> int | None:
    try:
        return os.stat(path).st_mode
    except OSError:
        return None
