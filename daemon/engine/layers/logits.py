"""From final hidden states to next-token logits, as the sampler receives them."""

from __future__ import annotations

import torch
from torch import nn

from daemon.engine.layers.vocab import VocabParallelLinear
from daemon.engine.parallel import SINGLE, Parallel


class LogitsHead(nn.Module):
    """lm_head, in float32 out, with Gemma's final soft-capping (cap * tanh(logits / cap)) when set.

    Split across ranks, each computes its run of the vocabulary (layers/vocab.py) and every rank
    gets the whole row, cut back to the real vocabulary: [N, vocab_size] on every rank."""

    def __init__(self, hidden_size: int, vocab_size: int, softcap: float | None = None, parallel: Parallel = SINGLE):
        super().__init__()
        self.lm_head = VocabParallelLinear(hidden_size, vocab_size, parallel)
        self.vocab_size = vocab_size
        self.softcap = softcap
        self.parallel = parallel

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.parallel.size > 1:
            logits = self.parallel.all_gather(logits, dim=-1)[:, : self.vocab_size].contiguous()
        logits = logits.float()
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
