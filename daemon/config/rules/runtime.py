"""The supervisor's runtime directory, where the IPC sockets live."""

from __future__ import annotations

import os

from daemon.config.errors import Severity
from daemon.config.facts import Facts
from daemon.config.ownership import RUNTIME_DIR_FIX
from daemon.config.rules.catalogue import CheckResult, rule
from daemon.config.schema import DaemonSettings

# Longest socket name the IPC layer appends to runtime.dir ("/daemon-<pid>/<tier>-<n>.ipc"),
# and the kernel's limit on a Unix socket path (sun_path is 108 bytes with the NUL).
IPC_NAME_BUDGET = 48
UNIX_SOCKET_PATH_MAX = 107


@rule(
    "runtime.dir-too-long",
    keys=["runtime.dir"],
    fix=f"use a runtime.dir of at most {UNIX_SOCKET_PATH_MAX - IPC_NAME_BUDGET} bytes, such as /run/daemon",
)
def _dir_too_long(c: DaemonSettings, f: Facts) -> CheckResult:
    """IPC socket paths under runtime.dir fit the kernel's Unix socket path limit."""
    length = len(os.fsencode(c.runtime.dir)) if c.runtime.dir else 0
    if c.runtime.dir and length + IPC_NAME_BUDGET > UNIX_SOCKET_PATH_MAX:
        return f"runtime.dir is {length} bytes long; socket paths under it would exceed {UNIX_SOCKET_PATH_MAX} bytes"


@rule(
    "runtime.dir-unwritable",
    keys=["runtime.dir"],
    severity=Severity.WARNING,
    fix="create runtime.dir writable by the daemon's user (systemd: RuntimeDirectory=daemon)",
)
def _dir_unwritable(c: DaemonSettings, f: Facts) -> CheckResult:
    """The daemon can create its sockets under runtime.dir (as the user running the check)."""
    problem = f.dir_problem(c.runtime.dir) if c.runtime.dir else None
    return problem[1] if problem and not problem[0] else None


@rule("runtime.dir-unsafe", keys=["runtime.dir"], fix=RUNTIME_DIR_FIX)
def _dir_unsafe(c: DaemonSettings, f: Facts) -> CheckResult:
    """runtime.dir is the daemon's user's alone: not a symlink, not another user's, not writable by
    others (its sockets and config hand-off files are trusted by every tier)."""
    return f.dir_unsafe(c.runtime.dir) if c.runtime.dir else None


@rule(
    "runtime.dir-not-a-directory",
    keys=["runtime.dir"],
    fix="point runtime.dir at a directory (or at a path where one can be created)",
)
def _dir_not_directory(c: DaemonSettings, f: Facts) -> CheckResult:
    """runtime.dir is a directory, or can become one: no file stands in its way."""
    problem = f.dir_problem(c.runtime.dir) if c.runtime.dir else None
    return problem[1] if problem and problem[0] else None


@rule(
    "runtime.blue-green-needs-cache-size",
    keys=["runtime.model_reload", "scheduler.max_total_tokens", "model.device"],
    fix="set scheduler.max_total_tokens to a cache that fits twice in GPU memory with the weights, or use drain",
)
def _blue_green_cache(c: DaemonSettings, f: Facts) -> CheckResult:
    """A blue-green reload on a GPU knows its KV cache size: a worker loading beside another cannot
    size it from the free memory (the other one's share counts as used). Only for device = cuda:
    asking whether `auto` means a GPU would import torch into the supervisor (the worker itself
    then falls back to drain mode)."""
    if c.runtime.model_reload != "blue_green" or c.scheduler.max_total_tokens or c.model.device != "cuda":
        return None
    if (probe := f.cuda) is not None and probe.devices > 0:
        return "model_reload is blue_green on a GPU but scheduler.max_total_tokens is unset"
