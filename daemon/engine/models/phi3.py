"""Phi-3: the Llama decoder with q/k/v and gate/up stored fused in the checkpoint (qkv_proj,
gate_up_proj), sliding-window attention when config.json sets one, and longrope scaling."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from daemon.engine.layers.mlp import GatedMLP
from daemon.engine.models.llama import LlamaForCausalLM, LlamaShape
from daemon.engine.models.registry import Family


class Phi3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def read_shape(cls, config: dict[str, Any], family: Family) -> LlamaShape:
        shape = LlamaShape.read(config, family, rms_norm_eps=config.get("rms_norm_eps", 1e-5))
        attention = dataclasses.replace(shape.attention, qkv_stored_as="qkv_proj", qkv_bias=False, o_bias=False)
        return dataclasses.replace(shape, attention=attention)

    def make_mlp(self, layer: int) -> nn.Module:
        shape = self.shape
        return GatedMLP(
            shape.hidden_size,
            shape.intermediate_size,
            shape.activation,
            stored_as="gate_up_proj",
            parallel=self.parallel,
        )
