"""Small random models built with transformers (one per architecture variant the engine serves), saved as
sharded safetensors for the engine to load through its own code, and what drives the engine by hand.

Importing this module imports transformers: a suite calls pytest.importorskip("transformers") first.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from daemon.engine.blocks import BlockManager
from daemon.engine.runner import ModelRunner, SequenceChunk

SMALL = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
VARIANTS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "llama-tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"tie_word_embeddings": True}),
    "llama3-rope": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "rope_theta": 500000.0,
        },
    ),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
}


def build_hf_model(directory: Path, variant: str, shard: bool = True):
    config_class, model_class, extra = VARIANTS[variant]
    torch.manual_seed(1234)
    model = model_class(config_class(**SMALL, **extra)).eval()
    for parameter in model.parameters():  # larger weights than the init default, so errors show in the logits
        parameter.data.normal_(0, 0.1)
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="40KB" if shard else "1GB")
    return model


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


class Sequences:
    """Block bookkeeping for a test that drives a runner by hand, as the scheduler will."""

    def __init__(self, runner: ModelRunner):
        self.blocks = BlockManager(num_blocks=runner.cache.layers[0].keys.shape[0] // runner.cache.block_size)

    def chunk(self, seq_id: int, tokens: list[int], start: int, **kwargs) -> SequenceChunk:
        table = self.blocks.grow(seq_id, start + len(tokens))
        return SequenceChunk(seq_id, tokens, start, list(table), **kwargs)


PROMPT = [5, 17, 33, 2, 99, 150, 7, 7, 42, 11, 64, 3, 120, 8, 19, 77, 101, 56, 9, 31]
