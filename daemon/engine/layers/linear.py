"""Projections, how they split across tensor-parallel ranks, and how a checkpoint's tensors map onto them.

Column-parallel (FusedLinear): each rank holds a share of the output rows, and its output is its
share of the features (its attention heads, its share of the MLP's intermediate size), which the
next layer consumes as they are. Row-parallel (RowParallelLinear): each rank holds a share of the
input columns, multiplies its share of the features, and the ranks' partial sums meet in an
all-reduce. Attention and the MLP are each one column-parallel product, local work, then one
row-parallel product: one all-reduce per block. At tensor-parallel size 1 both are the plain
products, with nothing added but one `if`.

Loading: every layer says, for each checkpoint tensor it takes, which slice of it goes where
(CheckpointTensor, a list of Pieces), so a rank reads only its slices from the safetensors.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from daemon.engine.parallel import SINGLE, Parallel


@dataclass(frozen=True)
class Piece:
    """Rows (dim 0) or columns (dim 1) [start, start + length) of a checkpoint tensor, copied into
    `target` (a view of a parameter); dim None: the whole tensor."""

    target: torch.Tensor
    dim: int | None = None
    start: int = 0
    length: int = 0


@dataclass(frozen=True)
class CheckpointTensor:
    """One checkpoint tensor: the shape it must have there, and the Pieces of it this rank loads."""

    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]

    @classmethod
    def whole(cls, param: torch.Tensor) -> CheckpointTensor:
        """A tensor every rank holds whole (norms, routers, a row-parallel layer's bias)."""
        return cls(tuple(param.shape), (Piece(param),))


@dataclass(frozen=True)
class OutputPart:
    """One projection of a fused column-parallel layer: its name in the checkpoint, its output rows
    there (`total`), and the rows [start, start + length) of them this rank holds."""

    name: str
    total: int
    start: int
    length: int

    @classmethod
    def split(cls, name: str, total: int, parallel: Parallel, what: str) -> OutputPart:
        """This rank's even share of the projection's rows; `what` names the dimension in the error."""
        return cls(name, total, *parallel.shard(total, what))


class FusedLinear(nn.Linear):
    """Several projections of the same input as one matrix product (small batches cost per operator,
    not per FLOP), column-parallel: this rank's rows of each part, in order.

    Most checkpoints store the parts separately (q_proj, k_proj, v_proj): each loads its rows into
    its slice. Some store them fused already (Phi-3's qkv_proj): `stored_as` then names the one
    tensor, whose parts follow one another in it.
    """

    def __init__(self, in_features: int, parts: Iterable[OutputPart], bias: bool, stored_as: str | None = None):
        parts = tuple(parts)
        super().__init__(in_features, sum(p.length for p in parts), bias=bias)
        self.parts = parts
        self.stored_as = stored_as

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """This layer applied to x, cut into its parts."""
        return list(self(x).split([p.length for p in self.parts], dim=-1))

    def checkpoint_parts(self, name: str) -> dict[str, CheckpointTensor]:
        """The checkpoint's tensor names (relative to the parent module) -> what of them this layer takes."""
        owned = {"weight": self.weight} | ({"bias": self.bias} if self.bias is not None else {})
        tensors: dict[str, CheckpointTensor] = {}
        for kind, param in owned.items():
            trailing = tuple(param.shape[1:])
            pieces, row, offset = [], 0, 0
            for p in self.parts:
                target = param[row : row + p.length]
                if self.stored_as:  # the parts one after another in the one tensor
                    pieces.append(Piece(target, 0, offset + p.start, p.length))
                else:
                    piece = Piece(target, 0, p.start, p.length)
                    tensors[f"{p.name}.{kind}"] = CheckpointTensor((p.total, *trailing), (piece,))
                row += p.length
                offset += p.total
            if self.stored_as:
                tensors[f"{self.stored_as}.{kind}"] = CheckpointTensor((offset, *trailing), tuple(pieces))
        return tensors


class RowParallelLinear(nn.Linear):
    """A projection whose input features are split across the ranks: this rank's columns, then the
    partial sums all-reduced, then the bias, added once (every rank holds it whole).

    reduce=False leaves the partial sum for the caller to reduce with others (a MoE block's shared
    expert, summed with the experts in one all-reduce); such a layer has no bias.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        parallel: Parallel = SINGLE,
        *,
        what: str = "in_features",
        reduce: bool = True,
    ):
        self.in_start, local = parallel.shard(in_features, what)
        super().__init__(local, out_features, bias=bias)
        assert reduce or not bias, "a partial sum left unreduced cannot take its bias"
        self.in_total = in_features
        self.parallel = parallel
        self.reduces = reduce and parallel.size > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.reduces:
            return F.linear(x, self.weight, self.bias)
        out = self.parallel.all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias

    def checkpoint_parts(self, name: str) -> dict[str, CheckpointTensor]:
        weight = Piece(self.weight, 1, self.in_start, self.in_features)
        tensors = {f"{name}.weight": CheckpointTensor((self.out_features, self.in_total), (weight,))}
        if self.bias is not None:
            tensors[f"{name}.bias"] = CheckpointTensor.whole(self.bias)
        return tensors
