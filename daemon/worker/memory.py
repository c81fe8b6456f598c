"""How much memory a worker may take: its KV cache, and whether it fits beside another worker.

A blue-green model reload starts the new worker while the old one still holds
its weights and cache. The new one checks, before loading its weights and again
before allocating its cache, that what it needs fits in the memory free now,
with some left for the rest of the machine; if not, it exits with
tier.EXIT_NO_ROOM_BESIDE and the supervisor replaces the worker in drain mode instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from daemon.config.schema import DaemonSettings
from daemon.engine.blocks import BLOCK_SIZE
from daemon.engine.model_dir import weight_files

CPU_CONTEXTS = 16  # default cache on CPU: this many full-length requests
CPU_MEMORY_SHARE = 0.25  # ... but never more than this share of the memory available
HEADROOM_SHARE = 0.1  # of the device's memory, left free by a worker loading beside another


class NoRoomBeside(Exception):
    """The new worker would not fit in the memory left beside the running one."""


class CacheAllocationFailed(Exception):
    """The device refused the memory of the KV cache."""


def gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def device_memory(device: str) -> tuple[int, int]:
    """(available, total) bytes of `device`: free GPU memory, or the kernel's MemAvailable."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024, total
    except (OSError, KeyError, ValueError):  # not Linux: free pages only (page cache counts as used)
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), total


def cache_blocks(
    settings: DaemonSettings, bytes_per_token: int, context: int, device: str, step_peak: int | None = None
) -> int:
    """KV-cache blocks: scheduler.max_total_tokens, else what the device's memory allows once the
    weights are loaded, with `step_peak` bytes (the warm-up's transient peak: engine/warm_up.py)
    kept free for the steps on a GPU. On a CPU the warm-up's memory is the process's already (the
    allocator keeps it: allocator.py), so what is available now is what is left."""
    if settings.scheduler.max_total_tokens:
        tokens = settings.scheduler.max_total_tokens
    elif device == "cuda":
        free, total = device_memory(device)
        tokens = gpu_cache_tokens(free, total, settings.scheduler.mem_fraction_static, step_peak or 0, bytes_per_token)
        tokens = max(tokens, context)
    else:
        available, _total = device_memory(device)
        tokens = min(CPU_CONTEXTS * context, int(available * CPU_MEMORY_SHARE // bytes_per_token))
        tokens = max(tokens, context)
    return -(-tokens // BLOCK_SIZE)


def gpu_cache_tokens(free: int, total: int, fraction: float, step_peak: int, bytes_per_token: int) -> int:
    """The tokens a GPU's KV cache holds: of the `fraction` of its memory the worker may use, what
    is not in use already (weights, CUDA's context, other processes) nor needed by a step."""
    budget = total * fraction - (total - free) - step_peak
    return max(0, int(budget // bytes_per_token))


def check_room_beside(settings: DaemonSettings, size: int, device: str, *, what: str = "the model's weights") -> None:
    """NoRoomBeside unless `size` bytes fit in `device`'s free memory, headroom kept, and the
    cache size is known where it would otherwise be sized from that memory (a GPU)."""
    if device == "cuda" and not settings.scheduler.max_total_tokens:
        raise NoRoomBeside(
            "on a GPU, a worker loading beside another needs scheduler.max_total_tokens (its KV cache "
            "would be sized from the memory the other one leaves free)"
        )
    available, total = device_memory(device)
    room = available - int(total * HEADROOM_SHARE)
    if size > room:
        raise NoRoomBeside(
            f"{what} ({gib(size)}) would not fit beside the running worker: {gib(available)} of "
            f"{device} memory is free and {gib(int(total * HEADROOM_SHARE))} is kept for the rest"
        )


def weights_size(model_dir: Path) -> int:
    """Bytes of the model's checkpoint files: about what its weights take once loaded."""
    return sum(path.stat().st_size for path in weight_files(model_dir))
