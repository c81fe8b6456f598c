"""A decoder layer's attention block: q/k/v projection, optional per-head q/k norms, rotation, attention, output.

Every family's block is this one with its options set: biases (Qwen2), per-head
q/k norms (Qwen3, Gemma 3), a sliding window, a score scale other than
1/sqrt(head_dim) and soft-capping (Gemma), or q/k/v stored fused in the
checkpoint (Phi-3).

Split across tensor-parallel ranks (parallel.py), each rank holds num_heads / size query heads
and their KV heads: num_kv_heads / size of them, or, where there are fewer KV heads than ranks,
the one its query heads use (replicated on size / num_kv_heads ranks, as vLLM does). Attention
is per head, so a rank attends its heads alone; o_proj is row-parallel and its all-reduce joins
them. The per-head q/k norms are the same on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from daemon.engine.layers.attention import AttentionBatch, AttentionOptions, LayerCache, paged_attention
from daemon.engine.layers.linear import FusedLinear, OutputPart, RowParallelLinear
from daemon.engine.layers.rotary import Rotation
from daemon.engine.parallel import SINGLE, Parallel, ParallelError


@dataclass(frozen=True)
class AttentionShape:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    o_bias: bool = False
    qkv_stored_as: str | None = None  # the checkpoint's name for q/k/v stored as one tensor


class SelfAttention(nn.Module):
    def __init__(
        self,
        shape: AttentionShape,
        options: AttentionOptions,
        qk_norm: Callable[[int], nn.Module] | None = None,
        parallel: Parallel = SINGLE,
    ):
        """`qk_norm(head_dim)` makes the norm applied to each head of q and of k before rotation."""
        super().__init__()
        self.shape, self.options = shape, options
        dim = shape.head_dim
        first_head, self.num_heads = parallel.shard(shape.num_heads, "num_attention_heads")
        first_kv_head, self.num_kv_heads = kv_heads_of_rank(shape.num_kv_heads, parallel)
        parts = [
            OutputPart("q_proj", shape.num_heads * dim, first_head * dim, self.num_heads * dim),
            OutputPart("k_proj", shape.num_kv_heads * dim, first_kv_head * dim, self.num_kv_heads * dim),
            OutputPart("v_proj", shape.num_kv_heads * dim, first_kv_head * dim, self.num_kv_heads * dim),
        ]
        self.qkv_proj = FusedLinear(shape.hidden_size, parts, bias=shape.qkv_bias, stored_as=shape.qkv_stored_as)
        self.o_proj = RowParallelLinear(
            shape.num_heads * dim, shape.hidden_size, shape.o_bias, parallel, what="num_attention_heads * head_dim"
        )
        self.q_norm = qk_norm(dim) if qk_norm else None
        self.k_norm = qk_norm(dim) if qk_norm else None

    def forward(self, x: torch.Tensor, rotation: Rotation, cache: LayerCache, batch: AttentionBatch) -> torch.Tensor:
        tokens, heads, kv_heads, dim = x.shape[0], self.num_heads, self.num_kv_heads, self.shape.head_dim
        q, k, v = self.qkv_proj.split(x)
        q = q.reshape(tokens, heads, dim)
        k = k.reshape(tokens, kv_heads, dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # queries and keys rotate together: one set of operators for both
        q, k = rotation.apply(torch.cat([q, k], dim=1)).split([heads, kv_heads], dim=1)
        v = v.reshape(tokens, kv_heads, dim)
        return self.o_proj(paged_attention(q, k, v, cache, batch, self.options).reshape(tokens, -1))


def kv_heads_of_rank(num_kv_heads: int, parallel: Parallel) -> tuple[int, int]:
    """(first, count) of the KV heads this rank holds: its even share, or with fewer KV heads than
    ranks the one its query heads attend to (rank r's queries are heads r/size of the whole)."""
    if num_kv_heads >= parallel.size:
        return parallel.shard(num_kv_heads, "num_key_value_heads")
    if parallel.size % num_kv_heads:
        raise ParallelError(
            f"num_key_value_heads ({num_kv_heads}) is fewer than the tensor-parallel size {parallel.size} "
            "and does not divide it"
        )
    return parallel.rank * num_kv_heads // parallel.size, 1
