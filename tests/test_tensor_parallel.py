"""Tensor parallelism: a model split across two ranks computes what one process computes.

Two ranks are spawned processes joined over gloo (NCCL where two CUDA devices exist) through a
file:// rendezvous in a temporary directory. A pair of ranks is spawned once per device and
runs every variant (each spawn costs seconds of importing torch): a mixed batch of a prefill,
a prompt in two chunks that scores its prompt, and decodes through the paged cache, rank 0
by step() and rank 1 by follow(), each step's chunks carrying the tokens rank 0 sampled before, as
the serving layer drives them. Every
logits row the head gives, on both ranks, must be the one-process row, and rank 0's greedy
tokens its tokens. Loading is checked in-process too: a rank's model built without a group
holds exactly its slices of the checkpoint's tensors.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import time
import traceback
from pathlib import Path

import pytest
import torch

from daemon.engine.blocks import BLOCK_SIZE
from daemon.engine.layers.moe import SparseMoE
from daemon.engine.models.registry import resolve
from daemon.engine.parallel import Parallel, ParallelError, join_group, leave_group
from daemon.engine.runner import ModelRunner, SequenceChunk
from daemon.engine.sampler import SamplingParams

# Variants of the harness (tests/harness/models.py), and one of our own (OWN_VARIANTS).
TP_VARIANTS = [
    "llama-tied",  # 2 KV heads, one a rank; o_proj and down_proj biases, added once; tied embeddings
    "llama-mqa",  # 1 KV head, on both ranks; a tied vocabulary of 161, which 2 does not divide
    "qwen2",  # q/k/v biases
    "qwen3",  # per-head q/k norms
    "phi3",  # q/k/v and gate/up stored fused
    "gemma2",  # soft-capped scores and logits, scaled tied embedding
    "qwen2-moe",  # a shared expert, experts 17 wide a rank: the per-expert loop
    "mixtral",  # experts 48 wide a rank: grouped_mm
]
OWN_VARIANTS = {"llama-mqa": ("llama", {"num_key_value_heads": 1, "vocab_size": 161, "tie_word_embeddings": True})}
PROMPT = [5, 17, 33, 2, 99, 150, 7, 7, 42, 11, 64, 3, 120, 8, 19, 77, 101, 56, 9, 31]
OTHER = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2]
DECODES = 3
SIZE = 2
SPAWN_TIMEOUT_S = 100  # the whole pair: imports, every variant's load and steps (pytest's timeout is 120 s)
COLLECTIVE_TIMEOUT_S = 45  # a rank whose peer died fails in its collective, rather than hang


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("transformers")
    from harness import models

    directories = {}
    with pytest.MonkeyPatch.context() as patch:
        for name, (base, extra) in OWN_VARIANTS.items():
            config_class, model_class, options = models.VARIANTS[base]
            patch.setitem(models.VARIANTS, name, (config_class, model_class, options | extra))
        for variant in TP_VARIANTS:
            directories[variant] = tmp_path_factory.mktemp(variant)
            models.build_hf_model(directories[variant], variant)
    return directories


def drive(runner: ModelRunner, parallel: Parallel) -> dict:
    """The steps every test runs, on any rank: every logits row the head gives, and the tokens."""
    heads: list[torch.Tensor] = []
    runner.model.head.register_forward_hook(lambda module, args, out: heads.append(out.to("cpu", copy=True)))
    greedy, scored = SamplingParams(temperature=0), SamplingParams(temperature=0, prompt_logprobs=2)

    def chunk(seq_id: int, tokens: list[int], start: int, sample: bool = True, **kwargs) -> SequenceChunk:
        table = list(range(4 * seq_id, 4 * seq_id + 4))  # 64 positions each
        assert start + len(tokens) <= 4 * BLOCK_SIZE
        return SequenceChunk(seq_id, tokens, start, table, sample, **kwargs)

    steps = [
        [
            chunk(0, PROMPT, 0, sampling=greedy),
            chunk(1, OTHER[:9], 0, sample=False, sampling=scored, score_prompt=True),
        ],
        [chunk(1, OTHER[9:], 9, sampling=scored, score_prompt=True)],  # a continued prefill beside a decode
    ]
    fed: dict[int, int] = {}  # each sequence's tokens so far
    tokens: list[dict[int, int]] = []
    sampled: dict[int, int] = {}  # rank 0's tokens of the step before, on every rank
    for i in range(len(steps) + DECODES):
        chunks = list(steps[i]) if i < len(steps) else []
        chunks += [chunk(s, [token], fed[s], sampling=greedy) for s, token in sorted(sampled.items())]
        fed.update({c.seq_id: c.start + len(c.token_ids) for c in chunks})
        if parallel.rank == 0:
            runner.step(chunks)
        else:
            runner.follow(chunks)
        sampled = parallel.broadcast_object(runner.last_sampled if parallel.rank == 0 else None)
        tokens.append(sampled)
    return {"heads": heads, "tokens": tokens}


def new_runner(directory: Path, device: str, parallel: Parallel) -> ModelRunner:
    return ModelRunner(directory, num_blocks=8, device=device, dtype="float32", parallel=parallel)


def run_rank(rank: int, device: str, init_method: str, directories: dict[str, Path], out: Path) -> None:
    """One spawned rank: every variant, its results saved for the test to compare."""
    try:
        parallel = join_group(rank, SIZE, init_method, device_type=device, timeout_s=COLLECTIVE_TIMEOUT_S)
        try:
            results = {name: drive(new_runner(path, device, parallel), parallel) for name, path in directories.items()}
        finally:
            leave_group(parallel)
        torch.save(results, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.error").write_text(traceback.format_exc())
        raise


def spawn_ranks(device: str, directories: dict[str, Path], out: Path) -> list[dict]:
    """Run both ranks to the end; a rank that fails (or time running out) ends the other at once."""
    context = multiprocessing.get_context("spawn")
    init_method = f"file://{out / 'rendezvous'}"
    ranks = [
        context.Process(target=run_rank, args=(rank, device, init_method, directories, out), daemon=True)
        for rank in range(SIZE)
    ]
    for process in ranks:
        process.start()
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        running = list(ranks)
        while running and time.monotonic() < deadline:
            for sentinel in multiprocessing.connection.wait(
                [p.sentinel for p in running], max(0, deadline - time.monotonic())
            ):
                running = [p for p in running if p.sentinel != sentinel]
            if any(p.exitcode for p in ranks if p not in running):
                break
    finally:
        for process in ranks:
            if process.is_alive():
                process.kill()
            process.join()
    errors = "\n".join(path.read_text() for path in sorted(out.glob("rank*.error")))
    assert [p.exitcode for p in ranks] == [0] * SIZE, errors or f"ranks cut off after {SPAWN_TIMEOUT_S} s"
    return [torch.load(out / f"rank{rank}.pt") for rank in range(SIZE)]


def devices() -> list:
    cuda = pytest.mark.skipif(torch.cuda.device_count() < SIZE, reason=f"needs {SIZE} CUDA devices (NCCL)")
    return ["cpu", pytest.param("cuda", marks=cuda)]


@pytest.fixture(scope="module", params=devices())
def split_and_whole(request, checkpoints: dict[str, Path], tmp_path_factory) -> tuple[str, list[dict], dict]:
    """(device, each rank's results, the one-process results) for every variant."""
    device = request.param
    ranks = spawn_ranks(device, checkpoints, tmp_path_factory.mktemp(f"ranks-{device}"))
    whole = {name: drive(new_runner(path, device, Parallel()), Parallel()) for name, path in checkpoints.items()}
    return device, ranks, whole


@pytest.mark.parametrize("variant", TP_VARIANTS)
def test_two_ranks_give_the_logits_and_tokens_of_one_process(split_and_whole, variant: str):
    device, ranks, whole = split_and_whole
    expected = whole[variant]
    # 1 mixed step with one prompt scored, one with the rest of it scored, then the decodes
    assert len(expected["heads"]) == 2 + 2 + DECODES
    for rank, results in enumerate(ranks):
        got = results[variant]
        assert len(got["heads"]) == len(expected["heads"]), f"rank {rank} called the head otherwise"
        for call, (ours, reference) in enumerate(zip(got["heads"], expected["heads"], strict=True)):
            # float32 sums in another order: 1e-7 of the logits' scale observed (3e-6 for Gemma 2); a
            # wrong slice or a bias added twice moves them by 1e-2 or more
            scale = max(1.0, reference.abs().max().item())
            atol = (2e-5 if device == "cpu" else 1e-4) * scale
            torch.testing.assert_close(ours, reference, atol=atol, rtol=0, msg=f"rank {rank}, head call {call}")
        assert got["tokens"] == expected["tokens"], f"rank {rank}"
    assert all(len(step) == 2 for step in expected["tokens"][1:])  # both sequences sampled from the second step


def load_full_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {name: t for shard in sorted(directory.glob("*.safetensors")) for name, t in load_file(shard).items()}


def joined(tensors, dim: int = 0) -> torch.Tensor:
    return torch.cat(list(tensors), dim=dim)


@pytest.mark.parametrize("variant", ["llama-mqa", "phi3", "qwen2-moe"])
def test_each_rank_loads_its_slices_of_the_checkpoint(checkpoints: dict[str, Path], variant: str):
    """Built as ranks 0 and 1 of 2 (no group: nothing here communicates), the ranks' shares put
    together are the checkpoint's tensors: heads in order (each rank the KV head of its query
    heads where there are fewer than ranks), MLP and expert rows, o_proj and down columns, the
    vocabulary's rows (padded with zeros)."""
    full = load_full_checkpoint(checkpoints[variant])
    config = json.loads((checkpoints[variant] / "config.json").read_text())
    models = [new_runner(checkpoints[variant], "cpu", Parallel(rank, SIZE)).model for rank in range(SIZE)]
    vocab = config["vocab_size"]
    embeddings = joined(m.model.embed_tokens.weight for m in models)
    assert torch.equal(embeddings[:vocab], full["model.embed_tokens.weight"])
    assert not embeddings[vocab:].any()
    if "lm_head.weight" in full:
        assert torch.equal(joined(m.head.lm_head.weight for m in models)[:vocab], full["lm_head.weight"])
    for i in range(config["num_hidden_layers"]):
        at = f"model.layers.{i}."
        check_attention_shares([m.model.layers[i].self_attn for m in models], full, f"{at}self_attn.", config)
        mlps = [m.model.layers[i].mlp for m in models]
        if isinstance(mlps[0], SparseMoE):
            check_expert_shares(mlps, full, f"{at}mlp.", config["num_experts"])
            check_mlp_shares([m.shared_expert for m in mlps], full, f"{at}mlp.shared_expert.")
        else:
            check_mlp_shares(mlps, full, f"{at}mlp.")


def check_attention_shares(attention: list, full: dict[str, torch.Tensor], at: str, config: dict) -> None:
    heads, kv_heads, dim = config["num_attention_heads"], config["num_key_value_heads"], attention[0].shape.head_dim
    if f"{at}qkv_proj.weight" in full:
        q, k, v = full[f"{at}qkv_proj.weight"].split([heads * dim, kv_heads * dim, kv_heads * dim])
    else:
        q, k, v = (full[f"{at}{name}_proj.weight"] for name in "qkv")
    shares = [
        a.qkv_proj.weight.split([a.num_heads * dim, a.num_kv_heads * dim, a.num_kv_heads * dim]) for a in attention
    ]
    assert torch.equal(joined(s[0] for s in shares), q)
    for part, whole in ((1, k), (2, v)):
        if kv_heads >= SIZE:
            assert torch.equal(joined(s[part] for s in shares), whole)
        else:  # rank r's query heads are of KV head r * kv_heads // SIZE
            for rank, s in enumerate(shares):
                head = rank * kv_heads // SIZE
                assert torch.equal(s[part], whole[head * dim : (head + 1) * dim])
    if f"{at}q_proj.bias" in full:
        assert torch.equal(joined(a.qkv_proj.bias[: a.num_heads * dim] for a in attention), full[f"{at}q_proj.bias"])
    assert torch.equal(joined((a.o_proj.weight for a in attention), dim=1), full[f"{at}o_proj.weight"])


def check_mlp_shares(mlps: list, full: dict[str, torch.Tensor], at: str) -> None:
    gates, ups = zip(*(m.gate_up_proj.weight.chunk(2) for m in mlps), strict=True)
    if f"{at}gate_up_proj.weight" in full:
        gate, up = full[f"{at}gate_up_proj.weight"].chunk(2)
    else:
        gate, up = full[f"{at}gate_proj.weight"], full[f"{at}up_proj.weight"]
    assert torch.equal(joined(gates), gate) and torch.equal(joined(ups), up)
    assert torch.equal(joined((m.down_proj.weight for m in mlps), dim=1), full[f"{at}down_proj.weight"])


def check_expert_shares(blocks: list, full: dict[str, torch.Tensor], at: str, num_experts: int) -> None:
    for block in blocks:
        assert torch.equal(block.gate.weight, full[f"{at}gate.weight"])  # the router, whole
    for e in range(num_experts):
        gates, ups = zip(*(b.experts.gate_up[e].chunk(2) for b in blocks), strict=True)
        assert torch.equal(joined(gates), full[f"{at}experts.{e}.gate_proj.weight"])
        assert torch.equal(joined(ups), full[f"{at}experts.{e}.up_proj.weight"])
        downs = (b.experts.down[e] for b in blocks)
        assert torch.equal(joined(downs, dim=1), full[f"{at}experts.{e}.down_proj.weight"])


def model_config(checkpoints: dict[str, Path], variant: str, **changes) -> dict:
    return json.loads((checkpoints[variant] / "config.json").read_text()) | changes


@pytest.mark.parametrize(
    ("variant", "changes", "size", "message"),
    [
        ("llama-tied", {}, 3, r"num_attention_heads \(4\) is not divisible by the tensor-parallel size 3"),
        (
            "llama-tied",
            {"num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 16},
            2,
            r"num_key_value_heads \(3\) is not divisible by the tensor-parallel size 2",
        ),
        (
            "llama-tied",
            {"num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 16},
            3,
            r"num_key_value_heads \(2\) is fewer than the tensor-parallel size 3 and does not divide it",
        ),
        (
            "qwen3",
            {"intermediate_size": 95},
            2,
            r"intermediate_size \(95\) is not divisible by the tensor-parallel size 2",
        ),
        ("qwen2-moe", {}, 4, r"each expert's intermediate size \(34\) is not divisible by the tensor-parallel size 4"),
        (
            "qwen2-moe",
            {"moe_intermediate_size": 32, "shared_expert_intermediate_size": 50},
            4,
            r"shared_expert_intermediate_size \(50\) is not divisible by the tensor-parallel size 4",
        ),
    ],
)
def test_a_model_that_does_not_split_evenly_says_which_dimension(checkpoints, variant, changes, size, message):
    config = model_config(checkpoints, variant, **changes)
    family = resolve(config)
    with pytest.raises(ParallelError, match=message):
        family.load_class()(config, family, 64, Parallel(0, size))
