"""Continuous batching on the real engine and the demo model, without processes.

The scheduler's batcher and the worker's step execution talk through the same
messages as the tiers do, encoded and decoded as on the wire; only the sockets
are left out. Greedy outputs of requests batched together, chunked, preempted
or recomputed must equal those of the same requests run alone, whether steps
run one at a time or pipelined as the scheduler runs them (the next step
planned before the previous one's tokens are known), and whether prompts that
share a prefix take it from the prefix cache or compute it again.
"""

from __future__ import annotations

import functools
import json
from collections import deque
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from daemon.engine import grammar
from daemon.engine.blocks import BlockManager
from daemon.engine.demo_model import ensure_demo_model
from daemon.engine.demo_spec import DEMO_HF_CONFIG
from daemon.engine.runner import ModelRunner
from daemon.ipc.messages import (
    SAMPLED_LAST_STEP,
    Constraint,
    Sampling,
    ScheduleRequest,
    SequenceUpdate,
    StepPlan,
    StepResult,
    ToScheduler,
    ToWorker,
    decoder,
    encode,
)
from daemon.scheduler import batcher as batcher_module
from daemon.scheduler.batcher import PIPELINE_DEPTH, Batcher, Limits
from daemon.worker.execute import execute

EOS = 3  # the demo tokenizer's <|im_end|>
to_worker, to_scheduler = decoder(ToWorker), decoder(ToScheduler)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    return ensure_demo_model(tmp_path_factory.mktemp("cache"))


class Harness:
    """A batcher and a runner joined by encoded messages; counts what happened."""

    def __init__(
        self,
        demo_dir: Path,
        *,
        num_blocks=64,
        running=8,
        queued=100,
        chunk=2048,
        policy="fcfs",
        pipelined=True,
        caching=True,
    ):
        self.depth = PIPELINE_DEPTH if pipelined else 1
        self.in_flight: deque[StepPlan] = deque()
        self.runner = ModelRunner(demo_dir, num_blocks=num_blocks, device="cpu", dtype="float32")
        limits = Limits(running, queued, chunk, policy, caching)
        self.batcher = Batcher(BlockManager(num_blocks), limits, DEMO_HF_CONFIG["max_position_embeddings"], [EOS])
        self.outputs: dict[str, list[int]] = {}
        self.finish: dict[str, str] = {}
        self.errors: dict[str, object] = {}
        self.cached: dict[str, int] = {}  # prompt tokens each request found in the prefix cache
        self.plans: list[StepPlan] = []

    def submit(self, request_id: str, prompt: list[int], max_tokens: int = 8, **sampling) -> None:
        sampling.setdefault("temperature", 0.0)
        request = ScheduleRequest(request_id, 0, prompt, Sampling(max_tokens=max_tokens, **sampling))
        self.batcher.add(to_scheduler.decode(encode(request)))
        for _tokenizer, update in self.batcher.take_rejections():
            self._record(update)

    def step(self) -> bool:
        """Plan what the pipeline has room for, then run the oldest step; False when idle."""
        while len(self.in_flight) < self.depth and (plan := self.batcher.plan()) is not None:
            plan = to_worker.decode(encode(plan))
            self.plans.append(plan)
            self.in_flight.append(plan)
        if not self.in_flight:
            return False
        result = to_scheduler.decode(encode(execute(self.runner, self.in_flight.popleft())))
        assert isinstance(result, StepResult)
        for updates in self.batcher.complete(result).values():
            for update in updates:
                self._record(update)
        return True

    def run(self, max_steps: int = 2000) -> None:
        for _ in range(max_steps):
            if not self.step():
                return
        raise AssertionError("the batch did not drain")

    def _record(self, update: SequenceUpdate) -> None:
        self.outputs.setdefault(update.request_id, []).extend(update.token_ids)
        if update.token_ids and update.request_id not in self.cached:  # said with the first token
            self.cached[update.request_id] = update.cached_tokens
        if update.finish_reason:
            self.finish[update.request_id] = update.finish_reason
            if update.error:
                self.errors[update.request_id] = update.error


PROMPTS = {f"r{i}": [(7 * i + j * 13) % 1000 + 4 for j in range(5 + 9 * i)] for i in range(10)}


def solo(demo_dir: Path, prompt: list[int], max_tokens: int) -> list[int]:
    harness = Harness(demo_dir, caching=False)
    harness.submit("solo", prompt, max_tokens, ignore_eos=True)
    harness.run()
    return harness.outputs["solo"]


@pytest.fixture(scope="module")
def expected(demo_dir: Path) -> dict[str, list[int]]:
    return {rid: solo(demo_dir, prompt, 12) for rid, prompt in PROMPTS.items()}


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "serial"])
def test_a_batch_gives_each_request_what_it_gets_alone(demo_dir, expected, pipelined):
    harness = Harness(demo_dir, pipelined=pipelined)
    for rid, prompt in PROMPTS.items():
        harness.submit(rid, prompt, 12, ignore_eos=True)
    harness.run()
    assert harness.outputs == expected
    assert set(harness.finish.values()) == {"length"}
    assert max(len(p.chunks) for p in harness.plans) > 1  # really batched
    assert harness.batcher.blocks.free_blocks == 64  # every block came back


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "serial"])
def test_requests_join_the_running_batch_between_steps(demo_dir, expected, pipelined):
    harness = Harness(demo_dir, pipelined=pipelined)
    ids = list(PROMPTS)
    harness.submit(ids[0], PROMPTS[ids[0]], 12, ignore_eos=True)
    for rid in ids[1:]:
        harness.step()
        harness.submit(rid, PROMPTS[rid], 12, ignore_eos=True)
    harness.run()
    assert harness.outputs == expected
    mixed = [p for p in harness.plans if {len(c.token_ids) == 1 for c in p.chunks} == {True, False}]
    assert mixed, "no step mixed decodes with a new prompt"


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "serial"])
def test_chunked_prefill_splits_long_prompts_and_keeps_outputs(demo_dir, expected, pipelined):
    harness = Harness(demo_dir, chunk=16, pipelined=pipelined)
    for rid, prompt in PROMPTS.items():
        harness.submit(rid, prompt, 12, ignore_eos=True)
    harness.run()
    assert harness.outputs == expected
    assert all(sum(len(c.token_ids) for c in p.chunks) <= 16 + len(PROMPTS) for p in harness.plans)
    assert any(not c.sample for p in harness.plans for c in p.chunks)  # some prompt took several steps


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "serial"])
def test_a_small_cache_preempts_and_recomputes_without_changing_outputs(demo_dir, expected, pipelined):
    harness = Harness(
        demo_dir, num_blocks=12, pipelined=pipelined
    )  # 192 token slots for ten requests of up to 98 tokens
    for rid, prompt in PROMPTS.items():
        harness.submit(rid, prompt, 12, ignore_eos=True)
    harness.run()
    assert harness.outputs == expected
    assert harness.batcher.preemptions, "nothing was preempted"
    assert harness.batcher.blocks.free_blocks == 12


def test_admission_is_bounded_by_max_running_requests(demo_dir):
    harness = Harness(demo_dir, running=3)
    for rid, prompt in PROMPTS.items():
        harness.submit(rid, prompt, 4, ignore_eos=True)
    harness.run()
    assert max(len(p.chunks) for p in harness.plans) == 3
    assert len(harness.finish) == len(PROMPTS)


def test_a_full_queue_refuses_with_503(demo_dir):
    harness = Harness(demo_dir, queued=2)
    for rid in ("a", "b", "c"):
        harness.submit(rid, [5, 6, 7])
    assert harness.finish == {"c": "error"}
    assert harness.errors["c"].status == 503
    harness.run()
    assert harness.finish == {"a": "length", "b": "length", "c": "error"}


def test_prompts_beyond_the_context_or_the_cache_are_refused_with_400(demo_dir):
    harness = Harness(demo_dir, num_blocks=4)
    harness.submit("too-long", [5] * DEMO_HF_CONFIG["max_position_embeddings"])
    harness.submit("beyond-cache", [5] * 64)
    harness.submit("empty", [])
    assert {rid: harness.errors[rid].status for rid in harness.errors} == {
        "too-long": 400,
        "beyond-cache": 400,
        "empty": 400,
    }


def test_aborts_free_the_cache_wherever_the_request_is(demo_dir):
    harness = Harness(demo_dir, running=1)
    harness.submit("running", PROMPTS["r3"], 50, ignore_eos=True)
    harness.submit("queued", PROMPTS["r4"], 50, ignore_eos=True)
    harness.step()
    harness.step()
    assert harness.batcher.blocks.free_blocks < 64
    harness.batcher.abort("running")
    harness.batcher.abort("queued")
    harness.batcher.abort("unknown")  # already gone: nothing happens
    assert harness.batcher.blocks.free_blocks == 64
    planned = len(harness.plans)
    harness.run()  # a step already in flight completes; its tokens go nowhere
    assert harness.plans[planned:] == []  # nothing new to run
    assert "running" not in harness.finish  # the aborting side already knows; nothing is sent back


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "serial"])
def test_finish_reasons(demo_dir, expected, pipelined):
    first_token = expected["r2"][0]
    harness = Harness(demo_dir, pipelined=pipelined)
    harness.submit("max", PROMPTS["r2"], 3, ignore_eos=True)
    harness.submit("stop-id", PROMPTS["r2"], 20, stop_token_ids=(first_token,))
    harness.run()
    assert harness.finish == {"max": "length", "stop-id": "stop"}
    assert harness.outputs["max"] == expected["r2"][:3]
    assert harness.outputs["stop-id"] == [first_token]  # the stop token is reported; the tokenizer hides it


def test_pipelined_steps_decode_the_token_in_flight_and_drop_what_an_ending_wastes(demo_dir, expected):
    first_token = expected["r2"][0]
    harness = Harness(demo_dir)
    harness.submit("max", PROMPTS["r2"], 3, ignore_eos=True)
    harness.submit("stop-id", PROMPTS["r2"], 20, stop_token_ids=(first_token,))
    harness.run()
    chunks = {seq_id: [c for p in harness.plans for c in p.chunks if c.seq_id == seq_id] for seq_id in (1, 2)}
    placeholders = [c for c in chunks[1] if c.token_ids == [SAMPLED_LAST_STEP]]
    assert len(placeholders) == 2  # every decode of "max" was planned before its token was known
    assert len(chunks[1]) == 3  # prefill + 2 decodes: an end by length is never planned past
    assert len(chunks[2]) == 2  # the stop token was not known in time: one wasted decode...
    assert harness.outputs["stop-id"] == [first_token]  # ... whose token is dropped
    assert harness.batcher.blocks.free_blocks == 64


@pytest.mark.parametrize("policy", ["fcfs", "lof", "priority"])
def test_policies_choose_the_admission_order(demo_dir, policy):
    harness = Harness(demo_dir, running=1, policy=policy)
    harness.submit("first", [5, 6], 2, ignore_eos=True)
    harness.submit("long-output", [5, 7], 6, ignore_eos=True)
    urgent = Sampling(max_tokens=4, temperature=0.0, ignore_eos=True)
    harness.batcher.add(ScheduleRequest("urgent", 0, [5, 8], urgent, priority=-5))  # lower runs first
    harness.run()
    order = []
    for plan in harness.plans:
        for chunk in plan.chunks:
            rid = {1: "first", 2: "long-output", 3: "urgent"}[chunk.seq_id]
            if rid not in order:
                order.append(rid)
    assert (
        order
        == {
            "fcfs": ["first", "long-output", "urgent"],
            "lof": ["long-output", "urgent", "first"],
            "priority": ["urgent", "first", "long-output"],
        }[policy]
    )


def test_sampled_requests_are_reproducible_under_their_seed(demo_dir):
    def run(companions: bool) -> list[int]:
        harness = Harness(demo_dir, num_blocks=16 if companions else 64)
        harness.submit("seeded", PROMPTS["r5"], 16, temperature=0.9, top_p=0.95, seed=42, ignore_eos=True)
        if companions:  # other traffic, and a cache small enough to preempt
            for rid in ("r1", "r6", "r7"):
                harness.submit(rid, PROMPTS[rid], 16, temperature=1.0, ignore_eos=True)
        harness.run()
        return harness.outputs["seeded"]

    alone = run(companions=False)
    assert run(companions=True) == alone


# --- prefix caching -------------------------------------------------------------------------------

SHARED = [(11 * j + 5) % 1000 + 4 for j in range(40)]  # two whole blocks and a half
SHARING = {f"s{i}": SHARED + [(13 * i + 7 * j) % 1000 + 4 for j in range(3 + 5 * i)] for i in range(6)}


@pytest.fixture(scope="module")
def expected_sharing(demo_dir: Path) -> dict[str, list[int]]:
    return {rid: solo(demo_dir, prompt, 12) for rid, prompt in SHARING.items()}


def first_then_the_rest(harness: Harness, prompts: dict[str, list[int]], max_tokens: int = 12) -> None:
    """The first prompt alone until its first token (its prompt is in the cache), then the others."""
    ids = list(prompts)
    harness.submit(ids[0], prompts[ids[0]], max_tokens, ignore_eos=True)
    while ids[0] not in harness.outputs:
        harness.step()
    for rid in ids[1:]:
        harness.submit(rid, prompts[rid], max_tokens, ignore_eos=True)
    harness.run()


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "serial"])
@pytest.mark.parametrize("chunk", [2048, 16], ids=["whole", "chunked"])
def test_prompts_sharing_a_prefix_take_it_from_the_cache_and_keep_their_outputs(
    demo_dir, expected_sharing, pipelined, chunk
):
    harness = Harness(demo_dir, pipelined=pipelined, chunk=chunk)
    first_then_the_rest(harness, SHARING)
    assert harness.outputs == expected_sharing
    assert harness.cached == {rid: 0 if rid == "s0" else 32 for rid in SHARING}  # the two whole blocks
    starts = {}
    for chunk_ in (c for p in harness.plans for c in p.chunks):
        starts.setdefault(chunk_.seq_id, chunk_.start)
    assert sorted(starts.values()) == [0] + [32] * (len(SHARING) - 1)  # computing starts after the prefix
    counts = harness.batcher.counts
    assert counts.queried == sum(map(len, SHARING.values())) and counts.hits == 32 * (len(SHARING) - 1)
    if chunk == 16:  # the budget counts only the tokens computed
        assert all(sum(len(c.token_ids) for c in p.chunks) <= 16 + len(SHARING) for p in harness.plans)
    assert harness.batcher.blocks.free_blocks == 64


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "serial"])
def test_a_small_cache_preempts_and_evicts_without_changing_the_outputs_of_shared_prefixes(
    demo_dir, expected_sharing, pipelined
):
    harness = Harness(demo_dir, num_blocks=7, pipelined=pipelined, chunk=16)  # 112 slots for 6 x up to 80
    first_then_the_rest(harness, SHARING)
    assert harness.outputs == expected_sharing
    assert harness.batcher.preemptions, "nothing was preempted"
    assert harness.batcher.counts.hits > 0
    assert harness.batcher.blocks.free_blocks == 7


def test_cached_prefixes_are_evicted_for_new_blocks_and_computed_again_when_asked(demo_dir, expected_sharing):
    harness = Harness(demo_dir, num_blocks=6)
    harness.submit("s0", SHARING["s0"], 12, ignore_eos=True)
    harness.run()
    assert harness.batcher.blocks.cached_blocks == 3  # 43 + 11 tokens computed: three whole blocks
    other = [(17 * j + 9) % 1000 + 4 for j in range(80)]  # needs every block: the cached ones are evicted
    harness.submit("other", other, 4, ignore_eos=True)
    harness.run()
    harness.submit("s1", SHARING["s1"], 12, ignore_eos=True)
    harness.run()
    assert harness.cached["s1"] == 0
    assert harness.outputs["s1"] == expected_sharing["s1"]


def test_generated_tokens_blocks_are_cached_too(demo_dir):
    """A conversation's next turn starts with the previous turn's prompt and answer: the blocks
    the answer filled are found in the cache as well."""
    harness = Harness(demo_dir)
    prompt = PROMPTS["r2"]  # 23 tokens
    harness.submit("turn1", prompt, 30, ignore_eos=True)
    harness.run()
    follow_up = prompt + harness.outputs["turn1"][:26]  # 49 tokens: three whole blocks, the last one generated
    harness.submit("turn2", follow_up, 8, ignore_eos=True)
    harness.run()
    assert harness.cached["turn2"] == 48
    assert harness.outputs["turn2"] == solo(demo_dir, follow_up, 8)


def test_a_prompt_already_cached_whole_still_computes_its_last_token(demo_dir, expected_sharing):
    harness = Harness(demo_dir)
    exact = SHARED[:32]  # two whole blocks
    harness.submit("a", exact, 4, ignore_eos=True)
    harness.run()
    harness.submit("b", exact, 4, ignore_eos=True)
    harness.run()
    assert harness.cached["b"] == 16  # the second block is computed again, for the last token's logits
    assert harness.outputs["b"] == harness.outputs["a"]


def test_switching_caching_off_forgets_every_prefix(demo_dir):
    harness = Harness(demo_dir)
    harness.submit("s0", SHARING["s0"], 4, ignore_eos=True)
    harness.run()
    assert harness.batcher.blocks.cached_blocks > 0
    harness.batcher.adopt(Limits(8, 100, 2048, "fcfs", prefix_caching=False))
    assert harness.batcher.blocks.cached_blocks == 0
    harness.submit("s1", SHARING["s1"], 4, ignore_eos=True)
    harness.run()
    assert harness.cached["s1"] == 0 and harness.batcher.blocks.cached_blocks == 0
    harness.batcher.adopt(Limits(8, 100, 2048, "fcfs", prefix_caching=True))
    harness.submit("s2", SHARING["s2"], 4, ignore_eos=True)
    harness.run()
    assert harness.cached["s2"] == 0  # nothing was registered while it was off


def test_a_model_whose_keys_follow_the_sequence_length_shares_no_prefix(demo_dir):
    harness = Harness(demo_dir)
    context = DEMO_HF_CONFIG["max_position_embeddings"]
    harness.batcher = Batcher(BlockManager(64), Limits(8, 100, 2048), context, [EOS], prefix_cacheable=False)
    first_then_the_rest(harness, {rid: SHARING[rid] for rid in ("s0", "s1")}, max_tokens=4)
    assert harness.cached == {"s0": 0, "s1": 0} and harness.batcher.blocks.cached_blocks == 0
    harness.batcher.adopt(Limits(8, 100, 2048, prefix_caching=True))  # a reload cannot switch it on
    assert not harness.batcher.blocks.caching


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "serial"])
def test_prompts_arriving_together_compute_their_shared_prefix_once(demo_dir, expected_sharing, pipelined):
    """All at once: the first prompt computes the shared blocks while the others wait for them, then
    take them from the cache, with the outputs each gets alone."""
    harness = Harness(demo_dir, pipelined=pipelined)
    for rid, prompt in SHARING.items():
        harness.submit(rid, prompt, 12, ignore_eos=True)
    harness.run()
    assert harness.outputs == expected_sharing
    assert harness.cached == {rid: 0 if rid == "s0" else 32 for rid in SHARING}
    assert harness.batcher.deferred > 0
    assert harness.batcher.counts.hits == 32 * (len(SHARING) - 1)
    assert harness.batcher.blocks.free_blocks == 64


def test_a_constrained_request_waits_for_its_grammar_then_follows_it(demo_dir):
    """Admission waits for the worker's word that the grammar is compiled (a step never waits for
    a compilation); the other requests go on meanwhile. Then the answer is one of the choices,
    and the completed grammar ends it."""
    harness = Harness(demo_dir)
    compiler = grammar.LazyCompiler(
        functools.partial(grammar.compiler_for_dir, demo_dir, harness.runner.vocab_size, [EOS])
    )
    harness.runner.enable_grammars(compiler)
    choices = ["alpha", "beta", "gamma"]
    constraint = Constraint("choice", json.dumps(choices), "guided_choice")
    request = ScheduleRequest(
        "c", 0, PROMPTS["r1"], Sampling(max_tokens=30, stop_token_ids=(EOS,)), constraint=constraint
    )
    harness.batcher.add(to_scheduler.decode(encode(request)))
    harness.submit("f", PROMPTS["r2"], 4, ignore_eos=True)
    assert harness.batcher.take_preparations() == [constraint]
    while harness.step():  # the free request runs to its end; the constrained one waits
        pass
    assert harness.finish == {"f": "length"} and harness.batcher.waiting[0].request_id == "c"
    assert harness.batcher.take_preparations() == []  # asked once
    compiler.get().compile(grammar.Constraint(constraint.kind, constraint.spec))  # as the worker's thread does
    harness.batcher.constraint_ready(to_scheduler.decode(encode(request)).constraint)
    harness.run()
    text = Tokenizer.from_file(str(demo_dir / "tokenizer.json")).decode(harness.outputs["c"])
    assert harness.finish["c"] == "stop" and text in choices, text


def test_constraints_forgotten_beyond_the_bound_are_asked_for_again(demo_dir, monkeypatch):
    """The batcher remembers a bounded number of constraints (asked of the worker, compiled by it),
    the oldest forgotten first; a request whose constraint was forgotten asks again, and runs."""
    monkeypatch.setattr(batcher_module, "MAX_CONSTRAINTS_KNOWN", 1)
    batcher = Harness(demo_dir).batcher
    first, second = Constraint("regex", "a+"), Constraint("regex", "b+")
    for request_id, constraint in (("r1", first), ("r2", second)):
        batcher.add(ScheduleRequest(request_id, 0, PROMPTS["r1"], Sampling(max_tokens=4), constraint=constraint))
    assert batcher.take_preparations() == [first, second]
    batcher.constraint_ready(first)
    batcher.constraint_ready(second)  # the first is forgotten: one is remembered
    plan = batcher.plan()
    assert [c.seq_id for c in plan.chunks] == [2]  # r2 runs; r1 asks again
    assert batcher.take_preparations() == [first]
    batcher.constraint_ready(first)
    assert 1 in [c.seq_id for c in batcher.plan().chunks] and not batcher.waiting
