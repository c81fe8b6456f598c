"""Decode speed of every model family: the engine against transformers' `generate`, same weights, same run.

For each family of the registry a small random checkpoint is built with transformers
(4 layers, hidden 256, vocabulary 2,048; the family's own options) and saved as safetensors.
Both sides then decode greedily from a batch of 64-token prompts, at batch 1 and 32:

- the engine: ModelRunner (what the worker runs), one prefill step then `--steps` decode steps;
- transformers: `generate(max_new_tokens=steps + 1, min_new_tokens=steps + 1)` on the same
  weights, which also prefills once then decodes `steps` tokens.

Decode tokens/s = batch x steps / the time of the decode steps alone (the engine's steps are
timed one by one; transformers' decode is its generate time less a one-token generate).
For MoE (Qwen3-MoE, 2 experts per token), the time of one decode step as the number of experts
goes from 8 to 64: at batch 1 a step uses 2 experts per layer whatever their number, so its
time should stay flat; at batch 32 the 64 choices of a layer reach more distinct experts as
there are more of them (about 23 of 32, 41 of 64 with random routing), and a step's cost
follows the experts it uses, not those it could.

    python bench/models.py            # about 3 minutes on 2 cores; --help for the knobs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from daemon.engine.blocks import BlockManager
from daemon.engine.models.registry import FAMILIES
from daemon.engine.runner import ModelRunner, SequenceChunk
from daemon.engine.sampler import SamplingParams

PROMPT_TOKENS = 64
SHAPE = dict(
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=256)
# family -> (config class, model class, the family's own options)
CHECKPOINTS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 32}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {**MOE, "num_experts": 8, "shared_expert_intermediate_size": 256},
    ),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {**MOE, "num_experts": 8, "head_dim": 32}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 8, "num_experts_per_tok": 2}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 32, "sliding_window": 32}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 32, "sliding_window": 32}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
}


def build(directory: Path, family: str, **extra) -> torch.nn.Module:
    config_name, model_name, options = CHECKPOINTS[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**(SHAPE | options | extra))
    model = getattr(transformers, model_name)(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


def prompts(batch: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(batch)
    return torch.randint(3, SHAPE["vocab_size"], (batch, PROMPT_TOKENS), generator=generator).tolist()


def engine_decode(directory: Path, batch: int, steps: int) -> list[float]:
    """Seconds of each decode step of the engine, after one prefill step of the whole batch."""
    runner = ModelRunner(directory, num_blocks=batch * (PROMPT_TOKENS + steps + 16) // 16 + 1, device="cpu")
    blocks, greedy = BlockManager(runner.cache.num_blocks), SamplingParams(temperature=0.0)

    def chunk(seq: int, tokens: list[int], start: int) -> SequenceChunk:
        table = blocks.grow(seq, start + len(tokens))
        return SequenceChunk(seq, tokens, start, list(table), sampling=greedy)

    next_tokens = runner.step([chunk(s, p, 0) for s, p in enumerate(prompts(batch))])
    times = []
    for step in range(steps):
        start = PROMPT_TOKENS + step
        plan = [chunk(s, [next_tokens[s]], start) for s in range(batch)]
        began = time.perf_counter()
        next_tokens = runner.step(plan)
        times.append(time.perf_counter() - began)
    return times


def transformers_decode(model: torch.nn.Module, batch: int, steps: int) -> float:
    """Seconds transformers' generate spends decoding `steps` tokens (its time for steps + 1 new
    tokens, less its time for one: the prefill and the first token)."""
    ids = torch.tensor(prompts(batch))

    def generate(new: int) -> float:
        began = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        return time.perf_counter() - began

    generate(2)  # warm-up
    return statistics.median(generate(steps + 1) for _ in range(3)) - statistics.median(generate(1) for _ in range(3))


def family_rows(families: list[str], batches: list[int], steps: int, work: Path) -> list[str]:
    rows = []
    for family in families:
        directory = work / family
        model = build(directory, family)
        engine_decode(directory, 1, 4)  # warm-up
        for batch in batches:
            ours = batch * steps / sum(engine_decode(directory, batch, steps))
            theirs = batch * steps / transformers_decode(model, batch, steps)
            rows.append(f"| {family} | {batch} | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.1f}x |")
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def moe_rows(expert_counts: list[int], steps: int, work: Path) -> list[str]:
    rows, first = [], {}
    for experts in expert_counts:
        directory = work / f"moe-{experts}"
        build(directory, "qwen3_moe", num_experts=experts)
        cells = []
        for batch in (1, 32):
            step_ms = statistics.median(engine_decode(directory, batch, steps)) * 1000
            first.setdefault(batch, step_ms)
            cells.append(f"{step_ms:.1f} ms ({step_ms / first[batch]:.2f})")
        rows.append(f"| {experts} | {' | '.join(cells)} |")
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    registered = [f.name for f in FAMILIES]
    parser.add_argument("--families", nargs="*", default=registered, choices=registered)
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 32])
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per run")
    parser.add_argument("--experts", nargs="*", type=int, default=[8, 16, 32, 64])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for both sides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads")
    print(f"prompts of {PROMPT_TOKENS} tokens, {args.steps} decode steps, float32, CPU; checkpoints: {SHAPE}\n")
    with tempfile.TemporaryDirectory(prefix="bench-models-") as work:
        rows = family_rows(args.families, args.batches, args.steps, Path(work))
        print("| family | batch | engine decode tok/s | transformers generate tok/s | ratio |")
        print("|---|---|---|---|---|")
        print("\n".join(rows))
        if "qwen3_moe" in registered and args.experts:
            moe = moe_rows(args.experts, args.steps, Path(work))
            print("\n| experts (2 per token) | decode step, batch 1 (vs 8) | decode step, batch 32 (vs 8) |")
            print("|---|---|---|")
            print("\n".join(moe))


if __name__ == "__main__":
    main()
