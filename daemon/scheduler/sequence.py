"""One request as the scheduler tracks it: its tokens, how far the engine has got, why it ended."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from daemon.ipc.messages import Constraint, FinishReason, Sampling, TokenLogprobs


class Phase(enum.Enum):
    WAITING = "waiting"  # queued, holds no cache
    RUNNING = "running"  # admitted: holds cache blocks, being prefilled or decoded
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int
    request_id: str
    tokenizer: int  # the tokenizer worker its tokens go back to
    prompt_ids: list[int]
    sampling: Sampling
    eos_token_ids: frozenset[int]
    priority: int = 0
    arrival: float = 0.0
    output_ids: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose keys and values are in the cache
    in_flight: int = 0  # tokens in steps planned but not completed
    samples_in_flight: int = 0  # tokens those steps will sample (not yet in output_ids)
    phase: Phase = Phase.WAITING
    finish_reason: FinishReason | None = None
    unsent: list[int] = field(default_factory=list)  # sampled but not yet sent to the tokenizer
    block_hashes: list[bytes] = field(default_factory=list)  # of its full blocks known so far (prefix caching)
    cached_tokens: int | None = None  # prompt tokens found in the prefix cache when it was first admitted
    prompt_unsent: bool = False  # its sampling needs its prompt in the worker, which has not had it yet
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # of prompt tokens 1.. reported so far
    constraint: Constraint | None = None  # what its output must match (the worker's matcher enforces it)
    constraint_unsent: bool = False  # admitted, and the worker has not had its constraint with a chunk yet

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def tokens_until(self, end: int) -> list[int]:
        """Its first `end` tokens (prompt, then output), without copying the rest."""
        if end <= len(self.prompt_ids):
            return self.prompt_ids[:end]
        return self.prompt_ids + self.output_ids[: end - len(self.prompt_ids)]

    @property
    def pending(self) -> int:
        """Tokens not yet in the cache: the prompt (or what is left of it), else the last sampled token.

        One rule covers prefill, chunked prefill, decode and recomputation after
        preemption: a step processes some pending tokens, and samples when it
        processes the last of them.
        """
        return self.length - self.computed

    @property
    def planned(self) -> int:
        """Positions whose keys and values are in the cache once the steps in flight complete."""
        return self.computed + self.in_flight

    @property
    def unplanned(self) -> int:
        """`pending`, seen from the next step to plan: it counts the tokens the steps in flight
        will sample and leaves out those they process."""
        return self.length + self.samples_in_flight - self.planned

    def ends_in_flight(self, context_length: int) -> bool:
        """Whether the tokens being sampled in flight are certainly its last (by length)."""
        if not self.samples_in_flight:
            return False
        outputs = len(self.output_ids) + self.samples_in_flight
        return outputs >= self.sampling.max_tokens or self.length + self.samples_in_flight >= context_length

    def finish_reason_after(self, token: int, context_length: int) -> FinishReason | None:
        """Why the sequence ends with `token` appended, if it does."""
        stop_ids = self.sampling.stop_token_ids
        if token in stop_ids or (not self.sampling.ignore_eos and token in self.eos_token_ids):
            return "stop"
        if len(self.output_ids) >= self.sampling.max_tokens or self.length >= context_length:
            return "length"
        return None
