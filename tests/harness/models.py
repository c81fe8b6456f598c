"""Small random models built with transformers (one per architecture variant the engine serves), saved as
sharded safetensors for the engine to load through its own code, and what drives the engine by hand.

Importing this module imports transformers: a suite calls pytest.importorskip("transformers") first.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from daemon.engine.blocks import BlockManager, extend_hashes
from daemon.engine.runner import ModelRunner, SequenceChunk

SMALL = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
_LLAMA = (transformers.LlamaConfig, transformers.LlamaForCausalLM)
_QWEN2 = (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)
_PHI3 = (transformers.Phi3Config, transformers.Phi3ForCausalLM)
WINDOW = 8  # sliding windows shorter than PROMPT, so every test runs past them
# name -> (config class, model class, the family's distinctive options). Every family of the
# registry and every RoPE kind has one; test_every_family_and_rope_kind_has_a_variant holds it so.
VARIANTS = {
    "llama": (*_LLAMA, {}),
    "llama-tied": (*_LLAMA, {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
    "llama3-rope": (
        *_LLAMA,
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
    "linear-rope": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    ),
    # past max_position_embeddings within PROMPT, so the base stretches as the sequence grows
    "dynamic-rope": (
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        {"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}, "max_position_embeddings": 16, "head_dim": 32},
    ),
    "qwen2": (*_QWEN2, {}),
    "qwen2-yarn": (
        *_QWEN2,
        {
            "rope_scaling": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4},
            "max_position_embeddings": 64,
            "use_sliding_window": True,
            "sliding_window": WINDOW,
            "max_window_layers": 1,  # layer 0 full, layer 1 sliding
        },
    ),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 32}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": WINDOW}),
    # 8 experts, top-2, the chosen probabilities used as they are; layer 1 a dense MLP
    "qwen3-moe": (
        transformers.Qwen3MoeConfig,
        transformers.Qwen3MoeForCausalLM,
        {
            "head_dim": 32,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "norm_topk_prob": False,
            "mlp_only_layers": [1],
        },
    ),
    # renormalised top-2 of 8 with a shared expert; experts 34 wide, whose float32 rows (136 bytes)
    # grouped_mm cannot take: the per-expert path; layer 0 sliding (transformers' layer_types)
    "qwen2-moe": (
        transformers.Qwen2MoeConfig,
        transformers.Qwen2MoeForCausalLM,
        {
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 34,
            "shared_expert_intermediate_size": 48,
            "norm_topk_prob": True,
            "use_sliding_window": True,
            "sliding_window": WINDOW,
            "max_window_layers": 1,
        },
    ),
    "mixtral": (
        transformers.MixtralConfig,
        transformers.MixtralForCausalLM,
        {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": WINDOW},
    ),
    "phi3": (*_PHI3, {"pad_token_id": 0, "sliding_window": WINDOW, "partial_rotary_factor": 0.5}),
    # scores scaled by query_pre_attn_scalar, not head_dim; both soft-caps small enough to bite;
    # layer_types by Gemma 2's default pattern: sliding, full, sliding
    "gemma2": (
        transformers.Gemma2Config,
        transformers.Gemma2ForCausalLM,
        {
            "head_dim": 32,
            "query_pre_attn_scalar": 20,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 3.0,
            "sliding_window": WINDOW,
        },
    ),
    # a RoPE per layer type (linear scaling on the global layers only), no attention soft-cap, as
    # Gemma 3 checkpoints have; a pattern of 2 for both layer types in 3 layers
    "gemma3": (
        transformers.Gemma3TextConfig,
        transformers.Gemma3ForCausalLM,
        {
            "head_dim": 32,
            "query_pre_attn_scalar": 20,
            "attn_logit_softcapping": None,
            "final_logit_softcapping": 3.0,
            "sliding_window": WINDOW,
            "sliding_window_pattern": 2,
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            },
        },
    ),
    # longrope switches from short to long factors once a sequence passes 12 positions
    "phi3-longrope": (
        *_PHI3,
        {
            "pad_token_id": 0,
            "rope_scaling": {
                "rope_type": "longrope",
                "short_factor": [1.0, 1.1, 1.2, 1.4, 1.6, 2.0, 2.5, 3.0],
                "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0],
            },
            "original_max_position_embeddings": 12,
            "max_position_embeddings": 64,
        },
    ),
}


def build_hf_model(directory: Path, variant: str, shard: bool = True):
    config_class, model_class, extra = VARIANTS[variant]
    torch.manual_seed(1234)
    # MoE references run transformers' plain loop over experts: its grouped_mm path is the engine's own
    # method (no independent check), and refuses rows whose strides are not multiples of 16 bytes
    model = model_class(config_class(**(SMALL | extra), experts_implementation="eager")).eval()
    for name, parameter in model.named_parameters():  # larger weights than the init default, so errors show
        # queries and keys larger still: sharp attention, so positions (RoPE, windows) change the logits
        sharp = any(part in name for part in ("q_proj", "k_proj", "qkv_proj"))
        # MoE routers far larger: probabilities far from uniform, so each routing weight matters
        router = name.endswith(".gate.weight")
        parameter.data.normal_(0, 1.0 if router else 0.4 if sharp else 0.1)
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="40KB" if shard else "1GB")
    return model


def word_tokenizer(vocab_size: int):
    """A tokenizer.json-style tokenizer with one word per id ("w0" ... ): any id sequence decodes to
    distinct text, so a completion's text says exactly which tokens were generated."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def hf_chunked_logits(model, ids: list[int], sizes: list[int]) -> list[torch.Tensor]:
    """transformers' logits of the last token of each chunk of `ids`, fed `sizes` tokens at a time
    through its KV cache: the reference for a runner fed the same chunks (RoPE kinds that follow the
    sequence's length, dynamic NTK and longrope, rotate each chunk by the length so far)."""
    cache, out, start = transformers.DynamicCache(config=model.config), [], 0
    with torch.no_grad():
        for size in sizes:
            chunk = torch.tensor([ids[start : start + size]])
            result = model(chunk, cache=cache, use_cache=True)
            out.append(result.logits[0, -1].float())
            start += size
    return out


class Sequences:
    """Block bookkeeping for a test that drives a runner by hand, as the scheduler will."""

    def __init__(self, runner: ModelRunner):
        self.blocks = BlockManager(num_blocks=runner.cache.num_blocks)
        self.hashes: dict[int, list[bytes]] = {}

    def chunk(self, seq_id: int, tokens: list[int], start: int, **kwargs) -> SequenceChunk:
        table = self.blocks.grow(seq_id, start + len(tokens))
        return SequenceChunk(seq_id, tokens, start, list(table), **kwargs)

    def admit(self, seq_id: int, tokens: list[int]) -> int:
        """Start `seq_id` on the cached blocks of the longest cached prefix of `tokens`, as the
        scheduler admits a request; returns how many tokens it need not compute."""
        self.hashes[seq_id] = extend_hashes([], tokens, self.blocks.block_size)
        cached = self.blocks.cached_prefix(self.hashes[seq_id], len(tokens))
        self.blocks.take(seq_id, cached)
        return len(cached) * self.blocks.block_size

    def computed(self, seq_id: int, tokens: int) -> None:
        """A step has written the keys and values of `seq_id`'s first `tokens` tokens: its full
        blocks among them become findable, as the scheduler registers them."""
        self.blocks.register(seq_id, self.hashes[seq_id], tokens // self.blocks.block_size)


PROMPT = [5, 17, 33, 2, 99, 150, 7, 7, 42, 11, 64, 3, 120, 8, 19, 77, 101, 56, 9, 31]
