"""Runs a model over a step's batch: prefill chunks and decodes together, then samples.

The scheduler decides what runs (which sequences, how many tokens, which cache
blocks); the runner turns that plan into tensors, runs one forward pass and
returns one token per sequence that asked to sample.

Split across tensor-parallel ranks (parallel.py), every rank runs the same steps over the same
chunks, each with its share of the model and of the KV cache (its KV heads): rank 0 calls step()
and the others follow(), which makes the same collectives and samples nothing. The chunks every
rank gets carry rank 0's tokens of the step before (resolved by worker/execute.py).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from daemon.engine.decode_graphs import DecodeGraphs
from daemon.engine.grammar import Constraint, GrammarError, LazyCompiler, Matchers
from daemon.engine.host_tensors import long_tensor
from daemon.engine.kv_cache import KVCache
from daemon.engine.layers.attention import AttentionBatch, attention_group
from daemon.engine.logprobs import PromptScores, TokenLogprob
from daemon.engine.model_dir import model_info_from_config, read_config
from daemon.engine.models.registry import resolve
from daemon.engine.parallel import SINGLE, Parallel
from daemon.engine.sampler import SamplingParams
from daemon.engine.token_choice import choose_tokens
from daemon.engine.token_counts import TokenCounts
from daemon.engine.weights import load_weights


@dataclass
class SequenceChunk:
    """The part of one sequence a step processes."""

    seq_id: int
    token_ids: list[int]  # prompt tokens of this chunk, or the one token sampled last step
    start: int  # position of token_ids[0] in the sequence
    block_table: list[int]  # cache blocks holding positions [0, start + len(token_ids))
    sample: bool = True  # sample the next token after this chunk (False for all but a prompt's last chunk)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # the whole prompt, with the first chunk after the sequence is admitted, where its sampling
    # needs the tokens it has seen (penalties, min_tokens: token_counts.py)
    prompt_ids: list[int] | None = None
    score_prompt: bool = False  # report the logprobs of its prompt tokens (sampling.prompt_logprobs)
    # what its output must match, with the first chunk after the sequence is admitted (grammar.py)
    constraint: Constraint | None = None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, checkpoint_dtype: str | None = None) -> torch.dtype:
    """model.dtype as a torch dtype. auto: float32 on CPU (most CPUs have no fast bfloat16 or float16
    matrix products, and float32 is exact to the reference); on CUDA the checkpoint's float16 or
    bfloat16, and bfloat16 for a float32 checkpoint."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type != "cuda":
        return torch.float32
    return torch.float16 if checkpoint_dtype == "float16" else torch.bfloat16


class ModelRunner:
    def __init__(
        self,
        model_dir: Path,
        *,
        num_blocks: int,
        device: str = "auto",
        dtype: str = "auto",
        max_positions: int | None = None,
        seed: int = 0,
        parallel: Parallel = SINGLE,
    ):
        """`parallel`: this process's rank of a tensor-parallel group (parallel.join_group); it
        builds and loads its share of the model only."""
        config = read_config(model_dir)
        # what `daemon check` reports, before anything loads: ModelDirError for a field missing or
        # mistyped, UnsupportedModel for what the engine cannot run
        info = model_info_from_config(config, str(model_dir / "config.json"))
        self.family = family = resolve(config)
        self.device = resolve_device(device)
        if self.device.type == "cuda" and self.device.index is None and parallel.size > 1:
            self.device = torch.device("cuda", torch.cuda.current_device())  # the rank's (join_group's)
        self.parallel = parallel
        self.dtype = resolve_dtype(dtype, self.device, config.get("dtype", config.get("torch_dtype")))
        positions = max_positions or info.max_context or 2048
        self.max_positions = positions
        # Parameters are made in their dtype on their device: a float32 copy first would take twice
        # a half-precision model's memory. Tables (rotary) are float32 whatever the default.
        with torch.device(self.device), _default_dtype(self.dtype):
            model = family.load_class()(config, family, positions, parallel)
        self.model = model.eval()
        # Whether a token's keys and values depend only on the tokens up to it, so that a prefix
        # computed by one sequence serves another (prefix caching) exactly as if it computed it.
        self.prefix_cacheable = not any(family.rope(config, t).follows_length for t in family.rope_layer_types)
        load_weights(self.model, model_dir)
        self.graphs: DecodeGraphs | None = None  # see use_decode_graphs
        self._graph_options: tuple[int, bool] | None = None
        self.resize_cache(num_blocks)
        # requests without a seed of their own draw from this one generator, together
        self._shared_generator = torch.Generator(self.device).manual_seed(seed)
        self._generators: dict[int, torch.Generator] = {}  # by sequence, for requests with a seed
        self._counts: TokenCounts | None = None  # made when a sequence first needs them
        self.last_sampled: dict[int, int] = {}  # the previous step's tokens, by sequence
        self.last_logprobs: dict[int, TokenLogprob] = {}  # and their log-probabilities, where asked
        self.last_prompt_logprobs: dict[int, list[TokenLogprob]] = {}  # of the prompt tokens scored
        self._prompt_scores = PromptScores()
        self.failures: dict[int, str] = {}  # the previous step's sequences whose sampling failed, with why
        # constrained sequences: their matchers, and those the previous step's token completed
        self._matchers: Matchers | None = None  # see enable_grammars
        self.last_completed: list[int] = []

    @property
    def vocab_size(self) -> int:
        """The width of the logits (the vocabulary, padded as the checkpoint has it), on every rank."""
        return self.model.head.vocab_size

    def enable_grammars(self, compiler: LazyCompiler) -> None:
        """Serve constrained sequences (grammar.py), with grammars compiled by `compiler`."""
        self._matchers = Matchers(compiler)

    def resize_cache(self, num_blocks: int) -> None:
        """(Re)allocate the KV cache with `num_blocks` blocks; its contents are lost."""
        self.cache = self.graphs = None  # free the old tensors (and graphs over them) before allocating new ones
        model = self.model
        self.cache = KVCache(model.num_layers, num_blocks, model.num_kv_heads, model.head_dim, self.dtype, self.device)
        if self._graph_options is not None:
            self.use_decode_graphs(*self._graph_options)

    def use_decode_graphs(self, max_batch: int, capture: bool) -> None:
        """Run steps of up to `max_batch` decodes padded to buckets over static buffers, replayed
        as CUDA graphs where `capture` (decode_graphs.py); other steps run as before."""
        self._graph_options = (max_batch, capture)
        max_blocks = -(-self.max_positions // self.cache.block_size)
        self.graphs = DecodeGraphs(self.model, self.cache, max_batch, max_blocks, capture=capture)

    @torch.inference_mode()
    def step(self, chunks: list[SequenceChunk]) -> dict[int, int]:
        """Run one forward pass over `chunks`; returns {seq_id: next token} for chunks that sample.

        A chunk whose sampling fails gets no token: it is in `failures` instead, and the others
        of the step are unaffected.
        """
        self.last_sampled, self.failures, self.last_logprobs, self.last_prompt_logprobs = {}, {}, {}, {}
        self.last_completed = []
        if not chunks:
            return self.last_sampled
        self._start_matchers(chunks)
        samplers = [c for c in chunks if c.sample]
        logits, prompt_logits = self._forward_and_logits(chunks)
        if prompt_logits is not None:
            self._score_prompts(prompt_logits, chunks)
        self._count(chunks, logits.shape[1])
        params = [c.sampling for c in samplers]
        seq_ids = [c.seq_id for c in samplers]
        generators = [self._generator(c) for c in samplers]
        matchers = self._matchers
        constrained = [row for row, s in enumerate(seq_ids) if matchers is not None and s in matchers]
        masks = None
        if constrained:
            assert matchers is not None
            masks = matchers.bitmasks(len(seq_ids), logits.shape[1], constrained, [seq_ids[r] for r in constrained])
        drawn, found = choose_tokens(logits, params, seq_ids, generators, self._shared_generator, self._counts, masks)
        for seq_id, token in zip(seq_ids, drawn, strict=True):
            if seq_id in self.failures:  # its constraint did not compile: the token stands for nothing
                continue
            if isinstance(token, Exception):
                self.failures[seq_id] = f"{type(token).__name__}: {token}"
            else:
                self.last_sampled[seq_id] = token
        for row in constrained:
            seq_id = seq_ids[row]
            if seq_id in self.last_sampled:
                self._advance_matcher(seq_id, self.last_sampled[seq_id])
        self.last_logprobs = {seq_ids[row]: entry for row, entry in found.items() if seq_ids[row] in self.last_sampled}
        return self.last_sampled

    @torch.inference_mode()
    def follow(self, chunks: list[SequenceChunk]) -> None:
        """What a rank other than 0 runs while rank 0 runs step(chunks): the same forward pass and
        head calls, so the same collectives in the same order, and no sampling (its last_sampled
        stays empty: the chunks it gets carry rank 0's tokens)."""
        self.last_sampled, self.failures, self.last_logprobs, self.last_prompt_logprobs = {}, {}, {}, {}
        self.last_completed = []
        if chunks:
            self._forward_and_logits(chunks)

    def _forward_and_logits(self, chunks: list[SequenceChunk]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward pass: the logits of the sampling chunks' last rows, and of every row of the
        chunks that score their prompt (None when none does). step() and follow() both run it, so
        every rank makes the same collectives."""
        hidden = self._forward(chunks)
        logits = self._logits_at(hidden, chunks, [c.sample for c in chunks], last_only=True)
        if not any(c.score_prompt for c in chunks):
            return logits, None
        return logits, self._logits_at(hidden, chunks, [c.score_prompt for c in chunks], last_only=False)

    def _start_matchers(self, chunks: list[SequenceChunk]) -> None:
        """Matchers for the sequences whose constraint comes with this step; one that cannot be
        compiled fails its sequence alone."""
        for c in chunks:
            if c.constraint is None:
                continue
            try:
                if self._matchers is None:
                    raise GrammarError("this engine was started without constrained decoding")
                self._matchers.start(c.seq_id, c.constraint, c.sampling.stop_token_ids)
            except GrammarError as exc:
                self.failures[c.seq_id] = f"its constraint cannot be used: {exc}"

    def _advance_matcher(self, seq_id: int, token: int) -> None:
        assert self._matchers is not None
        try:
            if self._matchers.accept(seq_id, token):
                self.last_completed.append(seq_id)
        except GrammarError as exc:
            del self.last_sampled[seq_id]
            self.failures[seq_id] = str(exc)

    @torch.inference_mode()
    def logits(self, chunks: list[SequenceChunk]) -> torch.Tensor:
        """Run one forward pass over `chunks`: next-token logits [chunks that sample, vocab], float32."""
        return self._logits_at(self._forward(chunks), chunks, [c.sample for c in chunks], last_only=True)

    def _forward(self, chunks: list[SequenceChunk]) -> torch.Tensor:
        """The final hidden states of every token of `chunks`, packed: [tokens, hidden]."""
        if self.graphs is not None and (bucket := self.graphs.bucket(chunks)) is not None:
            return self.graphs.hidden(chunks, bucket)
        ids = [t for c in chunks for t in c.token_ids]
        positions = [p for c in chunks for p in range(c.start, c.start + len(c.token_ids))]
        ends = [c.start + len(c.token_ids) for c in chunks for _ in c.token_ids]
        input_ids, positions, context_ends = long_tensor(ids + positions + ends, self.device).view(3, -1)
        return self.model(input_ids, positions, context_ends, self.cache.layers, self._attention_batch(chunks))

    def _logits_at(
        self, hidden: torch.Tensor, chunks: list[SequenceChunk], chosen: list[bool], *, last_only: bool
    ) -> torch.Tensor:
        """Logits of the chosen chunks' last rows (last_only) or of all their rows, in order."""
        offsets = _offsets(chunks)
        rows = [
            row
            for i in range(len(chunks))
            if chosen[i]
            for row in (range(offsets[i + 1] - 1, offsets[i + 1]) if last_only else range(offsets[i], offsets[i + 1]))
        ]
        return self.model.logits(hidden.index_select(0, long_tensor(rows, self.device)))

    def _score_prompts(self, logits: torch.Tensor, chunks: list[SequenceChunk]) -> None:
        """The logprobs of the prompt tokens of the chunks that score their prompt, from `logits`:
        those of every row of them, in order (one head call for all)."""
        at = 0
        for c in (c for c in chunks if c.score_prompt):
            rows = logits[at : at + len(c.token_ids)]
            at += len(c.token_ids)
            top = c.sampling.prompt_logprobs or 0
            found = self._prompt_scores.score(c.seq_id, c.start, c.token_ids, rows, top, final=c.sample)
            self.last_prompt_logprobs[c.seq_id] = found

    def release(self, seq_id: int) -> None:
        """Forget a finished sequence's random generator, token counts and matcher."""
        self._generators.pop(seq_id, None)
        if self._matchers is not None:
            self._matchers.release(seq_id)
        self._prompt_scores.forget(seq_id)
        if self._counts is not None:
            self._counts.release(seq_id)

    def forget_all(self) -> None:
        """Forget every sequence (a new scheduler numbers them afresh)."""
        self._generators.clear()
        self._prompt_scores.clear()
        if self._matchers is not None:
            self._matchers.clear()
        if self._counts is not None:
            self._counts.clear()
        self.last_sampled, self.failures = {}, {}

    def _count(self, chunks: list[SequenceChunk], vocab: int) -> None:
        """Bring the token counts of the step's sequences that need them up to date."""
        counted = [c for c in chunks if c.sampling.needs_counts]
        if not counted:
            return
        if self._counts is None:
            self._counts = TokenCounts(vocab, self.device)
        for c in counted:
            # a sequence known already is one readmitted after a preemption: its counts stand (its
            # recomputation feeds in only tokens they hold)
            if c.seq_id not in self._counts:
                self._counts.start(c.seq_id, c.prompt_ids or [])  # sent with its first chunk
        self._counts.feed([(c.seq_id, c.start, c.token_ids) for c in counted])

    def _generator(self, chunk: SequenceChunk) -> torch.Generator | None:
        """The sequence's own generator if its request has a seed (None: it draws from the shared one)."""
        if chunk.sampling.greedy or chunk.sampling.seed is None:
            return None
        if chunk.seq_id not in self._generators:
            self._generators[chunk.seq_id] = torch.Generator(self.device).manual_seed(chunk.sampling.seed)
        return self._generators[chunk.seq_id]

    def _attention_batch(self, chunks: list[SequenceChunk]) -> AttentionBatch:
        device, size = self.device, self.cache.block_size
        tables = self.cache.block_tables(chunks, device)
        rows = _offsets(chunks)
        slots = self.cache.new_token_slots(chunks)
        slot_mapping = long_tensor(slots, device)
        slot_blocks = slot_offsets = None
        if self.cache.keys_transposed:
            parts = [s // size for s in slots] + [s % size for s in slots]
            slot_blocks, slot_offsets = long_tensor(parts, device).view(2, -1)
        decodes = [i for i, c in enumerate(chunks) if len(c.token_ids) == 1]
        # prefill chunks that start their sequence apart from those that continue one (after a
        # cached prefix or a chunk): attended differently (layers/attention.py)
        fresh = [i for i, c in enumerate(chunks) if len(c.token_ids) > 1 and c.start == 0]
        continued = [i for i, c in enumerate(chunks) if len(c.token_ids) > 1 and c.start > 0]
        groups = []
        for members in (decodes, fresh, continued):
            if members:
                whole = len(members) == len(chunks)
                groups.append(
                    attention_group(
                        [rows[i] for i in members],
                        [len(chunks[i].token_ids) for i in members],
                        [chunks[i].start for i in members],
                        tables if whole else tables.index_select(0, long_tensor(members, device)),
                        size,
                        whole_batch=whole,
                    )
                )
        return AttentionBatch(slot_mapping, groups, slot_blocks, slot_offsets)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _offsets(chunks: list[SequenceChunk]) -> list[int]:
    """Where each chunk starts in the packed batch, and (last) where the batch ends."""
    return list(itertools.accumulate((len(c.token_ids) for c in chunks), initial=0))
