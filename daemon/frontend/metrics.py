"""Prometheus metrics of the front-end, shared by all its worker processes.

prometheus-client's multiprocess mode keeps each worker's figures in files under
PROMETHEUS_MULTIPROC_DIR (set by the front-end tier before Granian starts its
workers), so /metrics answers the same whichever worker serves it.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

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
TIER_RESTARTS = Gauge(
    "daemon_tier_restarts", "Times a tier process was restarted", ["tier", "index"], multiprocess_mode="mostrecent"
)


def render() -> bytes:
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)
        return generate_latest(registry)
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY)
