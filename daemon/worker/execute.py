"""Running one step plan from the scheduler on the engine."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

from daemon.engine import grammar
from daemon.engine.logprobs import TokenLogprob
from daemon.engine.runner import ModelRunner, SequenceChunk
from daemon.engine.sampler import SamplingParams
from daemon.ipc.messages import (
    SAMPLED_LAST_STEP,
    Constraint,
    PlannedChunk,
    Sampling,
    StepPlan,
    StepResult,
    TokenLogprobs,
)

NOT_SAMPLED = "its previous token was never sampled (that step failed for it)"


def execute(
    runner: ModelRunner,
    plan: StepPlan,
    worker_epoch: int = 1,
    share: Callable[[list[SequenceChunk]], None] | None = None,
) -> StepResult:
    """Run `plan`. A failure of one sequence (its sampling) ends only that one: it is reported in
    `failed` and the step's other tokens are delivered; a failure of the whole step (the forward
    pass) becomes a StepResult error, so its requests end cleanly. `share(chunks)`:
    hands the step, resolved, to the other ranks of a tensor-parallel group before it runs."""
    started = time.perf_counter()
    for seq_id in plan.finished:
        runner.release(seq_id)
    chunks: list[SequenceChunk] = []
    unsampled: dict[int, str] = {}
    for c in plan.chunks:
        if c.token_ids == [SAMPLED_LAST_STEP] and c.seq_id not in runner.last_sampled:
            # The step before failed for this sequence, so the scheduler ends it (or has): the
            # step goes on without it, rather than failing every request planned beside it.
            unsampled[c.seq_id] = NOT_SAMPLED
            continue
        chunks.append(_chunk(c, runner.last_sampled))
    if share is not None:
        share(chunks)
    try:
        tokens = runner.step(chunks)
    except Exception as exc:  # noqa: BLE001 - whatever broke, the scheduler must hear of it
        runner.last_sampled, runner.failures = {}, {}
        return StepResult(plan.step, worker_epoch, {}, error=f"{type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - started
    logprobs = {seq_id: _message(found) for seq_id, found in runner.last_logprobs.items()}
    scored = {seq_id: [_message(f) for f in found] for seq_id, found in runner.last_prompt_logprobs.items()}
    failed = {**unsampled, **runner.failures}
    return StepResult(
        plan.step,
        worker_epoch,
        tokens,
        failed=failed,
        seconds=seconds,
        logprobs=logprobs,
        prompt_logprobs=scored,
        completed=runner.last_completed,
    )


def _message(found: TokenLogprob) -> TokenLogprobs:
    return TokenLogprobs(found.logprob, found.rank, found.top_ids, found.top_logprobs)


def _chunk(c: PlannedChunk, last_sampled: dict[int, int]) -> SequenceChunk:
    token_ids = [last_sampled[c.seq_id]] if c.token_ids == [SAMPLED_LAST_STEP] else c.token_ids
    return SequenceChunk(
        seq_id=c.seq_id,
        token_ids=token_ids,
        start=c.start,
        block_table=c.block_table,
        sample=c.sample,
        sampling=engine_sampling(c.sampling),
        prompt_ids=c.prompt_ids,
        score_prompt=c.score_prompt,
        constraint=engine_constraint(c.constraint) if c.constraint is not None else None,
    )


def engine_constraint(constraint: Constraint) -> grammar.Constraint:
    return grammar.Constraint(constraint.kind, constraint.spec, constraint.compact, constraint.thinking)


@functools.lru_cache(maxsize=4096)
def engine_sampling(sampling: Sampling) -> SamplingParams:
    """The engine's params for a request's sampling. Cached: a sequence's chunk carries the same
    Sampling every step, and one params object per request lets the sampler keep what it
    derives from them (SamplingParams.kernel_row) instead of making it anew each step."""
    return SamplingParams(
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        min_p=sampling.min_p,
        seed=sampling.seed,
        repetition_penalty=sampling.repetition_penalty,
        frequency_penalty=sampling.frequency_penalty,
        presence_penalty=sampling.presence_penalty,
        min_tokens=sampling.min_tokens,
        stop_token_ids=sampling.stop_token_ids,
        logit_bias=sampling.logit_bias,
        allowed_token_ids=sampling.allowed_token_ids,
        bad_words=sampling.bad_words,
        logprobs=sampling.logprobs,
        prompt_logprobs=sampling.prompt_logprobs,
    )
