"""The gated MLP every family uses: down(act(gate(x)) * up(x)), gate and up as one product.

Split across tensor-parallel ranks, each holds its share of the intermediate size: gate and up
column-parallel, down row-parallel (layers/linear.py), one all-reduce at the end."""

from __future__ import annotations

import torch
from torch import nn

from daemon.engine.layers.activation import activation
from daemon.engine.layers.linear import FusedLinear, OutputPart, RowParallelLinear
from daemon.engine.parallel import SINGLE, Parallel


class GatedMLP(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        act: str,
        *,
        bias: bool = False,
        stored_as: str | None = None,
        parallel: Parallel = SINGLE,
        reduce: bool = True,
        what: str = "intermediate_size",
    ):
        """`stored_as`: the checkpoint's name for gate and up stored as one tensor (Phi-3's gate_up_proj).
        reduce=False: the output is this rank's partial sum, for the caller to all-reduce. `what`: the
        config field of the intermediate size, named when it does not split across the ranks."""
        super().__init__()
        parts = [OutputPart.split(name, intermediate_size, parallel, what) for name in ("gate_proj", "up_proj")]
        self.gate_up_proj = FusedLinear(hidden_size, parts, bias=bias, stored_as=stored_as)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias, parallel, what=what, reduce=reduce)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)
