"""The CPU decode-attention kernel (kernels/paged_decode.c) against attention computed in float64
over each sequence's keys taken out of the paged cache one by one."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from daemon.engine.kernels import cpu  # noqa: E402

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the CPU kernels were not built")


def paged_cache(kv_heads: int, blocks: int, block_size: int, dim: int, dtype: torch.dtype, generator):
    keys = torch.randn(kv_heads, blocks, block_size, dim, generator=generator).to(dtype)
    values = torch.randn(kv_heads, blocks, block_size, dim, generator=generator).to(dtype)
    return keys, values


def reference(queries, keys, values, tables, starts, ends, scale, softcap=None):
    """float64 attention of each sequence's queries over its keys [start, end), and the log-sum-exp."""
    sequences, kv_heads, group, dim = queries.shape
    block_size = keys.shape[2]
    out = torch.zeros(queries.shape, dtype=torch.float64)
    lse = torch.full(queries.shape[:3], float("-inf"), dtype=torch.float64)
    for g in range(sequences):
        positions = list(range(int(starts[g]), int(ends[g])))
        if not positions:
            continue
        blocks = torch.tensor([int(tables[g, p // block_size]) for p in positions])
        offsets = torch.tensor([p % block_size for p in positions])
        k = keys[:, blocks, offsets].double()  # [kv_heads, keys, dim]
        v = values[:, blocks, offsets].double()
        scores = torch.einsum("hjd,hkd->hjk", queries[g].double(), k) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        lse[g] = scores.logsumexp(-1)
        out[g] = torch.einsum("hjk,hkd->hjd", scores.softmax(-1), v)
    return out, lse


def run(queries, keys, values, tables, starts, ends, scale, softcap=None):
    """The kernel, given keys laid out as the transposed key cache it reads."""
    return cpu.paged_decode(queries, keys.transpose(2, 3).contiguous(), values, tables, starts, ends, scale, softcap)


def random_tables(sequences: int, width: int, blocks: int, generator) -> torch.Tensor:
    """Each sequence's blocks, all distinct and scattered over the cache."""
    return torch.randperm(blocks, generator=generator)[: sequences * width].view(sequences, width)


@pytest.mark.parametrize("dim", [16, 32, 64, 128, 256, 80])  # the kernel has copies for 32, 64, 128 and 256
@pytest.mark.parametrize("group", [1, 2, 4, 7, 8])  # ... taking query heads in pairs (and an odd one)
def test_whole_contexts_match_float64_attention(dim: int, group: int):
    generator = torch.Generator().manual_seed(dim * 10 + group)
    keys, values = paged_cache(2, 64, 16, dim, torch.float32, generator)
    tables = random_tables(5, 8, 64, generator)
    ends = torch.tensor([1, 15, 16, 17, 128])  # one key, within, at and past a block's end, all 8 blocks
    queries = torch.randn(5, 2, group, dim, generator=generator)
    out, lse = run(queries, keys, values, tables, torch.zeros(5, dtype=torch.long), ends, dim**-0.5)
    expected, expected_lse = reference(queries, keys, values, tables, torch.zeros(5), ends, dim**-0.5)
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), expected_lse, atol=2e-6, rtol=1e-5)


def test_key_ranges_starting_inside_a_block_windows_and_softcapping():
    """Ranges starting mid-tile (a sliding window), at a block boundary (a split context's second part), an
    empty range (zeros, log-sum-exp -inf), and soft-capped scores."""
    generator = torch.Generator().manual_seed(1)
    keys, values = paged_cache(2, 64, 16, 32, torch.float32, generator)
    tables = random_tables(4, 6, 64, generator)
    starts, ends = torch.tensor([5, 16, 37, 40]), torch.tensor([13, 90, 38, 40])
    queries = torch.randn(4, 2, 3, 32, generator=generator) * 4  # large scores, for the cap to bite
    for softcap in (None, 2.0):
        out, lse = run(queries, keys, values, tables, starts, ends, 0.3, softcap)
        expected, expected_lse = reference(queries, keys, values, tables, starts, ends, 0.3, softcap)
        torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(lse.double(), expected_lse, atol=2e-6, rtol=1e-5)
    assert out[3].abs().sum() == 0 and torch.isneginf(lse[3]).all()


def test_stale_slots_outside_the_range_never_reach_the_result():
    """A NaN or inf left in a slot of a block the range only partly covers (a finished sequence's,
    or a row of a failed step) changes nothing: 0 * NaN would be NaN."""
    generator = torch.Generator().manual_seed(2)
    keys, values = paged_cache(1, 8, 16, 16, torch.float32, generator)
    tables = torch.tensor([[3, 5]])
    starts, ends = torch.tensor([4]), torch.tensor([20])  # block 3 from slot 4, block 5 up to slot 3
    queries = torch.randn(1, 1, 2, 16, generator=generator)
    clean, clean_lse = run(queries, keys, values, tables, starts, ends, 0.25)
    for slot in (0, 3):
        keys[0, 3, slot], values[0, 3, slot] = float("nan"), float("inf")
    for slot in (4, 15):
        keys[0, 5, slot], values[0, 5, slot] = float("nan"), float("nan")
    out, lse = run(queries, keys, values, tables, starts, ends, 0.25)
    assert torch.equal(out, clean) and torch.equal(lse, clean_lse)


def test_bfloat16_caches_match_float64_attention_over_the_same_values():
    generator = torch.Generator().manual_seed(3)
    keys, values = paged_cache(2, 32, 16, 64, torch.bfloat16, generator)
    tables = random_tables(3, 4, 32, generator)
    ends, starts = torch.tensor([7, 33, 64]), torch.zeros(3, dtype=torch.long)
    queries = torch.randn(3, 2, 4, 64, generator=generator)
    out, lse = run(queries, keys, values, tables, starts, ends, 0.125)
    expected, expected_lse = reference(queries, keys.float(), values.float(), tables, starts, ends, 0.125)
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), expected_lse, atol=2e-6, rtol=1e-5)


def test_rows_of_a_wider_table_larger_blocks_and_several_threads():
    """Block tables as a slice of a step's wider tensor (row stride > width), 32-slot blocks, and
    the loop over sequences and heads split across two threads: the same result as one thread."""
    generator = torch.Generator().manual_seed(4)
    keys, values = paged_cache(3, 40, 32, 32, torch.float32, generator)
    wide = random_tables(6, 6, 40, generator)
    tables = wide[:, :4]
    starts, ends = torch.zeros(6, dtype=torch.long), torch.tensor([1, 31, 32, 64, 100, 128])
    queries = torch.randn(6, 3, 2, 32, generator=generator)
    expected, expected_lse = reference(queries, keys, values, tables, starts, ends, 0.2)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            out, lse = run(queries, keys, values, tables, starts, ends, 0.2)
            torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)
            torch.testing.assert_close(lse.double(), expected_lse, atol=2e-6, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("device", "dtype", "dim", "block_size", "serves"),
    [
        ("cpu", torch.float32, 64, 16, True),
        ("cpu", torch.bfloat16, 128, 32, True),
        ("cpu", torch.float16, 64, 16, False),  # no half-precision loads in the kernel
        ("cpu", torch.float32, 40, 16, False),  # head_dim not a multiple of 16
        ("cpu", torch.float32, 64, 8, False),
        ("cuda", torch.float32, 64, 16, False),
    ],
)
def test_which_caches_the_kernel_reads(device, dtype, dim, block_size, serves):
    assert cpu.reads_paged_cache(torch.device(device), dtype, dim, block_size) is serves
