"""A decoder layer's attention block: q/k/v projection, optional per-head q/k norms, rotation, attention, output.

Every family's block is this one with its options set: biases (Qwen2), per-head
q/k norms (Qwen3, Gemma 3), a sliding window, a score scale other than
1/sqrt(head_dim) and soft-capping (Gemma), or q/k/v stored fused in the
checkpoint (Phi-3).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from daemon.engine.layers.attention import AttentionBatch, AttentionOptions, LayerCache, paged_attention
from daemon.engine.layers.linear import FusedLinear
from daemon.engine.layers.rotary import Rotation


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
    ):
        """`qk_norm(head_dim)` makes the norm applied to each head of q and of k before rotation."""
        super().__init__()
        self.shape, self.options = shape, options
        q_size, kv_size = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
        parts = {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size}
        self.qkv_proj = FusedLinear(shape.hidden_size, parts, bias=shape.qkv_bias, stored_as=shape.qkv_stored_as)
        self.o_proj = nn.Linear(q_size, shape.hidden_size, bias=shape.o_bias)
        self.q_norm = qk_norm(shape.head_dim) if qk_norm else None
        self.k_norm = qk_norm(shape.head_dim) if qk_norm else None

    def forward(self, x: torch.Tensor, rotation: Rotation, cache: LayerCache, batch: AttentionBatch) -> torch.Tensor:
        tokens, shape = x.shape[0], self.shape
        q, k, v = self.qkv_proj.split(x)
        q = q.reshape(tokens, shape.num_heads, shape.head_dim)
        k = k.reshape(tokens, shape.num_kv_heads, shape.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # queries and keys rotate together: one set of operators for both
        q, k = rotation.apply(torch.cat([q, k], dim=1)).split([shape.num_heads, shape.num_kv_heads], dim=1)
        v = v.reshape(tokens, shape.num_kv_heads, shape.head_dim)
        return self.o_proj(paged_attention(q, k, v, cache, batch, self.options).reshape(tokens, -1))
