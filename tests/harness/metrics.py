"""The daemon's /metrics, scraped into samples; the engine's figures and waits on them.

The front-end refreshes the engine's figures (running and queued requests, KV-cache tokens) from
the scheduler about every 0.5 s: a wait on them allows for that lag.
"""

from __future__ import annotations

import time
from typing import Protocol

import httpx
from prometheus_client.parser import text_string_to_metric_families

from harness.wait import until


class Served(Protocol):
    @property
    def url(self) -> str: ...


def scrape(daemon: Served) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    text = httpx.get(daemon.url + "/metrics", timeout=5).raise_for_status().text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(daemon: Served, name: str, **labels: str) -> float:
    """One sample of /metrics (KeyError if it is not there)."""
    return scrape(daemon)[(name, tuple(sorted(labels.items())))]


def engine_figures(daemon: Served) -> tuple[float, float, float]:
    """(running requests, free KV-cache tokens, KV-cache tokens) as the front-end reports them."""
    samples = scrape(daemon)
    return (
        samples[("daemon_running_requests", ())],
        samples[("daemon_kv_cache_free_tokens", ())],
        samples[("daemon_kv_cache_tokens", ())],
    )


def engine_busy(daemon: Served) -> bool:
    """A request runs, holding KV-cache tokens."""
    running, free, total = engine_figures(daemon)
    return running >= 1 and free < total


def wait_engine_idle(daemon: Served, timeout: float) -> float:
    """Seconds until /metrics shows no running request and the whole KV cache free."""
    started = time.monotonic()

    def idle() -> bool:
        running, free, total = engine_figures(daemon)
        return running == 0 and total > 0 and free == total

    try:
        until(idle, timeout, interval=0.1, what="an idle engine")
    except AssertionError:
        raise AssertionError(f"the engine is still busy {timeout} s later: {engine_figures(daemon)}") from None
    return time.monotonic() - started


def wait_engine_busy(daemon: Served, timeout: float = 5.0) -> None:
    until(lambda: engine_busy(daemon), timeout, what="a running request in /metrics")
