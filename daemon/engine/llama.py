"""The Llama family (Llama, Qwen2, Mistral): one decoder block structure, a few switches.

Parameter names mirror Hugging Face's, so a checkpoint's state dict loads as is.
The forward pass works on a packed batch of new tokens (see attention.py) and
returns hidden states; logits are computed only for the tokens that sample.
Q, K and V (and gate and up) are computed by one fused matrix product each:
small batches cost per operator, not per FLOP. The checkpoint's separate
tensors load into slices of the fused weights (`checkpoint_tensors`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from daemon.engine.attention import AttentionBatch, LayerCache, paged_attention


class UnsupportedModel(ValueError):
    """The checkpoint's config asks for something this engine does not implement."""


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions and switches of a Llama-family model, from its config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> LlamaShape:
        if config.get("hidden_act", "silu") != "silu":
            raise UnsupportedModel(f"activation {config['hidden_act']!r} is not supported (only silu)")
        heads = config["num_attention_heads"]
        qwen2 = "Qwen2ForCausalLM" in config.get("architectures", [])
        attention_bias = bool(config.get("attention_bias", False))
        # transformers >= 5 writes RoPE settings as one "rope_parameters" table; older checkpoints
        # (most in the wild) have top-level rope_theta and rope_scaling.
        rope = config.get("rope_parameters") or {}
        scaling = config.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=qwen2 or attention_bias,  # Qwen2 always has q/k/v biases
            o_bias=attention_bias and not qwen2,
            mlp_bias=bool(config.get("mlp_bias", False)),
        )


def rope_inverse_frequencies(shape: LlamaShape) -> torch.Tensor:
    dim = shape.head_dim
    # float32 throughout, as transformers computes it: the reference our logits are held to
    inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaling = shape.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_frequencies(inv_freq, scaling)
    raise UnsupportedModel(f"rope scaling {kind!r} is not supported (default, linear, llama3)")


def _llama3_frequencies(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= old_context / high) & (wavelength <= old_context / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, shape: LlamaShape, max_positions: int):
        super().__init__()
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), rope_inverse_frequencies(shape))
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, positions: torch.Tensor) -> Rotation:
        """The rotation of each token of a step, looked up once for all layers."""
        return Rotation(self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1))


@dataclass
class Rotation:
    cos: torch.Tensor  # [T, 1, dim], float32
    sin: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate [T, heads, dim] by each token's position (HF's rotate-half layout)."""
        half = x.shape[-1] // 2
        turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return (x.float() * self.cos + turned.float() * self.sin).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype)


class FusedLinear(nn.Linear):
    """Several projections of the same input as one: `parts` names each one's output rows, in order."""

    def __init__(self, in_features: int, parts: dict[str, int], bias: bool):
        super().__init__(in_features, sum(parts.values()), bias=bias)
        self.parts = parts

    def part_tensors(self) -> dict[str, torch.Tensor]:
        """The checkpoint's name (relative to the parent module) -> the slice of this layer it fills."""
        tensors, row = {}, 0
        for name, size in self.parts.items():
            tensors[f"{name}.weight"] = self.weight[row : row + size]
            if self.bias is not None:
                tensors[f"{name}.bias"] = self.bias[row : row + size]
            row += size
        return tensors


class Attention(nn.Module):
    def __init__(self, shape: LlamaShape):
        super().__init__()
        self.shape = shape
        q_size, kv_size = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
        self.sizes = [q_size, kv_size, kv_size]
        parts = {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size}
        self.qkv_proj = FusedLinear(shape.hidden_size, parts, bias=shape.qkv_bias)
        self.o_proj = nn.Linear(q_size, shape.hidden_size, bias=shape.o_bias)

    def forward(self, x: torch.Tensor, rotation: Rotation, cache: LayerCache, batch: AttentionBatch) -> torch.Tensor:
        tokens, shape = x.shape[0], self.shape
        qk, v = self.qkv_proj(x).split([self.sizes[0] + self.sizes[1], self.sizes[2]], dim=-1)
        # queries and keys rotate together: one set of operators for both
        qk = rotation.apply(qk.reshape(tokens, shape.num_heads + shape.num_kv_heads, shape.head_dim))
        q, k = qk.split([shape.num_heads, shape.num_kv_heads], dim=1)
        v = v.reshape(tokens, shape.num_kv_heads, shape.head_dim)
        return self.o_proj(paged_attention(q, k, v, cache, batch).reshape(tokens, -1))


class MLP(nn.Module):
    def __init__(self, shape: LlamaShape):
        super().__init__()
        size = shape.intermediate_size
        parts = {"gate_proj": size, "up_proj": size}
        self.gate_up_proj = FusedLinear(shape.hidden_size, parts, bias=shape.mlp_bias)
        self.down_proj = nn.Linear(size, shape.hidden_size, bias=shape.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, shape: LlamaShape):
        super().__init__()
        self.self_attn = Attention(shape)
        self.mlp = MLP(shape)
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)

    def forward(self, x: torch.Tensor, rotation: Rotation, cache: LayerCache, batch: AttentionBatch) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rotation, cache, batch)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, shape: LlamaShape):
        super().__init__()
        self.embed_tokens = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(shape) for _ in range(shape.num_layers))
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, shape: LlamaShape, max_positions: int):
        super().__init__()
        self.shape = shape
        self.model = LlamaModel(shape)
        self.lm_head = nn.Linear(shape.hidden_size, shape.vocab_size, bias=False)
        self.rope = RotaryEmbedding(shape, max_positions)
        if shape.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, caches: list[LayerCache], batch: AttentionBatch
    ) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden]."""
        x = self.model.embed_tokens(input_ids)
        rotation = self.rope(positions)
        for layer, cache in zip(self.model.layers, caches, strict=True):
            x = layer(x, rotation, cache, batch)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor a Hugging Face checkpoint of this model holds, by its name there.

        Fused layers contribute their parts' slices; a tied lm_head is left out
        (it is the embedding)."""
        tensors = {}
        for prefix, module in self.named_modules():
            dot = f"{prefix}." if prefix else ""
            if isinstance(module, FusedLinear):
                parent = prefix.rpartition(".")[0]
                tensors.update({f"{parent}.{name}": t for name, t in module.part_tensors().items()})
                continue
            for name, param in module.named_parameters(recurse=False):
                tensors[f"{dot}{name}"] = param
        if self.shape.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        return tensors
