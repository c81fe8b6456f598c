"""The gated MLP every family uses: down(act(gate(x)) * up(x)), gate and up as one product."""

from __future__ import annotations

import torch
from torch import nn

from daemon.engine.layers.activation import activation
from daemon.engine.layers.linear import FusedLinear


class GatedMLP(nn.Module):
    def __init__(
        self, hidden_size: int, intermediate_size: int, act: str, *, bias: bool = False, stored_as: str | None = None
    ):
        """`stored_as`: the checkpoint's name for gate and up stored as one tensor (Phi-3's gate_up_proj)."""
        super().__init__()
        parts = {"gate_proj": intermediate_size, "up_proj": intermediate_size}
        self.gate_up_proj = FusedLinear(hidden_size, parts, bias=bias, stored_as=stored_as)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)
