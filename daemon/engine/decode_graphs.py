"""Decode steps over static buffers, replayable as CUDA graphs.

A decode step at a small batch is bound by kernel launches, not by arithmetic: the GPU waits
for the host to issue each of the forward pass's hundreds of kernels. A CUDA graph records
them once and replays them in one launch, but it replays the very same kernels on the very
same memory: every input must live in a buffer that outlasts it, every shape must be fixed,
and nothing in the forward pass may wait on the device. So a decode step whose batch fits is
padded up to a bucket of batch sizes (1, 2, 4, then multiples of 8, as vLLM does) and of
block-table widths (powers of two: the attention over gathered contexts costs what the widest
table holds), its inputs copied into the bucket's views of static buffers, and run there; a
padding row decodes token 0 at position 0 into a scratch block no sequence owns
(kv_cache.py), and its output is dropped. Steps with prompt chunks, or more sequences than the
largest bucket, run eagerly as before.

On CUDA each (batch, width) bucket is captured the first time a step needs it, after a warm-up
run on a side stream, and replayed from then on. Elsewhere (and for tests of the padding on a
CPU) the same static path runs eagerly: the outputs are the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
import torch

from daemon.engine.host_tensors import long_tensor, padded_long_tensor
from daemon.engine.layers.attention import AttentionBatch, AttentionGroup

if TYPE_CHECKING:
    from daemon.engine.kv_cache import KVCache
    from daemon.engine.runner import SequenceChunk

log = structlog.get_logger("daemon.engine")


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes decode steps are padded to: 1, 2, 4, then multiples of 8, up to `max_batch`."""
    buckets = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8))
    return [*buckets, max_batch]


def width_buckets(max_blocks: int) -> list[int]:
    """The block-table widths: powers of two up to `max_blocks` (a whole context), and it."""
    widths, width = [], 1
    while width < max_blocks:
        widths.append(width)
        width *= 2
    return [*widths, max_blocks]


def bucket_for(size: int, buckets: list[int]) -> int | None:
    """The smallest bucket that holds `size`, or None (larger than them all: run eagerly)."""
    return next((b for b in buckets if b >= size), None)


@dataclass
class StaticInputs:
    """A decode step's inputs, in buffers sized for the largest bucket: every step of a bucket
    writes into, and its graph reads from, the same memory."""

    input_ids: torch.Tensor  # [max_batch]
    positions: torch.Tensor  # [max_batch]
    context_ends: torch.Tensor  # [max_batch] each sequence's length, its new token included
    slot_mapping: torch.Tensor  # [max_batch] the cache slot each new token's K/V goes to
    block_tables: torch.Tensor  # [max_batch, max_blocks]

    @classmethod
    def allocate(cls, max_batch: int, max_blocks: int, device: torch.device) -> StaticInputs:
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.long, device=device)

        return cls(zeros(max_batch), zeros(max_batch), zeros(max_batch), zeros(max_batch), zeros(max_batch, max_blocks))

    def fill(self, chunks: list[SequenceChunk], batch: int, width: int, block_size: int, scratch: int) -> None:
        """Copy `chunks`' decodes into rows [0, len(chunks)) and pad the rest of the bucket's
        `batch` rows: token 0 at position 0, its K/V written to block `scratch`, seeing only it."""
        real = len(chunks)
        padding = batch - real
        positions = [c.start for c in chunks] + [0] * padding
        rows = [
            *([c.token_ids[0] for c in chunks] + [0] * padding),
            *positions,
            *([p + 1 for p in positions]),
            *([c.block_table[c.start // block_size] * block_size + c.start % block_size for c in chunks]),
            *([scratch * block_size] * padding),
        ]
        packed = long_tensor(rows, self.input_ids.device).view(4, batch)
        buffers = (self.input_ids, self.positions, self.context_ends, self.slot_mapping)
        for buffer, values in zip(buffers, packed, strict=True):
            buffer[:batch].copy_(values, non_blocking=True)
        # each row exactly `width` wide: a block past a sequence's end is hidden by its context end
        tables = [c.block_table[:width] + [scratch] * (width - len(c.block_table[:width])) for c in chunks]
        tables += [[scratch] * width] * padding
        self.block_tables[:batch, :width].copy_(padded_long_tensor(tables, self.input_ids.device), non_blocking=True)


def decode_batch(inputs: StaticInputs, batch: int, width: int, cache: KVCache) -> AttentionBatch:
    """The attention metadata of a padded decode step, made by tensor operations on the bucket's
    views of `inputs` alone (what a graph records replays on whatever the buffers hold)."""
    size = cache.block_size
    slots = inputs.slot_mapping[:batch]
    tables = inputs.block_tables[:batch, :width]
    ends = inputs.context_ends[:batch]
    positions = (ends - 1).view(batch, 1, 1)
    keys = torch.arange(width * size, device=slots.device).view(1, 1, -1)
    group = AttentionGroup(
        query_rows=torch.arange(batch, device=slots.device),
        blocks=tables,
        mask=(keys <= positions).unsqueeze(1),
        query_positions=positions,
        context_ends=ends,
        query_valid=torch.ones(batch, 1, dtype=torch.bool, device=slots.device),
        valid_queries=None,
        output_rows=None,
        decode=True,
        fresh=False,
    )
    slot_blocks = slot_offsets = None
    if cache.keys_transposed:
        slot_blocks, slot_offsets = slots // size, slots % size
    return AttentionBatch(slots, [group], slot_blocks, slot_offsets)


class DecodeGraphs:
    """Decode steps of up to `max_batch` sequences over `model`, padded to buckets and run on
    static buffers: replayed CUDA graphs when `capture`, else eagerly (same outputs)."""

    def __init__(self, model: torch.nn.Module, cache: KVCache, max_batch: int, max_blocks: int, *, capture: bool):
        self.model, self.cache, self.capture = model, cache, capture
        device = cache.layers[0].values.device
        self.batches, self.widths = batch_buckets(max_batch), width_buckets(max_blocks)
        self.inputs = StaticInputs.allocate(max_batch, max_blocks, device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None  # the captured graphs share one memory pool
        self._uncapturable: set[tuple[int, int]] = set()

    @property
    def captured(self) -> list[tuple[int, int]]:
        return sorted(self._graphs)

    def bucket(self, chunks: list[SequenceChunk]) -> tuple[int, int] | None:
        """The (batch, width) bucket of a step of decodes only, or None: it runs eagerly."""
        if not chunks or any(len(c.token_ids) != 1 for c in chunks):
            return None
        size = self.cache.block_size
        batch = bucket_for(len(chunks), self.batches)
        width = bucket_for(max(c.start // size + 1 for c in chunks), self.widths)
        return None if batch is None or width is None else (batch, width)

    def hidden(self, chunks: list[SequenceChunk], bucket: tuple[int, int]) -> torch.Tensor:
        """The final hidden states of `chunks` (decodes that fit `bucket`): [len(chunks), hidden]."""
        batch, width = bucket
        self.inputs.fill(chunks, batch, width, self.cache.block_size, self.cache.scratch_block)
        if self.capture and bucket not in self._graphs and bucket not in self._uncapturable:
            try:
                self._graphs[bucket] = self._record(batch, width)
            except RuntimeError as exc:  # an operation a graph cannot hold (a host sync): eager, said once
                self._uncapturable.add(bucket)
                log.warning("engine.graph_not_captured", batch=batch, width=width, error=str(exc).splitlines()[0])
        if bucket not in self._graphs:
            return self._run(batch, width)[: len(chunks)]
        graph, output = self._graphs[bucket]
        graph.replay()
        return output[: len(chunks)]

    def _run(self, batch: int, width: int) -> torch.Tensor:
        inputs = self.inputs
        attention = decode_batch(inputs, batch, width, self.cache)
        return self.model(
            inputs.input_ids[:batch],
            inputs.positions[:batch],
            inputs.context_ends[:batch],
            self.cache.layers,
            attention,
        )

    def _record(self, batch: int, width: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture the bucket's step: first run on a side stream (lazy initialisations, the
        allocator's warm-up: nothing a graph may record), then recorded, in the shared pool."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._run(batch, width)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = self._run(batch, width)
        self._pool = graph.pool()
        return graph, output
