"""Bad input never hurts anyone else.

A request the engine cannot honour is refused at the door with a 400 naming the field
(numbers beyond their bounds or beyond the 64 bits the IPC carries, JSON nested too
deep, a body framed two ways), and a failure that still reaches the engine ends only the
sequence that caused it: the requests batched beside it get their tokens, in the step
that failed and in the next one, already planned (pipelined).

The engine is tested directly (batcher and worker joined by encoded messages, no
processes), the rest on a real daemon with real clients; the property test throws
random JSON bodies at both generation endpoints.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import pytest
import torch

from daemon.engine.blocks import BlockManager
from daemon.engine.demo_model import ensure_demo_model
from daemon.engine.demo_spec import DEMO_HF_CONFIG
from daemon.engine.runner import ModelRunner
from daemon.engine.sampler import SamplingParams, sample
from daemon.ipc.messages import Sampling, ScheduleRequest, StepResult, ToScheduler, ToWorker, decoder, encode
from daemon.scheduler.batcher import PIPELINE_DEPTH, Batcher, Limits
from daemon.worker.execute import execute

to_worker, to_scheduler = decoder(ToWorker), decoder(ToScheduler)
NAN = float("nan")  # a temperature no request can carry past validation: its row's sampling raises


# --- the engine alone -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    return ensure_demo_model(tmp_path_factory.mktemp("cache"))


def run_batch(demo_dir: Path, requests: dict[str, Sampling]) -> tuple[dict[str, list[int]], dict[str, object]]:
    """Run `requests` (one prompt each) through a batcher and a runner, steps pipelined as the
    scheduler runs them; their tokens and their errors, by request id."""
    runner = ModelRunner(demo_dir, num_blocks=64, device="cpu", dtype="float32")
    batcher = Batcher(BlockManager(64), Limits(8, 100, 2048), DEMO_HF_CONFIG["max_position_embeddings"], [3])
    for index, (rid, sampling) in enumerate(requests.items()):
        batcher.add(ScheduleRequest(rid, 0, [5 + index, 40, 41, 42 + index], sampling))
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    errors: dict[str, object] = {}
    in_flight: deque = deque()
    for _ in range(500):  # bounded: a batch of 8-token requests drains in a few dozen steps
        while len(in_flight) < PIPELINE_DEPTH and (plan := batcher.plan()) is not None:
            in_flight.append(to_worker.decode(encode(plan)))
        if not in_flight:
            return tokens, errors
        result = to_scheduler.decode(encode(execute(runner, in_flight.popleft())))
        assert isinstance(result, StepResult) and result.error is None
        for updates in batcher.complete(result).values():
            for update in updates:
                tokens[update.request_id] += update.token_ids
                if update.error:
                    errors[update.request_id] = update.error
    raise AssertionError("the batch did not drain")


def test_a_sequence_whose_sampling_fails_ends_alone_and_the_batch_goes_on(demo_dir):
    innocent = {
        f"ok{i}": Sampling(max_tokens=8, temperature=0.0 if i % 2 else 0.8, seed=i, ignore_eos=True) for i in range(6)
    }
    alone, _ = run_batch(demo_dir, innocent)
    bad = {"bad-prefill": Sampling(max_tokens=8, temperature=NAN, ignore_eos=True)}
    tokens, errors = run_batch(demo_dir, {**innocent, **bad})
    assert set(errors) == {"bad-prefill"}
    assert errors["bad-prefill"].status == 500 and "the engine failed on this request" in errors["bad-prefill"].message
    assert tokens["bad-prefill"] == []
    # every innocent request got all its tokens, the same it gets without the bad one beside it
    assert {rid: tokens[rid] for rid in innocent} == alone
    assert all(len(t) == 8 for t in alone.values())


def test_the_rows_beside_a_failing_row_are_sampled_as_usual():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    logits[2, 7] = NAN
    params = [SamplingParams(0.0), SamplingParams(temperature=NAN), SamplingParams(0.0), SamplingParams(0.7, seed=3)]
    generators = [None, torch.Generator(), None, torch.Generator().manual_seed(3)]
    drawn = sample(logits, params, generators)
    assert drawn[0] == int(logits[0].argmax())
    assert isinstance(drawn[1], Exception) and isinstance(drawn[2], ValueError)
    assert isinstance(drawn[3], int) and 0 <= drawn[3] < 50


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1e-40),
        SamplingParams(temperature=1e-5),
        SamplingParams(top_p=1e-45),
        SamplingParams(top_p=1e-45, temperature=2.0, top_k=3),
    ],
    ids=["temperature-1e-40", "temperature-1e-5", "top_p-1e-45", "top_p-1e-45-top_k"],
)
def test_extreme_values_within_the_bounds_sample_the_likeliest_token(params):
    """Found by the fault battery: these made the sampler raise (inf/NaN probabilities, or none left)."""
    logits = torch.randn(3, 200, generator=torch.Generator().manual_seed(2)) * 30
    drawn = sample(logits, [params] * 3, [torch.Generator().manual_seed(i) for i in range(3)])
    assert drawn == logits.argmax(dim=-1).tolist()
