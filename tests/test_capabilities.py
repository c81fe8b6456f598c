"""`daemon check` and the worker refuse exactly the same models, from one capability table.

Each case is a config.json change the engine cannot run: the check rule for its kind reports it
(and no other capability rule does), and the worker's model load raises the same message before
it reads a weight. A model of every family passes all of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from harness.files import write_model_dir

from daemon.config.facts import Facts
from daemon.config.rules import RULES_BY_ID
from daemon.config.schema import DaemonSettings
from daemon.engine.models.registry import ACTIVATIONS, FAMILIES, ROPE_PARAMETERS, Capability, UnsupportedModel

CAPABILITY_RULES = [f"model.{c}-unsupported" for c in Capability]

CASES = {
    "architecture": ("GPT2LMHeadModel", {}, "architectures ['GPT2LMHeadModel'] are not supported"),
    "activation": ("LlamaForCausalLM", {"hidden_act": "gelu_10"}, "hidden_act 'gelu_10' is not supported"),
    "rope": ("Qwen2ForCausalLM", {"rope_scaling": {"type": "mrope"}}, "RoPE scaling 'mrope' is not supported"),
    "rope-parameters": (
        "LlamaForCausalLM",
        {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
        "RoPE scaling 'llama3' lacks low_freq_factor, high_freq_factor, original_max_position_embeddings",
    ),
    "gemma-activation": (
        "Gemma2ForCausalLM",
        {"hidden_activation": "quick_gelu"},
        "hidden_activation 'quick_gelu' is not supported",
    ),
    "rope-per-layer-type": (
        "Gemma3ForCausalLM",
        {"rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 1e6}}},
        "RoPE scaling 'yarn' for full_attention layers lacks factor, original_max_position_embeddings",
    ),
    "quantization": (
        "MistralForCausalLM",
        {"quantization_config": {"quant_method": "awq", "bits": 4}},
        "quantization_config (awq) is not supported",
    ),
    "dtype": ("Qwen3ForCausalLM", {"torch_dtype": "float8_e4m3fn"}, "dtype 'float8_e4m3fn' is not supported"),
}
KIND = {
    "architecture": Capability.ARCHITECTURE,
    "activation": Capability.ACTIVATION,
    "rope": Capability.ROPE,
    "rope-parameters": Capability.ROPE,
    "gemma-activation": Capability.ACTIVATION,
    "rope-per-layer-type": Capability.ROPE,
    "quantization": Capability.QUANTIZATION,
    "dtype": Capability.DTYPE,
}


def findings(root: Path) -> dict[str, list[str]]:
    settings = DaemonSettings(model={"path": str(root)})
    return {rule: [f.message for f in RULES_BY_ID[rule].findings(settings, Facts())] for rule in CAPABILITY_RULES}


@pytest.mark.parametrize("case", list(CASES))
def test_the_check_and_the_worker_refuse_the_same_thing(tmp_path: Path, case: str) -> None:
    architecture, fields, message = CASES[case]
    root = write_model_dir(tmp_path / "m", architecture=architecture, config=fields)
    found = findings(root)
    rule = f"model.{KIND[case]}-unsupported"
    assert len(found[rule]) == 1 and message in found[rule][0]
    assert all(not messages for other, messages in found.items() if other != rule)

    pytest.importorskip("torch")
    from daemon.engine.runner import ModelRunner

    with pytest.raises(UnsupportedModel) as refused:  # before the (placeholder) weights are read
        ModelRunner(root, num_blocks=1, device="cpu", dtype="float32")
    assert refused.value.message == found[rule][0]
    assert refused.value.capability is KIND[case]


@pytest.mark.parametrize("family", [f.name for f in FAMILIES])
def test_every_family_passes_the_check(tmp_path: Path, family: str) -> None:
    (architecture,) = next(f for f in FAMILIES if f.name == family).architectures
    root = write_model_dir(tmp_path / "m", architecture=architecture)
    assert findings(root) == {rule: [] for rule in CAPABILITY_RULES}


def test_the_table_names_what_the_layers_implement() -> None:
    """The capability table is pure Python (the check runs without torch); the layers must agree with it."""
    pytest.importorskip("torch")
    from daemon.engine.hf_config import RopeSettings
    from daemon.engine.layers.activation import ACTIVATION_FUNCTIONS
    from daemon.engine.layers.rotary import RotaryEmbedding

    assert set(ACTIVATION_FUNCTIONS) == set(ACTIVATIONS)
    example = {
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
        "long_factor": [1.0] * 4,
        "short_factor": [1.0] * 4,
    }
    for kind, needed in ROPE_PARAMETERS.items():
        rope = RotaryEmbedding(RopeSettings(kind, 10000.0, 1.0, {p: example[p] for p in needed}), 8, 32, 16)
        assert rope.cos.shape == (32, 8)


def test_unsupported_is_an_error_with_its_kind() -> None:
    error = UnsupportedModel(Capability.DTYPE, "x")
    assert isinstance(error, ValueError) and error.capability is Capability.DTYPE


@pytest.mark.parametrize(
    ("architecture", "drop", "message"),
    [
        ("LlamaForCausalLM", "intermediate_size", "intermediate_size is missing (LlamaForCausalLM needs it)"),
        ("MixtralForCausalLM", "num_local_experts", "num_local_experts is missing (MixtralForCausalLM needs it)"),
        (
            "Qwen3MoeForCausalLM",
            "num_experts",
            "num_experts or num_local_experts is missing (Qwen3MoeForCausalLM needs it)",
        ),
    ],
)
def test_a_field_the_model_needs_is_reported_by_the_check_as_by_the_worker(
    tmp_path: Path, architecture: str, drop: str, message: str
) -> None:
    moe = {"num_experts_per_tok": 2, "num_experts": 4, "num_local_experts": 4, "moe_intermediate_size": 8}
    root = write_model_dir(tmp_path / "m", architecture=architecture, config=moe)
    config = json.loads((root / "config.json").read_text())
    config.pop(drop)
    if drop == "num_experts":
        config.pop("num_local_experts")
    (root / "config.json").write_text(json.dumps(config))
    settings = DaemonSettings(model={"path": str(root)})
    [reported] = [f.message for f in RULES_BY_ID["model.config-invalid"].findings(settings, Facts())]
    assert reported.endswith(message)

    pytest.importorskip("torch")
    from daemon.engine.model_dir import ModelDirError
    from daemon.engine.runner import ModelRunner

    with pytest.raises(ModelDirError) as refused:
        ModelRunner(root, num_blocks=1, device="cpu", dtype="float32")
    assert refused.value.message == reported
