"""KV-cache blocks: fixed-size runs of token slots, and which sequence holds which.

Pure bookkeeping with no tensors (the scheduler uses it without importing
torch). A sequence's block table maps its token positions to cache slots:
slot = table[position // block_size] * block_size + position % block_size.
"""

from __future__ import annotations

from collections.abc import Hashable

BLOCK_SIZE = 16


class CacheFull(Exception):
    """Not enough free blocks for the request."""


def blocks_for(tokens: int, block_size: int = BLOCK_SIZE) -> int:
    return -(-tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = BLOCK_SIZE):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._tables: dict[Hashable, list[int]] = {}

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def free_tokens(self) -> int:
        return len(self._free) * self.block_size

    def table(self, owner: Hashable) -> list[int]:
        return self._tables.get(owner, [])

    def blocks_to_grow(self, owner: Hashable, tokens: int) -> int:
        """New blocks `owner` needs to hold `tokens` tokens in all."""
        return max(0, blocks_for(tokens, self.block_size) - len(self.table(owner)))

    def can_grow(self, owner: Hashable, tokens: int) -> bool:
        return self.blocks_to_grow(owner, tokens) <= len(self._free)

    def grow(self, owner: Hashable, tokens: int) -> list[int]:
        """Make room for `tokens` tokens in all; returns the owner's block table."""
        needed = self.blocks_to_grow(owner, tokens)
        if needed > len(self._free):
            raise CacheFull(f"{needed} blocks needed, {len(self._free)} free")
        table = self._tables.setdefault(owner, [])
        table.extend(self._free.pop() for _ in range(needed))
        return table

    def release(self, owner: Hashable) -> None:
        self._free.extend(reversed(self._tables.pop(owner, [])))
