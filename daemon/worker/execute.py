"""Running one step plan from the scheduler on the engine."""

from __future__ import annotations

from daemon.engine.runner import ModelRunner, SequenceChunk
from daemon.engine.sampler import SamplingParams
from daemon.ipc.messages import SAMPLED_LAST_STEP, PlannedChunk, StepPlan, StepResult


def execute(runner: ModelRunner, plan: StepPlan, worker_epoch: int = 1) -> StepResult:
    """Run `plan`; an engine failure becomes a StepResult error, so its requests end cleanly."""
    for seq_id in plan.finished:
        runner.release(seq_id)
    try:
        chunks = [_chunk(c, runner.last_sampled) for c in plan.chunks]
        return StepResult(plan.step, worker_epoch, runner.step(chunks))
    except Exception as exc:  # noqa: BLE001 - whatever broke, the scheduler must hear of it
        runner.last_sampled = {}
        return StepResult(plan.step, worker_epoch, {}, error=f"{type(exc).__name__}: {exc}")


def _chunk(c: PlannedChunk, last_sampled: dict[int, int]) -> SequenceChunk:
    token_ids = c.token_ids
    if token_ids == [SAMPLED_LAST_STEP]:
        if c.seq_id not in last_sampled:
            raise ValueError(f"sequence {c.seq_id} asks for the token of a step that did not sample it")
        token_ids = [last_sampled[c.seq_id]]
    return SequenceChunk(
        seq_id=c.seq_id,
        token_ids=token_ids,
        start=c.start,
        block_table=c.block_table,
        sample=c.sample,
        sampling=SamplingParams(c.sampling.temperature, c.sampling.top_p, c.sampling.top_k, c.sampling.seed),
    )
