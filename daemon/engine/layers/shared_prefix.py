"""Decodes whose contexts begin with the same cached blocks attend to those blocks once, together.

With prefix caching, sequences that share a prompt prefix (a system prompt, a
few-shot header) share its KV blocks. Attending each decode to its whole context
would read those blocks once per sequence in every layer. Instead, for each
cluster of decodes sharing leading blocks, the queries of all its members attend
to the shared blocks in one kernel call (the kernel reads each key once for all
the queries of its KV head), each decode attends to the rest of its context
alone, and the two partial results are merged by their log-sum-exp (as cascade
attention does in vLLM and FlashInfer): the result is the same attention, up to
float rounding. Both calls are the CPU kernel reading the cache in place
(kernels/cpu.py): the key ranges are block-aligned starts and context ends, so
nothing is copied. Where the kernel does not serve, decodes take the plain path.

Only decodes take part (prefill chunks are few in a step), and only layers that
see their whole context (a sliding window takes the plain path).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from daemon.engine.host_tensors import long_tensor, padded_long_tensor
from daemon.engine.kernels.cpu import paged_decode

if TYPE_CHECKING:
    from daemon.engine.layers.attention import AttentionOptions, LayerCache

# Fewer shared blocks than this are attended per sequence: below it, the second kernel call and
# the merge cost more than the reads they save (measured on the demo model on CPU).
MIN_SHARED_BLOCKS = 4


@dataclass
class SharedPrefixes:
    """Clusters of the decodes of one group whose block tables begin alike: C clusters of up to M."""

    prefix_blocks: torch.Tensor  # [C, P] each cluster's shared blocks (padding: block 0)
    prefix_starts: torch.Tensor  # [C] zeros: the prefix is attended from its first key
    prefix_ends: torch.Tensor  # [C] its length in keys
    member_queries: torch.Tensor  # [C * M] each member's decode (padding repeats the cluster's first)
    members: int  # M
    prefix_rows: torch.Tensor  # [G] each decode's row in the prefix results (C * M: a decode in no cluster)
    suffix_starts: torch.Tensor  # [G] each decode's first key after its cluster's prefix (0 in no cluster)


def find_shared_prefixes(
    tables: list[list[int]], lengths: list[int], block_size: int, device: torch.device
) -> SharedPrefixes | None:
    """The clusters among decodes with block tables `tables` and contexts `lengths` tokens long
    (the new token included), or None where no cluster would pay."""
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
    prefix_blocks, prefix_ends, member_queries = [], [], []
    prefix_rows = [len(clusters) * width] * len(tables)
    suffix_starts = [0] * len(tables)
    for c, (members, shared) in enumerate(clusters):
        prefix_blocks.append(tables[members[0]][:shared] + [0] * (longest - shared))
        prefix_ends.append(shared * block_size)
        member_queries += members + [members[0]] * (width - len(members))
        for slot, m in enumerate(members):
            prefix_rows[m] = c * width + slot
            suffix_starts[m] = shared * block_size
    return SharedPrefixes(
        prefix_blocks=padded_long_tensor(prefix_blocks, device),
        prefix_starts=torch.zeros(len(clusters), dtype=torch.long, device=device),
        prefix_ends=long_tensor(prefix_ends, device),
        member_queries=long_tensor(member_queries, device),
        members=width,
        prefix_rows=long_tensor(prefix_rows, device),
        suffix_starts=long_tensor(suffix_starts, device),
    )


def attend_decodes(
    queries: torch.Tensor,
    shared: SharedPrefixes,
    blocks: torch.Tensor,
    context_ends: torch.Tensor,
    cache: LayerCache,
    options: AttentionOptions,
) -> torch.Tensor:
    """queries [G, kv_heads, group, dim] (a KV head's query heads folded together), of decodes with
    block tables `blocks` [G, >= their blocks] and contexts `context_ends` [G] keys long -> the same
    shape, in the queries' dtype."""
    _, kv_heads, group, dim = queries.shape
    clusters, members = shared.prefix_blocks.shape[0], shared.members

    def attend(rows: torch.Tensor, tables: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor):
        return paged_decode(rows, cache.keys, cache.values, tables, starts, ends, options.scale, options.softcap)

    # each cluster's members' queries as one query axis per KV head: [C, kv_heads, M * group, dim]
    member_queries = queries.index_select(0, shared.member_queries).view(clusters, members, kv_heads, group, dim)
    member_queries = member_queries.transpose(1, 2).reshape(clusters, kv_heads, members * group, dim)
    prefix_out, prefix_lse = attend(member_queries, shared.prefix_blocks, shared.prefix_starts, shared.prefix_ends)
    prefix_out = prefix_out.view(clusters, kv_heads, members, group, dim).transpose(1, 2)
    prefix_lse = prefix_lse.view(clusters, kv_heads, members, group).transpose(1, 2)
    # one more row, for decodes in no cluster: nothing attended (weight exp(-inf) = 0)
    no_output = prefix_out.new_zeros(1, kv_heads, group, dim)
    no_lse = prefix_lse.new_full((1, kv_heads, group), float("-inf"))
    prefix_out = torch.cat([prefix_out.reshape(-1, kv_heads, group, dim), no_output])
    prefix_lse = torch.cat([prefix_lse.reshape(-1, kv_heads, group), no_lse])
    prefix_out = prefix_out.index_select(0, shared.prefix_rows)
    prefix_lse = prefix_lse.index_select(0, shared.prefix_rows)
    suffix_out, suffix_lse = attend(queries, blocks, shared.suffix_starts, context_ends)
    top = torch.maximum(prefix_lse, suffix_lse)  # the suffix always holds the query's own key: finite
    prefix_weight, suffix_weight = (prefix_lse - top).exp_().unsqueeze(-1), (suffix_lse - top).exp_().unsqueeze(-1)
    merged = prefix_out * prefix_weight + suffix_out * suffix_weight
    return merged.div_(prefix_weight + suffix_weight).to(queries.dtype)
