"""Attention over a paged KV cache, for a step that mixes prefill chunks and decodes.

The new tokens of every sequence in a step are packed into one flat batch of T
tokens. Each token's K and V are written to its cache slot; then the queries of
each sequence attend to that sequence's cached keys, causally (and, in a
sliding-window layer, only to the last `window` positions). Sequences are
attended in two padded groups, one call each: decodes (one query each) and
prefill chunks (up to the longest chunk's queries), so a step costs two
attention calls per layer however many sequences it holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AttentionGroup:
    query_index: torch.Tensor  # [G, Q] each query's row in the packed batch (padding repeats a real row)
    query_valid: torch.Tensor  # [G, Q] False for padding queries
    context_slots: torch.Tensor  # [G, L] cache slots of each sequence's context (padding: slot 0)
    mask: torch.Tensor  # [G, 1, Q, L] True where a query may see a key
    query_positions: torch.Tensor  # [G, Q, 1] each query's position in its sequence
    _windowed: dict[int, torch.Tensor] = field(default_factory=dict)

    def mask_for(self, window: int | None) -> torch.Tensor:
        """The mask of a layer that sees only keys less than `window` positions back (None: all)."""
        if window is None:
            return self.mask
        if window not in self._windowed:
            keys = torch.arange(self.mask.shape[-1], device=self.mask.device).view(1, 1, -1)
            recent = keys > self.query_positions - window  # [G, Q, L]
            # padding queries keep their one key (slot 0, position 0): no row is ever empty
            recent |= ~self.query_valid.unsqueeze(2)
            self._windowed[window] = self.mask & recent.unsqueeze(1)
        return self._windowed[window]


@dataclass
class AttentionBatch:
    slot_mapping: torch.Tensor  # [T] cache slot each new token's K/V goes to
    groups: list[AttentionGroup]


@dataclass
class LayerCache:
    keys: torch.Tensor  # [slots, kv_heads, head_dim]
    values: torch.Tensor


@dataclass(frozen=True)
class AttentionOptions:
    """How one layer's queries meet its keys."""

    scale: float  # multiplies q.k (1/sqrt(head_dim) in most models)
    window: int | None = None  # sliding window: a query sees only keys less than this many positions back
    softcap: float | None = None  # scores become softcap * tanh(scores / softcap) (Gemma 2)


def attention_group(
    first_rows: list[int], lengths: list[int], starts: list[int], context_slots: torch.Tensor
) -> AttentionGroup:
    """The group of sequences whose chunks begin at packed rows `first_rows`, are `lengths`
    tokens long and start at positions `starts`; `context_slots` [G, >= max(start + length)]."""
    device = context_slots.device
    width = max(lengths)
    offsets = torch.arange(width, device=device)
    first = torch.tensor(first_rows, device=device)
    length = torch.tensor(lengths, device=device)
    start = torch.tensor(starts, device=device)
    valid = offsets.unsqueeze(0) < length.unsqueeze(1)  # [G, Q]
    query_index = first.unsqueeze(1) + torch.minimum(offsets.unsqueeze(0), (length - 1).unsqueeze(1))
    context = int((start + length).max())
    keys = torch.arange(context, device=device)
    position = (start.unsqueeze(1) + offsets.unsqueeze(0)).unsqueeze(2)  # [G, Q, 1]
    mask = (keys.view(1, 1, -1) <= position) & valid.unsqueeze(2)
    mask |= ~valid.unsqueeze(2) & (keys.view(1, 1, -1) == 0)  # padding queries see one key: no empty rows
    return AttentionGroup(query_index, valid, context_slots[:, :context], mask.unsqueeze(1), position)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: LayerCache,
    batch: AttentionBatch,
    options: AttentionOptions,
) -> torch.Tensor:
    """q [T, heads, dim], k and v [T, kv_heads, dim] -> [T, heads, dim]."""
    # index_select/index_copy_ rather than tensor[index]: on CPU they are several times faster
    cache.keys.index_copy_(0, batch.slot_mapping, k)
    cache.values.index_copy_(0, batch.slot_mapping, v)
    out = torch.empty_like(q)
    for group in batch.groups:
        queries = _gather(q, group.query_index).transpose(1, 2)  # [G, heads, Q, dim]
        keys = _gather(cache.keys, group.context_slots).transpose(1, 2)  # [G, kv_heads, L, dim]
        values = _gather(cache.values, group.context_slots).transpose(1, 2)
        attended = _attend(queries, keys, values, group.mask_for(options.window), options)
        valid = group.query_valid
        out[group.query_index[valid]] = attended.transpose(1, 2)[valid]
    return out


def _attend(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, options: AttentionOptions
) -> torch.Tensor:
    gqa = queries.shape[1] != keys.shape[1]
    if options.softcap is None:
        return F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, scale=options.scale, enable_gqa=gqa
        )
    # SDPA has no soft-capping: the scores are computed, capped and masked here, in float32 as
    # transformers' eager attention does
    if gqa:
        repeat = queries.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(repeat, dim=1), values.repeat_interleave(repeat, dim=1)
    scores = torch.matmul(queries, keys.transpose(-1, -2)).float() * options.scale
    scores = torch.tanh(scores / options.softcap) * options.softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1).to(values.dtype), values)


def _gather(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """rows[index] for a 2-D index: [G, L] -> [G, L, *rows.shape[1:]]."""
    return rows.index_select(0, index.reshape(-1)).view(*index.shape, *rows.shape[1:])
