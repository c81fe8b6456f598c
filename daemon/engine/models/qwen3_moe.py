"""Qwen3-MoE: the Qwen3 decoder (per-head q/k RMSNorm) whose MLPs are sparse MoE blocks without a shared
expert; mlp_only_layers and decoder_sparse_step leave some layers dense, with the config's intermediate_size."""

from __future__ import annotations

from typing import Any

from torch import nn

from daemon.engine.layers.moe import MoEShape, SparseMoE
from daemon.engine.models.base import config_int
from daemon.engine.models.llama import LlamaShape
from daemon.engine.models.qwen2_moe import sparse_layers
from daemon.engine.models.qwen3 import Qwen3ForCausalLM
from daemon.engine.models.registry import Family


def num_experts(config: dict[str, Any]) -> int:
    """Qwen's own configs say num_experts; transformers 5 writes the same field as num_local_experts."""
    if "num_experts" in config:
        return config_int(config, "num_experts")
    return config_int(config, "num_local_experts")


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    @classmethod
    def read_shape(cls, config: dict[str, Any], family: Family) -> LlamaShape:
        # Unlike Qwen3's, a sliding window (use_sliding_window) covers every layer: no max_window_layers here
        return LlamaShape.read(config, family)

    def moe_shape(self) -> MoEShape:
        config = self.config
        return MoEShape(
            hidden_size=self.shape.hidden_size,
            num_experts=num_experts(config),
            top_k=config_int(config, "num_experts_per_tok"),
            intermediate_size=config_int(config, "moe_intermediate_size"),
            activation=self.shape.activation,
            normalise_top_k=bool(config.get("norm_topk_prob", False)),
        )

    def make_mlp(self, layer: int) -> nn.Module:
        moe = self.moe_shape()
        if layer in sparse_layers(self.config, self.shape.num_layers, moe.num_experts):
            return SparseMoE(moe, self.parallel)
        return super().make_mlp(layer)
