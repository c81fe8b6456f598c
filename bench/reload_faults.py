"""The two classes of bench/reload.py that are faults rather than changes that should succeed, and their
report. Both keep the load running and count its failed requests, as every class does.

doomed  A reload that cannot succeed: model.seed + 1 (a new model worker) together with server.port set to a
        port this script holds open. The daemon binds the new port while it prepares the reload, before it
        touches a tier, so the change must be rejected with every process left as it was. Then the file is
        written back to the running config (that reload, "unchanged", is not counted).
frozen  The serving model worker is stopped (SIGSTOP) under load. Its heartbeats stop; after
        runtime.hang_timeout_s the supervisor logs tier.hung, kills it, and starts a new one. The requests
        in flight at the freeze should end with explicit errors (a 503, or an error event in a stream), none
        should hang, and the others should not fail.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field

from common import daemon_processes, percentile, read_status, taken_port
from reload_changes import Bench, Trial, log_warnings, run_trial, settle, wait_for_event
from reload_load import Load, Record, failures_by_kind, kinds_text, ok_latencies
from reload_report import failed_cell, fmt_ms, fmt_s, spread

FAULT_CLASSES = ("doomed", "frozen")
HUNG_SLACK_S = 30.0  # beyond runtime.hang_timeout_s, how long to wait for tier.hung before giving up
# How the daemon ends a request whose worker died: a 503 before the answer began, an error event in a stream.
EXPLICIT_ERRORS = ("HTTP 503", "stream: error event")


# --- doomed -------------------------------------------------------------------------------------------


@dataclass
class Doomed:
    trial: Trial  # the rejected change, measured as any change is
    port: int  # the port another program (this script) listened on meanwhile
    before: dict[str, list[int]]  # the daemon's processes by role before the write
    after: dict[str, list[int]] = field(default_factory=dict)  # and once it was rejected and had settled
    restore: Trial | None = None  # the write back to the running config (not counted)

    @property
    def pids_unchanged(self) -> bool:
        return self.before == self.after


async def run_doomed(bench: Bench, repeat: int, values: dict[str, dict]) -> Doomed:
    """One doomed reload, then the file written back to `values` (the config the daemon still runs)."""
    before = daemon_processes(bench.daemon, bench.runtime_dir)
    with taken_port() as port:
        doomed = {section: dict(keys) for section, keys in values.items()}
        doomed["server"]["port"] = port
        doomed["model"]["seed"] = values["model"]["seed"] + 1
        change = (
            f"server.port {values['server']['port']} -> {port} (held by another program), "
            f"model.seed {values['model']['seed']} -> {doomed['model']['seed']}"
        )
        trial, _ = await run_trial(bench, "doomed", repeat, values, doomed, change)
    outcome = Doomed(trial, port, before, daemon_processes(bench.daemon, bench.runtime_dir))
    outcome.restore, _ = await run_trial(bench, "doomed-restore", repeat, values, values, "back to the running config")
    return outcome


def doomed_line(outcome: Doomed) -> str:
    """What one doomed reload did, in one line."""
    t = outcome.trial
    return (
        f"{t.change}: {t.result}, config.reload {fmt_s(t.to_generation)} s after the write; "
        f"PIDs {'unchanged' if outcome.pids_unchanged else f'CHANGED {outcome.before} -> {outcome.after}'}"
        + (f"; {t.reason}" if t.reason else "")
        + (f"; written back: {outcome.restore.result}" if outcome.restore else "")
    )


# --- frozen -------------------------------------------------------------------------------------------


@dataclass
class Freeze:
    repeat: int
    pid: int  # the model worker stopped
    stopped: float  # time.time() right after the SIGSTOP
    hung: float = float("nan")  # tier.hung: the supervisor declared it hung (and killed it)
    silent_s: float = float("nan")  # how long it had been silent then, as the supervisor counted
    died: float = float("nan")  # tier.died: its death was handled like a crash
    started: float = float("nan")  # tier.started of the new worker
    ready: float = float("nan")  # tier.ready of the new worker
    new_pid: int | None = None
    window_end: float = float("nan")
    warnings: dict[str, int] = field(default_factory=dict)
    in_window: list[Record] = field(default_factory=list)  # from the SIGSTOP to --window-tail after `ready`
    in_flight: list[Record] = field(default_factory=list)  # started before the SIGSTOP, ended after it
    first_ok: float = float("nan")  # end of the first successful request started after the SIGSTOP

    @property
    def detect(self) -> float:
        return self.hung - self.stopped

    @property
    def replace(self) -> float:
        return self.ready - self.stopped

    @property
    def to_serving(self) -> float:
        """From the SIGSTOP to the first answer served by the new worker (no other could answer it)."""
        return self.first_ok - self.stopped

    @property
    def in_flight_failed(self) -> list[Record]:
        return [r for r in self.in_flight if r.failure is not None]

    @property
    def not_explicit(self) -> list[Record]:
        """Requests in flight at the freeze that failed some other way than the daemon's explicit errors."""
        return [r for r in self.in_flight_failed if not r.failure.startswith(EXPLICIT_ERRORS)]

    @property
    def started_after(self) -> list[Record]:
        """The requests of the window that started after the SIGSTOP."""
        return [r for r in self.in_window if r.started > self.stopped]

    @property
    def other_failed(self) -> list[Record]:
        """Failed requests of the window that were not in flight at the freeze."""
        return [r for r in self.started_after if r.failure is not None]

    def refused_at(self) -> str:
        """When the failed requests started after the freeze ended, in seconds after the SIGSTOP."""
        ends = [r.ended - self.stopped for r in self.other_failed]
        return f"{min(ends):.2f}-{max(ends):.2f}" if ends else "-"

    @property
    def in_flight_ended(self) -> float:
        """Seconds from the SIGSTOP to the end of the last request that was in flight at it."""
        return max((r.ended for r in self.in_flight), default=float("nan")) - self.stopped

    @property
    def in_flight_answered_by(self) -> float:
        """Seconds from the SIGSTOP to the end of the last request in flight at it that still succeeded (its
        tokens were already on their way back when the worker froze)."""
        answered = [r.ended for r in self.in_flight if r.failure is None]
        return max(answered, default=float("nan")) - self.stopped

    @property
    def p99(self) -> float:
        return percentile(ok_latencies(self.in_window), 0.99)

    def attach(self, load: Load) -> None:
        """Take its requests from the load, once it has stopped."""
        self.in_window = load.between(self.stopped, self.window_end)
        self.in_flight = [r for r in self.in_window if r.started <= self.stopped]
        after = [r.ended for r in load.records if r.failure is None and r.started >= self.stopped]
        self.first_ok = min(after) if after else float("nan")


def serving_worker_pid(bench: Bench) -> int | None:
    """The model worker serving now: the newest one up (status.json)."""
    status = read_status(bench.runtime_dir, bench.daemon.process.pid) or {"tiers": []}
    up = [t for t in status["tiers"] if t["tier"] == "worker" and t["state"] == "up"]
    return max(up, key=lambda t: t["epoch"])["pid"] if up else None


async def run_frozen(bench: Bench, repeat: int) -> Freeze | None:
    """SIGSTOP the serving model worker and follow the supervisor until a new one is ready; None if no worker
    was up to stop."""
    args, log = bench.args, bench.log
    pid = serving_worker_pid(bench)
    if pid is None:
        return None
    log.poll()
    os.kill(pid, signal.SIGSTOP)
    freeze = Freeze(repeat, pid, time.time())
    try:
        hung = await wait_for_event(
            bench, "tier.hung", freeze.stopped, args.hang_timeout + HUNG_SLACK_S, tier="worker", child_pid=pid
        )
        if hung is not None:
            freeze.hung, freeze.silent_s = hung["ts"], float(hung.get("silent_s", float("nan")))
            ready = await wait_for_event(bench, "tier.ready", freeze.hung, args.reload_timeout, tier="worker")
            if ready is not None:
                freeze.ready, freeze.new_pid = ready["ts"], ready.get("child_pid")
    finally:
        # Not declared hung (or not yet dead): let it run again, so that the run goes on and ends.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    log.poll()
    if died := log.find("tier.died", freeze.stopped, child_pid=pid):
        freeze.died = died[0]["ts"]
    if started := log.find("tier.started", freeze.stopped, tier="worker"):
        freeze.started = started[0]["ts"]
    end = freeze.ready if freeze.ready == freeze.ready else time.time()
    freeze.window_end = end + args.window_tail
    await settle(bench)
    log.poll()
    freeze.warnings = log_warnings(log, freeze.stopped)
    return freeze


def freeze_line(freeze: Freeze) -> str:
    """What one freeze did, in one line."""
    if freeze.hung != freeze.hung:
        return f"worker {freeze.pid} stopped: no tier.hung (it was let go on again)"
    return (
        f"worker {freeze.pid} stopped: tier.hung after {fmt_s(freeze.detect)} s (silent {fmt_s(freeze.silent_s)} s), "
        f"died {fmt_s(freeze.died - freeze.stopped)} s, new worker {freeze.new_pid} started "
        f"{fmt_s(freeze.started - freeze.stopped)} s, ready {fmt_s(freeze.replace)} s after the SIGSTOP"
    )


# --- report -------------------------------------------------------------------------------------------


def print_fault_details(doomed: list[Doomed], freezes: list[Freeze], notes: list[str]) -> None:
    """One row per doomed reload and per freeze; what disagreed with the expectation goes to `notes`."""
    if doomed:
        print("\n## each doomed reload (its write back to the running config not counted)")
        print(
            "| # | change | result | config.reload after the write | PIDs unchanged | tier processes started | "
            "requests in window | failed | p99 in window ms | log warnings | written back |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for i, d in enumerate(doomed, 1):
            t = d.trial
            print(
                f"| {i} | {t.change} | {t.result} | {fmt_s(t.to_generation)} | {'yes' if d.pids_unchanged else 'NO'} "
                f"| {len(t.startups)} | {len(t.in_window)} | {kinds_text(t.failures) or 0} | {fmt_ms(t.p99)} | "
                f"{kinds_text(t.warnings) or '-'} | {d.restore.result if d.restore else '-'} |"
            )
            if t.result != "rejected" or not t.reason or f"127.0.0.1:{d.port}" not in t.reason:
                notes.append(f"doomed reload '{t.change}' was {t.result}, expected rejected for the port: {t.reason}")
            if not d.pids_unchanged:
                notes.append(f"doomed reload '{t.change}' changed the daemon's processes: {d.before} -> {d.after}")
            if d.restore is not None and d.restore.result != "unchanged":
                notes.append(f"writing back the running config after '{t.change}': {d.restore.result}")
    if freezes:
        print("\n## each freeze (times in seconds from the SIGSTOP)")
        print(
            "| # | worker | tier.hung | tier.died | new worker tier.started | tier.ready | first OK answer after | "
            "in flight at the freeze: failed | the others answered by | last of them ended | started after the "
            "freeze: failed | those failures ended at | p99 in window ms | log warnings |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for i, f in enumerate(freezes, 1):
            print(
                f"| {i} | {f.pid} -> {f.new_pid or '-'} | {fmt_s(f.detect)} | {fmt_s(f.died - f.stopped)} | "
                f"{fmt_s(f.started - f.stopped)} | {fmt_s(f.replace)} | {fmt_s(f.to_serving)} | "
                f"{failed_cell(f.in_flight)} | {fmt_s(f.in_flight_answered_by)} | {fmt_s(f.in_flight_ended)} | "
                f"{failed_cell(f.started_after)} | {f.refused_at()} | {fmt_ms(f.p99)} | "
                f"{kinds_text(f.warnings) or '-'} |"
            )
            if f.hung != f.hung or f.ready != f.ready:
                notes.append(f"freeze {i}: {freeze_line(f)}; no new worker ready")
            if f.not_explicit:
                notes.append(
                    f"freeze {i}: requests in flight at the freeze ended without an explicit error: "
                    f"{kinds_text(failures_by_kind(f.not_explicit))}"
                )


def print_fault_results(doomed: list[Doomed], freezes: list[Freeze], steady_p99: float) -> None:
    """One row for the doomed reloads and one for the freezes: medians (min-max) over the repeats."""
    if doomed:
        trials = [d.trial for d in doomed]
        print(
            "\n| doomed reload | rejected | file write to config.reload (rejected), s | PIDs unchanged | "
            "failed requests | p99 during it vs steady p99, ms |"
        )
        print("|---|---|---|---|---|---|")
        print(
            f"| `server.port` taken + `model.seed` + 1 | {sum(t.result == 'rejected' for t in trials)}/{len(trials)} "
            f"| {spread([t.to_generation for t in trials])} | {sum(d.pids_unchanged for d in doomed)}/{len(doomed)} "
            f"| {failed_cell([r for t in trials for r in t.in_window])} | {spread([t.p99 for t in trials], fmt_ms)} "
            f"vs {fmt_ms(steady_p99)} |"
        )
    if freezes:
        in_flight = [r for f in freezes for r in f.in_flight]
        others = [r for f in freezes for r in f.started_after]
        print(
            "\n| frozen worker (SIGSTOP) | SIGSTOP to tier.hung, s | to the new worker's tier.ready, s | to the "
            "first OK answer, s | in flight at the freeze: failed | last of them ended, s | requests started "
            "after the freeze: failed |"
        )
        print("|---|---|---|---|---|---|---|")
        print(
            f"| {len(freezes)} freeze(s) | {spread([f.detect for f in freezes])} | "
            f"{spread([f.replace for f in freezes])} | {spread([f.to_serving for f in freezes])} | "
            f"{failed_cell(in_flight)} | {spread([f.in_flight_ended for f in freezes])} | {failed_cell(others)} |"
        )
    if doomed or freezes:
        print(
            "\nDoomed reload: from the os.replace of the config file to the supervisor's config.reload event; "
            "PIDs: every process of the daemon (status.json and their children) before the write and after the "
            "rejection; its window runs to --window-tail after the event. Frozen worker: times from the SIGSTOP; "
            "in flight: requests started before it and ended after it; started after the freeze: the rest of its "
            "window, which runs from the SIGSTOP to --window-tail after the new worker's tier.ready."
        )
