"""Which replica a new request runs on (model.dp_size > 1).

A request is placed once, when it comes, and stays on its replica: its keys and values
are in that replica's cache. The choice, among the replicas taking requests:

- one whose context holds the prompt, if any does (during a reload that changes the
  context, the old and the new replicas differ);
- the least loaded: fewest requests running and waiting, then room in the cache for the
  prompt now, then the most free cache;
- unless another holds (or is computing) a longer prefix of the prompt in its cache and is
  loaded at most PREFIX_LOAD_SLACK requests more: there, the prefix is not computed again.
  The slack bounds how far prompts that share a prefix (one system prompt for every
  request) can pile onto one replica while the others idle.

Pure: the scheduler (service.py) gathers each replica's figures into a Candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX_LOAD_SLACK = 2


@dataclass(frozen=True)
class Candidate:
    """A replica taking requests, as one request's placement sees it."""

    index: int
    running: int
    waiting: int
    free_tokens: int
    context_length: int
    cached_tokens: int = 0  # of this request's prompt, held or being computed in its cache

    @property
    def load(self) -> int:
        return self.running + self.waiting


def choose(candidates: list[Candidate], prompt_tokens: int) -> Candidate:
    """The replica to place a request of `prompt_tokens` prompt tokens on (`candidates` not empty)."""
    fitting = [c for c in candidates if prompt_tokens < c.context_length] or candidates
    least = min(fitting, key=lambda c: (c.load, c.free_tokens <= prompt_tokens, -c.free_tokens, c.index))
    cached = [c for c in fitting if c.cached_tokens > least.cached_tokens and c.load <= least.load + PREFIX_LOAD_SLACK]
    if cached:
        return max(cached, key=lambda c: (c.cached_tokens, -c.load, c.free_tokens, -c.index))
    return least
