"""The paged KV cache's tensors (the worker's side; the bookkeeping is in blocks.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from daemon.engine.blocks import BLOCK_SIZE
from daemon.engine.host_tensors import padded_long_tensor
from daemon.engine.kernels.cpu import reads_paged_cache
from daemon.engine.layers.attention import LayerCache

if TYPE_CHECKING:
    from daemon.engine.runner import SequenceChunk


class KVCache:
    """Key and value tensors for every layer, `num_blocks * block_size` token slots each."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        block_size: int = BLOCK_SIZE,
    ):
        self.num_blocks = num_blocks  # the blocks sequences may own: the scheduler's
        self.block_size = block_size
        # one more, no sequence's: padding rows of a decode step padded to a bucket write their
        # keys and values there (decode_graphs.py)
        self.scratch_block = num_blocks
        # head-major, and keys transposed in their blocks where the CPU kernel reads them: see
        # layers/attention.py
        self.keys_transposed = reads_paged_cache(torch.device(device), dtype, head_dim, block_size)
        shape = (kv_heads, num_blocks + 1, block_size, head_dim)
        key_shape = (kv_heads, num_blocks + 1, head_dim, block_size) if self.keys_transposed else shape
        self.layers = [
            LayerCache(
                torch.zeros(key_shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
                self.keys_transposed,
            )
            for _ in range(num_layers)
        ]

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    def new_token_slots(self, chunks: list[SequenceChunk]) -> list[int]:
        """The cache slot (block * block_size + offset) of every new token of `chunks`, in batch order."""
        size = self.block_size
        return [
            c.block_table[p // size] * size + p % size
            for c in chunks
            for p in range(c.start, c.start + len(c.token_ids))
        ]

    def block_tables(self, chunks: list[SequenceChunk], device: torch.device) -> torch.Tensor:
        """Every chunk's block table, padded with block 0 to the longest: one tensor [B, most blocks]."""
        return padded_long_tensor([c.block_table for c in chunks], device)
