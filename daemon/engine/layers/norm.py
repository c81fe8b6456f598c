"""RMS normalisation, in the two forms checkpoints use."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Llama's: x / rms(x) computed in float32, cast back, then scaled by `weight` (ones at init)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's fused rms_norm computes x * rsqrt(mean(x^2) + eps), as transformers does, in one pass
        return self.weight * torch.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


class OffsetRMSNorm(nn.Module):
    """Gemma's: the checkpoint stores w and the scale is (1 + w), applied in float32 before the cast."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)
