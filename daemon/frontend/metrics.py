"""Prometheus metrics of the front-end, shared by all its worker processes.

prometheus-client's multiprocess mode keeps each worker's figures in files under
PROMETHEUS_MULTIPROC_DIR (set by the front-end tier before Granian starts its
workers), so /metrics answers the same whichever worker serves it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from daemon.ipc.messages import STEP_KINDS, DaemonStatus, SchedulerStats

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)

REQUESTS = Counter("daemon_requests", "HTTP requests answered, by endpoint and status", ["endpoint", "status"])
RUNNING = Gauge("daemon_running_requests", "Requests in the running batch", multiprocess_mode="mostrecent")
QUEUED = Gauge("daemon_queued_requests", "Requests waiting for admission", multiprocess_mode="mostrecent")
CACHE_FREE = Gauge("daemon_kv_cache_free_tokens", "Free KV-cache token slots", multiprocess_mode="mostrecent")
CACHE_TOTAL = Gauge("daemon_kv_cache_tokens", "KV-cache capacity in tokens", multiprocess_mode="mostrecent")
TIME_TO_FIRST_TOKEN = Histogram(
    "daemon_time_to_first_token_seconds", "Time to the first output", buckets=LATENCY_BUCKETS
)
LATENCY = Histogram("daemon_request_latency_seconds", "Time to the last output", ["endpoint"], buckets=LATENCY_BUCKETS)
PROMPT_TOKENS = Histogram("daemon_prompt_tokens", "Prompt tokens per request", buckets=TOKEN_BUCKETS)
COMPLETION_TOKENS = Histogram("daemon_completion_tokens", "Generated tokens per request", buckets=TOKEN_BUCKETS)
TOKENS = Counter("daemon_tokens", "Tokens processed, by kind (prompt, completion)", ["kind"])
RELOAD_RESULTS = ("applied", "unchanged", "rejected", "rolled_back")


class SupervisorFigures(Collector):
    """What the supervisor counts (tier restarts, reloads, the generation), read from its status
    file at scrape time: one figure whichever front-end worker answers."""

    def __init__(self, status: DaemonStatus):
        self.status = status

    def collect(self) -> Iterable[Metric]:
        restarts = CounterMetricFamily(
            "daemon_tier_restarts", "Times a tier process was restarted after dying", labels=["tier", "index"]
        )
        for tier in self.status.tiers:
            restarts.add_metric([tier.tier, str(tier.index)], tier.restarts)
        reloads = CounterMetricFamily("daemon_reloads", "Config reloads, by result", labels=["result"])
        for result in RELOAD_RESULTS:
            reloads.add_metric([result], self.status.reloads.get(result, 0))
        generation = GaugeMetricFamily("daemon_config_generation", "The config generation serving (+1 per reload)")
        generation.add_metric([], self.status.generation)
        return [restarts, reloads, generation, self._worker_processes()]

    def _worker_processes(self) -> Metric:
        """Every process holding the model: a series per replica and tensor-parallel rank."""
        processes = GaugeMetricFamily(
            "daemon_worker_process",
            "1 for each process holding the model while its worker is up (0 otherwise), by replica and rank",
            labels=["replica", "rank", "node", "device", "pid"],
        )
        for tier in self.status.tiers:
            if tier.tier != "worker" or tier.model is None:
                continue
            for rank in tier.model.ranks:
                labels = [str(tier.index), str(rank.rank), str(rank.node), rank.device, str(rank.pid)]
                processes.add_metric(labels, 1 if tier.state == "up" else 0)
        return processes


class SchedulerFigures(Collector):
    """What the scheduler counts (prefix-cache lookups), from its latest stats broadcast: the
    scheduler's own totals, so every front-end worker answers the same. They start again from zero
    when the scheduler restarts, as a counter may."""

    def __init__(self, stats: SchedulerStats):
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        queried = CounterMetricFamily(
            "daemon_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache at admission"
        )
        queried.add_metric([], self.stats.prefix_cache_queried_tokens)
        hits = CounterMetricFamily(
            "daemon_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache at admission (not computed)"
        )
        hits.add_metric([], self.stats.prefix_cache_hit_tokens)
        blocks = GaugeMetricFamily(
            "daemon_prefix_cache_blocks", "KV-cache blocks holding a cached prefix (in use or free)"
        )
        blocks.add_metric([], self.stats.prefix_cache_blocks)
        steps = CounterMetricFamily(
            "daemon_engine_steps",
            "Engine steps run, by kind: prefill (computes prompt tokens, decodes beside them) or decode (decodes only)",
            labels=["kind"],
        )
        seconds = CounterMetricFamily(
            "daemon_engine_step_seconds", "Time the model worker spent running steps, by kind of step", labels=["kind"]
        )
        tokens = CounterMetricFamily(
            "daemon_engine_step_tokens",
            "Tokens computed in steps: prompt tokens prefilled (prefix-cache hits excluded), tokens decoded",
            labels=["kind"],
        )
        for kind in STEP_KINDS:
            steps.add_metric([kind], self.stats.steps.get(kind, 0))
            seconds.add_metric([kind], self.stats.step_seconds.get(kind, 0.0))
            tokens.add_metric([kind], self.stats.step_tokens.get(kind, 0))
        return [queried, hits, blocks, steps, seconds, tokens, *self._replicas()]

    def _replicas(self) -> list[Metric]:
        """Each data-parallel replica's share of the engine figures (model.dp_size)."""
        labels = ["replica"]
        running = GaugeMetricFamily("daemon_replica_running_requests", "Requests running on a replica", labels=labels)
        queued = GaugeMetricFamily("daemon_replica_queued_requests", "Requests waiting on a replica", labels=labels)
        free = GaugeMetricFamily("daemon_replica_kv_cache_free_tokens", "A replica's free KV slots", labels=labels)
        total = GaugeMetricFamily("daemon_replica_kv_cache_tokens", "A replica's KV-cache capacity", labels=labels)
        placed = CounterMetricFamily(
            "daemon_replica_requests_placed", "Requests the scheduler placed on a replica", labels=labels
        )
        serving = GaugeMetricFamily(
            "daemon_replica_serving", "1 while a replica takes new requests (0: drained or restarting)", labels=labels
        )
        for replica in self.stats.replicas:
            label = [str(replica.replica)]
            running.add_metric(label, replica.running)
            queued.add_metric(label, replica.queued)
            free.add_metric(label, replica.free_tokens)
            total.add_metric(label, replica.total_tokens)
            placed.add_metric(label, replica.placed)
            serving.add_metric(label, 1 if replica.state == "serving" else 0)
        return [running, queued, free, total, placed, serving]


def render(status: DaemonStatus | None, stats: SchedulerStats | None = None) -> bytes:
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    figures: list[Collector] = []
    if status is not None:
        figures.append(SupervisorFigures(status))
    if stats is not None:
        figures.append(SchedulerFigures(stats))
    for collector in figures:
        registry.register(collector)
    try:
        return generate_latest(registry)
    finally:
        for collector in figures:
            registry.unregister(collector)
