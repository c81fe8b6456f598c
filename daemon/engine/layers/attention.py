"""Attention over a paged KV cache, for a step that mixes prefill chunks and decodes.

The new tokens of every sequence in a step are packed into one flat batch of T
tokens. Each token's K and V are written to its cache slot; then the queries of
each sequence attend to that sequence's cached keys, causally (and, in a
sliding-window layer, only to the last `window` positions).

The cache of a layer is head-major, [kv_heads, blocks, block_size, head_dim] for
values. Where the engine's CPU kernel serves the cache (kernels/cpu.py: built at
install, float32 or bfloat16, head_dim a multiple of 16), keys are stored
transposed within each block, [kv_heads, blocks, head_dim, block_size], and
queries are attended by that kernel reading the blocks in place: a decode's one
query (a KV head's group of query heads folded together), and each query of a
prefill chunk that continues a sequence (after a cached prefix, or an earlier
chunk) as a decode of its own that sees the keys up to its position. Nothing is
copied; the block tables and key ranges are all it needs. (For such a chunk
this measured as fast as torch's flash attention over a copied context, whose
arithmetic is the same; a chunk that starts its sequence has no context but its
own keys, and torch's flash attention over them was 10% faster, so it keeps
that.) Queries whose contexts begin with the
same cached blocks (a prefix-cache hit) each read those blocks: the kernel reads
a block once for every two query heads of its KV head, and blocks read by many
queries stay in the CPU's caches, so attending to a shared prefix once for all
its decodes (cascade attention) measured slower here.

Elsewhere (those chunks, and no C compiler at install, CUDA, float16), torch's
attention operators serve, and they want each sequence's keys as one
contiguous slab: the blocks of a group's contexts are taken with one
index_select of whole blocks, then one attention call per group (prefill chunks
padded to the longest). Everything a layer needs is made once per step from the
block tables (one tensor per step), so the forward pass has no host
synchronisation. A CUDA kernel library takes the same metadata: block tables,
key ranges, slot mapping.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from daemon.engine.host_tensors import long_tensor
from daemon.engine.kernels.cpu import paged_decode


@dataclass
class AttentionGroup:
    """Sequences attended in one call: G sequences, their queries padded to Q, their contexts to L."""

    query_rows: torch.Tensor  # [G * Q] each query's row in the packed batch (padding repeats a real row)
    blocks: torch.Tensor  # [G, L / block_size] cache blocks of each sequence's context (padding: block 0)
    mask: torch.Tensor  # [G, 1, Q, L] True where a query may see a key
    query_positions: torch.Tensor  # [G, Q, 1] each query's position in its sequence
    context_ends: torch.Tensor  # [G] each sequence's context length, its new tokens included
    query_valid: torch.Tensor  # [G, Q] False for padding queries
    valid_queries: torch.Tensor | None  # indexes of the real queries in [G * Q] (None: all are)
    output_rows: torch.Tensor | None  # their rows in the packed batch (None: the group is the whole batch, in order)
    decode: bool  # one query per sequence
    fresh: bool  # prefill chunks that start their sequences: nothing cached before them
    _windowed: dict[int, torch.Tensor] = field(default_factory=dict)
    _window_starts: dict[int | None, torch.Tensor] = field(default_factory=dict)
    _additive: dict[tuple[int | None, torch.dtype], torch.Tensor] = field(default_factory=dict)
    _per_query: dict[int | None, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def mask_for(self, window: int | None) -> torch.Tensor:
        """The mask of a layer that sees only keys less than `window` positions back (None: all)."""
        if window is None:
            return self.mask
        if window not in self._windowed:
            keys = torch.arange(self.mask.shape[-1], device=self.mask.device).view(1, 1, -1)
            recent = keys > self.query_positions - window  # [G, Q, L]
            # padding queries keep their one key (block 0's first slot): no row is ever empty
            recent |= ~self.query_valid.unsqueeze(2)
            self._windowed[window] = self.mask & recent.unsqueeze(1)
        return self._windowed[window]

    def window_starts(self, window: int | None) -> torch.Tensor:
        """[G] the first key each sequence's last query sees in a layer with this window (None: all)."""
        if window not in self._window_starts:
            ends = self.context_ends
            self._window_starts[window] = torch.zeros_like(ends) if window is None else (ends - window).clamp_(min=0)
        return self._window_starts[window]

    def per_query(self, window: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each real query as a decode of its own, for the paged kernel: its sequence's block
        table, and the keys it sees, [start, its position + 1) (start: 0, or where the layer's
        window begins). Made once a step for all layers."""
        if window not in self._per_query:
            queries = self.query_valid.shape[1]
            tables = self.blocks.repeat_interleave(queries, dim=0)
            ends = self.query_positions.reshape(-1) + 1
            if self.valid_queries is not None:
                tables, ends = tables.index_select(0, self.valid_queries), ends.index_select(0, self.valid_queries)
            starts = torch.zeros_like(ends) if window is None else (ends - window).clamp_(min=0)
            self._per_query[window] = (tables, starts, ends)
        return self._per_query[window]

    def additive_mask_for(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """mask_for(window) as 0 / -inf in `dtype`: what SDPA turns a boolean mask into on every
        call, made once a step for all layers."""
        key = (window, dtype)
        if key not in self._additive:
            hidden = ~self.mask_for(window)
            self._additive[key] = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device).masked_fill_(
                hidden, float("-inf")
            )
        return self._additive[key]


@dataclass
class AttentionBatch:
    slot_mapping: torch.Tensor  # [T] cache slot each new token's K/V goes to (block * block_size + offset)
    groups: list[AttentionGroup]
    slot_blocks: torch.Tensor | None = None  # [T] its block and offset in the block, where keys are
    slot_offsets: torch.Tensor | None = None  # stored transposed (see LayerCache)


@dataclass
class LayerCache:
    keys: torch.Tensor  # [kv_heads, blocks, block_size, head_dim], or with the last two swapped (below)
    values: torch.Tensor  # [kv_heads, blocks, block_size, head_dim]
    # keys [kv_heads, blocks, head_dim, block_size]: the layout the CPU kernel reads (kernels/cpu.py)
    keys_transposed: bool = False


@dataclass(frozen=True)
class AttentionOptions:
    """How one layer's queries meet its keys."""

    scale: float  # multiplies q.k (1/sqrt(head_dim) in most models)
    window: int | None = None  # sliding window: a query sees only keys less than this many positions back
    softcap: float | None = None  # scores become softcap * tanh(scores / softcap) (Gemma 2)


def attention_group(
    first_rows: list[int],
    lengths: list[int],
    starts: list[int],
    block_tables: torch.Tensor,
    block_size: int,
    *,
    whole_batch: bool = False,
) -> AttentionGroup:
    """The group of sequences whose chunks begin at packed rows `first_rows`, are `lengths` tokens
    long and start at positions `starts`; `block_tables` [G, >= their blocks]. `whole_batch`: the
    group's queries are the packed batch itself, in order (a step of decodes only, or of prefill
    chunks only)."""
    device = block_tables.device
    width = max(lengths)
    num_blocks = -(-max(s + n for s, n in zip(starts, lengths, strict=True)) // block_size)
    offsets = torch.arange(width, device=device)
    first, length, start = long_tensor(first_rows + lengths + starts, device).view(3, -1)
    valid = offsets.unsqueeze(0) < length.unsqueeze(1)  # [G, Q]
    query_rows = first.unsqueeze(1) + torch.minimum(offsets.unsqueeze(0), (length - 1).unsqueeze(1))
    keys = torch.arange(num_blocks * block_size, device=device).view(1, 1, -1)
    position = (start.unsqueeze(1) + offsets.unsqueeze(0)).unsqueeze(2)  # [G, Q, 1]
    mask = (keys <= position) & valid.unsqueeze(2)
    mask |= ~valid.unsqueeze(2) & (keys == 0)  # padding queries see one key: no empty rows
    valid_queries = None
    if min(lengths) < width:  # made from the plan's numbers: nothing waits on the device
        indexes = [g * width + j for g, n in enumerate(lengths) for j in range(n)]
        valid_queries = long_tensor(indexes, device)
    output_rows = None if whole_batch else query_rows.reshape(-1)
    if output_rows is not None and valid_queries is not None:
        output_rows = output_rows.index_select(0, valid_queries)
    return AttentionGroup(
        query_rows.reshape(-1),
        block_tables[:, :num_blocks],
        mask.unsqueeze(1),
        position,
        start + length,
        valid,
        valid_queries,
        output_rows,
        decode=width == 1,
        fresh=width > 1 and not any(starts),
    )


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: LayerCache,
    batch: AttentionBatch,
    options: AttentionOptions,
) -> torch.Tensor:
    """q [T, heads, dim], k and v [T, kv_heads, dim] -> [T, heads, dim]."""
    kv_heads, _, _, dim = cache.values.shape
    # index_copy_/index_select rather than tensor[index]: on CPU they are several times faster
    if cache.keys_transposed:  # a key is a column of its block; the indexed dims come first: [T, kv_heads, dim]
        cache.keys[:, batch.slot_blocks, :, batch.slot_offsets] = k
    else:
        cache.keys.view(kv_heads, -1, dim).index_copy_(1, batch.slot_mapping, k.transpose(0, 1))
    cache.values.view(kv_heads, -1, dim).index_copy_(1, batch.slot_mapping, v.transpose(0, 1))
    if len(batch.groups) == 1 and batch.groups[0].output_rows is None:
        return _attend_group(q, cache, batch.groups[0], options)
    out = torch.empty_like(q)
    for group in batch.groups:
        out.index_copy_(0, group.output_rows, _attend_group(q, cache, group, options))
    return out


def _attend_group(q: torch.Tensor, cache: LayerCache, group: AttentionGroup, options: AttentionOptions) -> torch.Tensor:
    """The group's real queries, attended: [their number, heads, dim]."""
    heads, dim = q.shape[1], q.shape[2]
    sequences, queries = group.mask.shape[0], group.mask.shape[2]
    kv_heads = cache.keys.shape[0]
    grouped = q.index_select(0, group.query_rows)
    if group.decode:
        # one query each: the query heads sharing a KV head are that head's queries
        folded = grouped.view(sequences, kv_heads, heads // kv_heads, dim)
        if cache.keys_transposed:
            attended = _decode_in_place(folded, cache, group, options)
        else:
            keys, values = _context(cache.keys, group.blocks), _context(cache.values, group.blocks)
            attended = _attend(folded, keys, values, group, options)
        return attended.reshape(sequences, heads, dim)
    if cache.keys_transposed and not group.fresh:
        # each query a decode of its own, reading the blocks in place: no context is copied
        real = grouped if group.valid_queries is None else grouped.index_select(0, group.valid_queries)
        tables, starts, ends = group.per_query(options.window)
        folded = real.view(real.shape[0], kv_heads, heads // kv_heads, dim)
        attended, _ = paged_decode(
            folded, cache.keys, cache.values, tables, starts, ends, options.scale, options.softcap
        )
        return attended.to(q.dtype).view(real.shape[0], heads, dim)
    keys = _context(cache.keys, group.blocks, transposed=cache.keys_transposed)  # [G, kv_heads, L, dim]
    values = _context(cache.values, group.blocks)
    attended = _attend(grouped.view(sequences, queries, heads, dim).transpose(1, 2), keys, values, group, options)
    attended = attended.transpose(1, 2).reshape(sequences * queries, heads, dim)
    return attended if group.valid_queries is None else attended.index_select(0, group.valid_queries)


def _decode_in_place(
    queries: torch.Tensor, cache: LayerCache, group: AttentionGroup, options: AttentionOptions
) -> torch.Tensor:
    """queries [G, kv_heads, group, dim], attended by the CPU kernel reading the cache's blocks."""
    starts = group.window_starts(options.window)
    attended, _ = paged_decode(
        queries, cache.keys, cache.values, group.blocks, starts, group.context_ends, options.scale, options.softcap
    )
    return attended.to(queries.dtype)


def _context(layer: torch.Tensor, blocks: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
    """The cached rows of `blocks` [G, N] of a layer's keys or values: [G, kv_heads, N * block_size, dim],
    one contiguous slab per sequence and head (keys stored transposed are turned back: a copy)."""
    kv_heads = layer.shape[0]
    sequences, count = blocks.shape
    taken = layer.index_select(1, blocks.reshape(-1))  # [kv_heads, G * N, block_size, dim] (or dim, block_size)
    if transposed:
        taken = taken.transpose(2, 3).contiguous()
    block_size, dim = taken.shape[2:]
    return taken.view(kv_heads, sequences, count * block_size, dim).transpose(0, 1)


def _attend(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, group: AttentionGroup, options: AttentionOptions
) -> torch.Tensor:
    gqa = queries.shape[1] != keys.shape[1]
    if options.softcap is None:
        mask = group.additive_mask_for(options.window, queries.dtype)
        return F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, scale=options.scale, enable_gqa=gqa
        )
    mask = group.mask_for(options.window)
    # SDPA has no soft-capping: the scores are computed, capped and masked here, in float32 as
    # transformers' eager attention does
    if gqa:
        repeat = queries.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(repeat, dim=1), values.repeat_interleave(repeat, dim=1)
    scores = torch.matmul(queries, keys.transpose(-1, -2)).float() * options.scale
    scores = torch.tanh(scores / options.softcap) * options.softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1).to(values.dtype), values)
