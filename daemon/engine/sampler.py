"""Choosing the next token from logits: greedy, or sampled with temperature, min-p, top-k and top-p.

On the CPU (float32, the kernels built) kernels/sample.c chooses the whole batch's tokens,
greedy and sampled, in one call: the same distribution in a few passes over each row, without
sorting the vocabulary, and without the dozen operators (a few microseconds each to call) that
torch takes. Elsewhere the torch operators below do it. (A step's usual way there is
token_choice.py, whose one kernel call also applies the penalties and scores the logprobs;
sample() serves the steps it takes stage by stage.)

(The options that change the logits first, penalties and biases, are logits_processors.py.)

The whole batch is sampled with a handful of tensor operations, on the logits'
device: temperatures, top-k and top-p become per-row tensors, and the draw is
inverse-CDF sampling (one uniform number per row, looked up in the row's
cumulative distribution), which draws every row in one call: on CPU, torch's
multinomial and exponential noise cost ten times as much for a batch.

A request with its own seed owns a random generator seeded from it and draws
its row's number from it alone, so the same request with the same seed gives the
same tokens whatever else is in the batch (up to the floating-point effects of
batching on the logits). Requests without a seed share the engine's generator,
seeded from model.seed, in one draw for all of them, as vLLM does.

A row that cannot be sampled (logits holding NaN, a distribution that is not
one) fails alone: its entry in the result is the exception, and every other row
of the batch still gets its token.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

import torch

from daemon.engine.kernels import cpu as kernels

# Below this temperature sampling is greedy (as in vLLM): the scaled distribution puts all its
# mass on the likeliest token anyway, and dividing by a near-zero temperature would only risk
# overflow for no change in the outcome.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW_TEMPERATURE): greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    min_p: float = 0.0  # keep tokens at least this likely relative to the likeliest (0: all)
    seed: int | None = None  # None: drawn from the engine's generator
    # applied to the logits before the above (logits_processors.py)
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    min_tokens: int = 0  # stop_token_ids are held back until this many tokens were generated
    stop_token_ids: tuple[int, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    allowed_token_ids: tuple[int, ...] = ()  # empty: all
    bad_words: tuple[tuple[int, ...], ...] = ()  # a sequence's last token is banned after the rest
    logprobs: int | None = None  # report the token's log-probability and the N likeliest (None: no)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (SequenceChunk.score_prompt)

    # What the engine derives from the params, once per params object (the worker keeps one per
    # request, so a step reads these, not recomputes them for each of its sequences).

    @functools.cached_property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE or self.top_k == 1

    @functools.cached_property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @functools.cached_property
    def needs_counts(self) -> bool:
        """Whether sampling needs the sequence's token counts (token_counts.py)."""
        return self.penalised or self.min_tokens > 0 or bool(self.bad_words)

    @functools.cached_property
    def masked_or_biased(self) -> bool:
        """Whether a logits processor other than the penalties applies to the row."""
        return bool(self.allowed_token_ids or self.bad_words or self.min_tokens or self.logit_bias)

    @functools.cached_property
    def processed(self) -> bool:
        """Whether any logits processor applies to the row (logits_processors.py)."""
        return self.masked_or_biased or self.penalised

    @property
    def penalties(self) -> tuple[float, float, float]:
        return (self.repetition_penalty, self.frequency_penalty, self.presence_penalty)

    @functools.cached_property
    def kernel_row(self) -> bytes:
        """The row's options as kernels/sample.c reads them: eight native float64 (temperature, 0
        when greedy; top_k; top_p; min_p; logprobs, -1 for none; the three penalties)."""
        logprobs = -1 if self.logprobs is None else self.logprobs
        temperature = 0.0 if self.greedy else self.temperature
        return struct.pack("=8d", temperature, self.top_k, self.top_p, self.min_p, logprobs, *self.penalties)


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    shared: torch.Generator | None = None,
) -> list[int | Exception]:
    """logits [B, vocab] (float32) -> one token id per row, or the exception that row's sampling raised.

    `generators[i]` draws row i's number when set; rows without one draw from `shared` together."""
    drawn_rows, uniform = drawn_uniforms(params, generators, shared, logits.device)
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and kernels.available():
        # the whole batch in one call (kernels/sample.c): a few passes over each row, greedy or not
        found, _ = kernels.sample_rows(logits.contiguous(), b"".join(p.kernel_row for p in params), uniform)
        return [token if token >= 0 else unusable_row() for token in found]
    top = logits.max(dim=-1)  # the first maximum, like argmax, at a third of its cost on CPU
    chosen = top.indices
    # max propagates NaN: a row holding one (which makes argmax and softmax meaningless) shows it
    # here, without another pass over the logits
    broken = top.values.isnan()
    if uniform is not None:
        everything = len(drawn_rows) == len(params)
        index = None if everything else torch.tensor(drawn_rows, device=logits.device)
        rows, maxima = (logits, top.values) if everything else (logits.index_select(0, index), top.values[index])
        probs = _distribution(rows, maxima, params, drawn_rows)
        drawn, mass = _inverse_cdf(probs, uniform)
        # temperature, top-k and top-p cannot break a distribution of finite logits; anything
        # else that does (an infinite logit, a temperature no request can carry) makes the
        # row's total mass NaN or inf
        unusable = ~mass.isfinite()
        if everything:
            chosen, broken = drawn, broken | unusable
        else:
            chosen = chosen.index_copy(0, index, drawn)
            broken = broken.index_copy(0, index, broken[index] | unusable)
    tokens: list[int | Exception] = chosen.tolist()
    for row, is_broken in enumerate(broken.tolist()):
        if is_broken:
            tokens[row] = unusable_row()
    return tokens


def unusable_row() -> ValueError:
    """What a row whose logits cannot be chosen from gets instead of a token."""
    return ValueError("the model's logits for this sequence hold NaN or inf")


def _distribution(
    logits: torch.Tensor, maxima: torch.Tensor, params: list[SamplingParams], rows: list[int]
) -> torch.Tensor:
    """The probabilities to draw from, after temperature, min-p, top-k and top-p: [rows, vocab]."""
    device, vocab = logits.device, logits.shape[-1]
    temperature = torch.tensor([params[r].temperature for r in rows], device=device, dtype=logits.dtype)
    # Shifted so that the top logit is 0 before scaling: a small temperature drives the others
    # towards -inf (probability 0), never the top one towards +inf (NaN after softmax).
    scaled = (logits - maxima.unsqueeze(1)) / temperature.unsqueeze(1)
    min_p = [params[r].min_p for r in rows]
    if any(min_p):
        # p / p_max = e^scaled (the top is 0): min-p keeps the tokens with scaled >= log(min_p),
        # which no renormalisation (top-k, top-p) changes; min_p 0 is log 0 = -inf, keeping all
        floor = torch.tensor(min_p, device=device, dtype=torch.float64).log().to(logits.dtype)
        scaled = scaled.masked_fill(scaled < floor.unsqueeze(1), float("-inf"))
    top_k = [params[r].top_k if 0 < params[r].top_k < vocab else 0 for r in rows]
    if any(top_k):
        widest = max(top_k)
        kept = torch.topk(scaled, widest, dim=-1).values  # [rows, widest], descending
        last = torch.tensor([max(k, 1) - 1 for k in top_k], device=device).unsqueeze(1)
        threshold = kept.gather(1, last)
        threshold = threshold.masked_fill(torch.tensor(top_k, device=device).unsqueeze(1) == 0, float("-inf"))
        scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    top_p = [params[r].top_p for r in rows]
    if any(p < 1.0 for p in top_p):
        # keep the smallest set of likeliest tokens whose mass reaches top_p, and always the top
        # token: a top_p that rounds to 0 in float32 would otherwise leave nothing to draw from.
        # Rows without a limit get one above any sum, so rounding never cuts their tail.
        limit = torch.tensor([p if p < 1.0 else 2.0 for p in top_p], device=device, dtype=probs.dtype)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= limit.unsqueeze(1)
        outside[:, 0] = False
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs.masked_fill(outside, 0.0))
    return probs


def drawn_uniforms(
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    shared: torch.Generator | None,
    device: torch.device,
) -> tuple[list[int], torch.Tensor | None]:
    """The rows that draw (not greedy), and their numbers in row order (None: no row draws)."""
    drawn_rows = [row for row, p in enumerate(params) if not p.greedy]
    if not drawn_rows:
        return drawn_rows, None
    return drawn_rows, _uniforms(len(drawn_rows), [generators[row] for row in drawn_rows], shared, device)


def _uniforms(
    rows: int, generators: list[torch.Generator | None], shared: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """One number in [0, 1) per row (float64): from the row's own generator when it has one, the
    others in one draw from `shared`."""
    own = [row for row, g in enumerate(generators) if g is not None]
    if not own:
        return torch.rand(rows, generator=shared, device=device, dtype=torch.float64)
    uniform = torch.empty(rows, device=device, dtype=torch.float64)
    for row in own:
        uniform[row] = torch.rand(1, generator=generators[row], device=device, dtype=torch.float64)[0]
    rest = [row for row, g in enumerate(generators) if g is None]
    if rest:
        drawn = torch.rand(len(rest), generator=shared, device=device, dtype=torch.float64)
        uniform.index_copy_(0, torch.tensor(rest, device=device), drawn)
    return uniform


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The token whose cumulative-probability interval holds uniform * the row's total mass, and
    that mass. Tokens of probability 0 have empty intervals, so they are never drawn; the sums are
    float64 so that a large vocabulary's small terms still count, and the mass need not be
    normalised (top-p leaves it below 1)."""
    cdf = probs.double().cumsum(dim=-1)
    mass = cdf[:, -1]
    tokens = torch.searchsorted(cdf, (uniform * mass).unsqueeze(1), right=True).squeeze(1)
    return tokens.clamp_max_(probs.shape[-1] - 1), mass
