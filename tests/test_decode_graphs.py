"""Decode steps padded to buckets over static buffers (engine/decode_graphs.py), the CUDA-graph
path, run here eagerly on the CPU: the bucket choice, the buffers' reuse and padding, and that
a step padded so gives the same logits as the same step unpadded, for models with sliding
windows and soft-capping among them. On CUDA, tests/test_engine_cuda.py compares replayed
graphs with eager steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from harness.models import PROMPT, Sequences, build_hf_model  # noqa: E402

from daemon.engine.decode_graphs import StaticInputs, batch_buckets, bucket_for, width_buckets  # noqa: E402
from daemon.engine.runner import ModelRunner, SequenceChunk  # noqa: E402


def test_batch_buckets_are_1_2_4_then_multiples_of_8_up_to_the_largest_batch():
    assert batch_buckets(128) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120, 128]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_buckets(1) == [1]
    assert width_buckets(128) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert width_buckets(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert [bucket_for(n, batch_buckets(20)) for n in (1, 3, 5, 9, 17, 20, 21)] == [1, 4, 8, 16, 20, 20, None]


def test_static_inputs_are_filled_in_place_and_padding_writes_to_the_scratch_block():
    inputs = StaticInputs.allocate(8, 4, torch.device("cpu"))
    addresses = [t.data_ptr() for t in (inputs.input_ids, inputs.block_tables)]
    chunks = [SequenceChunk(1, [11], 17, [3, 5]), SequenceChunk(2, [12], 0, [7])]
    inputs.fill(chunks, batch=4, width=2, block_size=16, scratch=9)
    assert [t.data_ptr() for t in (inputs.input_ids, inputs.block_tables)] == addresses  # reused, never reallocated
    assert inputs.input_ids[:4].tolist() == [11, 12, 0, 0]
    assert inputs.positions[:4].tolist() == [17, 0, 0, 0]
    assert inputs.context_ends[:4].tolist() == [18, 1, 1, 1]
    assert inputs.slot_mapping[:4].tolist() == [5 * 16 + 1, 7 * 16, 9 * 16, 9 * 16]
    assert inputs.block_tables[:4, :2].tolist() == [[3, 5], [7, 9], [9, 9], [9, 9]]
    inputs.fill(chunks[1:], batch=1, width=1, block_size=16, scratch=9)  # a smaller bucket: its own views
    assert inputs.input_ids[:1].tolist() == [12] and inputs.block_tables[:1, :1].tolist() == [[7]]


@pytest.mark.parametrize("variant", ["llama", "mistral", "gemma2", "qwen2-moe"])
def test_padded_decode_steps_give_the_eager_logits(tmp_path: Path, variant: str):
    """Five sequences of different lengths decoded together, then three: padded to buckets 8 and
    4 (and block-table widths 2 and 4 as they grow), their logits are those of the same steps
    run unpadded."""
    build_hf_model(tmp_path, variant)
    eager = ModelRunner(tmp_path, num_blocks=64, device="cpu", dtype="float32")
    padded = ModelRunner(tmp_path, num_blocks=64, device="cpu", dtype="float32")
    padded.use_decode_graphs(8, capture=False)
    seqs = Sequences(eager)  # one bookkeeping for both: their caches are laid out alike
    prompts = {seq: PROMPT[: 3 + 4 * seq] for seq in range(5)}
    steps = [[seqs.chunk(seq, prompt, 0) for seq, prompt in prompts.items()]]
    tokens = {seq: len(prompt) for seq, prompt in prompts.items()}
    widths = set()
    for step in range(14):
        live = list(prompts) if step < 8 else [0, 2, 4]
        chunk = [seqs.chunk(seq, [(seq * 7 + step) % 100], tokens[seq]) for seq in live]
        for seq in live:
            tokens[seq] += 1
        steps.append(chunk)
    for number, chunks in enumerate(steps):
        bucket = padded.graphs.bucket(chunks)  # type: ignore[union-attr]
        assert (bucket is None) == (number == 0), (number, bucket)  # the prompts' step runs eagerly
        if bucket is not None:
            widths.add(bucket[1])
            assert bucket[0] == (8 if len(chunks) == 5 else 4)
        torch.testing.assert_close(padded.logits(chunks), eager.logits(chunks), atol=1e-5, rtol=1e-5)
    assert widths == {2, 4}, widths  # contexts of 20 to 33 tokens: tables 2 and 3 blocks wide
