"""Decodes attending to shared blocks together (layers/shared_prefix.py) against each attending alone."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from daemon.engine.kernels import cpu  # noqa: E402
from daemon.engine.layers.attention import (  # noqa: E402
    AttentionBatch,
    AttentionOptions,
    LayerCache,
    attention_group,
    paged_attention,
)
from daemon.engine.layers.shared_prefix import MIN_SHARED_BLOCKS, find_shared_prefixes  # noqa: E402

BLOCK = 16
KV_HEADS, HEADS, DIM = 2, 6, 16
CPU = torch.device("cpu")


def tables_and_lengths() -> tuple[list[list[int]], list[int]]:
    """Two clusters of different sizes and prefix lengths, a decode sharing too few blocks with a
    cluster's first block, and a loner; every table's blocks after the shared ones are its own."""
    fresh = iter(range(100, 1000))
    a, b = list(range(0, 6)), list(range(10, 10 + MIN_SHARED_BLOCKS))
    tables = [
        a + [next(fresh) for _ in range(2)],  # cluster A: 6 shared blocks, 3 members
        a + [next(fresh)],
        a[:6] + [next(fresh) for _ in range(3)],
        b + [next(fresh) for _ in range(2)],  # cluster B: MIN_SHARED_BLOCKS shared, 2 members
        b + [next(fresh)],
        [next(fresh) for _ in range(5)],  # alone
    ]
    lengths = [len(t) * BLOCK - 3 for t in tables]  # each ends inside its last, private block
    return tables, lengths


def attend(tables: list[list[int]], lengths: list[int], shared, *, in_place: bool = True) -> torch.Tensor:
    """One layer's decode attention: the CPU kernel reading the cache in place (with `shared`
    clusters or without), or torch's operators over gathered blocks (in_place False)."""
    generator = torch.Generator().manual_seed(0)
    shape = (KV_HEADS, 1000, BLOCK, DIM)
    keys, values = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    cache = LayerCache(keys.transpose(2, 3).contiguous() if in_place else keys, values, keys_transposed=in_place)
    q = torch.randn(len(tables), HEADS, DIM, generator=generator)
    k = torch.randn(len(tables), KV_HEADS, DIM, generator=generator)
    v = torch.randn(len(tables), KV_HEADS, DIM, generator=generator)
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    slots = torch.tensor([t[(n - 1) // BLOCK] * BLOCK + (n - 1) % BLOCK for t, n in zip(tables, lengths, strict=True)])
    starts = [n - 1 for n in lengths]
    group = attention_group(list(range(len(tables))), [1] * len(tables), starts, padded, BLOCK, whole_batch=True)
    group.shared = shared
    batch = AttentionBatch(slots, [group], slots // BLOCK, slots % BLOCK)
    return paged_attention(q, k, v, cache, batch, AttentionOptions(scale=DIM**-0.5))


def test_clusters_are_the_decodes_sharing_enough_leading_blocks():
    tables, lengths = tables_and_lengths()
    shared = find_shared_prefixes(tables, lengths, BLOCK, CPU)
    assert shared.prefix_blocks.tolist() == [[0, 1, 2, 3, 4, 5], [10, 11, 12, 13, 0, 0]]
    assert shared.prefix_ends.tolist() == [6 * BLOCK, MIN_SHARED_BLOCKS * BLOCK]
    assert shared.members == 3
    assert shared.prefix_rows.tolist() == [0, 1, 2, 3, 4, 6]  # the loner's row is the empty one
    # each decode's own keys start after its cluster's prefix; nothing skipped where nothing is shared
    assert shared.suffix_starts.tolist() == [6 * BLOCK] * 3 + [MIN_SHARED_BLOCKS * BLOCK] * 2 + [0]


def test_too_short_a_common_start_makes_no_cluster():
    tables = [[1, 2, 3, 7, 8, 9], [1, 2, 3, 4, 5, 6]]  # three blocks in common, then apart
    assert MIN_SHARED_BLOCKS > 3
    assert find_shared_prefixes(tables, [90, 90], BLOCK, CPU) is None


@pytest.mark.skipif(not cpu.available(), reason="the CPU kernels were not built")
def test_attending_together_gives_what_each_decode_gets_alone():
    tables, lengths = tables_and_lengths()
    shared = find_shared_prefixes(tables, lengths, BLOCK, CPU)
    assert shared is not None
    together, alone = attend(tables, lengths, shared), attend(tables, lengths, None)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(together, attend(tables, lengths, None, in_place=False), atol=1e-5, rtol=0)
