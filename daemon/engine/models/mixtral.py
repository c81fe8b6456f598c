"""Mixtral: the Mistral decoder (sliding-window attention on every layer when set) whose every MLP is a
sparse MoE block, the chosen experts' probabilities always renormalised to sum to 1."""

from __future__ import annotations

from torch import nn

from daemon.engine.layers.moe import MoEShape, SparseMoE
from daemon.engine.models.base import config_int
from daemon.engine.models.mistral import MistralForCausalLM


class MixtralForCausalLM(MistralForCausalLM):
    def make_mlp(self, layer: int) -> nn.Module:
        shape = MoEShape(
            hidden_size=self.shape.hidden_size,
            num_experts=config_int(self.config, "num_local_experts"),
            top_k=config_int(self.config, "num_experts_per_tok"),
            intermediate_size=self.shape.intermediate_size,
            activation=self.shape.activation,
            normalise_top_k=True,
            expert_names=("w1", "w3", "w2"),  # gate, up, down
        )
        return SparseMoE(shape, self.parallel)

    def checkpoint_name(self, name: str) -> str:
        # Mixtral's checkpoints call each layer's MoE block block_sparse_moe; the decoder layer calls it mlp
        return super().checkpoint_name(name).replace(".mlp.", ".block_sparse_moe.", 1)
