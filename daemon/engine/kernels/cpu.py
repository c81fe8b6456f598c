"""The engine's CPU kernels (C, built at install into _cpu), called through ctypes.

Torch has no CPU operator that reads a paged KV cache in place: its attention
operators want each sequence's keys as one contiguous slab. paged_decode.c is
decode attention that reads the blocks where they are. sample.c does a step's
sampling in one call (penalties, raw logprobs, temperature, min-p, top-k, top-p,
the draw) in a few passes a row, with top-k and top-p found by selection:
torch's CPU sort of a vocabulary costs more than the forward pass. It is built by
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
from array import array
from typing import NamedTuple

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
    library.sample_rows.restype = None
    library.sample_rows.argtypes = [
        pointer, size, size,  # logits, rows, vocab
        ctypes.c_char_p, pointer, pointer, pointer,  # params (bytes: no copy), counts rows, output counts, prompt mask
        pointer, pointer,  # mask rows, masks
        pointer, size, pointer,  # uniform, its length, tokens
        pointer, pointer, pointer, pointer, size,  # chosen, rank, top ids, top logprobs, their width
        ctypes.c_int,  # threads
    ]  # fmt: skip
    library.apply_penalties.restype = None
    library.apply_penalties.argtypes = [
        pointer, size, size, pointer,  # logits, rows, vocab, logit rows
        pointer, pointer, pointer, pointer, ctypes.c_int,  # output counts, prompt mask, their rows, penalties, threads
    ]  # fmt: skip
    library.token_logprobs.restype = None
    library.token_logprobs.argtypes = [
        pointer, size, size, pointer, size,  # logits, rows, vocab, tokens, top
        pointer, pointer, pointer, pointer, ctypes.c_int,  # chosen, rank, top ids, top logprobs, threads
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


class RowScores(NamedTuple):
    """sample_rows' log-probabilities, for each row that asked for them, in row order: its token's
    and its rank (1: the likeliest), and its likeliest tokens' ids and log-probabilities (the
    first as many as the row asked for are its; -inf past what exists)."""

    chosen: list[float]
    rank: list[int]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


def sample_rows(
    logits: torch.Tensor,
    params: bytes,
    uniform: torch.Tensor | None,
    counts: tuple[list[int], torch.Tensor, torch.Tensor] | None = None,
    scores_width: int | None = None,
    scored: int = 0,
    masks: tuple[list[int], torch.Tensor] | None = None,
) -> tuple[list[int], RowScores | None]:
    """A step's tokens, one for each row of logits [rows, vocab] (float32, CPU; changed in place
    where penalised): greedy rows their first largest logit, sampled rows one drawn from their
    distribution, after each row's penalties, with the log-probabilities of its raw logits.

    `params`: per row, eight native float64 (SamplingParams.kernel_row): temperature (0:
    greedy), top_k (0: none), top_p (1: none), min_p (0: none), logprobs (< 0: none), and the
    repetition, frequency and presence penalties. `uniform` (float64): a number in [0, 1) for
    each sampled row, in row order. `counts` (None: nothing penalised): each row's row in the
    output counts [*, vocab] float32 and prompt mask [*, vocab] bool that follow (-1: not
    penalised). `scores_width` (None: no log-probabilities): the most any row asks for; then
    `scored` rows ask. `masks` (None: no grammar): each row's row in the token bitmasks [*,
    vocab / 32 rounded up] int32 that follow (xgrammar's layout; -1: none); a row's tokens its
    mask does not allow get -inf after its raw logits are scored.

    Tokens are -1 for a row that cannot be chosen from (NaN; sampled, +inf too; or a sampled row
    `uniform` has no number for)."""
    library = _library()
    assert library is not None, "sample_rows called without the kernels built (check available())"
    assert logits.dtype == torch.float32 and logits.device.type == "cpu" and logits.is_contiguous()
    rows, vocab = logits.shape
    assert len(params) == 64 * rows, "eight float64 a row"
    if uniform is not None:
        uniform = uniform.contiguous()
        assert uniform.dtype == torch.float64
    counts_rows = output = prompt = None
    if counts is not None:
        counts_rows, output, prompt = array("q", counts[0]), counts[1], counts[2]
        assert len(counts_rows) == rows and output.is_contiguous() and prompt.is_contiguous()
        assert output.dtype == torch.float32 and prompt.dtype == torch.bool
        assert output.shape[1] == prompt.shape[1] == vocab
        assert max(counts_rows) < output.shape[0], "a counts row past the counts"
    mask_rows = bitmasks = None
    if masks is not None:
        mask_rows, bitmasks = array("q", masks[0]), masks[1]
        assert len(mask_rows) == rows and bitmasks.is_contiguous() and bitmasks.dtype == torch.int32
        assert bitmasks.shape[1] == (vocab + 31) // 32 and max(mask_rows) < bitmasks.shape[0]
    tokens = torch.empty(rows, dtype=torch.long)
    width = scores_width or 0
    scores = None
    if scores_width is not None:  # chosen, rank, top ids, top logprobs
        scores = (
            torch.empty(scored, dtype=torch.float32),
            torch.empty(scored, dtype=torch.long),
            torch.empty(scored, width, dtype=torch.long),
            torch.empty(scored, width, dtype=torch.float32),
        )
    library.sample_rows(
        logits.data_ptr(),
        rows,
        vocab,
        params,
        None if counts_rows is None else counts_rows.buffer_info()[0],
        None if output is None else output.data_ptr(),
        None if prompt is None else prompt.data_ptr(),
        None if mask_rows is None else mask_rows.buffer_info()[0],
        None if bitmasks is None else bitmasks.data_ptr(),
        None if uniform is None else uniform.data_ptr(),
        0 if uniform is None else uniform.numel(),
        tokens.data_ptr(),
        *((None,) * 4 if scores is None else (t.data_ptr() for t in scores)),
        width,
        torch.get_num_threads(),
    )
    if scores is None:
        return tokens.tolist(), None
    return tokens.tolist(), RowScores(*(t.tolist() for t in scores))


def apply_penalties(
    logits: torch.Tensor,
    logit_rows: torch.Tensor,
    output_counts: torch.Tensor,
    prompt_mask: torch.Tensor,
    counts_rows: torch.Tensor,
    penalties: torch.Tensor,
) -> None:
    """vLLM's repetition, frequency and presence penalties, in place, on rows logit_rows of logits
    [*, vocab] float32 (CPU), from rows counts_rows of output_counts [*, vocab] float32 and
    prompt_mask [*, vocab] bool; penalties [rows, 3] float32: repetition, frequency, presence."""
    library = _library()
    assert library is not None, "apply_penalties called without the kernels built (check available())"
    assert logits.is_contiguous() and output_counts.is_contiguous() and prompt_mask.is_contiguous()
    logit_rows, counts_rows, penalties = logit_rows.contiguous(), counts_rows.contiguous(), penalties.contiguous()
    library.apply_penalties(
        logits.data_ptr(),
        logit_rows.shape[0],
        logits.shape[1],
        logit_rows.data_ptr(),
        output_counts.data_ptr(),
        prompt_mask.data_ptr(),
        counts_rows.data_ptr(),
        penalties.data_ptr(),
        torch.get_num_threads(),
    )


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Of each row of logits [rows, vocab] float32 (CPU): the log-probability and rank (1: the
    likeliest) of tokens[r], and the `top` likeliest tokens' ids and log-probabilities."""
    library = _library()
    assert library is not None, "token_logprobs called without the kernels built (check available())"
    logits, tokens = logits.contiguous(), tokens.contiguous()
    rows, vocab = logits.shape
    if rows and not 0 <= int(tokens.min()) <= int(tokens.max()) < vocab:  # the kernel reads logits[token]
        raise ValueError(f"token ids must be in 0..{vocab - 1} (the model's vocabulary) to have a logprob")
    chosen = torch.empty(rows, dtype=torch.float32)
    rank = torch.empty(rows, dtype=torch.long)
    top_ids = torch.empty(rows, top, dtype=torch.long)
    top_logprobs = torch.empty(rows, top, dtype=torch.float32)
    library.token_logprobs(
        logits.data_ptr(),
        rows,
        vocab,
        tokens.data_ptr(),
        top,
        chosen.data_ptr(),
        rank.data_ptr(),
        top_ids.data_ptr(),
        top_logprobs.data_ptr(),
        torch.get_num_threads(),
    )
    return chosen, rank, top_ids, top_logprobs
