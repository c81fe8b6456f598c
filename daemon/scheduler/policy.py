"""Scheduling policies: the order queued requests are admitted in, and who yields the cache.

fcfs: first come, first served. lof: longest output (max_tokens) first, which
packs long generations early and keeps the batch full. priority: the request's
`priority` field, lower values first (as vLLM), then arrival.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Literal

from daemon.scheduler.sequence import Sequence

Policy = Literal["fcfs", "lof", "priority"]


def admission_order(waiting: Seq[Sequence], policy: Policy) -> list[Sequence]:
    if policy == "lof":
        return sorted(waiting, key=lambda s: (-s.sampling.max_tokens, s.arrival, s.seq_id))
    if policy == "priority":
        return sorted(waiting, key=lambda s: (s.priority, s.arrival, s.seq_id))
    return sorted(waiting, key=lambda s: (s.arrival, s.seq_id))


def preemption_victim(candidates: Seq[Sequence], policy: Policy) -> Sequence:
    """Of running sequences (in admission order), the one to give its cache back."""
    if policy == "priority":
        return max(candidates, key=lambda s: (s.priority, s.arrival, s.seq_id))
    return candidates[-1]  # the most recently admitted has the least work to lose
