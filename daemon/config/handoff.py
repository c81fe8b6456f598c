"""Handing the effective configuration to child processes, one file per generation.

The supervisor has already read, merged, checked and derived it; children must
run with exactly that, not re-read sources that may have changed since. Each
generation (1 at start, +1 per applied reload) is written as JSON into the
private socket directory (mode 0700; the files 0600, since they hold the
secrets the front-end needs). A child is told its generation in its
environment, and later ones by a ConfigUpdate broadcast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from daemon.config.schema import DaemonSettings, flat_values, nested_values

GENERATION_VAR = "DAEMON_CONFIG_GENERATION"


def config_file(directory: Path, generation: int) -> Path:
    return directory / f"config-{generation}.json"


def write_config(settings: DaemonSettings, directory: Path, generation: int) -> Path:
    nested = nested_values(flat_values(settings, reveal_secrets=True))
    path = config_file(directory, generation)
    staging = directory / f".{path.name}.{os.getpid()}"
    descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as stream:
        json.dump({"generation": generation, "settings": nested}, stream)
    os.replace(staging, path)  # readers see the old file or the new one, never half of one
    return path


def read_config(directory: Path, generation: int) -> DaemonSettings:
    """The settings of `generation`, as the supervisor handed them over."""
    data = json.loads(config_file(directory, generation).read_text(encoding="utf-8"))
    return DaemonSettings(**data["settings"])


def generation_from_environment() -> int:
    return int(os.environ.get(GENERATION_VAR, "1"))
