"""The engine's CPU kernels (C, built at install into _cpu), called through ctypes.

Torch has no CPU operator that reads a paged KV cache in place: its attention
operators want each sequence's keys as one contiguous slab. paged_decode.c is
decode attention that reads the blocks where they are. It is built by
`pip install` (pyproject.toml, an optional extension): where the build could
not be made (no C compiler), `available()` is False and the engine keeps torch's
operators over gathered blocks.

ctypes releases the GIL for the call, and passing raw pointers costs a few
microseconds a call, against hundreds for the attention itself.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util

import torch

TILE = 16  # keys scored at once (paged_decode.c): head_dim and block_size must be multiples of it
_CACHE_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


@functools.cache
def _library() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("daemon.engine.kernels._cpu")
    if spec is None or spec.origin is None:
        return None
    library = ctypes.CDLL(spec.origin)  # torch is loaded: the kernel's OpenMP runtime is torch's
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    library.paged_decode.restype = None
    library.paged_decode.argtypes = [
        pointer, pointer, pointer, ctypes.c_int,  # q, key cache, value cache, bf16
        pointer, size, pointer, pointer,  # block tables, their row stride, key start, key end
        pointer, pointer,  # out, lse
        size, size, size, size, size, size,  # sequences, kv heads, group, dim, blocks, block size
        ctypes.c_float, ctypes.c_float, ctypes.c_int,  # scale, softcap, threads
    ]  # fmt: skip
    return library


def available() -> bool:
    """The kernels were built (see pyproject.toml) and load."""
    return _library() is not None


def reads_paged_cache(device: torch.device, dtype: torch.dtype, head_dim: int, block_size: int) -> bool:
    """Whether paged_decode serves a cache of this kind (else: torch's operators over gathered blocks)."""
    return (
        device.type == "cpu"
        and dtype in _CACHE_DTYPES
        and head_dim % TILE == 0
        and block_size % TILE == 0
        and available()
    )


def paged_decode(
    queries: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    key_start: torch.Tensor,
    key_end: torch.Tensor,
    scale: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """queries [G, kv_heads, group, dim] (a KV head's query heads folded together) attend to keys
    [key_start[g], key_end[g]) of sequence g, read through block_tables [G, >= its blocks] from
    key_cache [kv_heads, blocks, dim, block_size] (keys transposed per block) and value_cache
    [kv_heads, blocks, block_size, dim]. Returns the result [G, kv_heads, group, dim] and the
    log-sum-exp of the scores [G, kv_heads, group], both float32 (an empty key range: zeros, -inf)."""
    library = _library()
    assert library is not None, "paged_decode called without the kernels built (check available())"
    sequences, kv_heads, group, dim = queries.shape
    _, num_blocks, _, block_size = key_cache.shape
    queries = queries.float().contiguous()
    assert key_cache.is_contiguous() and value_cache.is_contiguous() and block_tables.stride(1) == 1
    assert block_tables.dtype == key_start.dtype == key_end.dtype == torch.long
    key_start, key_end = key_start.contiguous(), key_end.contiguous()
    out = torch.empty(queries.shape, dtype=torch.float32)
    lse = torch.empty(queries.shape[:3], dtype=torch.float32)
    library.paged_decode(
        queries.data_ptr(),
        key_cache.data_ptr(),
        value_cache.data_ptr(),
        _CACHE_DTYPES[key_cache.dtype],
        block_tables.data_ptr(),
        block_tables.stride(0),
        key_start.data_ptr(),
        key_end.data_ptr(),
        out.data_ptr(),
        lse.data_ptr(),
        sequences,
        kv_heads,
        group,
        dim,
        num_blocks,
        block_size,
        scale,
        softcap or 0.0,
        torch.get_num_threads(),
    )
    return out, lse
