"""Which checkpoints the engine serves: model families by HF architecture name, and one capability table.

`daemon check` and the worker both ask `unsupported(config)` what in a config.json
the engine cannot run, so a model that passes the check never fails at load for
a reason the check could have seen. This module is pure Python (the check runs
without torch); a family's model class is imported only when a worker loads it.
"""

from __future__ import annotations

import enum
import importlib
from dataclasses import dataclass
from typing import Any

from daemon.engine.hf_config import FULL_ATTENTION, SLIDING_ATTENTION, ConfigFieldError, RopeSettings, rope_settings
from daemon.engine.hf_config import served_positions as rope_served_positions


@dataclass(frozen=True)
class Family:
    """One model file under daemon/engine/models and the architectures it serves."""

    name: str  # the module's name under daemon.engine.models
    architectures: tuple[str, ...]
    model_class: str
    options: str  # what the family's file implements, for the README's table
    activation_key: str = "hidden_act"  # the config.json field naming the MLP's activation
    default_activation: str = "silu"
    # Attention layer types with a RoPE of their own (None: one RoPE for every layer), and the
    # older config format's field for the sliding layers' base.
    rope_layer_types: tuple[str | None, ...] = (None,)
    local_theta_key: str | None = None
    # config.json fields the model file cannot do without (positive integers), beyond the dimensions
    # every family reads; a tuple of names: any one of them (checkpoints spell some two ways)
    required: tuple[str | tuple[str, ...], ...] = ()

    def required_fields(self) -> tuple[str | tuple[str, ...], ...]:
        return DIMENSIONS + self.required

    def activation(self, config: dict[str, Any]) -> str:
        return config.get(self.activation_key) or self.default_activation

    def rope(self, config: dict[str, Any], layer_type: str | None = None) -> RopeSettings:
        if layer_type not in self.rope_layer_types:
            layer_type = None
        return rope_settings(config, layer_type, local_theta_key=self.local_theta_key)

    def served_positions(self, config: dict[str, Any]) -> int | None:
        """The longest context the model is made for. With a RoPE per layer type, the shortest any type
        is made for: Gemma 3's max_position_embeddings already counts the linear scaling of its global
        layers (vLLM reads it so too), and its sliding layers are unscaled."""
        lengths = [rope_served_positions(config, self.rope(config, t)) for t in self.rope_layer_types]
        return None if None in lengths else min(lengths)

    def load_class(self) -> type:
        return getattr(importlib.import_module(f"daemon.engine.models.{self.name}"), self.model_class)


# What every family reads from config.json to size its layers.
DIMENSIONS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")
_MOE = ("num_experts_per_tok",)
_LLAMA_LIKE = "RMSNorm, fused q/k/v and gate/up projections, GQA"
_GEMMA_LAYERS = (FULL_ATTENTION, SLIDING_ATTENTION)
FAMILIES = (
    Family("llama", ("LlamaForCausalLM",), "LlamaForCausalLM", f"Llama 1-3.x: {_LLAMA_LIKE}, optional biases"),
    Family("mistral", ("MistralForCausalLM",), "MistralForCausalLM", f"{_LLAMA_LIKE}, sliding-window attention"),
    Family("qwen2", ("Qwen2ForCausalLM",), "Qwen2ForCausalLM", f"{_LLAMA_LIKE}, q/k/v biases, sliding window"),
    Family("qwen3", ("Qwen3ForCausalLM",), "Qwen3ForCausalLM", f"{_LLAMA_LIKE}, per-head q/k RMSNorm"),
    Family(
        "qwen2_moe",
        ("Qwen2MoeForCausalLM",),
        "Qwen2MoeForCausalLM",
        "top-k experts (normalised or not), shared expert with its sigmoid gate, dense layers, q/k/v biases",
        required=(*_MOE, "num_experts", "moe_intermediate_size", "shared_expert_intermediate_size"),
    ),
    Family(
        "qwen3_moe",
        ("Qwen3MoeForCausalLM",),
        "Qwen3MoeForCausalLM",
        "top-k experts (normalised or not), dense layers, per-head q/k RMSNorm",
        required=(*_MOE, ("num_experts", "num_local_experts"), "moe_intermediate_size"),
    ),
    Family(
        "mixtral",
        ("MixtralForCausalLM",),
        "MixtralForCausalLM",
        "top-k experts, sliding-window attention",
        required=(*_MOE, "num_local_experts"),
    ),
    Family(
        "gemma2",
        ("Gemma2ForCausalLM",),
        "Gemma2ForCausalLM",
        "(1+w) norms, pre/post norms, embedding scale, attention and final logit soft-capping, "
        "alternating sliding-window and global layers",
        activation_key="hidden_activation",
        default_activation="gelu_pytorch_tanh",
    ),
    Family(
        "gemma3",
        ("Gemma3ForCausalLM",),
        "Gemma3ForCausalLM",
        "Gemma 3 text: as Gemma 2, plus per-head q/k norms and a RoPE base per layer type",
        activation_key="hidden_activation",
        default_activation="gelu_pytorch_tanh",
        rope_layer_types=_GEMMA_LAYERS,
        local_theta_key="rope_local_base_freq",
    ),
    Family("phi3", ("Phi3ForCausalLM",), "Phi3ForCausalLM", "fused qkv and gate_up in the checkpoint, longrope"),
)
BY_ARCHITECTURE = {arch: family for family in FAMILIES for arch in family.architectures}

# Every family shares the gated MLP and the rotary layer, so these hold for all of them.
ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu")
ROPE_PARAMETERS = {  # each RoPE kind and the parameters it needs
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "longrope": ("long_factor", "short_factor", "original_max_position_embeddings"),
}
DTYPES = ("float32", "float16", "bfloat16")


class Capability(enum.StrEnum):
    """What of a config.json the engine may not support: one check rule each."""

    ARCHITECTURE = "architecture"
    ACTIVATION = "activation"
    ROPE = "rope"
    QUANTIZATION = "quantization"
    DTYPE = "dtype"


class UnsupportedModel(ValueError):
    """The checkpoint's config asks for something this engine does not implement."""

    def __init__(self, capability: Capability, message: str):
        super().__init__(message)
        self.capability = capability
        self.message = message


def family_of(config: dict[str, Any]) -> Family | None:
    architectures = config.get("architectures") or []
    return next((BY_ARCHITECTURE[a] for a in architectures if a in BY_ARCHITECTURE), None)


def unsupported(config: dict[str, Any]) -> list[UnsupportedModel]:
    """Everything in `config` (a parsed config.json) that the engine cannot run; [] when it can."""
    family = family_of(config)
    if family is None:
        listed = config.get("architectures") or []
        return [UnsupportedModel(Capability.ARCHITECTURE, f"config.json architectures {listed} are not supported")]
    problems = []
    activation = family.activation(config)
    if activation not in ACTIVATIONS:
        problems.append(
            UnsupportedModel(
                Capability.ACTIVATION,
                f"config.json {family.activation_key} {activation!r} is not supported ({', '.join(ACTIVATIONS)})",
            )
        )
    problems += _rope_problems(family, config)
    quantization = config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else quantization
        problems.append(
            UnsupportedModel(Capability.QUANTIZATION, f"config.json quantization_config ({method}) is not supported")
        )
    dtype = config.get("dtype", config.get("torch_dtype"))
    if dtype is not None and dtype not in DTYPES:
        problems.append(
            UnsupportedModel(Capability.DTYPE, f"config.json dtype {dtype!r} is not supported ({', '.join(DTYPES)})")
        )
    return problems


def _rope_problems(family: Family, config: dict[str, Any]) -> list[UnsupportedModel]:
    problems = []
    for layer_type in family.rope_layer_types:
        where = f" for {layer_type} layers" if layer_type else ""
        try:
            rope = family.rope(config, layer_type)
        except ConfigFieldError as exc:
            problems.append(UnsupportedModel(Capability.ROPE, f"config.json RoPE settings{where}: {exc}"))
            continue
        if rope.rope_type not in ROPE_PARAMETERS:
            kinds = ", ".join(ROPE_PARAMETERS)
            message = f"config.json RoPE scaling {rope.rope_type!r}{where} is not supported ({kinds})"
            problems.append(UnsupportedModel(Capability.ROPE, message))
            continue
        missing = [p for p in ROPE_PARAMETERS[rope.rope_type] if p not in rope.parameters]
        if missing:
            message = f"config.json RoPE scaling {rope.rope_type!r}{where} lacks {', '.join(missing)}"
            problems.append(UnsupportedModel(Capability.ROPE, message))
    return problems


def resolve(config: dict[str, Any]) -> Family:
    """The family that serves `config`, or UnsupportedModel naming the first thing it cannot run."""
    problems = unsupported(config)
    if problems:
        raise problems[0]
    family = family_of(config)
    assert family is not None  # unsupported() reported it otherwise
    return family


def models_markdown() -> str:
    """The README's table of what the engine serves, from this registry."""
    lines = ["| Architecture (config.json) | Model file | What it implements |", "|---|---|---|"]
    for family in FAMILIES:
        names = ", ".join(f"`{a}`" for a in family.architectures)
        lines.append(f"| {names} | `daemon/engine/models/{family.name}.py` | {family.options} |")
    rope = ", ".join(f"`{kind}`" for kind in ROPE_PARAMETERS)
    lines += [
        "",
        f"Every family: RoPE scaling {rope} (partial rotary where `partial_rotary_factor` asks for it); "
        f"activations {', '.join(f'`{a}`' for a in ACTIVATIONS)}; checkpoint dtypes "
        f"{', '.join(f'`{d}`' for d in DTYPES)}; tied or separate embeddings; one or several safetensors shards. "
        "Quantized checkpoints (`quantization_config`) are refused.",
    ]
    return "\n".join(lines) + "\n"
