"""The scheduler: admission bounds, KV-cache capacity, chunked prefill."""

from __future__ import annotations

from daemon.config.errors import Severity
from daemon.config.facts import Facts
from daemon.config.rules.catalogue import CHOICE, LOWER, UPPER, CheckResult, rule, schema_rule
from daemon.config.rules.model import model_info
from daemon.config.schema import DaemonSettings

schema_rule(
    "scheduler.policy-choice",
    keys=["scheduler.policy"],
    summary="The scheduling policy is fcfs, lof or priority.",
    fix="use fcfs, lof or priority",
    errors=CHOICE,
)
schema_rule(
    "scheduler.mem-fraction-range",
    keys=["scheduler.mem_fraction_static"],
    summary="mem_fraction_static is strictly between 0 and 1.",
    fix="use a fraction such as 0.85",
    errors=LOWER | UPPER,
)


def _context_length(c: DaemonSettings, f: Facts) -> int | None:
    if c.model.context_length:
        return c.model.context_length
    info = model_info(f, c)
    return info.max_context if info else None


@rule(
    "scheduler.total-tokens-below-context",
    keys=["scheduler.max_total_tokens", "model.context_length"],
    fix="raise scheduler.max_total_tokens to at least the context length, or lower model.context_length",
)
def _total_below_context(c: DaemonSettings, f: Facts) -> CheckResult:
    """The KV cache holds at least one full-length request (max_total_tokens >= context length)."""
    total, context = c.scheduler.max_total_tokens, _context_length(c, f)
    if total and context and total < context:
        return f"max_total_tokens {total} is less than the context length {context}"


@rule(
    "scheduler.chunked-prefill-size",
    keys=["scheduler.chunked_prefill_size"],
    fix="use a positive chunk size such as 2048, or -1 to disable chunked prefill",
)
def _chunked_prefill(c: DaemonSettings, f: Facts) -> CheckResult:
    """chunked_prefill_size is positive, or -1 (off)."""
    size = c.scheduler.chunked_prefill_size
    if size == 0 or size < -1:
        return f"chunked_prefill_size {size} is neither positive nor -1"


@rule(
    "scheduler.chunk-exceeds-cache",
    keys=["scheduler.chunked_prefill_size", "scheduler.max_total_tokens"],
    severity=Severity.WARNING,
    fix="lower chunked_prefill_size to at most max_total_tokens",
)
def _chunk_exceeds_cache(c: DaemonSettings, f: Facts) -> CheckResult:
    """A prefill chunk fits in the KV cache."""
    size, total = c.scheduler.chunked_prefill_size, c.scheduler.max_total_tokens
    if total and size > total:
        return f"chunked_prefill_size {size} exceeds max_total_tokens {total}; chunks will be capped"


@rule(
    "scheduler.running-exceeds-cache",
    keys=["scheduler.max_running_requests", "scheduler.max_total_tokens"],
    severity=Severity.WARNING,
    fix="lower max_running_requests, or raise max_total_tokens",
)
def _running_exceeds_cache(c: DaemonSettings, f: Facts) -> CheckResult:
    """Every running request needs KV-cache room, so more running requests than cache tokens cannot happen."""
    running, total = c.scheduler.max_running_requests, c.scheduler.max_total_tokens
    if total and running > total:
        return f"max_running_requests {running} can never be reached with max_total_tokens {total}"
