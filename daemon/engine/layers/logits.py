"""From final hidden states to next-token logits, as the sampler receives them."""

from __future__ import annotations

import torch
from torch import nn


class LogitsHead(nn.Module):
    """lm_head, in float32 out, with Gemma's final soft-capping (cap * tanh(logits / cap)) when set."""

    def __init__(self, hidden_size: int, vocab_size: int, softcap: float | None = None):
        super().__init__()
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        self.softcap = softcap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
