"""Projections, and how a checkpoint's tensors map onto them."""

from __future__ import annotations

import torch
from torch import nn


class FusedLinear(nn.Linear):
    """Several projections of the same input as one matrix product: small batches cost per operator,
    not per FLOP. `parts` names each projection's output rows, in order.

    Most checkpoints store the parts separately (q_proj, k_proj, v_proj): each loads into its
    slice. Some store them fused already (Phi-3's qkv_proj): `stored_as` then names the one
    tensor, which loads whole.
    """

    def __init__(self, in_features: int, parts: dict[str, int], bias: bool, stored_as: str | None = None):
        super().__init__(in_features, sum(parts.values()), bias=bias)
        self.parts = parts
        self.stored_as = stored_as

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """This layer applied to x, cut into its parts."""
        return list(self(x).split(list(self.parts.values()), dim=-1))

    def checkpoint_parts(self) -> dict[str, torch.Tensor]:
        """The checkpoint's tensor names (relative to the parent module) -> what of this layer each fills."""
        if self.stored_as:
            tensors = {f"{self.stored_as}.weight": self.weight}
            return tensors | ({f"{self.stored_as}.bias": self.bias} if self.bias is not None else {})
        tensors, row = {}, 0
        for name, size in self.parts.items():
            tensors[f"{name}.weight"] = self.weight[row : row + size]
            if self.bias is not None:
                tensors[f"{name}.bias"] = self.bias[row : row + size]
            row += size
        return tensors
