"""Reading a Hugging Face config.json the way transformers does, without torch.

Checkpoints in the wild write the same settings in two formats: the older one
(top-level rope_theta, a rope_scaling table whose kind is "type" or
"rope_type", Gemma 3's rope_local_base_freq, Phi-3's top-level
original_max_position_embeddings) and transformers 5's (one rope_parameters
table, or one per attention layer type). Both read into the same RopeSettings
here, so the checker, the KV-cache sizing and the model files agree on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The attention layer types of transformers' layer_types lists.
FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"

# Older names of RoPE scaling kinds, as transformers still accepts them.
_ROPE_ALIASES = {"su": "longrope"}  # Phi-3's first checkpoints


class ConfigFieldError(ValueError):
    """A config.json field has a value of the wrong kind (the message names it)."""


@dataclass(frozen=True)
class RopeSettings:
    """How one kind of attention layer rotates its queries and keys."""

    rope_type: str = "default"
    theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    # the scaling kind's own parameters (factor, low_freq_factor, long_factor, ...), as written
    parameters: dict[str, Any] = field(default_factory=dict)

    def rotary_dim(self, head_dim: int) -> int:
        return int(head_dim * self.partial_rotary_factor)

    @property
    def follows_length(self) -> bool:
        """Whether a key's rotation depends on how long its sequence was when it was computed
        (dynamic NTK, longrope), not on its position alone: the same prefix computed within
        sequences of different lengths then has different keys."""
        return self.rope_type in ("dynamic", "longrope")


def rope_settings(
    config: dict[str, Any], layer_type: str | None = None, *, local_theta_key: str | None = None
) -> RopeSettings:
    """The RoPE of the layers of `layer_type` (None: a model whose layers all rotate alike).

    `local_theta_key` names the older format's field holding the sliding layers' base
    (Gemma 3's rope_local_base_freq); those layers are unscaled in that format.
    """
    new = config.get("rope_parameters")
    if isinstance(new, dict) and layer_type is not None and isinstance(new.get(layer_type), dict):
        table = dict(new[layer_type])
    elif isinstance(new, dict) and new and not any(isinstance(v, dict) for v in new.values()):
        table = dict(new)
    else:  # the older format
        table = dict(config.get("rope_scaling") or {})
        table.setdefault("rope_theta", config.get("rope_theta", 10000.0))
        if layer_type == SLIDING_ATTENTION and local_theta_key and local_theta_key in config:
            table = {"rope_theta": config[local_theta_key]}
    if "original_max_position_embeddings" in config and "original_max_position_embeddings" not in table:
        table["original_max_position_embeddings"] = config["original_max_position_embeddings"]
    kind = table.pop("rope_type", None) or table.pop("type", None) or "default"
    table.pop("type", None)
    if not isinstance(kind, str):
        raise ConfigFieldError(f"rope type {kind!r} is not a name")
    theta = table.pop("rope_theta", config.get("rope_theta", 10000.0))
    partial = table.pop("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    for name, value in (("rope_theta", theta), ("partial_rotary_factor", partial)):
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigFieldError(f"{name} must be a positive number, not {value!r}")
    return RopeSettings(_ROPE_ALIASES.get(kind, kind), float(theta), float(partial), table)


def layer_types(config: dict[str, Any], num_layers: int, default_pattern: int | None = None) -> list[str]:
    """Each layer's attention type: config.json's layer_types, else every `default_pattern`-th layer
    full and the others sliding (Gemma 2 and 3 before layer_types), else all full."""
    listed = config.get("layer_types")
    if isinstance(listed, list) and len(listed) == num_layers:
        return list(listed)
    if default_pattern:
        return [FULL_ATTENTION if (i + 1) % default_pattern == 0 else SLIDING_ATTENTION for i in range(num_layers)]
    return [FULL_ATTENTION] * num_layers


def served_positions(config: dict[str, Any], rope: RopeSettings) -> int | None:
    """The longest context the model is made for, counting what its RoPE scaling extends it to.

    As vLLM derives it: linear and dynamic NTK scaling stretch max_position_embeddings by their
    factor, YaRN stretches the original context by its factor; Llama 3 and longrope checkpoints
    already state the extended length."""
    limit = config.get("max_position_embeddings")
    factor = rope.parameters.get("factor")
    if not isinstance(limit, int) or not isinstance(factor, int | float) or isinstance(factor, bool):
        return limit if isinstance(limit, int) else None
    if rope.rope_type in ("linear", "dynamic"):
        return int(limit * factor)
    if rope.rope_type == "yarn":
        original = rope.parameters.get("original_max_position_embeddings", limit)
        return max(limit, int(original * factor))
    return limit
