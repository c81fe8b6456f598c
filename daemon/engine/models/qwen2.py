"""Qwen2 and Qwen2.5: the Llama decoder with q/k/v biases (none on o_proj), and sliding windows on
the layers from max_window_layers on when use_sliding_window is set."""

from __future__ import annotations

import dataclasses
from typing import Any

from daemon.engine.hf_config import FULL_ATTENTION, SLIDING_ATTENTION
from daemon.engine.models.llama import LlamaForCausalLM, LlamaShape, sliding_windows
from daemon.engine.models.registry import Family


def qwen_windows(config: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    """Older Qwen configs have no layer_types: layers from max_window_layers on are the sliding ones."""
    if "layer_types" not in config and config.get("use_sliding_window"):
        first = config.get("max_window_layers", num_layers)
        types = [SLIDING_ATTENTION if i >= first else FULL_ATTENTION for i in range(num_layers)]
        config = config | {"layer_types": types}
    return sliding_windows(config, num_layers)


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def read_shape(cls, config: dict[str, Any], family: Family) -> LlamaShape:
        shape = LlamaShape.read(config, family)
        attention = dataclasses.replace(shape.attention, qkv_bias=True, o_bias=False)
        return dataclasses.replace(shape, attention=attention, windows=qwen_windows(config, shape.num_layers))
