"""Llama 1-3.x, and the decoder every Llama-like family builds on (Mistral, Qwen2/3, the MoE families, Phi-3).

A layer is x + attn(norm(x)), then x + mlp(norm(x)). What differs between the
families that share it is read from their config.json by their own file, which
overrides `read_shape`, and sometimes `qk_norm` or `make_mlp`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from daemon.engine.hf_config import SLIDING_ATTENTION
from daemon.engine.layers.attention import AttentionBatch, AttentionOptions, LayerCache
from daemon.engine.layers.logits import LogitsHead
from daemon.engine.layers.mlp import GatedMLP
from daemon.engine.layers.norm import RMSNorm
from daemon.engine.layers.rotary import RotaryEmbedding, Rotation
from daemon.engine.layers.self_attention import AttentionShape, SelfAttention
from daemon.engine.layers.vocab import VocabParallelEmbedding
from daemon.engine.models.base import CausalLM, config_int
from daemon.engine.models.registry import Family
from daemon.engine.parallel import SINGLE, Parallel


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions and switches of a Llama-like model, from its config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    attention: AttentionShape
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    activation: str
    mlp_bias: bool = False
    windows: tuple[int | None, ...] = ()  # each layer's sliding window (None: full attention)

    @classmethod
    def read(cls, config: dict[str, Any], family: Family, **overrides: Any) -> LlamaShape:
        heads = config_int(config, "num_attention_heads")
        hidden = config_int(config, "hidden_size")
        layers = config_int(config, "num_hidden_layers")
        attention_bias = bool(config.get("attention_bias", False))
        attention = AttentionShape(
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            qkv_bias=attention_bias,
            o_bias=attention_bias,
        )
        fields = dict(
            vocab_size=config_int(config, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=config_int(config, "intermediate_size"),
            num_layers=layers,
            attention=attention,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            max_position_embeddings=config_int(config, "max_position_embeddings", 2048),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            activation=family.activation(config),
            mlp_bias=bool(config.get("mlp_bias", False)),
            windows=sliding_windows(config, layers),
        )
        return cls(**(fields | overrides))


def sliding_windows(config: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    """Each layer's window: config.json's sliding_window, on the layers its layer_types mark sliding
    (on every layer when it lists none, as Mistral's and Phi-3's configs do)."""
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    if not window:
        return (None,) * num_layers
    types = config.get("layer_types")
    if isinstance(types, list) and len(types) == num_layers:
        return tuple(window if t == SLIDING_ATTENTION else None for t in types)
    return (window,) * num_layers


class DecoderLayer(nn.Module):
    def __init__(self, self_attn: SelfAttention, mlp: nn.Module, hidden_size: int, eps: float):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)

    def forward(self, x: torch.Tensor, rotation: Rotation, cache: LayerCache, batch: AttentionBatch) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rotation, cache, batch)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(CausalLM):
    def __init__(self, config: dict[str, Any], family: Family, max_positions: int, parallel: Parallel = SINGLE):
        """`parallel`: the tensor-parallel share this model holds (all of it by default)."""
        super().__init__()
        self.config = config
        self.parallel = parallel
        self.shape = shape = self.read_shape(config, family)
        attention = shape.attention
        self.num_layers, self.head_dim = shape.num_layers, attention.head_dim
        self.tie_word_embeddings = shape.tie_word_embeddings
        self.model = nn.Module()
        self.model.embed_tokens = VocabParallelEmbedding(shape.vocab_size, shape.hidden_size, parallel)
        self.model.layers = nn.ModuleList(
            DecoderLayer(
                SelfAttention(attention, self.attention_options(i), self.qk_norm(), parallel),
                self.make_mlp(i),
                shape.hidden_size,
                shape.rms_norm_eps,
            )
            for i in range(shape.num_layers)
        )
        self.num_kv_heads = self.model.layers[0].self_attn.num_kv_heads
        self.model.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.head = LogitsHead(shape.hidden_size, shape.vocab_size, parallel=parallel)
        if shape.tie_word_embeddings:
            self.head.lm_head.weight = self.model.embed_tokens.weight
        self.rotary_emb = RotaryEmbedding(
            family.rope(config), attention.head_dim, max_positions, shape.max_position_embeddings
        )

    @classmethod
    def read_shape(cls, config: dict[str, Any], family: Family) -> LlamaShape:
        return LlamaShape.read(config, family)

    def attention_options(self, layer: int) -> AttentionOptions:
        return AttentionOptions(scale=self.shape.attention.head_dim**-0.5, window=self.shape.windows[layer])

    def qk_norm(self):
        """The per-head norm of q and k, for families that have one (Qwen3): None here."""
        return None

    def make_mlp(self, layer: int) -> nn.Module:
        shape = self.shape
        return GatedMLP(
            shape.hidden_size, shape.intermediate_size, shape.activation, bias=shape.mlp_bias, parallel=self.parallel
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        context_ends: torch.Tensor,
        caches: list[LayerCache],
        batch: AttentionBatch,
    ) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        rotation = self.rotary_emb(positions, context_ends)
        for layer, cache in zip(self.model.layers, caches, strict=True):
            x = layer(x, rotation, cache, batch)
        return self.model.norm(x)
