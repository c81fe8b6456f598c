"""The sparse MoE block alone: exact against a per-token reference, on both of its expert paths, and
its cost follows the experts a step activates, not how many the model has."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from daemon.engine.layers.moe import MoEShape, SparseMoE

HIDDEN, INNER = 64, 32  # strides of 256 and 128 bytes in float32: grouped_mm takes them
# grouped_mm has no float64: the same block takes its loop over active experts
PATHS = {"grouped": torch.float32, "per-expert": torch.float64}
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def make_moe(num_experts: int, dtype: torch.dtype, *, normalise: bool = True, shared: int = 0) -> SparseMoE:
    torch.manual_seed(0)
    shape = MoEShape(HIDDEN, num_experts, 2, INNER, "silu", normalise, shared_intermediate_size=shared)
    moe = SparseMoE(shape).to(dtype)
    with torch.no_grad():
        for parameter in moe.parameters():
            parameter.normal_(0, 0.3)
    return moe


def per_token_reference(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """Each token on its own, each of its experts on its own: the definition, with no grouping."""
    shape, experts, out = moe.shape, moe.experts, []
    for token in x:
        probabilities = torch.softmax(moe.gate(token).float(), dim=-1)
        chosen = probabilities.argsort(descending=True)[: shape.top_k]
        weights = probabilities[chosen] / (probabilities[chosen].sum() if shape.normalise_top_k else 1.0)
        y = torch.zeros(HIDDEN, dtype=torch.float64)
        for weight, e in zip(weights.tolist(), chosen.tolist(), strict=True):
            gate = experts.gate_up[e, :INNER] @ token
            up = experts.gate_up[e, INNER:] @ token
            y += weight * (experts.down[e] @ (F.silu(gate) * up)).double()
        if moe.shared_expert is not None:
            y += (torch.sigmoid(moe.shared_expert_gate(token)) * moe.shared_expert(token)).double()
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize(("normalise", "shared"), [(True, 0), (False, 0), (False, 48)])
def test_matches_a_per_token_reference_and_idle_experts_are_not_read(path: str, normalise: bool, shared: int):
    dtype = PATHS[path]
    moe = make_moe(16, dtype, normalise=normalise, shared=shared)
    x = torch.randn(6, HIDDEN, dtype=dtype)  # 12 choices among 16 experts: some get no token
    with torch.no_grad():
        expected = per_token_reference(moe, x)
        idle = sorted(set(range(16)) - set(moe.route(x)[1].flatten().tolist()))
        assert len(idle) >= 4
        # an idle expert's weights, were they used at all, would turn the output to NaN
        moe.experts.gate_up[idle] = float("nan")
        moe.experts.down[idle] = float("nan")
        assert moe.experts.grouped_mm_fits(x) == (path == "grouped")
        out = moe(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[dtype], rtol=0)


class OpLog(TorchDispatchMode):
    """Every aten operator run inside it, by name."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def ops_with_all_tokens_on_two_experts(num_experts: int, dtype: torch.dtype) -> list[str]:
    moe = make_moe(num_experts, dtype)
    with torch.no_grad():  # experts 1 and 3 outscore every other for any positive x
        moe.gate.weight.fill_(-1.0)
        moe.gate.weight[1], moe.gate.weight[3] = 1.0, 0.5
        x = torch.rand(32, HIDDEN, dtype=dtype) + 0.1
        assert set(moe.route(x)[1].flatten().tolist()) == {1, 3}
        with OpLog() as log:
            moe(x)
    return log.ops


@pytest.mark.parametrize("path", list(PATHS))
def test_a_step_runs_the_same_operators_for_4_or_64_experts_when_2_are_active(path: str):
    dtype = PATHS[path]
    few, many = ops_with_all_tokens_on_two_experts(4, dtype), ops_with_all_tokens_on_two_experts(64, dtype)
    assert few == many  # nothing loops over the experts that get no token
    products = [op for op in many if op in ("mm", "addmm", "bmm", "_grouped_mm")]
    if path == "grouped":
        assert products == ["mm", "_grouped_mm", "_grouped_mm"]  # the router's, then gate/up and down of all
    else:
        assert products == ["mm"] + ["mm", "mm"] * 2  # the router's, then gate/up and down of each active expert
