"""KV-cache blocks: fixed-size runs of token slots, who holds which, and which hold a known prefix.

Pure bookkeeping with no tensors (the scheduler uses it without importing
torch). A sequence's block table maps its token positions to cache slots:
slot = table[position // block_size] * block_size + position % block_size.

Prefix caching: a full block is named by a hash chained over the tokens before
it (its parent block's hash and its own token ids), so two sequences whose
tokens agree up to the end of a block agree on its hash, and one can use the
keys and values the other computed. The owner of a block registers its hash
once the block's keys and values are in the cache; from then on any sequence
whose tokens start the same way shares it, each holding a reference. Only full
blocks are shared: a sequence's partial last block, which it goes on writing,
is always its own.

A block nobody holds any more keeps its contents and its hash: it waits in a
free list, least recently released first, and is found again by the next
sequence that starts the same way. It is only forgotten (evicted) when a new
block is needed and no free block without a hash remains.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Hashable, Sequence

BLOCK_SIZE = 16


class CacheFull(Exception):
    """Not enough free blocks for the request."""


def blocks_for(tokens: int, block_size: int = BLOCK_SIZE) -> int:
    return -(-tokens // block_size)


def chain_root(extra: bytes = b"") -> bytes:
    """The parent hash of a sequence's first block. Anything besides the tokens that changes what
    the keys and values are (a cache salt, a LoRA adapter) goes in `extra`, so it changes every
    hash of the chain."""
    return hashlib.blake2b(b"daemon-prefix\0" + extra, digest_size=16).digest()


def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The hash of a full block: its parent's hash and its own token ids. A 128-bit digest, not
    Python's hash(): a collision would silently give a sequence another prompt's keys and values."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


def extend_hashes(hashes: list[bytes], tokens: Sequence[int], block_size: int, extra: bytes = b"") -> list[bytes]:
    """Append to `hashes` (those of the first blocks of `tokens`) the hashes of the other full
    blocks of `tokens`; returns `hashes`."""
    parent = hashes[-1] if hashes else chain_root(extra)
    for start in range(len(hashes) * block_size, len(tokens) - block_size + 1, block_size):
        parent = block_hash(parent, tokens[start : start + block_size])
        hashes.append(parent)
    return hashes


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = BLOCK_SIZE, caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        self._refs = [0] * num_blocks  # sequences holding each block
        self._hash_of: list[bytes | None] = [None] * num_blocks  # set once registered, until evicted
        self._by_hash: dict[bytes, int] = {}
        self._fresh = list(range(num_blocks - 1, -1, -1))  # free, no hash; pop() hands out low ids first
        self._cached: OrderedDict[int, None] = OrderedDict()  # free with a hash, least recently released first
        self._tables: dict[Hashable, list[int]] = {}
        self._known: dict[Hashable, int] = {}  # leading blocks of each table whose hash is registered or taken

    @property
    def free_blocks(self) -> int:
        """Blocks no sequence holds, cached or not: all can be handed out."""
        return len(self._fresh) + len(self._cached)

    @property
    def free_tokens(self) -> int:
        return self.free_blocks * self.block_size

    @property
    def cached_blocks(self) -> int:
        """Blocks whose hash can be found, held or free."""
        return len(self._by_hash)

    def table(self, owner: Hashable) -> list[int]:
        return self._tables.get(owner, [])

    # --- prefixes -----------------------------------------------------------------------------

    def cached_prefix(self, hashes: Sequence[bytes], tokens: int) -> list[int]:
        """The blocks holding the longest cached prefix of a sequence of `tokens` tokens whose full
        blocks hash to `hashes`. At most tokens - 1 of them, in whole blocks: the last token is
        always computed, as its logits are needed."""
        if not self.caching:
            return []
        found: list[int] = []
        for digest in hashes[: (tokens - 1) // self.block_size]:
            block = self._by_hash.get(digest)
            if block is None:
                break
            found.append(block)
        return found

    def can_take(self, owner: Hashable, cached: Sequence[int], tokens: int) -> bool:
        """Whether a new `owner` can take the `cached` blocks and grow to `tokens` tokens."""
        assert owner not in self._tables, "a sequence takes cached blocks only when it starts"
        idle = sum(1 for block in cached if self._refs[block] == 0)  # free now, not once taken
        return blocks_for(tokens, self.block_size) - len(cached) <= self.free_blocks - idle

    def take(self, owner: Hashable, cached: Sequence[int]) -> None:
        """Start `owner`'s table with the `cached` blocks of its prefix (see cached_prefix)."""
        assert owner not in self._tables, "a sequence takes cached blocks only when it starts"
        for block in cached:
            if self._refs[block] == 0:
                del self._cached[block]
            self._refs[block] += 1
        self._tables[owner] = list(cached)
        self._known[owner] = len(cached)

    def register(self, owner: Hashable, hashes: Sequence[bytes], count: int) -> None:
        """Make `owner`'s first `count` blocks findable by their `hashes`. Call it only once their
        keys and values are in the cache. A block whose hash another block already has stays
        private (both hold the same keys and values; the first keeps serving)."""
        if not self.caching:
            return
        table = self._tables.get(owner, [])
        start = self._known.get(owner, 0)
        end = min(count, len(hashes), len(table))
        for index in range(start, end):
            block, digest = table[index], hashes[index]
            if self._hash_of[block] is None and digest not in self._by_hash:
                self._hash_of[block] = digest
                self._by_hash[digest] = block
        self._known[owner] = max(start, end)

    def set_caching(self, on: bool) -> None:
        """Switch prefix caching; switched off, every hash is forgotten (the blocks stay with their holders)."""
        self.caching = on
        if on:
            return
        self._fresh.extend(reversed(self._cached))
        self._cached.clear()
        for block in self._by_hash.values():
            self._hash_of[block] = None
        self._by_hash.clear()

    # --- growing and releasing ----------------------------------------------------------------

    def blocks_to_grow(self, owner: Hashable, tokens: int) -> int:
        """New blocks `owner` needs to hold `tokens` tokens in all."""
        return max(0, blocks_for(tokens, self.block_size) - len(self.table(owner)))

    def can_grow(self, owner: Hashable, tokens: int) -> bool:
        return self.blocks_to_grow(owner, tokens) <= self.free_blocks

    def grow(self, owner: Hashable, tokens: int) -> list[int]:
        """Make room for `tokens` tokens in all; returns the owner's block table."""
        needed = self.blocks_to_grow(owner, tokens)
        if needed > self.free_blocks:
            raise CacheFull(f"{needed} blocks needed, {self.free_blocks} free")
        table = self._tables.setdefault(owner, [])
        table.extend(self._allocate() for _ in range(needed))
        return table

    def release(self, owner: Hashable) -> None:
        """`owner` lets go of its blocks: those nobody else holds are free, cached ones still findable.
        Released last block first, so a chain's tail is evicted before its head, which more
        sequences share."""
        self._known.pop(owner, None)
        for block in reversed(self._tables.pop(owner, [])):
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            if self._hash_of[block] is None:
                self._fresh.append(block)
            else:
                self._cached[block] = None

    def _allocate(self) -> int:
        if self._fresh:
            block = self._fresh.pop()
        else:  # evict the least recently released cached block
            block, _ = self._cached.popitem(last=False)
            del self._by_hash[self._hash_of[block]]  # type: ignore[arg-type]
            self._hash_of[block] = None
        self._refs[block] = 1
        return block
