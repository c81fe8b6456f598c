"""Decodes whose contexts begin with the same cached blocks attend to those blocks once, together.

With prefix caching, sequences that share a prompt prefix (a system prompt, a
few-shot header) share its KV blocks. Attending each decode to its whole context
would take those blocks once per sequence in every layer. Instead, for each
cluster of decodes sharing leading blocks, the queries of all its members attend
to the shared blocks in one call, each decode attends to the rest of its context
alone, and the two partial results are merged by their log-sum-exp (as cascade
attention does in vLLM and FlashInfer): the result is the same attention, up to
float rounding. torch's CPU flash-attention kernel returns the log-sum-exp; other
devices take the plain path for now.

Only decodes take part (prefill chunks are few in a step), and only layers that
see their whole context without soft-capping (a sliding window or soft-capped
scores take the plain path).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from daemon.engine.host_tensors import long_tensor, padded_long_tensor

# Fewer shared blocks than this are taken per sequence, as before: below it, the second attention
# call and the merge cost more than the copies they save (measured on the demo model on CPU).
MIN_SHARED_BLOCKS = 4


@dataclass
class SharedPrefixes:
    """Clusters of the decodes of one group whose block tables begin alike: C clusters of up to M."""

    prefix_blocks: torch.Tensor  # [C, P] each cluster's shared blocks (padding: block 0)
    prefix_mask: torch.Tensor  # [C, 1, 1, P * block_size] 0 where a key is in the cluster's prefix, else -inf
    member_queries: torch.Tensor  # [C * M] each member's decode (padding repeats the cluster's first)
    members: int  # M
    prefix_rows: torch.Tensor  # [G] each decode's row in the prefix results (C * M: a decode in no cluster)
    suffix_blocks: torch.Tensor  # [G, S] each decode's blocks after its cluster's prefix (padding: block 0)
    suffix_mask: torch.Tensor  # [G, 1, 1, S * block_size] 0 where a key is in the decode's context, else -inf


def find_shared_prefixes(
    tables: list[list[int]], lengths: list[int], block_size: int, device: torch.device, dtype: torch.dtype
) -> SharedPrefixes | None:
    """The clusters among decodes with block tables `tables` and contexts `lengths` tokens long
    (the new token included), or None where no cluster would pay."""
    if device.type != "cpu":
        return None
    by_first_block: dict[int, list[int]] = defaultdict(list)
    for decode, table in enumerate(tables):
        by_first_block[table[0]].append(decode)
    clusters: list[tuple[list[int], int]] = []
    for members in by_first_block.values():
        if len(members) < 2:
            continue
        # blocks every member holds alike and sees whole (a block is only shared once full, so
        # this is the common start of the tables, never the block a decode writes into)
        shared = min(lengths[m] // block_size for m in members)
        first = tables[members[0]]
        for m in members[1:]:
            table, same = tables[m], 0
            while same < shared and table[same] == first[same]:
                same += 1
            shared = same
        if shared >= MIN_SHARED_BLOCKS:
            clusters.append((members, shared))
    if not clusters:
        return None
    width = max(len(m) for m, _ in clusters)
    longest = max(s for _, s in clusters)
    prefix_blocks, prefix_mask, member_queries = [], [], []
    prefix_rows = [len(clusters) * width] * len(tables)
    skipped = [0] * len(tables)  # blocks of each decode's context attended in its cluster's prefix
    for c, (members, shared) in enumerate(clusters):
        prefix_blocks.append(tables[members[0]][:shared] + [0] * (longest - shared))
        prefix_mask.append(shared * block_size)
        member_queries += members + [members[0]] * (width - len(members))
        for slot, m in enumerate(members):
            prefix_rows[m] = c * width + slot
            skipped[m] = shared
    suffixes = [table[skip:] for table, skip in zip(tables, skipped, strict=True)]
    suffix_width = max(len(s) for s in suffixes)
    suffix_keys = [length - skip * block_size for length, skip in zip(lengths, skipped, strict=True)]
    return SharedPrefixes(
        prefix_blocks=padded_long_tensor(prefix_blocks, device),
        prefix_mask=_additive_mask(prefix_mask, longest * block_size, device, dtype),
        member_queries=long_tensor(member_queries, device),
        members=width,
        prefix_rows=long_tensor(prefix_rows, device),
        suffix_blocks=padded_long_tensor(suffixes, device),
        suffix_mask=_additive_mask(suffix_keys, suffix_width * block_size, device, dtype),
    )


def _additive_mask(visible: list[int], width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[N, 1, 1, width]: 0 for the first visible[i] keys of row i, -inf after (the flash kernel
    takes a mask of the queries' dtype)."""
    keys = torch.arange(width, device=device).view(1, -1)
    hidden = keys >= long_tensor(visible, device).view(-1, 1)
    mask = torch.zeros(hidden.shape, device=device, dtype=dtype).masked_fill_(hidden, float("-inf"))
    return mask.view(-1, 1, 1, width)


def attend_decodes(
    queries: torch.Tensor,
    shared: SharedPrefixes,
    context: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """queries [G, kv_heads, group, dim] (a KV head's query heads folded together) -> the same shape.
    `context(layer, blocks)` takes blocks [N, B] of a layer's `keys` or `values` as
    [N, kv_heads, B * block_size, dim]."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    _, kv_heads, group, dim = queries.shape
    clusters, members = shared.prefix_blocks.shape[0], shared.members
    # each cluster's members' queries as one query axis per KV head: [C, kv_heads, M * group, dim]
    member_queries = queries.index_select(0, shared.member_queries).view(clusters, members, kv_heads, group, dim)
    member_queries = member_queries.transpose(1, 2).reshape(clusters, kv_heads, members * group, dim)
    blocks = shared.prefix_blocks
    prefix_out, prefix_lse = flash(
        member_queries, context(keys, blocks), context(values, blocks), attn_mask=shared.prefix_mask, scale=scale
    )
    prefix_out = prefix_out.view(clusters, kv_heads, members, group, dim).transpose(1, 2)
    prefix_lse = prefix_lse.view(clusters, kv_heads, members, group).transpose(1, 2)
    # one more row, for decodes in no cluster: nothing attended (weight exp(-inf) = 0)
    no_output = prefix_out.new_zeros(1, kv_heads, group, dim)
    no_lse = prefix_lse.new_full((1, kv_heads, group), float("-inf"))
    prefix_out = torch.cat([prefix_out.reshape(-1, kv_heads, group, dim), no_output])
    prefix_lse = torch.cat([prefix_lse.reshape(-1, kv_heads, group), no_lse])
    prefix_out = prefix_out.index_select(0, shared.prefix_rows)
    prefix_lse = prefix_lse.index_select(0, shared.prefix_rows)
    blocks = shared.suffix_blocks
    suffix_out, suffix_lse = flash(
        queries, context(keys, blocks), context(values, blocks), attn_mask=shared.suffix_mask, scale=scale
    )
    top = torch.maximum(prefix_lse, suffix_lse)  # the suffix always holds the query's own key: finite
    prefix_weight, suffix_weight = (prefix_lse - top).exp_().unsqueeze(-1), (suffix_lse - top).exp_().unsqueeze(-1)
    merged = prefix_out * prefix_weight + suffix_out * suffix_weight
    return merged.div_(prefix_weight + suffix_weight)
