"""The KV cache is sized after a warm-up step of the largest shape, from the memory that step took.

The shape and the cache arithmetic are pure functions; the peak is measured for real: by the
process's peak resident memory on this (Linux) CPU, in fresh processes where the worker loads
the demo model as it does in the daemon. The GPU side (the CUDA allocator's peak, and a cache
that leaves it free) is tests/test_engine_cuda.py's, skipped without CUDA.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from daemon.config.schema import DaemonSettings
from daemon.engine.blocks import BLOCK_SIZE
from daemon.engine.warm_up import blocks_needed, largest_step, peak_during, warm_up_chunks
from daemon.worker.memory import cache_blocks, gpu_cache_tokens

GIB = 2**30
PEAK_READABLE = Path("/proc/self/clear_refs").exists() and Path("/proc/self/status").exists()


def test_largest_step_is_every_sequence_that_may_run_and_the_whole_token_budget():
    assert largest_step(128, 2048, 4096) == (2048, 128)
    assert largest_step(128, 2048, 1024) == (1024, 128)  # no chunk outgrows the context
    assert largest_step(128, -1, 4096) == (4096, 128)  # no chunking: a whole prompt, up to the context
    assert largest_step(64, 16, 4096) == (16, 16)  # a step holds no more sequences than tokens
    assert largest_step(300, 2048, 100) == (300, 300)  # decodes never wait for the budget


@pytest.mark.parametrize(("tokens", "sequences", "end"), [(2048, 128, 1921), (2048, 128, 4096), (1, 1, 1)])
def test_warm_up_chunks_are_one_prompt_chunk_and_decodes_in_blocks_of_their_own(tokens, sequences, end):
    chunks = warm_up_chunks(tokens, sequences, BLOCK_SIZE, end)
    assert len(chunks) == sequences and sum(len(c.token_ids) for c in chunks) == tokens
    prompt, decodes = chunks[0], chunks[1:]
    assert prompt.start + len(prompt.token_ids) == end and all(len(c.token_ids) == 1 for c in decodes)
    blocks = [b for c in chunks for b in c.block_table]
    assert len(set(blocks)) == len(blocks) and max(blocks) < blocks_needed(sequences, BLOCK_SIZE, end)
    assert len(prompt.block_table) * BLOCK_SIZE >= end


@pytest.mark.skipif(not PEAK_READABLE, reason="needs Linux's /proc/self/clear_refs")
def test_peak_during_measures_what_an_action_held_at_once_on_cpu():
    def hold_and_free() -> None:
        block = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched
        del block

    peak = peak_during(torch.device("cpu"), hold_and_free)
    assert peak is not None and peak >= 200 * 2**20, peak
    assert peak_during(torch.device("cpu"), lambda: None) < 64 * 2**20


def test_a_gpu_cache_takes_what_the_weights_and_the_largest_step_leave():
    # 80 GiB, 20 in use (weights, CUDA's context): 0.9 of it is 72, less 20, less a 4 GiB step
    tokens = gpu_cache_tokens(60 * GIB, 80 * GIB, 0.9, 4 * GIB, bytes_per_token=128 * 1024)
    assert tokens == 48 * GIB // (128 * 1024)
    assert gpu_cache_tokens(10 * GIB, 80 * GIB, 0.9, 4 * GIB, bytes_per_token=1024) == 0  # nothing left


def test_max_total_tokens_fixes_the_cache_whatever_the_step_took():
    settings = DaemonSettings(model={"path": "builtin:demo"}, scheduler={"max_total_tokens": 4096})
    for device in ("cpu", "cuda"):
        assert cache_blocks(settings, 1024, 2048, device, step_peak=100 * GIB) == 4096 // BLOCK_SIZE


WORKER_LOAD = """
import json, sys
from daemon.config.schema import DaemonSettings
from daemon.logs import configure_logging
from daemon.worker.service import load_runner
configure_logging("worker", fmt="json")
settings = DaemonSettings(
    model={"path": "builtin:demo", "device": "cpu"},
    runtime={"cache_dir": sys.argv[1]},
    scheduler={"chunked_prefill_size": int(sys.argv[2])},
)
runner, _ = load_runner(settings)
"""


def warmed_up(model_cache: Path, chunk: int) -> dict:
    """The worker.warmed_up event of the worker's model loading, in a fresh process."""
    result = subprocess.run(
        [sys.executable, "-c", WORKER_LOAD, str(model_cache), str(chunk)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in (result.stdout + result.stderr).splitlines() if line.startswith("{")]
    return next(e for e in events if e["event"] == "worker.warmed_up")


@pytest.mark.skipif(not PEAK_READABLE, reason="needs Linux's /proc/self/clear_refs")
def test_the_worker_warms_up_at_the_largest_step_before_it_sizes_its_cache(model_cache):
    small, large = warmed_up(model_cache, 64), warmed_up(model_cache, 2048)
    assert (small["tokens"], small["sequences"]) == (64, 64)
    assert (large["tokens"], large["sequences"]) == (2048, 128)  # the demo's context is 2048
    # a prompt chunk of 1,921 tokens holds its attention mask and scores (1,921 x 1,936 float32,
    # 14 MiB each) at once; 64 decodes hold next to nothing
    assert large["step_peak_mib"] > small["step_peak_mib"] + 10, (small, large)
    assert large["cache_tokens"] >= 2048


def test_only_a_lack_of_memory_in_the_warm_up_reads_as_a_step_too_large():
    from daemon.worker.service import _out_of_memory

    with pytest.raises(RuntimeError) as refused:
        torch.empty(1 << 50)  # 4 PiB: the CPU allocator refuses it
    assert _out_of_memory(refused.value)
    # what gloo raises when a rank of the group is gone: not the step's size
    assert not _out_of_memory(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer"))
