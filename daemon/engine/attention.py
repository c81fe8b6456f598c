"""Attention over a paged KV cache, for a step that mixes prefill chunks and decodes.

The new tokens of every sequence in a step are packed into one flat batch of T
tokens. Each token's K and V are written to its cache slot; then each query
attends to its own sequence's cached keys. Decodes (one query each) attend
together in one padded call; prefill chunks (many queries each) one sequence at
a time, since their lengths differ widely.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DecodeGroup:
    token_index: torch.Tensor  # [B] positions of the decode tokens in the packed batch
    context_slots: torch.Tensor  # [B, L] cache slots of each sequence's context, padded
    context_mask: torch.Tensor  # [B, 1, 1, L] True where a slot is part of the context


@dataclass
class PrefillChunk:
    start: int  # the chunk's first token in the packed batch
    end: int
    context_slots: torch.Tensor  # [L] cache slots of the sequence's context up to the chunk's end
    past: int  # tokens of the sequence already in the cache before this chunk


@dataclass
class AttentionBatch:
    slot_mapping: torch.Tensor  # [T] cache slot each new token's K/V goes to
    decodes: DecodeGroup | None
    prefills: list[PrefillChunk]


@dataclass
class LayerCache:
    keys: torch.Tensor  # [slots, kv_heads, head_dim]
    values: torch.Tensor


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache, batch: AttentionBatch
) -> torch.Tensor:
    """q [T, heads, dim], k and v [T, kv_heads, dim] -> [T, heads, dim]."""
    cache.keys[batch.slot_mapping] = k
    cache.values[batch.slot_mapping] = v
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    if (group := batch.decodes) is not None:
        queries = q[group.token_index].unsqueeze(2)  # [B, heads, 1, dim]
        keys = cache.keys[group.context_slots].transpose(1, 2)  # [B, kv_heads, L, dim]
        values = cache.values[group.context_slots].transpose(1, 2)
        attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=group.context_mask, enable_gqa=gqa)
        out[group.token_index] = attended.squeeze(2)
    for chunk in batch.prefills:
        queries = q[chunk.start : chunk.end].transpose(0, 1)  # [heads, n, dim]
        if chunk.past == 0:  # the whole context is this chunk: plain causal attention
            keys, values = k[chunk.start : chunk.end].transpose(0, 1), v[chunk.start : chunk.end].transpose(0, 1)
            attended = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, enable_gqa=gqa)
        else:
            keys = cache.keys[chunk.context_slots].transpose(0, 1)
            values = cache.values[chunk.context_slots].transpose(0, 1)
            n, context = chunk.end - chunk.start, chunk.context_slots.shape[0]
            query_positions = torch.arange(chunk.past, chunk.past + n, device=q.device).unsqueeze(1)
            mask = torch.arange(context, device=q.device).unsqueeze(0) <= query_positions  # [n, L]
            attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, enable_gqa=gqa)
        out[chunk.start : chunk.end] = attended.transpose(0, 1)
    return out
