"""Choosing the next token from logits: greedy, or sampled with temperature, top-k and top-p.

Each sampled request owns a random generator seeded from its own seed, so the
same request with the same seed gives the same tokens whatever else is in the
batch (up to the floating-point effects of batching on the logits).

A row that cannot be sampled (logits holding NaN, a distribution torch refuses)
fails alone: its entry in the result is the exception, and every other row of
the batch still gets its token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Below this temperature sampling is greedy (as in vLLM): the scaled distribution puts all its
# mass on the likeliest token anyway, and dividing by a near-zero temperature would only risk
# overflow for no change in the outcome.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW_TEMPERATURE): greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    seed: int | None = None  # None: drawn from the engine's own seeded generator

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE or self.top_k == 1


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int | Exception]:
    """logits [B, vocab] (float32) -> one token id per row, or the exception that row's sampling raised."""
    top = logits.max(dim=-1)  # the first maximum, like argmax, at a third of its cost on CPU
    chosen: list[int | Exception] = top.indices.tolist()
    # max propagates NaN: a row holding one (which makes argmax and softmax meaningless) shows it
    # here, without another pass over the logits
    broken = top.values.isnan().tolist()
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if broken[row]:
            chosen[row] = ValueError("the model's logits for this sequence hold NaN")
        elif not p.greedy:
            try:
                chosen[row] = _draw(logits[row], p, generator)
            except Exception as exc:  # noqa: BLE001 - one row's failure must not take the batch down
                chosen[row] = exc
    return chosen


def _draw(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    logits = logits.float().cpu()
    # Shifted so that the top logit is 0 before scaling: a small temperature drives the others
    # towards -inf (probability 0), never the top one towards +inf (NaN after softmax).
    scaled = (logits - logits.max()) / p.temperature
    if p.top_k > 0 and p.top_k < scaled.shape[-1]:
        threshold = torch.topk(scaled, p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p, and always the top token: a top_p
        # that rounds to 0 in float32 would otherwise leave nothing to draw from
        outside = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
        outside[0] = False
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator).item())
