"""Log-probabilities of the sampled tokens and of the likeliest ones, for requests that ask.

As vLLM reports them by default (its raw_logprobs mode): from the model's own logits,
before penalties, biases, temperature and truncation change them, so they say what the
model thinks of a token whatever options chose it. The rows that ask are taken out of
the batch's logits before the logits processors run (they change logits in place), and
one log_softmax and one topk serve them all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from daemon.engine.host_tensors import long_tensor
from daemon.engine.sampler import SamplingParams


@dataclass(frozen=True)
class TokenLogprob:
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


class RawLogprobs:
    """The log-softmax of the raw logits of the rows whose params ask for logprobs."""

    def __init__(self, logits: torch.Tensor, params: list[SamplingParams]):
        self.rows = [row for row, p in enumerate(params) if p.logprobs is not None]
        self.top = [params[row].logprobs or 0 for row in self.rows]
        self.values: torch.Tensor | None = None
        if self.rows:
            taken = logits.index_select(0, long_tensor(self.rows, logits.device))
            self.values = torch.log_softmax(taken.float(), dim=-1)

    def of(self, tokens: list[int | Exception]) -> dict[int, TokenLogprob]:
        """By row: the log-probability of the row's token and of its params' N likeliest (rows
        whose sampling failed get nothing)."""
        if self.values is None:
            return {}
        wanted = [i for i, row in enumerate(self.rows) if isinstance(tokens[row], int)]
        if not wanted:
            return {}
        chosen = long_tensor([tokens[self.rows[i]] for i in wanted], self.values.device)
        values = self.values.index_select(0, long_tensor(wanted, self.values.device))
        chosen_logprobs = values.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
        widest = max(self.top[i] for i in wanted)
        top_values, top_ids = values.topk(widest, dim=-1) if widest else (values[:, :0], values[:, :0].long())
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
        return {
            self.rows[i]: TokenLogprob(logprob, ids[: self.top[i]], lps[: self.top[i]])
            for i, logprob, ids, lps in zip(wanted, chosen_logprobs, top_ids, top_values, strict=True)
        }
