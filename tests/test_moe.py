"""The sparse MoE block alone: exact against a per-token reference, on both of its expert paths, and
its cost follows the experts a step activates, not how many the model has.

The families' parity with transformers is in test_engine.py (variants qwen3-moe, qwen2-moe, mixtral);
here, besides the block, what those tests rely on: that their routers really spread tokens over the
experts, and the family rules (which layers are sparse, windows, expert count) read as transformers does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from daemon.engine.layers.moe import MoEShape, SparseMoE

HIDDEN, INNER = 64, 32  # strides of 256 and 128 bytes in float32: grouped_mm takes them
# grouped_mm has no float64: the same block takes its loop over active experts
PATHS = {"grouped": torch.float32, "per-expert": torch.float64}
# (atol, rtol): float32 outputs reach tens, where its rounding alone is some 1e-6 each way, and
# the order of the products' sums follows torch's thread count (a CI run saw 1.5e-5 at 17)
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-10, 0.0)}


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
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)


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


# What the parity tests of test_engine.py rely on, and the families' rules.

transformers = pytest.importorskip("transformers")

from harness.models import PROMPT, Sequences, build_hf_model, hf_logits  # noqa: E402

from daemon.engine.models.qwen2_moe import qwen2_moe_windows, sparse_layers  # noqa: E402
from daemon.engine.runner import ModelRunner  # noqa: E402

MOE_VARIANTS = ["qwen3-moe", "qwen2-moe", "mixtral"]


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_the_parity_variants_spread_tokens_over_the_experts(tmp_path: Path, variant: str):
    """A router that sent every token to the same experts would let routing bugs pass test_engine.py."""
    build_hf_model(tmp_path, variant)
    runner = ModelRunner(tmp_path, num_blocks=64, device="cpu", dtype="float32")
    routes: list[tuple[SparseMoE, torch.Tensor]] = []
    blocks = [m for m in runner.model.modules() if isinstance(m, SparseMoE)]
    for block in blocks:
        block.register_forward_hook(lambda module, args, out: routes.append((module, module.route(args[0])[1])))
    runner.logits([Sequences(runner).chunk(1, PROMPT, 0)])
    assert len(routes) == len(blocks) >= 2
    for block, experts in routes:
        assert len(set(experts.flatten().tolist())) >= block.shape.num_experts // 2
        assert len({frozenset(row) for row in experts.tolist()}) >= 5  # tokens differ in their experts


def test_qwen3_moe_reads_num_experts_as_qwen_writes_it(tmp_path: Path):
    """transformers 5 saves Qwen3-MoE's expert count as num_local_experts; Qwen's checkpoints say num_experts."""
    hf = build_hf_model(tmp_path, "qwen3-moe", shard=False)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_experts"] = config.pop("num_local_experts")
    (tmp_path / "config.json").write_text(json.dumps(config))
    runner = ModelRunner(tmp_path, num_blocks=64, device="cpu", dtype="float32")
    ours = runner.logits([Sequences(runner).chunk(1, PROMPT, 0)])[0]
    torch.testing.assert_close(ours, hf_logits(hf, PROMPT)[-1], atol=2e-5, rtol=0)


@pytest.mark.parametrize(
    ("config_class", "model_class"),
    [
        (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
        (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
    ],
)
@pytest.mark.parametrize(("step", "dense"), [(1, []), (2, []), (2, [3]), (3, [0, 4])])
def test_sparse_layers_are_those_transformers_builds(config_class, model_class, step: int, dense: list[int]):
    fields = dict(decoder_sparse_step=step, mlp_only_layers=dense, num_experts=4, num_hidden_layers=6)
    config = config_class(
        hidden_size=16,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=16,
        moe_intermediate_size=8,
        vocab_size=8,
        **fields,
    )
    theirs = {i for i, layer in enumerate(model_class(config).model.layers) if hasattr(layer.mlp, "experts")}
    assert sparse_layers(fields, 6, 4) == theirs


@pytest.mark.parametrize("first_full", [0, 3, 6])
def test_qwen2_moe_windows_without_layer_types_are_transformers_default(first_full: int):
    config = transformers.Qwen2MoeConfig(
        num_hidden_layers=6, use_sliding_window=True, sliding_window=8, max_window_layers=first_full
    )
    theirs = tuple(8 if t == "sliding_attention" else None for t in config.layer_types)
    fields = {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": first_full}
    assert qwen2_moe_windows(fields, 6) == theirs
