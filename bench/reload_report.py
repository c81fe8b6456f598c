"""What bench/reload.py prints once the load has stopped: each change, then the results (the
steady state, and one row per class of change, medians over the repeats).
"""

from __future__ import annotations

import argparse
import os
import statistics

from common import cpu_model, percentile
from reload_changes import DESCRIPTION, EXPECTED_RESTART, GOAL_S, MODEL_GOAL_EXTRA_S, Trial, replaces_worker
from reload_load import Load, Record, failures_by_kind, kinds_text, ok_latencies


def fmt_s(x: float) -> str:
    return "-" if x != x else f"{x:.2f}"


def fmt_ms(x: float) -> str:
    return "-" if x != x else f"{x * 1000:.0f}"


def med(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], f=fmt_s) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "-"
    if len(values) == 1:
        return f(values[0])
    return f"{f(statistics.median(values))} ({f(min(values))}-{f(max(values))})"


def failed_cell(records: list[Record]) -> str:
    """'<failed> of <all>' requests, and the failures by kind when there are any."""
    failed = failures_by_kind(records)
    return f"{sum(failed.values())} of {len(records)}" + (f": {kinds_text(failed)}" if failed else "")


def steady_records(load: Load | None, out: dict, which: str) -> list[Record]:
    """The requests wholly inside the steady-state measurement `which` (steady_before, steady_after)."""
    return load.inside(*out[which]) if load is not None and which in out else []


def steady_p99(load: Load | None, out: dict) -> float:
    """The p99 of the steady state before the first change: what every class's p99 is set against."""
    return percentile(ok_latencies(steady_records(load, out, "steady_before")), 0.99)


def print_changes(trials: list[Trial], notes: list[str]) -> None:
    """One row per change, in the order made; what disagreed with the expectation goes to `notes`."""
    if not trials:
        return
    print("\n## each change")
    print(
        "| # | change | result | restarted | watcher saw it | config.reload (time to new generation) | "
        "transaction (duration_s) | new tier(s) ready | new worker start -> ready | first OK request started "
        "after the event, done at | requests in window | failed | failures ended at | p99 in window ms | "
        "log warnings |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i, t in enumerate(trials, 1):
        print(
            f"| {i} | {t.change} | {t.result} | {', '.join(t.restarted) or '-'} | "
            f"{fmt_s(t.detected - t.written)} | {fmt_s(t.to_generation)} | {fmt_s(t.duration_s)} | "
            f"{fmt_s(t.new_ready)} | {fmt_s(t.load_time)} | {fmt_s(t.first_ok - t.written)} | "
            f"{len(t.in_window)} | {kinds_text(t.failures) or 0} | {t.failed_at()} | {fmt_ms(t.p99)} | "
            f"{kinds_text(t.warnings) or '-'} |"
        )
    print("\n(all times in seconds from the os.replace of the config file)")
    for t in trials:
        if t.server_info:
            notes.append(f"after '{t.change}': {t.server_info}")
        if t.result != "applied":
            notes.append(f"'{t.change}' was {t.result}: {t.reason}")
        expected = EXPECTED_RESTART.get(t.kind)
        if expected is not None and sorted(t.restarted) != sorted(expected) and t.result == "applied":
            notes.append(f"'{t.change}' restarted {t.restarted}, expected {expected}")


def print_results(
    args: argparse.Namespace,
    out: dict,
    trials: list[Trial],
    load: Load | None,
    startup_load: float,
    windowed: list[Record],
) -> None:
    """The run in one paragraph (load, steady state before and after), then one row per class of change.
    `windowed`: the requests in the window of any class (faults too), so that the others are counted apart."""
    print("\n## results")
    steady_before = steady_records(load, out, "steady_before")
    steady_after = steady_records(load, out, "steady_after")
    p99_before = steady_p99(load, out)
    if load is not None:
        span = (max(r.ended for r in load.records) - min(r.started for r in load.records)) if load.records else 0.0
        seen = {id(r) for r in windowed}
        windows = [r for r in load.records if id(r) in seen]
        outside = [r for r in load.records if id(r) not in seen]
        print(
            f"Machine: nproc {os.cpu_count()} ({cpu_model()}); the load client shares its cores with the daemon. "
            f"Load: {args.clients} closed-loop clients over aiohttp HTTP/1.1 keep-alive, completions with "
            f"max_tokens {args.max_tokens} (ignore_eos), {args.stream_percent}% of the clients streaming, no "
            f"retries; {len(load.records)} requests in {span:.0f} s, {len(windows)} of them in reload windows; "
            f"failures outside the windows: {kinds_text(failures_by_kind(outside)) or 0}. "
            f"Steady state ({args.steady:g} s before the first change): "
            f"{len(steady_before) / args.steady:.0f} req/s, p50 {fmt_ms(percentile(ok_latencies(steady_before), 0.5))}"
            f" ms, p99 {fmt_ms(p99_before)} ms; after the changes and the change back to it: "
            + (
                f"{len(steady_after) / args.steady:.0f} req/s, p50 "
                f"{fmt_ms(percentile(ok_latencies(steady_after), 0.5))} ms, p99 "
                f"{fmt_ms(percentile(ok_latencies(steady_after), 0.99))} ms"
                if steady_after
                else "not measured"
            )
            + ". Model load time at start "
            f"(worker tier.started -> tier.ready, idle): {fmt_s(startup_load)} s. {args.repeats} changes per "
            f"class: medians (min-max)."
        )
    print()
    print(
        "| change class | restarted tier | time to new generation (config.reload), s | first OK request "
        "after it, s | goal, s | met | failed requests (all changes) | p99 during reload vs steady p99, ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for kind in args.classes:
        of_kind = [t for t in trials if t.kind == kind]
        if not of_kind:
            continue
        restarted = sorted({tier for t in of_kind for tier in t.restarted}) or ["none (live)"]
        times = [t.to_generation for t in of_kind]
        if replaces_worker(kind):
            goal = f"< load + {MODEL_GOAL_EXTRA_S:g} s (load {spread([t.load_time for t in of_kind])})"
        else:
            goal = f"< {GOAL_S[kind]:g}"
        met = sum(1 for t in of_kind if t.result == "applied" and t.to_serving < t.goal())
        p99s = [t.p99 for t in of_kind]
        ratio = f" ({med(p99s) / p99_before:.1f}x)" if p99_before == p99_before and p99_before else ""
        print(
            f"| {DESCRIPTION[kind]} | {', '.join(restarted)} | {spread(times)} | "
            f"{spread([t.to_serving for t in of_kind])} | {goal} | {met}/{len(of_kind)} | "
            f"{failed_cell([r for t in of_kind for r in t.in_window])} | {spread(p99s, fmt_ms)} vs "
            f"{fmt_ms(p99_before)}{ratio} |"
        )
    delay = "the file watch's debounce" if args.trigger == "file" else "the start of the `daemon reload` client"
    print(
        "\nTime to new generation: from the os.replace of the config file to the supervisor's config.reload "
        f"event ({delay} included; the transaction ends once old tiers have drained); first OK "
        "request after it: to the end of the first request that started after that event and succeeded (served by "
        "the new generation's processes); the goal counts as met when that request ended within it. Reload "
        f"window: from the write to {args.window_tail:g} s after that event; a request counts when its lifetime "
        "overlaps it. Steady p99: the requests wholly inside the steady-state measurement before the first change."
    )
