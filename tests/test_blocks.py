"""The scheduler's KV-cache block bookkeeping: growing and releasing tables, and prefix caching
(hash-chained full blocks, shared with reference counts, evicted least recently used)."""

from __future__ import annotations

import pytest

from daemon.engine.blocks import BlockManager, CacheFull, block_hash, chain_root, extend_hashes

SIZE = 4  # small blocks keep the token lists readable


def tokens(*blocks: int, tail: int = 0) -> list[int]:
    """Whole blocks of token ids, block b made of 100 * b + 0..3, then `tail` more tokens."""
    ids = [100 * b + i for b in blocks for i in range(SIZE)]
    return ids + [900 + i for i in range(tail)]


def hashes(ids: list[int]) -> list[bytes]:
    return extend_hashes([], ids, SIZE)


def admit(blocks: BlockManager, owner: int, ids: list[int]) -> int:
    """As the scheduler admits a request: its cached prefix, then room for the rest and one more."""
    cached = blocks.cached_prefix(hashes(ids), len(ids))
    assert blocks.can_take(owner, cached, len(ids) + 1)
    blocks.take(owner, cached)
    blocks.grow(owner, len(ids) + 1)
    return len(cached) * SIZE


def computed(blocks: BlockManager, owner: int, ids: list[int]) -> None:
    blocks.register(owner, hashes(ids), len(ids) // SIZE)


def test_a_block_hash_depends_on_its_tokens_and_on_everything_before_it():
    root = chain_root()
    assert block_hash(root, [1, 2, 3, 4]) == block_hash(root, [1, 2, 3, 4])
    assert block_hash(root, [1, 2, 3, 4]) != block_hash(root, [1, 2, 3, 5])
    # the same tokens after different parents: different blocks
    a, b = hashes(tokens(1, 3)), hashes(tokens(2, 3))
    assert a[0] != b[0] and a[1] != b[1]
    # an extra key (a cache salt, an adapter) changes the whole chain
    assert extend_hashes([], tokens(1), SIZE, extra=b"salt") != hashes(tokens(1))


def test_only_full_blocks_are_hashed_and_hashes_extend_incrementally():
    ids = tokens(1, 2, tail=3)
    assert len(hashes(ids)) == 2
    first = extend_hashes([], ids[:SIZE], SIZE)
    assert extend_hashes(first, ids, SIZE) == hashes(ids)


def test_a_prompt_starting_like_a_computed_one_shares_its_full_blocks():
    blocks = BlockManager(16, SIZE)
    first, second = tokens(1, 2, tail=2), tokens(1, 2, 5, tail=1)
    assert admit(blocks, 1, first) == 0
    computed(blocks, 1, first)
    assert blocks.cached_blocks == 2  # the partial third block is not
    assert admit(blocks, 2, second) == 2 * SIZE
    assert blocks.table(2)[:2] == blocks.table(1)[:2]
    assert blocks.table(2)[2] != blocks.table(1)[2]  # the partial block is always private
    # a prompt that differs in its second block shares the first alone
    assert admit(blocks, 3, tokens(1, 7, tail=1)) == SIZE


def test_a_block_is_shared_only_once_registered():
    blocks = BlockManager(16, SIZE)
    ids = tokens(1, 2, tail=1)
    admit(blocks, 1, ids)
    assert admit(blocks, 2, ids) == 0  # the first one's keys and values are not written yet
    blocks.register(1, hashes(ids), 1)  # its first block is
    assert admit(blocks, 3, ids) == SIZE


def test_the_same_prefix_computed_twice_keeps_the_first_block_and_leaves_the_second_private():
    blocks = BlockManager(16, SIZE)
    ids = tokens(1, tail=1)
    admit(blocks, 1, ids)
    admit(blocks, 2, ids)
    computed(blocks, 1, ids)
    computed(blocks, 2, ids)
    assert blocks.cached_blocks == 1
    assert blocks.cached_prefix(hashes(ids), len(ids)) == blocks.table(1)[:1]
    blocks.release(2)
    blocks.release(1)
    assert blocks.free_blocks == 16 and blocks.cached_blocks == 1


def test_the_cache_hit_leaves_at_least_the_last_token_to_compute():
    blocks = BlockManager(16, SIZE)
    whole = tokens(1, 2, 3)  # exactly three blocks
    admit(blocks, 1, whole + [7])
    computed(blocks, 1, whole + [7])
    assert blocks.cached_blocks == 3
    # the same three blocks as a whole prompt: the last block is computed again for its logits
    assert len(blocks.cached_prefix(hashes(whole), len(whole))) == 2
    # one token more and all three are used
    assert len(blocks.cached_prefix(hashes(whole + [5]), len(whole) + 1)) == 3
    assert blocks.cached_prefix(hashes(tokens(1)), SIZE) == []


def test_reference_counts_keep_shared_blocks_until_their_last_user_lets_go():
    blocks = BlockManager(8, SIZE)
    ids = tokens(1, 2, tail=1)
    admit(blocks, 1, ids)
    computed(blocks, 1, ids)
    admit(blocks, 2, ids)
    shared = blocks.table(1)[:2]
    assert blocks.free_blocks == 8 - 3 - 1
    blocks.release(1)
    assert blocks.free_blocks == 8 - 3  # the shared blocks are still held by 2
    blocks.grow(9, 5 * SIZE)  # every free block: never one that 2 holds
    assert not set(blocks.table(9)) & set(blocks.table(2))
    with pytest.raises(CacheFull):
        blocks.grow(9, 6 * SIZE)
    assert blocks.cached_prefix(hashes(ids), len(ids)) == shared  # still findable


def test_released_blocks_stay_findable_until_new_blocks_need_them():
    blocks = BlockManager(4, SIZE)
    ids = tokens(1, 2, tail=1)
    admit(blocks, 1, ids)
    computed(blocks, 1, ids)
    blocks.release(1)
    assert blocks.free_blocks == 4 and blocks.cached_blocks == 2
    blocks.grow(2, SIZE)  # a block never cached is handed out first
    assert blocks.cached_blocks == 2
    assert admit(blocks, 3, ids) == 2 * SIZE  # found again after its user left
    blocks.release(3)
    blocks.release(2)
    blocks.grow(4, 4 * SIZE)  # all four: the cached ones too, so their hashes are forgotten
    assert blocks.cached_blocks == 0
    blocks.release(4)
    assert blocks.cached_prefix(hashes(ids), len(ids)) == []


def test_eviction_takes_the_least_recently_released_block_and_a_chains_tail_first():
    blocks = BlockManager(6, SIZE)
    older, newer = tokens(1, 2, tail=1), tokens(3, 4, tail=1)
    for owner, ids in ((1, older), (2, newer)):
        admit(blocks, owner, ids)
        computed(blocks, owner, ids)
    blocks.release(1)
    blocks.release(2)
    assert blocks.cached_blocks == 4
    blocks.grow(5, 3 * SIZE)  # 2 never-cached blocks, then one eviction: older's tail
    assert blocks.cached_blocks == 3
    assert len(blocks.cached_prefix(hashes(older), len(older))) == 1
    assert len(blocks.cached_prefix(hashes(newer), len(newer))) == 2
    blocks.grow(5, 4 * SIZE)  # then older's head
    assert blocks.cached_prefix(hashes(older), len(older)) == []
    assert len(blocks.cached_prefix(hashes(newer), len(newer))) == 2


def test_taking_a_block_makes_it_recently_used():
    blocks = BlockManager(4, SIZE)
    a, b = tokens(1, tail=1), tokens(2, tail=1)
    for owner, ids in ((1, a), (2, b)):
        admit(blocks, owner, ids)
        computed(blocks, owner, ids)
    blocks.release(1)
    blocks.release(2)
    admit(blocks, 3, a)  # a's block is used again, and released after b's
    blocks.release(3)
    blocks.grow(4, 3 * SIZE)  # takes 2 fresh blocks then evicts one: b's, the older now
    assert blocks.cached_prefix(hashes(b), len(b)) == []
    assert len(blocks.cached_prefix(hashes(a), len(a))) == 1


def test_admission_counts_cached_blocks_that_are_free_as_taken():
    blocks = BlockManager(3, SIZE)
    ids = tokens(1, 2, tail=1)
    admit(blocks, 1, ids)
    computed(blocks, 1, ids)
    blocks.release(1)
    cached = blocks.cached_prefix(hashes(ids), len(ids))
    assert len(cached) == 2 and blocks.free_blocks == 3
    # 2 cached + 1 new fit in 3; 2 cached + 2 new (a longer prompt) do not, though 3 blocks are free
    assert blocks.can_take(2, cached, len(ids) + 1)
    assert not blocks.can_take(2, cached, len(ids) + SIZE + 1)


def test_switched_off_nothing_is_found_or_registered_and_cached_blocks_are_plain_free_ones():
    blocks = BlockManager(8, SIZE)
    ids = tokens(1, 2, tail=1)
    admit(blocks, 1, ids)
    computed(blocks, 1, ids)
    admit(blocks, 2, ids)
    blocks.release(1)
    blocks.set_caching(False)
    assert blocks.cached_blocks == 0 and blocks.cached_prefix(hashes(ids), len(ids)) == []
    computed(blocks, 2, ids)
    assert blocks.cached_blocks == 0
    blocks.release(2)
    assert blocks.free_blocks == 8
    blocks.set_caching(True)
    assert admit(blocks, 3, ids) == 0
