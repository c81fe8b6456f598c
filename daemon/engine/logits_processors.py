"""What a request's sampling options do to its row of logits before a token is chosen.

In vLLM's order: the allowed tokens (all others to -inf), bad words (a word's last token to
-inf where the output ends with the rest of it), min_tokens (the stop tokens to -inf while the
sequence is shorter), logit_bias (added), then the repetition, frequency and
presence penalties. Temperature, min_p, top-k and top-p come after, in the sampler; greedy
rows take the argmax of what this leaves, as in vLLM.

Each option is applied to the rows that set it, for all of them at once: the (row, token)
pairs of a step's lists become index tensors, and each kind of change is one or two tensor
operations over the batch. A step where no row sets any of them costs nothing here.
"""

from __future__ import annotations

from array import array

import torch

from daemon.engine.host_tensors import long_tensor
from daemon.engine.kernels import cpu as kernels
from daemon.engine.sampler import SamplingParams
from daemon.engine.token_counts import TokenCounts


def apply_processors(
    logits: torch.Tensor,
    params: list[SamplingParams],
    seq_ids: list[int],
    counts: TokenCounts | None,
    *,
    penalties: bool = True,
) -> torch.Tensor:
    """logits [B, vocab] float32, row i that of sequence seq_ids[i] sampling with params[i]:
    changed in place and returned. `counts` holds every sequence whose params need them
    (SamplingParams.needs_counts; None: none does). Without `penalties`, all but the penalties
    (the sampling kernel applies them itself: token_choice.py)."""
    device, vocab = logits.device, logits.shape[1]
    # the rows some processor applies to (SamplingParams.processed); the others are left alone
    active = [(row, p) for row, p in enumerate(params) if p.processed]
    allowed = [(row, p.allowed_token_ids) for row, p in active if p.allowed_token_ids]
    if allowed:
        hidden = torch.ones(len(allowed), vocab, dtype=torch.bool, device=device)
        pairs = [(i, t) for i, (_row, ids) in enumerate(allowed) for t in ids]
        hidden[_pairs(pairs, device)] = False
        rows = long_tensor([row for row, _ids in allowed], device)
        logits.index_copy_(0, rows, logits.index_select(0, rows).masked_fill_(hidden, float("-inf")))
    # bad words (vLLM's): a word's last token is banned where the output ends with the rest of it
    banned = [
        (row, word[-1])
        for row, p in active
        if counts is not None
        for word in p.bad_words
        if word[-1] < vocab and counts.ends_with(seq_ids[row], word[:-1])
    ]
    if banned:
        logits[_pairs(banned, device)] = float("-inf")
    too_short = [
        (row, t)
        for row, p in active
        if p.min_tokens and counts is not None and counts.generated(seq_ids[row]) < p.min_tokens
        for t in p.stop_token_ids
        if t < vocab  # a stop id beyond the vocabulary is never generated anyway
    ]
    if too_short:
        logits[_pairs(too_short, device)] = float("-inf")
    biased = [(row, t, bias) for row, p in active for t, bias in p.logit_bias]
    if biased:
        bias = torch.tensor([b for _row, _t, b in biased], dtype=logits.dtype, device=device)
        logits.index_put_(_pairs([(row, t) for row, t, _b in biased], device), bias, accumulate=True)
    penalised = [row for row, p in active if p.penalised] if penalties else []
    if penalised and counts is not None:
        rows = long_tensor(penalised, device)
        which = counts.rows_of([seq_ids[row] for row in penalised])
        # [rows, 3]: repetition, frequency, presence (packed as an array: torch.tensor walks a list
        # of lists at a fifth of the speed)
        flat = array("f", [x for row in penalised for x in params[row].penalties])
        values = torch.frombuffer(flat, dtype=torch.float32).view(-1, 3).to(device=device, dtype=logits.dtype)
        if device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous() and kernels.available():
            # one pass over each row (kernels/sample.c), not a dozen operators over them all
            kernels.apply_penalties(logits, rows, counts.output, counts.prompt, which, values)
        else:
            logits.index_copy_(0, rows, _penalise(logits.index_select(0, rows), counts, which, values))
    return logits


def _penalise(logits: torch.Tensor, counts: TokenCounts, rows: torch.Tensor, penalties: torch.Tensor) -> torch.Tensor:
    """vLLM's penalties: a token in the prompt or the output has its logit divided by the
    repetition penalty if positive, multiplied if not; then each output token's logit loses
    the frequency penalty once per time it was generated and the presence penalty once."""
    output = counts.output.index_select(0, rows)
    generated = output > 0
    seen = counts.prompt.index_select(0, rows) | generated
    repetition, frequency, presence = penalties.unsqueeze(2).unbind(1)  # each [rows, 1]
    repeated = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, repeated, logits)
    return logits - frequency * output - presence * generated


def _pairs(pairs: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) index tensors of (row, column) pairs."""
    flat = long_tensor([r for r, _c in pairs] + [c for _r, c in pairs], device).view(2, -1)
    return flat[0], flat[1]
