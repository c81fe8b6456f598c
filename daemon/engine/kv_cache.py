"""The paged KV cache's tensors (the worker's side; the bookkeeping is in blocks.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from daemon.engine.blocks import BLOCK_SIZE
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
        slots = num_blocks * block_size
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.layers = [
            LayerCache(
                torch.zeros(slots, kv_heads, head_dim, dtype=dtype, device=device),
                torch.zeros(slots, kv_heads, head_dim, dtype=dtype, device=device),
            )
            for _ in range(num_layers)
        ]

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    def new_token_slots(self, chunks: list[SequenceChunk]) -> list[int]:
        """The cache slot of every new token of `chunks` (SequenceChunks), in batch order."""
        size = self.block_size
        return [
            c.block_table[p // size] * size + p % size
            for c in chunks
            for p in range(c.start, c.start + len(c.token_ids))
        ]

    def slots(self, tables: list[list[int]], lengths: list[int], device: torch.device) -> torch.Tensor:
        """Cache slots of positions [0, length) of each sequence, padded with slot 0: [B, max length]."""
        size = self.block_size
        width = max(len(t) for t in tables)
        padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
        positions = torch.arange(max(lengths), dtype=torch.long)
        return (padded[:, positions // size] * size + positions % size).to(device)
