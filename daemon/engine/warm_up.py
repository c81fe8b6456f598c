"""A warm-up forward pass as large as a step may be, and the memory it took at its peak.

The KV cache takes what memory is left once the weights are loaded, but a step also needs
memory while it runs: activations, the attention's gathered context and masks, the logits.
Sized before any forward pass ran, a cache can leave too little for the largest step (an
out-of-memory error at the first long prompt, on a GPU). So the worker runs one step of the
largest shape the scheduler may send (scheduler.max_running_requests sequences,
scheduler.chunked_prefill_size tokens) over a small cache first, measures the memory it took
beyond what was held before it (the transient peak), and sizes the cache with that kept free
(worker/memory.py), as vLLM profiles a run before it sizes its cache.

Measured by the CUDA allocator's peak on a GPU, by the process's peak resident memory on
Linux CPUs (VmHWM, reset through /proc/self/clear_refs); elsewhere it is not measured (None).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from daemon.engine.runner import ModelRunner, SequenceChunk

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_RESET_PEAK_RSS = "5"  # what resets VmHWM to VmRSS (Linux 4.0+)


@dataclass(frozen=True)
class WarmUp:
    """The step a warm-up ran, and what it measured."""

    tokens: int
    sequences: int
    peak_bytes: int | None  # the memory it took beyond what was held before it (None: not measured)
    seconds: float


def largest_step(max_running_requests: int, chunked_prefill_size: int, context: int) -> tuple[int, int]:
    """(tokens, sequences) of the largest step the scheduler plans: as many sequences as may run,
    one token each but one, whose prompt chunk fills the step's token budget (a whole prompt, up
    to the context, where chunking is off)."""
    budget = chunked_prefill_size if chunked_prefill_size > 0 else context
    sequences = max(1, min(max_running_requests, budget))
    return max(min(budget, context), sequences), sequences


def warm_up_chunks(tokens: int, sequences: int, block_size: int, prompt_end: int) -> list[SequenceChunk]:
    """`sequences` - 1 decodes and one prompt chunk ending at position `prompt_end`, `tokens`
    tokens in all, each sequence in blocks of its own from block 0: a cache of
    blocks_needed(...) blocks holds them."""
    prompt = tokens - (sequences - 1)
    prompt_blocks = -(-prompt_end // block_size)
    chunks = [SequenceChunk(0, [0] * prompt, prompt_end - prompt, list(range(prompt_blocks)))]
    for index in range(1, sequences):
        chunks.append(SequenceChunk(index, [0], 0, [prompt_blocks + index - 1]))
    return chunks


def blocks_needed(sequences: int, block_size: int, prompt_end: int) -> int:
    return -(-prompt_end // block_size) + sequences - 1


def prompt_end(runner: ModelRunner, tokens: int, sequences: int, context: int) -> int:
    """Where the warm-up's prompt chunk ends. Where attention gathers each sequence's cached
    context into one slab (torch's operators: CUDA), a chunk that continues a long sequence
    takes the most memory: it ends at the context's end. Where the CPU kernel reads the cache
    in place, a chunk that starts its sequence does (its keys are attended by torch)."""
    prompt = tokens - (sequences - 1)
    return prompt if runner.cache.keys_transposed else max(prompt, context)


def warm_up(runner: ModelRunner, tokens: int, sequences: int, end: int) -> WarmUp:
    """Run the largest step once on `runner` (its cache already holds blocks_needed blocks):
    the forward pass and the head, as every rank of a tensor-parallel group runs them."""
    chunks = warm_up_chunks(tokens, sequences, runner.cache.block_size, end)
    started = time.monotonic()
    peak = peak_during(runner.device, lambda: runner.follow(chunks))
    return WarmUp(tokens, sequences, peak, round(time.monotonic() - started, 3))


def peak_during(device: torch.device, action: Callable[[], object]) -> int | None:
    """The most memory `action` took at once beyond what was held before it, in bytes."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        action()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if not _reset_peak_rss():
        action()
        return None
    before = _status_kib("VmRSS")
    action()
    peak = _status_kib("VmHWM")
    return None if before is None or peak is None else max(0, peak - before) * 1024


def _reset_peak_rss() -> bool:
    with contextlib.suppress(OSError):
        _CLEAR_REFS.write_text(_RESET_PEAK_RSS)
        return True
    return False


def _status_kib(field: str) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None
