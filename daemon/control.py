"""The client side of a running daemon's control socket: `daemon reload` and `daemon status`.

A daemon is found by its socket directory under runtime.dir (the one whose
lock its supervisor holds); `daemon reload` asks the supervisor to reload and
waits for the outcome, `daemon status` reads the status file the supervisor
keeps up to date.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

import zmq

from daemon.config.check import check_config
from daemon.config.derive import default_runtime_dir
from daemon.config.errors import ConfigError
from daemon.config.sources import read_config_file
from daemon.ipc.endpoints import Endpoints
from daemon.ipc.messages import DaemonStatus, ReloadCommand, ReloadReport, decoder, encode, read_status_file
from daemon.supervisor.runtime_dir import live_socket_dirs

RUNTIME_DIR_VAR = "DAEMON_RUNTIME__DIR"


class ControlError(Exception):
    """No daemon to talk to, or it did not answer; the message says what to do."""


def runtime_dir_for(path: Path, *, env_file: Path | None = None, sets: Iterable[str] = ()) -> Path:
    """The runtime.dir a daemon started with this config uses."""
    report = check_config(path, env_file=env_file, sets=sets, offline=True)
    if report.config is not None:
        return report.config.settings.runtime.dir
    # The file does not check any more (a reload will say why): find the directory the plain way.
    if value := os.environ.get(RUNTIME_DIR_VAR):
        return Path(value)
    try:
        configured = read_config_file(path).values.get("runtime", {}).get("dir")
    except ConfigError:
        configured = None
    return Path(configured) if configured else default_runtime_dir(os.environ)


def find_daemon(runtime_dir: Path, pid: int | None = None) -> Path:
    """The socket directory of the daemon running under `runtime_dir` (with PID `pid`)."""
    running = live_socket_dirs(runtime_dir) if runtime_dir.is_dir() else []
    if pid is not None:
        running = [(p, d) for p, d in running if p == pid]
    if not running:
        which = f" with PID {pid}" if pid is not None else ""
        raise ControlError(f"no daemon{which} is running under {runtime_dir} (runtime.dir)")
    if len(running) > 1:
        pids = ", ".join(str(p) for p, _ in running)
        raise ControlError(f"several daemons run under {runtime_dir} (PIDs {pids}): choose one with --pid")
    return running[0][1]


def request_reload(socket_dir: Path, timeout_s: float) -> ReloadReport:
    context = zmq.Context()
    try:
        control = context.socket(zmq.DEALER)
        control.setsockopt(zmq.LINGER, 0)
        control.connect(Endpoints(socket_dir).control)
        control.send(encode(ReloadCommand()))
        if not control.poll(int(timeout_s * 1000)):
            raise ControlError(f"the daemon did not answer within {timeout_s:g} s; see its log (config.reload)")
        return decoder(ReloadReport).decode(control.recv())
    finally:
        context.destroy(linger=0)


def read_status(socket_dir: Path) -> DaemonStatus:
    status = read_status_file(socket_dir)
    if status is None:
        raise ControlError(f"cannot read the daemon's status in {socket_dir}")
    return status


# --- rendering ----------------------------------------------------------------------------------


def describe_reload(report: ReloadReport) -> str:
    outcome = {
        "applied": f"applied: now generation {report.generation}",
        "unchanged": f"unchanged: the effective config equals generation {report.generation}'s",
        "rejected": f"rejected: generation {report.generation} keeps serving",
        "rolled_back": f"rolled back: generation {report.generation} keeps serving",
    }[report.result]
    lines = [f"reload {outcome} (config {report.config_hash}, {report.duration_s:.1f} s, trigger {report.trigger})"]
    if report.reason:
        lines.append(f"  reason: {report.reason}")
    for key, change in report.changes.items():
        lines.append(f"  {key}: {change['old']!r} -> {change['new']!r} ({change['scope']})")
    if report.restarted:
        lines.append(f"  restarted: {', '.join(report.restarted)}")
    lines += [f"  note: {note}" for note in report.notes]
    return "\n".join(lines)


def describe_status(status: DaemonStatus) -> str:
    now = time.time()
    lines = [
        f"daemon {status.supervisor_pid}: up {_duration(now - status.started)}, "
        f"generation {status.generation} (config {status.config_hash})",
    ]
    if status.last_reload is not None:
        last = status.last_reload
        lines.append(f"last reload: {last.result} ({last.trigger}, {_duration(now - last.at)} ago)")
        if last.reason:
            lines.append(f"  reason: {last.reason}")
    if status.reloads:
        lines.append("reloads: " + ", ".join(f"{n} {result}" for result, n in sorted(status.reloads.items())))
    lines.append(f"{'tier':<12} {'pid':>8}  {'state':<9} {'for':>9}  restarts")
    for tier in status.tiers:
        name = f"{tier.tier}-{tier.index}"
        lines.append(
            f"{name:<12} {tier.pid or '-':>8}  {tier.state:<9} {_duration(now - tier.since):>9}  {tier.restarts}"
        )
        ranks = tier.model.ranks if tier.model else []
        # a tensor-parallel group's processes (on a node other than 0, its share of the group)
        for rank in ranks if len(ranks) > 1 or any(r.rank or r.node for r in ranks) else []:
            lines.append(f"  rank {rank.rank:<5} {rank.pid:>8}  {rank.device} (node {rank.node})")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
