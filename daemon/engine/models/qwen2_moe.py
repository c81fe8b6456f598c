"""Qwen1.5-MoE and Qwen2-MoE: the Qwen2 decoder (q/k/v biases) whose MLPs are sparse MoE blocks, each with
a shared expert behind a sigmoid gate; mlp_only_layers and decoder_sparse_step leave some layers dense."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from daemon.engine.hf_config import FULL_ATTENTION, SLIDING_ATTENTION
from daemon.engine.layers.moe import MoEShape, SparseMoE
from daemon.engine.models.base import config_int
from daemon.engine.models.llama import LlamaShape, sliding_windows
from daemon.engine.models.qwen2 import Qwen2ForCausalLM
from daemon.engine.models.registry import Family


def sparse_layers(config: dict[str, Any], num_layers: int, num_experts: int) -> frozenset[int]:
    """The layers whose MLP is a MoE block, as transformers' Qwen MoEs decide: every
    decoder_sparse_step-th layer (counting from 1) that mlp_only_layers does not list."""
    if num_experts == 0:
        return frozenset()
    step = config_int(config, "decoder_sparse_step", 1)
    dense = set(config.get("mlp_only_layers") or ())
    return frozenset(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)


def qwen2_moe_windows(config: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    """A config.json without layer_types gets transformers' Qwen2-MoE default: with use_sliding_window,
    the even layers below max_window_layers slide (not Qwen2's rule, which slides the layers above)."""
    if "layer_types" not in config and config.get("use_sliding_window"):
        below = config.get("max_window_layers", num_layers)
        types = [SLIDING_ATTENTION if i % 2 == 0 and i < below else FULL_ATTENTION for i in range(num_layers)]
        config = config | {"layer_types": types}
    return sliding_windows(config, num_layers)


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    @classmethod
    def read_shape(cls, config: dict[str, Any], family: Family) -> LlamaShape:
        shape = LlamaShape.read(config, family)
        # Qwen2-MoE's switch for the q/k/v biases is qkv_bias (on unless set off); o_proj has none
        attention = dataclasses.replace(shape.attention, qkv_bias=bool(config.get("qkv_bias", True)), o_bias=False)
        return dataclasses.replace(shape, attention=attention, windows=qwen2_moe_windows(config, shape.num_layers))

    def moe_shape(self) -> MoEShape:
        config = self.config
        return MoEShape(
            hidden_size=self.shape.hidden_size,
            num_experts=config_int(config, "num_experts"),
            top_k=config_int(config, "num_experts_per_tok"),
            intermediate_size=config_int(config, "moe_intermediate_size"),
            activation=self.shape.activation,
            normalise_top_k=bool(config.get("norm_topk_prob", False)),
            shared_intermediate_size=config_int(config, "shared_expert_intermediate_size"),
        )

    def make_mlp(self, layer: int) -> nn.Module:
        moe = self.moe_shape()
        if layer in sparse_layers(self.config, self.shape.num_layers, moe.num_experts):
            return SparseMoE(moe, self.parallel)
        return super().make_mlp(layer)
