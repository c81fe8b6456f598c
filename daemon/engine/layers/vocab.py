"""The vocabulary split across tensor-parallel ranks: the input embedding and the output projection.

Each rank holds a contiguous run of ceil(vocab / size) token rows (the last rank's run padded
past the real vocabulary with rows of zeros, which no token id reaches and whose logits are
cut off). The embedding looks up the ids in its run, zeros for the others, and the ranks'
rows are summed; the output projection gives each rank its run's logits, gathered into the
whole row. Both hold the same rows, so a tied model shares the one parameter. At size 1 the run
is the whole vocabulary and both are the plain layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from daemon.engine.layers.linear import CheckpointTensor, Piece
from daemon.engine.parallel import SINGLE, Parallel


class VocabShard:
    """Which token rows a rank holds: [start, start + rows), of which the first `real` exist."""

    def __init__(self, vocab_size: int, parallel: Parallel):
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // parallel.size)
        self.start = parallel.rank * self.rows
        self.real = max(0, min(self.rows, vocab_size - self.start))

    def checkpoint_tensor(self, weight: torch.Tensor) -> CheckpointTensor:
        piece = Piece(weight[: self.real], 0, self.start, self.real)
        return CheckpointTensor((self.vocab_size, weight.shape[1]), (piece,))


class VocabParallelEmbedding(nn.Embedding):
    def __init__(self, vocab_size: int, hidden_size: int, parallel: Parallel = SINGLE):
        self.shard = VocabShard(vocab_size, parallel)
        super().__init__(self.shard.rows, hidden_size)
        self.parallel = parallel
        with torch.no_grad():
            self.weight[self.shard.real :].zero_()  # the padding rows: never loaded

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.shard.start
        outside = (local < 0) | (local >= self.shard.rows)
        rows = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.parallel.all_reduce(rows.masked_fill_(outside.unsqueeze(-1), 0))

    def checkpoint_parts(self, name: str) -> dict[str, CheckpointTensor]:
        return {f"{name}.weight": self.shard.checkpoint_tensor(self.weight)}


class VocabParallelLinear(nn.Linear):
    """The output projection: this rank's run of the logits, [N, rows] (gathered by LogitsHead)."""

    def __init__(self, hidden_size: int, vocab_size: int, parallel: Parallel = SINGLE):
        self.shard = VocabShard(vocab_size, parallel)
        super().__init__(hidden_size, self.shard.rows, bias=False)
        with torch.no_grad():
            self.weight[self.shard.real :].zero_()

    def checkpoint_parts(self, name: str) -> dict[str, CheckpointTensor]:
        return {f"{name}.weight": self.shard.checkpoint_tensor(self.weight)}
