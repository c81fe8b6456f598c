"""Log-probabilities of the sampled tokens, of the prompt's tokens, and of the likeliest ones,
for requests that ask.

As vLLM reports them by default (its raw_logprobs mode): from the model's own logits,
before penalties, biases, temperature and truncation change them, so they say what the
model thinks of a token whatever options chose it. The sampled rows that ask are taken out
of the batch's logits before the logits processors run (they change logits in place); one
log_softmax, one gather and one topk serve all of them.

A prompt's token i is scored by the logits at position i - 1: a chunk of positions [s, e)
scores its tokens s + 1 .. e - 1 itself, and token s with the last row of the sequence's
previous chunk, which the runner keeps until then (`PromptScores`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from daemon.engine.host_tensors import long_tensor
from daemon.engine.kernels import cpu as kernels
from daemon.engine.sampler import SamplingParams


class TokenLogprob(NamedTuple):  # a tuple, not a dataclass: a step makes one per row that asks
    logprob: float
    rank: int  # 1: the likeliest token
    top_ids: list[int]
    top_logprobs: list[float]


def token_logprobs(logits: torch.Tensor, tokens: list[int], tops: list[int]) -> list[TokenLogprob]:
    """logits [R, vocab] (raw); row r's token tokens[r] and its tops[r] likeliest, as
    log-probabilities. On the CPU one kernel pass a row (kernels/sample.c), else torch."""
    widest = max(tops, default=0)
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and kernels.available():
        chosen, ranks, top_ids, top_values = kernels.token_logprobs(logits, long_tensor(tokens, logits.device), widest)
        return [
            TokenLogprob(logprob, rank, ids[:top], lps[:top])
            for logprob, rank, ids, lps, top in zip(
                chosen.tolist(), ranks.tolist(), top_ids.tolist(), top_values.tolist(), tops, strict=True
            )
        ]
    values = torch.log_softmax(logits.float(), dim=-1)
    device = values.device
    chosen = values.gather(1, long_tensor(tokens, device).unsqueeze(1))  # [R, 1]
    ranks = ((values > chosen).sum(dim=1) + 1).tolist()
    top_values, top_ids = values.topk(widest, dim=-1) if widest else (values[:, :0], values[:, :0].long())
    return [
        TokenLogprob(logprob, rank, ids[:top], lps[:top])
        for logprob, rank, ids, lps, top in zip(
            chosen.squeeze(1).tolist(), ranks, top_ids.tolist(), top_values.tolist(), tops, strict=True
        )
    ]


class RawLogprobs:
    """The raw logits of the rows whose params ask for logprobs, kept for their log-softmax."""

    def __init__(self, logits: torch.Tensor, params: list[SamplingParams]):
        self.rows = [row for row, p in enumerate(params) if p.logprobs is not None]
        self.top = [params[row].logprobs or 0 for row in self.rows]
        # the raw logits of those rows, copied: the processors change the batch's in place
        self.logits: torch.Tensor | None = None
        if self.rows:
            self.logits = logits.index_select(0, long_tensor(self.rows, logits.device)).float()

    def of(self, tokens: list[int | Exception]) -> dict[int, TokenLogprob]:
        """By row: the log-probability of the row's token and of its params' N likeliest (rows
        whose sampling failed get nothing)."""
        if self.logits is None:
            return {}
        wanted = [i for i, row in enumerate(self.rows) if isinstance(tokens[row], int)]
        if not wanted:
            return {}
        rows = self.logits  # all of them, unless some rows' sampling failed
        if len(wanted) < len(self.rows):
            rows = rows.index_select(0, long_tensor(wanted, rows.device))
        found = token_logprobs(rows, [tokens[self.rows[i]] for i in wanted], [self.top[i] for i in wanted])  # type: ignore[misc]
        return {self.rows[i]: entry for i, entry in zip(wanted, found, strict=True)}


class PromptScores:
    """Each scored sequence's last row of logits, kept from one prompt chunk to the next."""

    def __init__(self) -> None:
        self._last_rows: dict[int, torch.Tensor] = {}

    def score(
        self, seq_id: int, start: int, token_ids: list[int], logits: torch.Tensor, top: int, final: bool
    ) -> list[TokenLogprob]:
        """The logprobs of the chunk's prompt tokens from position max(start, 1) on, given the
        raw logits [len(token_ids), vocab] of the chunk's rows."""
        values = logits.float()
        rows, tokens = values[:-1], token_ids[1:]
        earlier = self._last_rows.pop(seq_id, None)
        if start > 0 and earlier is not None:  # token `start` is scored by the previous chunk's last row
            rows, tokens = torch.cat([earlier.unsqueeze(0), rows]), [token_ids[0], *tokens]
        if not final:
            self._last_rows[seq_id] = values[-1].clone()
        return token_logprobs(rows, tokens, [top] * len(tokens)) if tokens else []

    def forget(self, seq_id: int) -> None:
        self._last_rows.pop(seq_id, None)

    def clear(self) -> None:
        self._last_rows.clear()
