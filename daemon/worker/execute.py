"""Running one step plan from the scheduler on the engine."""

from __future__ import annotations

from daemon.engine.runner import ModelRunner, SequenceChunk
from daemon.engine.sampler import SamplingParams
from daemon.ipc.messages import StepPlan, StepResult


def execute(runner: ModelRunner, plan: StepPlan, worker_epoch: int = 1) -> StepResult:
    """Run `plan`; an engine failure becomes a StepResult error, so its requests end cleanly."""
    for seq_id in plan.finished:
        runner.release(seq_id)
    chunks = [
        SequenceChunk(
            seq_id=c.seq_id,
            token_ids=c.token_ids,
            start=c.start,
            block_table=c.block_table,
            sample=c.sample,
            sampling=SamplingParams(c.sampling.temperature, c.sampling.top_p, c.sampling.top_k, c.sampling.seed),
        )
        for c in plan.chunks
    ]
    try:
        return StepResult(plan.step, worker_epoch, runner.step(chunks))
    except Exception as exc:  # noqa: BLE001 - whatever broke, the scheduler must hear of it
        return StepResult(plan.step, worker_epoch, {}, error=f"{type(exc).__name__}: {exc}")
