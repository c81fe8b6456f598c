"""What each sequence has seen so far, for the samplers that depend on it: which tokens its
prompt holds, how often it has generated each token, how many it has generated, and (for bad
words) its output in order.

Repetition, presence and frequency penalties, min_tokens and bad words need these. They live on the
model's device as one row per sequence of two [rows, vocab] tensors (a bit mask of the
prompt, float counts of the output), as vLLM's persistent batch keeps them: a step gathers
its sequences' rows with one index_select and adds its new tokens with one index_put_, so the
cost of a step grows with its sequences, never with their lengths. Only sequences whose
sampling needs them get a row.

A sequence's row starts from its whole prompt (the scheduler sends it with the first chunk it
plans after admitting the sequence, since a prefix-cache hit means the worker never sees the
cached part). Then every token fed back in at a position past what was counted is an output:
the one sampled by the step before, or, after a preemption, nothing new, since recomputing
feeds in tokens already counted.
"""

from __future__ import annotations

import torch

from daemon.engine.host_tensors import long_tensor


class TokenCounts:
    def __init__(self, vocab: int, device: torch.device):
        self.vocab, self.device = vocab, device
        self.prompt = torch.zeros(0, vocab, dtype=torch.bool, device=device)
        self.output = torch.zeros(0, vocab, dtype=torch.float32, device=device)
        self._rows: dict[int, int] = {}  # seq_id -> its row
        self._free: list[int] = []
        self._prompt_len: dict[int, int] = {}
        self._counted: dict[int, int] = {}  # seq_id -> positions counted (prompt and output)
        self._outputs: dict[int, list[int]] = {}  # seq_id -> its output tokens in order (bad words)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._rows

    def start(self, seq_id: int, prompt_ids: list[int]) -> None:
        """(Re)start a sequence's counts from its prompt: nothing generated yet."""
        row = self._rows.get(seq_id)
        if row is None:
            row = self._rows[seq_id] = self._free.pop() if self._free else self._grow()
        self.prompt[row].zero_()
        self.output[row].zero_()
        if prompt_ids:
            self.prompt[row].index_fill_(0, long_tensor(prompt_ids, self.device), True)
        self._prompt_len[seq_id] = self._counted[seq_id] = len(prompt_ids)
        self._outputs[seq_id] = []

    def feed(self, fed: list[tuple[int, int, list[int]]]) -> None:
        """A step's input, as (seq_id, start position, token ids): the tokens past what each
        counted sequence has counted are its outputs, added in one operation."""
        rows: list[int] = []
        tokens: list[int] = []
        for seq_id, start, token_ids in fed:
            counted = self._counted.get(seq_id)
            if counted is None:
                continue
            new = token_ids[max(counted - start, 0) :]
            if new:
                rows += [self._rows[seq_id]] * len(new)
                tokens += new
                self._outputs[seq_id] += new
                self._counted[seq_id] = max(counted, start + len(token_ids))
        if tokens:
            index = long_tensor(rows + tokens, self.device).view(2, -1)
            ones = torch.ones(len(tokens), dtype=self.output.dtype, device=self.device)
            self.output.index_put_((index[0], index[1]), ones, accumulate=True)

    def generated(self, seq_id: int) -> int:
        """Output tokens counted so far (every one sampled before this step)."""
        return self._counted[seq_id] - self._prompt_len[seq_id]

    def ends_with(self, seq_id: int, tokens: tuple[int, ...]) -> bool:
        """Whether the sequence's output so far ends with `tokens` (empty: always)."""
        output = self._outputs[seq_id]
        return not tokens or tuple(output[-len(tokens) :]) == tokens

    def row_of(self, seq_id: int) -> int:
        return self._rows[seq_id]

    def rows_of(self, seq_ids: list[int]) -> torch.Tensor:
        return long_tensor([self._rows[s] for s in seq_ids], self.device)

    def release(self, seq_id: int) -> None:
        row = self._rows.pop(seq_id, None)
        if row is not None:
            self._free.append(row)
            del self._prompt_len[seq_id], self._counted[seq_id], self._outputs[seq_id]

    def clear(self) -> None:
        self._free += self._rows.values()
        self._rows.clear()
        self._prompt_len.clear()
        self._counted.clear()
        self._outputs.clear()

    def _grow(self) -> int:
        """A new row: the tensors double (a copy now and then, not one per sequence)."""
        size = self.prompt.shape[0]
        grown = max(2 * size, 8)
        prompt = torch.zeros(grown, self.vocab, dtype=torch.bool, device=self.device)
        output = torch.zeros(grown, self.vocab, dtype=torch.float32, device=self.device)
        prompt[:size], output[:size] = self.prompt, self.output
        self.prompt, self.output = prompt, output
        self._free += range(grown - 1, size, -1)
        return size
