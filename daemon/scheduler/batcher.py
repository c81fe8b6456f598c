"""Continuous batching: which tokens of which requests the next engine step processes.

Between two steps, new requests join the running batch and finished ones leave
it. A step carries, within the token budget (`chunked_prefill_size`), one token
for every decoding sequence, then chunks of prompts being prefilled, oldest
first, then prompts of newly admitted requests in policy order. Admission is
bounded by `max_running_requests` and by the KV cache: a request is admitted
only when its whole prompt fits, and when decoding outgrows the cache the most
expendable running sequence is preempted: it gives its blocks back and is
queued again, to be recomputed later.

With prefix caching, a request is admitted after the longest prefix of its
tokens whose keys and values the cache already holds (full blocks that other
sequences computed, or that it computed itself before it was preempted): only
the rest counts against the step's token budget and takes new blocks. A block
becomes findable when the step that completes it has come back without error:
never while its keys and values may not be written yet.

Steps are pipelined: the next step is planned while the previous one runs, so
the worker goes from one to the next without waiting for the scheduler. A
sequence whose next token the running step samples decodes it in the next step
as a placeholder (SAMPLED_LAST_STEP) that the worker fills in. If that token
ends the sequence (EOS, a stop token), its place in the next step is wasted and
its result dropped; an end by length is known in advance and never planned.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from daemon.engine.blocks import BlockManager, extend_hashes
from daemon.ipc.messages import (
    SAMPLED_LAST_STEP,
    STEP_KINDS,
    Constraint,
    ErrorInfo,
    PlannedChunk,
    ScheduleRequest,
    SequenceUpdate,
    StepPlan,
    StepResult,
)
from daemon.scheduler.policy import Policy, admission_order, preemption_victim
from daemon.scheduler.sequence import Phase, Sequence

QUEUE_FULL = ErrorInfo(503, "the server is at capacity: the request queue is full", type="server_overloaded")
PIPELINE_DEPTH = 2  # steps in flight at once: the one running and the next, waiting for the worker
# Constraints remembered as asked of the worker, and as compiled by it: at most this many and
# this much text each (a schema may be 128 Ki characters), the oldest forgotten first. A request
# waiting on one forgotten asks for it again (the worker's cache answers at once).
MAX_CONSTRAINTS_KNOWN = 4096
MAX_CONSTRAINT_CHARS_KNOWN = 32 * 1024 * 1024


@dataclass
class Limits:
    max_running_requests: int
    max_queued_requests: int
    chunked_prefill_size: int  # -1: no chunking, whole prompts in one step
    policy: Policy = "fcfs"
    prefix_caching: bool = True


@dataclass
class CacheCounts:
    """Prefix-cache lookups since the scheduler started, in tokens (one per admission, readmissions
    after preemption included): what was looked up, and what was found."""

    queried: int = 0
    hits: int = 0


@dataclass
class StepCounts:
    """The engine steps run since the scheduler started, as the worker timed them, by kind: a
    prefill step computes prompt tokens (and decodes beside them), a decode step decodes only.
    Tokens: the prompt tokens computed (prefix-cache hits are not), and the tokens decoded. Kept
    by kind as SchedulerStats sends them."""

    steps: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STEP_KINDS, 0))
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STEP_KINDS, 0.0))
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STEP_KINDS, 0))

    def add(self, work: list[_Work], seconds: float) -> None:
        prompt = sum(w.tokens for w in work if w.tokens > 1)  # a chunk of one prompt token counts as a decode
        kind = "prefill" if prompt else "decode"
        self.steps[kind] += 1
        self.seconds[kind] += seconds
        self.tokens["prefill"] += prompt
        self.tokens["decode"] += sum(1 for w in work if w.tokens == 1)


class _Remembered:
    """Constraints, oldest first, within MAX_CONSTRAINTS_KNOWN and MAX_CONSTRAINT_CHARS_KNOWN."""

    def __init__(self) -> None:
        self._items: dict[Constraint, None] = {}
        self._chars = 0

    def __contains__(self, constraint: Constraint) -> bool:
        return constraint in self._items

    def add(self, constraint: Constraint) -> None:
        if constraint in self._items:
            return
        self._items[constraint] = None
        self._chars += len(constraint.spec)
        while len(self._items) > MAX_CONSTRAINTS_KNOWN or self._chars > MAX_CONSTRAINT_CHARS_KNOWN:
            oldest = next(iter(self._items))
            del self._items[oldest]
            self._chars -= len(oldest.spec)


@dataclass
class _Work:
    seq: Sequence
    tokens: int
    sample: bool
    scores_from: int | None = None  # the first prompt token whose logprob this chunk reports (score_prompt)


class Batcher:
    def __init__(
        self,
        blocks: BlockManager,
        limits: Limits,
        context_length: int,
        eos_token_ids: Iterable[int],
        epoch: int = 1,
        counts: CacheCounts | None = None,
        steps: StepCounts | None = None,
        prefix_cacheable: bool = True,
    ):
        self.epoch = epoch
        self.blocks = blocks
        self.limits = limits
        self.prefix_cacheable = prefix_cacheable  # the worker's model allows it (see WorkerReady)
        blocks.set_caching(limits.prefix_caching and prefix_cacheable)
        self.counts = counts if counts is not None else CacheCounts()
        self.steps = steps if steps is not None else StepCounts()
        self.preemptions = 0
        self.deferred = 0  # admissions put off for a prefix another sequence was computing
        self.context_length = context_length
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []  # in admission order
        self._by_request: dict[str, Sequence] = {}
        self._seq_ids = itertools.count(1)
        self._steps = itertools.count(1)
        self._in_flight: deque[tuple[int, list[_Work]]] = deque()  # (step, its work), oldest first
        self._finished_ids: list[int] = []
        self._rejected: list[tuple[int, SequenceUpdate]] = []
        self.hold = False  # admit only requests that have started (preempted ones): the worker is leaving
        # Constrained requests are admitted once the worker has compiled their constraint (a step
        # never waits for a compilation): those it has, those asked of it, those to ask.
        self._constraints_ready = _Remembered()
        self._constraints_asked = _Remembered()
        self._to_prepare: list[Constraint] = []

    # --- requests in --------------------------------------------------------------------------

    def add(self, request: ScheduleRequest, block_hashes: list[bytes] | None = None) -> None:
        """Queue a request, or answer it at once with an error (see `take_rejections`).
        `block_hashes`: those of its prompt's first full blocks, where placement made them already."""
        problem = self._refusal(request)
        if problem is not None:
            self._rejected.append((request.tokenizer, SequenceUpdate(request.request_id, [], "error", problem)))
            return
        seq = Sequence(
            seq_id=next(self._seq_ids),
            request_id=request.request_id,
            tokenizer=request.tokenizer,
            prompt_ids=list(request.prompt_ids),
            sampling=request.sampling,
            eos_token_ids=self.eos_token_ids,
            priority=request.priority,
            arrival=request.arrival,
            constraint=request.constraint,
            block_hashes=list(block_hashes or ()),
        )
        self._by_request[request.request_id] = seq
        self.waiting.append(seq)
        if request.constraint is not None:
            self.want_constraint(request.constraint)

    def want_constraint(self, constraint: Constraint) -> None:
        """Have the worker compile `constraint`, unless it was asked already (see take_preparations)."""
        if constraint not in self._constraints_asked:
            self._constraints_asked.add(constraint)
            self._to_prepare.append(constraint)

    def constraint_ready(self, constraint: Constraint) -> None:
        self._constraints_ready.add(constraint)

    def take_preparations(self) -> list[Constraint]:
        """The constraints to send the worker to compile (PrepareConstraint)."""
        taken, self._to_prepare = self._to_prepare, []
        return taken

    def _refusal(self, request: ScheduleRequest) -> ErrorInfo | None:
        if request.request_id in self._by_request:
            return ErrorInfo(400, f"request id {request.request_id!r} is already in use")
        if not request.prompt_ids:
            return ErrorInfo(400, "the prompt is empty", param="prompt")
        if request.sampling.max_tokens is None or request.sampling.max_tokens < 1:
            return ErrorInfo(400, "max_tokens must be at least 1", param="max_tokens")
        if len(request.prompt_ids) >= self.context_length:
            # Worded as the tokenizer's refusal: a request it checked against the limit of the worker
            # being replaced lands here, and its client reads the same sentence with the new limit.
            return ErrorInfo(
                400,
                f"This model's maximum context length is {self.context_length} tokens. However, your prompt has "
                f"{len(request.prompt_ids)} tokens, which leaves no room for the completion. Please shorten "
                "the prompt (or set truncate_prompt_tokens).",
                param="prompt",
            )
        if len(request.prompt_ids) + 1 > self.blocks.num_blocks * self.blocks.block_size:
            return ErrorInfo(400, "the prompt does not fit in the KV cache", param="prompt")
        if len(self.waiting) >= self.limits.max_queued_requests:
            return QUEUE_FULL
        return None

    def abort(self, request_id: str) -> None:
        """Forget a request; a step in flight for it completes, but its tokens go nowhere."""
        seq = self._by_request.pop(request_id, None)
        if seq is None:
            return
        if seq.phase is Phase.WAITING:
            self.waiting.remove(seq)
        elif seq.phase is Phase.RUNNING:
            self._retire(seq)
        seq.phase = Phase.FINISHED
        seq.finish_reason = "abort"

    def adopt(self, limits: Limits) -> None:
        """New limits from a reload: they apply from the next step (prefix caching switched off
        forgets every cached prefix at once)."""
        self.limits = limits
        if (limits.prefix_caching and self.prefix_cacheable) != self.blocks.caching:
            self.blocks.set_caching(limits.prefix_caching and self.prefix_cacheable)

    def take_rejections(self) -> list[tuple[int, SequenceUpdate]]:
        rejected, self._rejected = self._rejected, []
        return rejected

    # --- steps --------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Whether the pipeline is full: no step can be planned until one completes."""
        return len(self._in_flight) >= PIPELINE_DEPTH

    def plan(self) -> StepPlan | None:
        """The next step, or None when there is nothing to run."""
        assert not self.busy, "the pipeline is full"
        budget = self.limits.chunked_prefill_size if self.limits.chunked_prefill_size > 0 else 1 << 62
        work: list[_Work] = []
        scheduled: set[int] = set()
        for seq in list(self.running):
            if seq.phase is not Phase.RUNNING:  # preempted to make room for an older one
                continue
            if seq.ends_in_flight(self.context_length):
                continue
            pending = seq.unplanned
            tokens = 1 if pending == 1 else min(pending, budget)  # decodes never wait for budget
            if tokens <= 0 or not self._make_room(seq, seq.planned + tokens, scheduled):
                continue
            work.append(_Work(seq, tokens, tokens == pending))
            scheduled.add(seq.seq_id)
            budget -= tokens
        computing = self._blocks_being_computed()  # grows with each admission below
        for seq in admission_order(self.waiting, self.limits.policy):
            if self.hold and not seq.output_ids:
                continue
            if seq.constraint is not None and seq.constraint not in self._constraints_ready:
                self.want_constraint(seq.constraint)  # asked already, unless forgotten since
                continue
            if budget <= 0 or len(self.running) >= self.limits.max_running_requests:
                break
            cached = self._cached_prefix(seq)
            if computing and len(cached) < len(seq.block_hashes) and seq.block_hashes[len(cached)] in computing:
                # a running sequence is computing this prompt's next blocks: admitted once they are
                # cached (a step or two), it takes them instead of computing them again. Requests
                # arriving together with one system prompt prefill it once, not once each.
                self.deferred += 1
                continue
            if not self._admit(seq, cached):
                break  # the best candidate does not fit: wait for room rather than overtake it
            self.waiting.remove(seq)
            self.running.append(seq)
            seq.phase = Phase.RUNNING
            computing |= self._blocks_to_compute(seq)
            tokens = min(seq.pending, budget)
            work.append(_Work(seq, tokens, tokens == seq.pending))
            budget -= tokens
        if not work:
            return None
        chunks = [self._chunk(w) for w in work]  # before the counts below move on
        for w in work:
            w.seq.in_flight += w.tokens
            w.seq.samples_in_flight += w.sample
        step = next(self._steps)
        self._in_flight.append((step, work))
        finished, self._finished_ids = self._finished_ids, []
        return StepPlan(step=step, scheduler_epoch=self.epoch, chunks=chunks, finished=finished)

    def _chunk(self, work: _Work) -> PlannedChunk:
        seq, start = work.seq, work.seq.planned
        # past the known tokens: the one the step in flight samples
        token_ids = seq.token_ids[start : start + work.tokens] if start < seq.length else [SAMPLED_LAST_STEP]
        table = list(self.blocks.table(seq.seq_id))
        prompt_ids = None
        if seq.prompt_unsent:  # the worker counts what the sequence has seen from its prompt on
            prompt_ids, seq.prompt_unsent = seq.prompt_ids, False
        constraint = None
        if seq.constraint_unsent:  # sent with each admission: a worker that has the matcher keeps it
            constraint, seq.constraint_unsent = seq.constraint, False
        # prompt logprobs: reported by the prompt's first computation (a preemption before its
        # first token starts it again from position 0: complete() keeps what was reported once)
        score = seq.sampling.prompt_logprobs is not None and not seq.output_ids and start < len(seq.prompt_ids)
        work.scores_from = max(start, 1) if score else None
        return PlannedChunk(
            seq.seq_id, token_ids, start, table, work.sample, seq.sampling, prompt_ids, score, constraint
        )

    def complete(self, result: StepResult) -> dict[int, list[SequenceUpdate]]:
        """Apply a finished step; returns the updates to send, by tokenizer worker."""
        if not self._in_flight or self._in_flight[0][0] != result.step:
            return {}  # not the step we are waiting for: a lost worker's, already failed
        _step, work = self._in_flight.popleft()
        if result.error is None:
            self.steps.add(work, result.seconds)
        updates: dict[int, list[SequenceUpdate]] = {}
        completed = set(result.completed)
        for item in work:
            seq = item.seq
            seq.in_flight -= item.tokens
            seq.samples_in_flight -= item.sample
            if seq.phase is not Phase.RUNNING:
                continue  # aborted, or ended by a token of the previous step, while this one ran
            if result.error is not None:
                self._end(seq, "error")
                error = ErrorInfo(500, f"the engine failed: {result.error}", type="server_error")
                updates.setdefault(seq.tokenizer, []).append(SequenceUpdate(seq.request_id, [], "error", error))
                continue
            if (why := result.failed.get(seq.seq_id)) is not None:
                self._end(seq, "error")
                error = ErrorInfo(500, f"the engine failed on this request: {why}", type="server_error")
                updates.setdefault(seq.tokenizer, []).append(SequenceUpdate(seq.request_id, [], "error", error))
                continue
            seq.computed += item.tokens
            self._register(seq)
            if item.scores_from is not None:
                # entries for prompt tokens scores_from.. : keep those not already reported
                known = 1 + len(seq.prompt_logprobs)  # the next token index to report
                found = result.prompt_logprobs.get(seq.seq_id, [])
                seq.prompt_logprobs += found[max(known - item.scores_from, 0) :]
            if not item.sample:
                continue
            token = result.tokens[seq.seq_id]
            seq.output_ids.append(token)
            # a grammar that is complete ends the sequence, whatever else it asked (ignore_eos)
            reason = "stop" if seq.seq_id in completed else seq.finish_reason_after(token, self.context_length)
            if reason is not None:
                self._end(seq, reason)
            # The first token's update says how much of the prompt came from the cache.
            cached = (seq.cached_tokens or 0) if len(seq.output_ids) == 1 else 0
            logprobs = [found] if (found := result.logprobs.get(seq.seq_id)) is not None else []
            scored = seq.prompt_logprobs if len(seq.output_ids) == 1 else []
            update = SequenceUpdate(
                seq.request_id, [token], reason, cached_tokens=cached, logprobs=logprobs, prompt_logprobs=scored
            )
            updates.setdefault(seq.tokenizer, []).append(update)
        return updates

    @property
    def idle(self) -> bool:
        """Nothing started is left: no step in flight, no running or preempted request."""
        return not self.running and not self._in_flight and not any(s.output_ids for s in self.waiting)

    def take_unstarted(self) -> list[ScheduleRequest]:
        """Remove and return the requests that have not started, to hand them to another batcher."""
        unstarted = [s for s in self.waiting if not s.output_ids]
        for seq in unstarted:
            self.waiting.remove(seq)
            self._by_request.pop(seq.request_id, None)
            seq.phase = Phase.FINISHED
        return [
            ScheduleRequest(s.request_id, s.tokenizer, s.prompt_ids, s.sampling, s.priority, s.arrival, s.constraint)
            for s in unstarted
        ]

    def fail_all(self, error: ErrorInfo) -> dict[int, list[SequenceUpdate]]:
        """End every request (the engine is gone): updates for their tokenizers."""
        updates: dict[int, list[SequenceUpdate]] = {}
        for seq in [*self.running, *self.waiting]:
            updates.setdefault(seq.tokenizer, []).append(SequenceUpdate(seq.request_id, [], "error", error))
            self._end(seq, "error")
        self.waiting.clear()
        self._in_flight.clear()
        return updates

    # --- the cache ----------------------------------------------------------------------------

    def _blocks_being_computed(self) -> set[bytes]:
        """The hashes of the full prompt blocks that running sequences have yet to compute (or have
        in flight): the cache will hold them after a step or two."""
        return {block for seq in self.running for block in self._blocks_to_compute(seq)}

    def _blocks_to_compute(self, seq: Sequence) -> set[bytes]:
        if not self.blocks.caching or seq.computed >= seq.length:
            return set()
        size = self.blocks.block_size
        return set(seq.block_hashes[seq.computed // size : seq.length // size])

    def prefix_on_hand(self, hashes: list[bytes], tokens: int) -> int:
        """How many leading tokens of a prompt of `tokens` tokens, whose full blocks hash to
        `hashes`, this cache holds or a running sequence is computing: what a request with that
        prompt would not compute here (placement, with several replicas)."""
        if not self.blocks.caching:
            return 0
        found = len(self.blocks.cached_prefix(hashes, tokens))
        rest = hashes[found : (tokens - 1) // self.blocks.block_size]
        computing = self._blocks_being_computed() if rest else set()
        for digest in rest:
            if digest not in computing:
                break
            found += 1
        return found * self.blocks.block_size

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks `seq`'s tokens begin with (its block hashes made first). None for a
        request that wants its prompt's logprobs: every prompt token must be computed (as in vLLM)."""
        if not self.blocks.caching or seq.sampling.prompt_logprobs is not None:
            return []
        size = self.blocks.block_size
        if len(seq.block_hashes) < seq.length // size:
            extend_hashes(seq.block_hashes, seq.token_ids, size)
        return self.blocks.cached_prefix(seq.block_hashes, seq.length)

    def _admit(self, seq: Sequence, cached: list[int]) -> bool:
        """Give `seq` the `cached` blocks of its prefix and room for the rest of its tokens and one
        more; it starts computing after the prefix. False if that does not fit."""
        if not self.blocks.can_take(seq.seq_id, cached, seq.length + 1):
            return False
        self.blocks.take(seq.seq_id, cached)
        self.blocks.grow(seq.seq_id, seq.length + 1)
        seq.computed = len(cached) * self.blocks.block_size
        seq.prompt_unsent = seq.sampling.needs_token_counts
        seq.constraint_unsent = seq.constraint is not None
        if self.blocks.caching:
            self.counts.queried += seq.length
            self.counts.hits += seq.computed
        if seq.cached_tokens is None:
            seq.cached_tokens = seq.computed
        return True

    def _register(self, seq: Sequence) -> None:
        """Make the blocks `seq` has completely computed findable by the sequences that follow."""
        if not self.blocks.caching:
            return
        size = self.blocks.block_size
        full = seq.computed // size
        if len(seq.block_hashes) < full:
            extend_hashes(seq.block_hashes, seq.tokens_until(full * size), size)
        self.blocks.register(seq.seq_id, seq.block_hashes, full)

    def _make_room(self, seq: Sequence, tokens: int, scheduled: set[int]) -> bool:
        """Grow `seq` to `tokens` cache slots, preempting others if needed; False if `seq` itself yields.

        Sequences already `scheduled` in this step are never preempted: their
        chunks would write into blocks handed to someone else in the same step.
        Nor are those with a step in flight, whose results would land on a
        sequence that has started again.
        """
        while not self.blocks.can_grow(seq.seq_id, tokens):
            candidates = [s for s in self.running if s.seq_id not in scheduled and not s.in_flight]
            if not candidates:
                return False  # room comes back when the steps in flight complete
            victim = preemption_victim(candidates, self.limits.policy)
            self._preempt(victim)
            if victim is seq:
                return False
        self.blocks.grow(seq.seq_id, tokens)
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Give `seq`'s cache back and queue it again; it is recomputed from its tokens when readmitted."""
        assert not seq.in_flight, "a sequence with a step in flight is never preempted"
        self.running.remove(seq)
        self.blocks.release(seq.seq_id)  # its full blocks stay cached: readmitted, it may find them again
        seq.computed = 0
        self.preemptions += 1
        seq.phase = Phase.WAITING
        self.waiting.insert(0, seq)

    def _end(self, seq: Sequence, reason: str) -> None:
        self._retire(seq)
        seq.phase = Phase.FINISHED
        seq.finish_reason = reason  # type: ignore[assignment]
        self._by_request.pop(seq.request_id, None)

    def _retire(self, seq: Sequence) -> None:
        """Release everything `seq` holds, and tell the workers to forget it with the next plan."""
        if seq in self.running:
            self.running.remove(seq)
        self.blocks.release(seq.seq_id)
        self._finished_ids.append(seq.seq_id)
