"""The daemon against vLLM's CPU build, as one markdown table with a ratio column (daemon / vLLM): the
ready time, W1 (h2load: req/s over HTTP/1.1 and h2c), W2 and W3 (`vllm bench serve`: output tokens/s,
TTFT and TPOT medians), and the failed requests of each, for bench/vllm_peer.py.

The goal (issue 13) is a ratio of at least 1.5 where higher is better, with no failed request on either
server: each such row says whether it is met, so that the table reads without the issue beside it.
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass, field

from common import H2loadResult, h2c_shape

H1, H2C = "HTTP/1.1", "HTTP/2 (h2c)"
GOAL_RATIO = 1.5


@dataclass
class Measured:
    """What one server gave: its ready time, W1's runs by protocol, and `vllm bench serve`'s results by workload."""

    ready_s: float | None = None
    w1: dict[str, list[H2loadResult]] = field(default_factory=dict)
    served: dict[str, list[dict]] = field(default_factory=dict)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _w1_summary(runs: list[H2loadResult] | None) -> tuple[float, int] | None:
    """(median req/s, failures summed) over W1's runs."""
    return (_median([r.rps for r in runs]), sum(r.failed for r in runs)) if runs else None


def _served_summary(runs: list[dict] | None) -> dict | None:
    """The median of each measure over the runs; failed and prompts summed."""
    if not runs:
        return None
    measures = ("output_throughput", "median_ttft_ms", "median_tpot_ms")
    summary = {key: _median([r[key] for r in runs]) for key in measures}
    summary["failed"] = sum(_served_failed(r) for r in runs)
    summary["num_prompts"] = sum(r.get("num_prompts", 0) for r in runs)
    return summary


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _ratio(daemon: float | None, peer: float | None) -> float | None:
    if daemon is None or peer is None or not peer or math.isnan(daemon) or math.isnan(peer):
        return None
    return daemon / peer


def _ratio_cell(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _goal_cell(ratio: float | None) -> str:
    if ratio is None:
        return f">= {GOAL_RATIO}x"
    return f">= {GOAL_RATIO}x: {'met' if ratio >= GOAL_RATIO else 'NOT met'}"


def _failures_goal(*counts: int | None) -> str:
    if any(count is None for count in counts):
        return "0"
    return f"0: {'met' if not any(counts) else 'NOT met'}"


def _served_failed(result: dict | None) -> int | None:
    if result is None:
        return None
    return int(result.get("failed", result.get("num_prompts", 0) - result.get("completed", 0)))


def _row(*cells: str) -> None:
    print("| " + " | ".join(cells) + " |")


def _w1_rows(daemon: Measured, peer: Measured, args: argparse.Namespace) -> None:
    connections, streams = h2c_shape(args.concurrency, args.h2_connections)
    shapes = {H1: f"{args.concurrency} connections", H2C: f"{connections} connections x {streams} streams"}
    for proto, shape in shapes.items():
        d, p = _w1_summary(daemon.w1.get(proto)), _w1_summary(peer.w1.get(proto))
        if d is None and p is None:
            continue
        # vLLM's server (uvicorn) speaks no h2c: the daemon's h2c is set against vLLM's HTTP/1.1.
        base = p or _w1_summary(peer.w1.get(H1))
        ratio = _ratio(d[0] if d else None, base[0] if base else None)
        against = " (vs vLLM's HTTP/1.1)" if p is None and ratio is not None else ""
        peer_rps = f"{p[0]:.1f}" if p else "n/a (no h2c)" if proto == H2C else "-"
        _row(
            "W1",
            f"req/s, {proto}, {shape}",
            _number(d[0] if d else None, 1),
            peer_rps,
            _ratio_cell(ratio) + against,
            _goal_cell(ratio),
        )
        d_failed, p_failed = (d[1] if d else None), (p[1] if p else None)
        peer_failed = _number(p_failed, 0) if p or proto == H1 else "n/a"
        goal = _failures_goal(d_failed, p_failed) if proto == H1 else _failures_goal(d_failed)
        runs = len(daemon.w1.get(proto) or peer.w1.get(proto) or [])
        _row("W1", f"failed of {runs} x {args.requests}, {proto}", _number(d_failed, 0), peer_failed, "", goal)


def _served_rows(workload: str, daemon: Measured, peer: Measured) -> None:
    d, p = _served_summary(daemon.served.get(workload)), _served_summary(peer.served.get(workload))
    for key, measure, digits, higher_is_better in (
        ("output_throughput", "output tok/s", 0, True),
        ("median_ttft_ms", "TTFT p50 ms", 0, False),
        ("median_tpot_ms", "TPOT p50 ms", 1, False),
    ):
        d_value, p_value = (d[key] if d else None), (p[key] if p else None)
        ratio = _ratio(d_value, p_value)
        goal = _goal_cell(ratio) if higher_is_better else "lower is better"
        _row(workload, measure, _number(d_value, digits), _number(p_value, digits), _ratio_cell(ratio), goal)
    prompts = (d or p or {}).get("num_prompts", "?")
    d_failed, p_failed = (d["failed"] if d else None), (p["failed"] if p else None)
    _row(
        workload,
        f"failed of {prompts}",
        _number(d_failed, 0),
        _number(p_failed, 0),
        "",
        _failures_goal(d_failed, p_failed),
    )


def print_table(daemon: Measured, peer: Measured, workloads: list[str], args: argparse.Namespace) -> None:
    _row("workload", "measure", "daemon", "vLLM (CPU build)", "ratio (daemon/vLLM)", "goal")
    _row(*["---"] * 6)
    ready = _ratio(daemon.ready_s, peer.ready_s)
    _row(
        "start",
        "ready: first completion answered, s",
        _number(daemon.ready_s, 1),
        _number(peer.ready_s, 1),
        _ratio_cell(ready),
        "lower is better",
    )
    for workload in workloads:
        if workload == "W1":
            _w1_rows(daemon, peer, args)
        else:
            _served_rows(workload, daemon, peer)
