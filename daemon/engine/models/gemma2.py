"""Gemma 2: a decoder of its own, and the one Gemma 3 builds on.

A layer is x + post_norm(attn(norm(x))), then x + post_ff_norm(mlp(pre_ff_norm(x))),
every norm Gemma's (1 + w) RMSNorm. Input embeddings are scaled by
sqrt(hidden_size); attention scores by query_pre_attn_scalar**-0.5 (not head_dim's),
and soft-capped, as are the final logits. Sliding-window and global layers
alternate (config.json's layer_types, else every other layer sliding). The
embedding is tied to the output: Gemma checkpoints hold no lm_head.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from daemon.engine.hf_config import SLIDING_ATTENTION, RopeSettings, layer_types
from daemon.engine.layers.attention import AttentionBatch, AttentionOptions, LayerCache
from daemon.engine.layers.logits import LogitsHead
from daemon.engine.layers.mlp import GatedMLP
from daemon.engine.layers.norm import OffsetRMSNorm
from daemon.engine.layers.rotary import RotaryEmbedding, Rotation
from daemon.engine.layers.self_attention import SelfAttention
from daemon.engine.layers.vocab import VocabParallelEmbedding
from daemon.engine.models.base import CausalLM, config_int
from daemon.engine.models.llama import LlamaShape
from daemon.engine.models.registry import Family
from daemon.engine.parallel import SINGLE, Parallel


class ScaledEmbedding(VocabParallelEmbedding):
    """Token embeddings times sqrt(hidden_size), the factor rounded to the weights' dtype first as
    transformers rounds it (in bfloat16, sqrt(3072) is 55.5, not 55.43): the checkpoints were
    trained with the rounded one."""

    def __init__(self, vocab_size: int, hidden_size: int, parallel: Parallel = SINGLE):
        super().__init__(vocab_size, hidden_size, parallel)
        self.register_buffer("normalizer", torch.tensor(hidden_size**0.5, dtype=torch.float32), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.normalizer.to(self.weight.dtype)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, self_attn: SelfAttention, mlp: nn.Module, hidden_size: int, eps: float):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = OffsetRMSNorm(hidden_size, eps)
        self.post_attention_layernorm = OffsetRMSNorm(hidden_size, eps)
        self.pre_feedforward_layernorm = OffsetRMSNorm(hidden_size, eps)
        self.post_feedforward_layernorm = OffsetRMSNorm(hidden_size, eps)

    def forward(self, x: torch.Tensor, rotation: Rotation, cache: LayerCache, batch: AttentionBatch) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rotation, cache, batch))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma2ForCausalLM(CausalLM):
    # What transformers' config class assumes for a field config.json leaves out. A field present
    # as null stays None: Gemma 3 checkpoints write "attn_logit_softcapping": null.
    defaults: dict[str, Any] = {
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "sliding_window": 4096,
        "tie_word_embeddings": True,
    }

    def __init__(self, config: dict[str, Any], family: Family, max_positions: int, parallel: Parallel = SINGLE):
        """`parallel`: the tensor-parallel share this model holds (all of it by default)."""
        super().__init__()
        self.config = config = self.defaults | config
        num_layers = config_int(config, "num_hidden_layers")
        types = layer_types(config, num_layers, self.window_pattern(config))
        window = config["sliding_window"]
        windows = tuple(window if t == SLIDING_ATTENTION else None for t in types)
        tied = bool(config["tie_word_embeddings"])
        self.shape = shape = LlamaShape.read(config, family, tie_word_embeddings=tied, windows=windows)
        attention = shape.attention
        self.num_layers, self.head_dim = num_layers, attention.head_dim
        self.tie_word_embeddings = tied

        self.model = nn.Module()
        self.model.embed_tokens = ScaledEmbedding(shape.vocab_size, shape.hidden_size, parallel)
        self.model.layers = nn.ModuleList(
            GemmaDecoderLayer(
                SelfAttention(attention, self.attention_options(config, windows[i]), self.qk_norm(), parallel),
                GatedMLP(shape.hidden_size, shape.intermediate_size, shape.activation, parallel=parallel),
                shape.hidden_size,
                shape.rms_norm_eps,
            )
            for i in range(num_layers)
        )
        self.num_kv_heads = self.model.layers[0].self_attn.num_kv_heads
        self.model.norm = OffsetRMSNorm(shape.hidden_size, shape.rms_norm_eps)
        softcap = config["final_logit_softcapping"]
        self.head = LogitsHead(shape.hidden_size, shape.vocab_size, softcap=softcap, parallel=parallel)
        if tied:
            self.head.lm_head.weight = self.model.embed_tokens.weight

        # One table per distinct RoPE: Gemma 2's layers share one, Gemma 3's two layer types differ.
        ropes: list[RopeSettings] = []
        for layer_type in types:
            if (rope := family.rope(config, layer_type)) not in ropes:
                ropes.append(rope)
        self.rope_of_layer = [ropes.index(family.rope(config, t)) for t in types]
        self.rotary_embs = nn.ModuleList(
            RotaryEmbedding(rope, attention.head_dim, max_positions, shape.max_position_embeddings) for rope in ropes
        )

    @staticmethod
    def window_pattern(config: dict[str, Any]) -> int:
        """Without layer_types, every this-many-th layer is global and the others slide."""
        return 2

    @staticmethod
    def attention_options(config: dict[str, Any], window: int | None) -> AttentionOptions:
        return AttentionOptions(
            scale=config["query_pre_attn_scalar"] ** -0.5, window=window, softcap=config["attn_logit_softcapping"]
        )

    def qk_norm(self):
        """The per-head norm of q and k (Gemma 3's): none in Gemma 2."""
        return None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        context_ends: torch.Tensor,
        caches: list[LayerCache],
        batch: AttentionBatch,
    ) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        rotations = [rotary(positions, context_ends) for rotary in self.rotary_embs]
        for layer, cache, rope in zip(self.model.layers, caches, self.rope_of_layer, strict=True):
            x = layer(x, rotations[rope], cache, batch)
        return self.model.norm(x)
