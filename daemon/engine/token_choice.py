"""A step's tokens from its logits: the logits processors, the draw and the logprobs, in vLLM's
order (logprobs from the raw logits; allowed ids, bad words, min_tokens, logit_bias, then the
penalties; then temperature, min-p, top-k, top-p and the draw).

Two ways to the same result:

- On the CPU with the kernels built, one kernel call (kernels/sample.c) does each row's
  penalties, the log-probabilities of its raw logits and its token, greedy or drawn; the other
  processors, which few requests set, run before it as torch operators. Each stage as a call
  of its own, with the Python that feeds it, cost about 0.3 ms a step of 57 sequences, against
  a forward pass of 2-3 ms on the demo model.
- Elsewhere, and for a step where a row that asks for logprobs also has one of those other
  processors (its raw logits must be read before they run), stage by stage: the raw rows that
  ask for logprobs copied (RawLogprobs), the processors (logits_processors.py), the draw
  (sampler.py), the logprobs of the copies.
"""

from __future__ import annotations

import torch

from daemon.engine.grammar import TokenMasks
from daemon.engine.kernels import cpu as kernels
from daemon.engine.logits_processors import apply_processors
from daemon.engine.logprobs import RawLogprobs, TokenLogprob
from daemon.engine.sampler import SamplingParams, drawn_uniforms, sample, unusable_row
from daemon.engine.token_counts import TokenCounts


def choose_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    seq_ids: list[int],
    generators: list[torch.Generator | None],
    shared: torch.Generator | None,
    counts: TokenCounts | None,
    masks: TokenMasks | None = None,
) -> tuple[list[int | Exception], dict[int, TokenLogprob]]:
    """logits [B, vocab] float32 (changed in place), row i that of sequence seq_ids[i] sampling
    with params[i] (generators[i] its own generator, or None: it draws from `shared`). `masks`:
    the grammars of the rows that follow one (grammar.py).

    One token per row, or the exception that row's sampling raised; and by row, the logprobs of
    the rows that asked for them and got a token."""
    if not _in_one_call(logits, params):  # stage by stage
        raw = RawLogprobs(logits, params)  # before the processors change the logits
        if masks is not None:
            masks.apply(logits)
        if any(p.processed for p in params):
            logits = apply_processors(logits, params, seq_ids, counts)
        drawn = sample(logits, params, generators, shared)
        return drawn, raw.of(drawn)
    # one kernel call (which applies the grammars' masks too), after the processors other than the penalties
    if any(p.masked_or_biased for p in params):
        apply_processors(logits, params, seq_ids, counts, penalties=False)
    _drawn_rows, uniform = drawn_uniforms(params, generators, shared, logits.device)
    penalised = None
    if counts is not None and any(p.penalised for p in params):
        rows = [counts.row_of(seq_ids[row]) if p.penalised else -1 for row, p in enumerate(params)]
        penalised = (rows, counts.output, counts.prompt)
    asked = [(row, p.logprobs) for row, p in enumerate(params) if p.logprobs is not None]
    width = max((top for _row, top in asked), default=None)
    packed = b"".join(p.kernel_row for p in params)
    grammars = None
    if masks is not None and masks.rows:
        mask_rows = [-1] * len(params)
        for row in masks.rows:
            mask_rows[row] = row
        grammars = (mask_rows, masks.bitmask)
    tokens, scores = kernels.sample_rows(logits, packed, uniform, penalised, width, len(asked), grammars)
    found: dict[int, TokenLogprob] = {}
    if scores is not None:
        for k, (row, top) in enumerate(asked):
            if tokens[row] >= 0:
                found[row] = TokenLogprob(
                    scores.chosen[k], scores.rank[k], scores.top_ids[k][:top], scores.top_logprobs[k][:top]
                )
    return [token if token >= 0 else unusable_row() for token in tokens], found


def _in_one_call(logits: torch.Tensor, params: list[SamplingParams]) -> bool:
    return (
        logits.device.type == "cpu"
        and logits.dtype == torch.float32
        and logits.is_contiguous()
        and kernels.available()
        and not any(p.logprobs is not None and p.masked_or_biased for p in params)
    )
