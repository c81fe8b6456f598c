"""The engine on a CUDA GPU: logits match transformers there too, and the KV cache leaves the
largest step room. Skipped without CUDA.

Run on a GPU host with: pytest tests/test_engine_cuda.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
transformers = pytest.importorskip("transformers")

from harness.models import PROMPT, VARIANTS, Sequences, build_hf_model  # noqa: E402

from daemon.config.schema import DaemonSettings  # noqa: E402
from daemon.engine.blocks import BLOCK_SIZE  # noqa: E402
from daemon.engine.runner import ModelRunner  # noqa: E402
from daemon.engine.warm_up import largest_step, prompt_end, warm_up_chunks  # noqa: E402
from daemon.worker.service import load_runner  # noqa: E402


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 1e-3), ("bfloat16", 0.15)])
def test_cuda_logits_match_transformers(tmp_path: Path, variant: str, dtype: str, tolerance: float):
    hf = build_hf_model(tmp_path, variant).to("cuda", getattr(torch, dtype))
    runner = ModelRunner(tmp_path, num_blocks=64, device="cuda", dtype=dtype)
    seqs = Sequences(runner)
    prefill = runner.logits([seqs.chunk(1, PROMPT[:-1], 0)])[0]
    decode = runner.logits([seqs.chunk(1, PROMPT[-1:], len(PROMPT) - 1)])[0]
    with torch.no_grad():
        reference = hf(torch.tensor([PROMPT], device="cuda")).logits[0].float()
    torch.testing.assert_close(prefill, reference[-2], atol=tolerance, rtol=0)
    torch.testing.assert_close(decode, reference[-1], atol=tolerance, rtol=0)


def test_cuda_cache_is_sized_after_the_largest_step_and_leaves_it_room(tmp_path: Path):
    """The worker's KV cache, sized from free memory after the warm-up step, leaves that step room:
    run again over the full cache, the process stays within mem_fraction_static of the device."""
    settings = DaemonSettings(model={"path": "builtin:demo", "device": "cuda"}, runtime={"cache_dir": str(tmp_path)})
    runner, loaded = load_runner(settings)
    _free, total = torch.cuda.mem_get_info()
    scheduler, context = settings.scheduler, loaded.max_model_len
    tokens, sequences = largest_step(scheduler.max_running_requests, scheduler.chunked_prefill_size, context)
    end = prompt_end(runner, tokens, sequences, context)
    torch.cuda.reset_peak_memory_stats()
    runner.follow(warm_up_chunks(tokens, sequences, BLOCK_SIZE, end))
    torch.cuda.synchronize()
    assert runner.cache.num_blocks * BLOCK_SIZE > context  # sized from memory, not the floor
    assert torch.cuda.max_memory_allocated() <= total * scheduler.mem_fraction_static


def greedy_decodes(runner: ModelRunner) -> list[dict[int, int]]:
    """Five sequences' greedy tokens, step by step: their prompts, then decodes of all five (a
    bucket of 8), then of three (a bucket of 4)."""
    seqs = Sequences(runner)
    prompts = {seq: PROMPT[: 3 + 4 * seq] for seq in range(5)}
    tokens = {seq: len(prompt) for seq, prompt in prompts.items()}
    last = runner.step([seqs.chunk(seq, prompt, 0) for seq, prompt in prompts.items()])
    found = [dict(last)]
    for step in range(12):
        live = list(prompts) if step < 6 else [0, 2, 4]
        chunks = [seqs.chunk(seq, [last[seq]], tokens[seq]) for seq in live]
        for seq in live:
            tokens[seq] += 1
        last = {**last, **runner.step(chunks)}
        found.append(dict(last))
    return found


@pytest.mark.parametrize("variant", ["llama", "gemma2"])
def test_cuda_graphs_decode_the_same_greedy_tokens_as_eager_steps(tmp_path: Path, variant: str):
    build_hf_model(tmp_path, variant)
    eager = ModelRunner(tmp_path, num_blocks=64, device="cuda", dtype="bfloat16")
    graphed = ModelRunner(tmp_path, num_blocks=64, device="cuda", dtype="bfloat16")
    graphed.use_decode_graphs(8, capture=True)
    assert greedy_decodes(graphed) == greedy_decodes(eager)
    assert graphed.graphs is not None and len(graphed.graphs.captured) >= 2  # buckets 8 and 4, replayed
