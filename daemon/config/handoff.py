"""Handing the effective configuration to child processes.

The supervisor has already read, merged, checked and derived it; children must
run with exactly that, not re-read sources that may have changed since. It is
written as JSON into the private socket directory (mode 0700; the file 0600,
since it holds the secrets the front-end needs).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from daemon.config.schema import DaemonSettings, flat_values, nested_values

CONFIG_FILE = "config.json"


def write_config(settings: DaemonSettings, directory: Path, generation: int = 1) -> Path:
    nested = nested_values(flat_values(settings, reveal_secrets=True))
    path = directory / CONFIG_FILE
    staging = directory / f".{CONFIG_FILE}.{os.getpid()}"
    descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as stream:
        json.dump({"generation": generation, "settings": nested}, stream)
    os.replace(staging, path)  # readers see the old file or the new one, never half of one
    return path


def read_config(directory: Path) -> tuple[DaemonSettings, int]:
    """The settings and generation the supervisor handed over."""
    data = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    return DaemonSettings(**data["settings"]), data["generation"]
