"""A sparse mixture-of-experts block: a router picks each token's top-k experts, and only those run.

How a step is done, and why:
- The router's logits come out in the model's dtype and go through softmax in float32, as
  transformers does: the same choices as the reference, and routing weights at full precision.
- Every expert's weights are stacked: gate and up in one [E, 2I, H] tensor (one product per
  expert for both, as GatedMLP), down in one [E, H, I]. The checkpoint's per-expert tensors
  load into slices of them (`checkpoint_parts`).
- The (token, slot) pairs are sorted by expert, so each expert's rows are contiguous and each
  expert multiplies all its rows in one product. With F.grouped_mm, one call covers every
  expert: the group offsets say which rows are whose, and an expert without rows costs nothing.
  Where grouped_mm cannot run (its dtypes and 16-byte strides), a Python loop goes over the
  experts that have rows, never over tokens and never over all E.
- So a step's cost follows the experts it activates: beyond the router (its product, softmax
  and top-k over E), the only work proportional to E is finding each expert's end among the
  sorted choices (the group offsets), a binary search each.
- The results go back to (token, slot) order through the sort's permutation and the k slots
  are summed, in float32 at least: no scatter-add with repeated indices (atomic, so unordered
  and not reproducible on CUDA), and the routing weights apply at full precision.
- Split across tensor-parallel ranks (as vLLM's TP MoE is), every rank holds every expert's
  share of the intermediate size: gate/up [E, 2I/size, H], down [E, H, I/size], so each rank
  runs the same routing (the router is whole everywhere) over its slices, and the block's
  partial sums, the shared expert's among them, meet in one all-reduce.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from daemon.engine.layers.activation import activation
from daemon.engine.layers.linear import CheckpointTensor, Piece
from daemon.engine.layers.mlp import GatedMLP
from daemon.engine.parallel import SINGLE, Parallel


@dataclass(frozen=True)
class MoEShape:
    hidden_size: int
    num_experts: int
    top_k: int
    intermediate_size: int  # each expert's
    activation: str
    # Scale the chosen experts' probabilities to sum to 1 (Mixtral always; the Qwen MoEs per norm_topk_prob).
    normalise_top_k: bool
    # A dense expert every token goes through, scaled by sigmoid(shared_expert_gate(x)) (Qwen2-MoE); 0: none.
    shared_intermediate_size: int = 0
    # Each expert's gate, up and down projections' names in the checkpoint (Mixtral's: w1, w3, w2).
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")


class SparseMoE(nn.Module):
    """The block that replaces a decoder layer's MLP; its parts are named as the checkpoints name them."""

    def __init__(self, shape: MoEShape, parallel: Parallel = SINGLE):
        super().__init__()
        self.shape = shape
        self.parallel = parallel
        self.gate = nn.Linear(shape.hidden_size, shape.num_experts, bias=False)  # the router
        self.experts = StackedExperts(shape, parallel)
        self.shared_expert = self.shared_expert_gate = None
        if shape.shared_intermediate_size:
            self.shared_expert = GatedMLP(
                shape.hidden_size,
                shape.shared_intermediate_size,
                shape.activation,
                parallel=parallel,
                reduce=False,  # reduced with the experts' sum, below
                what="shared_expert_intermediate_size",
            )
            self.shared_expert_gate = nn.Linear(shape.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(x)
        out = self.experts(x, experts, weights)
        if self.shared_expert is not None:
            # the gate is per token, whole on every rank: scaling each rank's partial sum scales the total
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        if self.parallel.size > 1:
            self.parallel.all_reduce(out)
        return out

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> each token's top-k routing weights (float32) and experts, both [T, k]."""
        probabilities = torch.softmax(self.gate(x).float(), dim=-1)
        weights, experts = probabilities.topk(self.shape.top_k, dim=-1)
        if self.shape.normalise_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts


class StackedExperts(nn.Module):
    """All experts' gated MLPs as two stacked weights; holds no submodules (it maps its own tensors)."""

    def __init__(self, shape: MoEShape, parallel: Parallel = SINGLE):
        super().__init__()
        experts, hidden = shape.num_experts, shape.hidden_size
        self.inner_start, inner = parallel.shard(shape.intermediate_size, "each expert's intermediate size")
        self.num_experts, self.hidden_size, self.intermediate_size = experts, hidden, inner  # this rank's share
        self.total_intermediate_size = shape.intermediate_size
        self.names = shape.expert_names
        self.gate_up = nn.Parameter(torch.empty(experts, 2 * inner, hidden))
        self.down = nn.Parameter(torch.empty(experts, hidden, inner))
        self.act = activation(shape.activation)
        # nn.Linear's default scale, so a model built without a checkpoint (a benchmark's) computes finite values
        nn.init.uniform_(self.gate_up, -(hidden**-0.5), hidden**-0.5)
        nn.init.uniform_(self.down, -(inner**-0.5), inner**-0.5)

    def checkpoint_parts(self, name: str) -> dict[str, CheckpointTensor]:
        """{name}.{e}.{gate,up,down}.weight (relative to the MoE block) -> this rank's rows of gate and up,
        columns of down, in their slices of the stacks."""
        gate, up, down = self.names
        start, inner, total = self.inner_start, self.intermediate_size, self.total_intermediate_size
        projection, down_shape = (total, self.hidden_size), (self.hidden_size, total)
        parts = {}
        for e in range(self.num_experts):
            gate_rows, up_rows = self.gate_up[e, :inner], self.gate_up[e, inner:]
            parts[f"{name}.{e}.{gate}.weight"] = CheckpointTensor(projection, (Piece(gate_rows, 0, start, inner),))
            parts[f"{name}.{e}.{up}.weight"] = CheckpointTensor(projection, (Piece(up_rows, 0, start, inner),))
            parts[f"{name}.{e}.{down}.weight"] = CheckpointTensor(down_shape, (Piece(self.down[e], 1, start, inner),))
        return parts

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H]; experts [T, k] (each token's chosen experts); weights [T, k] float32 -> [T, H]."""
        tokens, top_k = experts.shape
        # Stable: within an expert, rows keep token order, so a step's result does not depend on sort ties.
        by_expert, order = experts.flatten().sort(stable=True)
        rows = x[order // top_k]  # pair i of the sorted order is token order[i] // k
        compute = self.grouped if self.grouped_mm_fits(x) else self.per_active_expert
        out = compute(rows, by_expert)
        weighted = out * weights.flatten()[order].unsqueeze(-1)  # float32 weights: float32 at least from here
        unsorted = torch.empty_like(weighted)
        unsorted[order] = weighted  # a permutation: each row written once
        return unsorted.view(tokens, top_k, -1).sum(dim=1).to(x.dtype)

    def grouped(self, rows: torch.Tensor, by_expert: torch.Tensor) -> torch.Tensor:
        """Every expert's rows through its MLP in two grouped products (rows sorted by expert)."""
        # Where each expert's rows end, by binary search in the sorted choices: unlike a bincount,
        # whose size depends on the data, it needs no device sync on CUDA
        experts = torch.arange(self.num_experts, device=by_expert.device)
        ends = torch.searchsorted(by_expert, experts, right=True, out_int32=True)
        # grouped_mm multiplies by [E, in, out]: the transposed views of the [E, out, in] stacks
        gate, up = F.grouped_mm(rows, self.gate_up.transpose(1, 2), offs=ends).chunk(2, dim=-1)
        return F.grouped_mm(self.act(gate) * up, self.down.transpose(1, 2), offs=ends)

    def per_active_expert(self, rows: torch.Tensor, by_expert: torch.Tensor) -> torch.Tensor:
        """The same, one product per expert that has rows (a host sync for their counts)."""
        active, counts = torch.unique_consecutive(by_expert, return_counts=True)
        outs = []
        for expert, expert_rows in zip(active.tolist(), rows.split(counts.tolist()), strict=True):
            gate, up = F.linear(expert_rows, self.gate_up[expert]).chunk(2, dim=-1)
            outs.append(F.linear(self.act(gate) * up, self.down[expert]))
        return torch.cat(outs)

    def grouped_mm_fits(self, x: torch.Tensor) -> bool:
        strides_fit = all(size * x.dtype.itemsize % 16 == 0 for size in (self.hidden_size, self.intermediate_size))
        return strides_fit and grouped_mm_runs(x.device, x.dtype)


@functools.cache
def grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch has F.grouped_mm for `dtype` on `device`: bfloat16 on CUDA from sm80 on (as its
    documentation says), float32 and bfloat16 on CPU."""
    if not hasattr(F, "grouped_mm"):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
