"""Rotary position embeddings with every common scaling: default, linear, dynamic NTK, YaRN, Llama 3, longrope.

Frequencies are computed in float32 as transformers computes them: its forward
pass is the reference our logits are held to. Two kinds depend on how long the
sequence is, as in transformers, where the frequencies follow the longest
position of each forward pass: dynamic NTK stretches its base once a sequence
passes max_position_embeddings, and longrope switches from its short to its long
factors once a sequence passes the original context. Here each token follows its
own sequence's length in the step (`context_ends`), so a sequence's rotation does
not depend on what else is batched with it; a key keeps the rotation it was
cached with, as in transformers' cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from daemon.engine.hf_config import RopeSettings


def base_frequencies(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_context = p["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= old_context / high) & (wavelength <= old_context / low)
    return torch.where(medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(theta: float, dim: int, p: dict) -> tuple[torch.Tensor, float]:
    factor, original = p["factor"], p["original_max_position_embeddings"]
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no division by zero in the ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    positional = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp  # the share of each frequency left unscaled
    inv_freq = (1.0 / (factor * positional)) * (1 - extrapolation) + (1.0 / positional) * extrapolation
    return inv_freq, float(attention_factor)


def _longrope(theta: float, dim: int, p: dict, max_positions: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_positions / original
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    short = 1.0 / (torch.tensor(p["short_factor"], dtype=torch.float32) * theta**shape)
    long = 1.0 / (torch.tensor(p["long_factor"], dtype=torch.float32) * theta**shape)
    return short, long, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """The cos/sin tables of one RoPE, for positions [0, max_positions)."""

    def __init__(self, rope: RopeSettings, head_dim: int, max_positions: int, model_positions: int):
        """`model_positions`: config.json's max_position_embeddings (where dynamic NTK starts to stretch)."""
        super().__init__()
        self.rope_type = rope.rope_type
        self.dim = rope.rotary_dim(head_dim)
        self.theta = rope.theta
        p = rope.parameters
        self.factor = p.get("factor", 1.0)
        self.model_positions = model_positions
        self.threshold = p.get("original_max_position_embeddings", model_positions)
        inv_freq = base_frequencies(rope.theta, self.dim)
        scale, long_inv_freq = 1.0, None
        if self.rope_type == "linear":
            inv_freq = inv_freq / p["factor"]
        elif self.rope_type == "llama3":
            inv_freq = _llama3(inv_freq, p)
        elif self.rope_type == "yarn":
            inv_freq, scale = _yarn(rope.theta, self.dim, p)
        elif self.rope_type == "longrope":
            inv_freq, long_inv_freq, scale = _longrope(rope.theta, self.dim, p, model_positions)
        elif self.rope_type not in ("default", "dynamic"):
            raise ValueError(f"RoPE scaling {self.rope_type!r}")  # the registry refuses it before a load
        positions = torch.arange(max_positions, dtype=torch.float32)
        self._register_table("", torch.outer(positions, inv_freq), scale)
        if long_inv_freq is not None:
            self._register_table("long_", torch.outer(positions, long_inv_freq), scale)

    def _register_table(self, prefix: str, angles: torch.Tensor, scale: float) -> None:
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer(f"{prefix}cos", angles.cos() * scale, persistent=False)
        self.register_buffer(f"{prefix}sin", angles.sin() * scale, persistent=False)

    def forward(self, positions: torch.Tensor, context_ends: torch.Tensor) -> Rotation:
        """The rotation of each token of a step ([T] positions, and [T] lengths of their sequences
        once the step is done), looked up once for all layers."""
        if self.rope_type == "dynamic":
            cos, sin = self._dynamic(positions, context_ends)
        elif self.rope_type == "longrope":
            long = (context_ends > self.threshold).unsqueeze(1)
            cos = torch.where(long, self.long_cos[positions], self.cos[positions])
            sin = torch.where(long, self.long_sin[positions], self.sin[positions])
        else:
            cos, sin = self.cos[positions], self.sin[positions]
        return Rotation(cos.unsqueeze(1), sin.unsqueeze(1), self.dim)

    def _dynamic(self, positions: torch.Tensor, context_ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # NTK: a longer sequence gets a larger base; up to max_position_embeddings the base is unchanged
        length = context_ends.clamp(min=self.model_positions).float()
        factor, dim = self.factor, self.dim
        base = self.theta * ((factor * length / self.model_positions) - (factor - 1)) ** (dim / (dim - 2))
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device).float() / dim
        inv_freq = 1.0 / (base.unsqueeze(1) ** exponents.unsqueeze(0))  # [T, dim / 2]
        angles = positions.float().unsqueeze(1) * inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()


@dataclass
class Rotation:
    cos: torch.Tensor  # [T, 1, rotary dim], float32
    sin: torch.Tensor
    dim: int  # how many leading dims of each head rotate (partial rotary leaves the rest)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate [T, heads, head_dim] by each token's position (HF's rotate-half layout)."""
        if self.dim < x.shape[-1]:
            return torch.cat([self.apply(x[..., : self.dim]), x[..., self.dim :]], dim=-1)
        half = x.shape[-1] // 2
        turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return (x.float() * self.cos + turned.float() * self.sin).to(x.dtype)
