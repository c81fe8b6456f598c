"""What the built-in demo model is, as plain data, and where it is built.

The engine builds the model from this description; the config rules read it to
check tensor-parallel and context settings without building anything. It is a
tiny Llama-architecture model with random weights: it runs the real code path
but produces no meaningful text.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

DEMO_MODEL_REF = "builtin:demo"
DEMO_SERVED_NAME = "demo"

DEMO_HF_CONFIG: dict = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "vocab_size": 1024,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    # Spelled out rather than left to loaders' defaults, which differ between versions.
    "head_dim": 32,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    # The standard deviation of the demo model's random weights.
    "initializer_range": 0.02,
}

# Built-in models by their reference in model.path.
BUILTIN_MODELS: dict[str, dict] = {DEMO_MODEL_REF: DEMO_HF_CONFIG}

# Bump whenever the files built from an unchanged DEMO_HF_CONFIG would change.
BUILD_VERSION = 1


def demo_dir_name(config: dict[str, Any] = DEMO_HF_CONFIG, build_version: int = BUILD_VERSION) -> str:
    recipe = json.dumps({"build_version": build_version, "config": config}, sort_keys=True)
    return "demo-" + hashlib.sha256(recipe.encode()).hexdigest()[:12]


def demo_model_dir(cache_dir: Path) -> Path:
    """Where the demo model is (or will be) under `cache_dir`; builds nothing."""
    return Path(cache_dir) / demo_dir_name()
