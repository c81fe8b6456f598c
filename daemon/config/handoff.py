"""Handing the effective configuration to child processes, one file per generation.

The supervisor has already read, merged, checked and derived it; children must
run with exactly that, not re-read sources that may have changed since. Each
generation (1 at start, +1 per applied reload) is written as JSON into the
private socket directory (mode 0700; the files 0600, since they hold the
secrets the front-end needs). A child is told its generation in its
environment, and later ones by a ConfigUpdate broadcast.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

from daemon.config.schema import DaemonSettings, flat_values, nested_values

GENERATION_VAR = "DAEMON_CONFIG_GENERATION"


def config_file(directory: Path, generation: int) -> Path:
    return directory / f"config-{generation}.json"


def write_config(settings: DaemonSettings, directory: Path, generation: int) -> Path:
    nested = nested_values(flat_values(settings, reveal_secrets=True))
    path = config_file(directory, generation)
    staging = directory / f".{path.name}.{os.getpid()}"
    # O_EXCL|O_NOFOLLOW: whatever is already at the staging name (a link planted there) is not written through
    staging.unlink(missing_ok=True)
    descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "w") as stream:
        json.dump({"generation": generation, "settings": nested}, stream)
    os.replace(staging, path)  # readers see the old file or the new one, never half of one
    return path


def read_config(directory: Path, generation: int) -> DaemonSettings:
    """The settings of `generation`, as the supervisor handed them over."""
    data = json.loads(_read_trusted(config_file(directory, generation)))
    return DaemonSettings(**data["settings"])


class UntrustedHandoff(Exception):
    """The hand-off file is not one only the daemon's user could have written."""


def _read_trusted(path: Path) -> bytes:
    """The bytes of `path`, if it is a regular file (not a link) owned by us and writable by no one
    else: a tier restarted as root must not read a config another local user planted."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UntrustedHandoff(f"{path} is a symlink; the supervisor writes a plain file there") from None
        raise
    with os.fdopen(descriptor, "rb") as stream:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise UntrustedHandoff(f"{path} is not a regular file of uid {os.geteuid()} (uid {info.st_uid})")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UntrustedHandoff(f"{path} is writable by others (mode {stat.S_IMODE(info.st_mode):04o})")
        return stream.read()


def generation_from_environment() -> int:
    return int(os.environ.get(GENERATION_VAR, "1"))
