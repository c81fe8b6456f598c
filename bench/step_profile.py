"""Where an engine step's time goes, on the demo model, for the step shapes of W2 and W3.

The worker's ModelRunner runs alone (no server): the allocator and the thread count set as
the worker sets them on this machine, the KV cache filled as the step needs. For each shape
it prints the median wall time of a step (no profiler attached), then one profiled series
split by what the time is spent in:

- matrix products (the projections, the MLP, the LM head);
- the attention kernels: the engine's paged kernel (kernels/paged_decode.c, reading the cache in
  place, decodes and prefill chunks alike), or with --torch-attention torch's CPU flash attention;
- gathers: index_select, mostly (with --torch-attention) the blocks of the contexts attended to;
- the other operators (norms, rotary, activations, masks, sampling's arithmetic);
- Python: the rest of the (unprofiled) wall time, outside any operator (module calls, the step's
  metadata made from the plan's lists, sampling's bookkeeping).

Shapes:
- decode: W2's steady state, 32 sequences of 256-384 tokens each decoding one;
- prefill: one 256-token prompt, W2's prefill (each request's; vLLM does the same work);
- shared decode: W3's, 32 sequences of ~560 tokens whose first 512 are 4 shared prefixes
  (the prefix cache's blocks, each read by the 8 decodes that share it);
- suffix prefill: W3's, 3 prompts whose first 512 tokens are cached (a prefix-cache hit), each
  computing its 32-token suffix over the 544-token context.

    python bench/step_profile.py          # ~1 minute on 2 cores; --threads, --repeats
    python bench/step_profile.py --torch-attention   # attention as without the CPU kernel
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import profile

from daemon.engine import kv_cache
from daemon.engine.blocks import BLOCK_SIZE
from daemon.engine.demo_model import ensure_demo_model
from daemon.engine.layers import attention
from daemon.engine.runner import ModelRunner, SequenceChunk
from daemon.worker.allocator import keep_freed_memory
from daemon.worker.service import cpu_threads

MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"}
DECODE_KERNEL = "daemon::paged_decode"  # not a torch operator: recorded under this name (below)
ATTENTION = {"aten::_scaled_dot_product_flash_attention_for_cpu", DECODE_KERNEL}
GATHERS = {"aten::index_select"}


def record_decode_kernel() -> None:
    """Make the paged decode kernel (a ctypes call, invisible to the profiler) show as an event."""

    def recorded(kernel: Callable) -> Callable:
        def call(*args, **kwargs):
            with torch.profiler.record_function(DECODE_KERNEL):
                return kernel(*args, **kwargs)

        return call

    attention.paged_decode = recorded(attention.paged_decode)


def decode_step(lengths: list[int], prefixes: int = 0, prefix_len: int = 0) -> list[SequenceChunk]:
    """Decodes of sequences `lengths` long (the new token included), each on blocks of its own. With
    `prefixes`, the first `prefix_len` tokens of sequence i are those of prefix i % prefixes,
    held in the same blocks (as the prefix cache shares them)."""
    shared_blocks = prefix_len // BLOCK_SIZE
    next_block = prefixes * shared_blocks
    chunks = []
    for i, length in enumerate(lengths):
        blocks = -(-length // BLOCK_SIZE)
        table = list(range((i % prefixes) * shared_blocks, (i % prefixes + 1) * shared_blocks)) if prefixes else []
        own = blocks - len(table)
        table += list(range(next_block, next_block + own))
        next_block += own
        chunks.append(SequenceChunk(i, [5], length - 1, table))
    return chunks


def suffix_prefill_step(prompts: int, prefix_len: int, suffix_len: int) -> list[SequenceChunk]:
    """Prefill chunks of `suffix_len` tokens after `prefix_len` cached ones, prompt i on prefix
    i's blocks (as a prefix-cache hit finds them), its suffix on blocks of its own."""
    shared_blocks = prefix_len // BLOCK_SIZE
    own_blocks = -(-suffix_len // BLOCK_SIZE)
    next_block = prompts * shared_blocks
    chunks = []
    for i in range(prompts):
        table = list(range(i * shared_blocks, (i + 1) * shared_blocks))
        table += list(range(next_block + i * own_blocks, next_block + (i + 1) * own_blocks))
        chunks.append(SequenceChunk(2000 + i, list(range(7, 7 + suffix_len)), prefix_len, table))
    return chunks


def timed(step: Callable[[], object], repeats: int) -> float:
    """Median wall time of `step`, ms."""
    step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def split(step: Callable[[], object], repeats: int, wall: float) -> dict[str, float]:
    """ms per step by category: the operators' own times from one profiled series, and Python as
    what the unprofiled `wall` time leaves (the profiler slows each operator call a little, so
    Python is if anything understated)."""
    with profile():  # the profiler's own start-up, outside the series
        step()
    with profile() as prof:
        for _ in range(repeats):
            step()
    parts = dict.fromkeys(("matrix products", "attention kernel", "gathers", "other operators"), 0.0)
    for event in prof.key_averages():
        ms = event.self_cpu_time_total / 1e3 / repeats
        if event.key in MATMULS:
            parts["matrix products"] += ms
        elif event.key in ATTENTION:
            parts["attention kernel"] += ms
        elif event.key in GATHERS:
            parts["gathers"] += ms
        elif event.key.startswith("aten::"):  # the kernel's own allocations and conversions too
            parts["other operators"] += ms
    parts["Python"] = max(0.0, wall - sum(parts.values()))
    return parts


def report(name: str, step: Callable[[], object], args: argparse.Namespace) -> None:
    wall = timed(step, args.repeats)
    parts = split(step, args.repeats, wall)
    total = sum(parts.values())
    shares = ", ".join(f"{part} {100 * ms / total:.0f}%" for part, ms in parts.items())
    print(f"| {name} | {wall:.2f} ms | {shares} |", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: as the worker sets them)")
    p.add_argument("--repeats", type=int, default=50, help="steps timed per shape")
    p.add_argument(
        "--torch-attention",
        action="store_true",
        help="attention through torch over gathered blocks, as where the CPU kernel was not built",
    )
    args = p.parse_args()
    keep_freed_memory()
    record_decode_kernel()
    if args.torch_attention:
        kv_cache.reads_paged_cache = lambda *_: False
    torch.set_num_threads(args.threads or cpu_threads(None))
    with tempfile.TemporaryDirectory(prefix="dm-steps-") as cache:
        runner = ModelRunner(ensure_demo_model(Path(cache)), num_blocks=2048, device="cpu")
        decodes = decode_step([256 + (128 * i) // 31 for i in range(32)])
        prefill = [SequenceChunk(1000, list(range(4, 260)), 0, list(range(2000, 2016)))]
        shared = decode_step([545 + i for i in range(32)], prefixes=4, prefix_len=512)
        suffixes = suffix_prefill_step(3, 512, 32)
        attention = "torch over gathered blocks" if args.torch_attention else "the paged kernel"
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), the demo model in float32, "
            f"attention by {attention}\n"
        )
        print("| step | wall (median) | where the time goes (profiled) |\n|---|---|---|")
        with torch.inference_mode():
            report("decode, 32 x 256-384 tokens (W2)", lambda: runner.step(decodes), args)
            report("prefill, 256 tokens (W2)", lambda: runner.step(prefill), args)
            report("decode, 32 x ~560 tokens, 4 shared prefixes of 512 (W3)", lambda: runner.step(shared), args)
            report("prefill, 3 x 32 tokens after 512 cached (W3)", lambda: runner.step(suffixes), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
