"""The worker process: load the model, size the KV cache, run the scheduler's steps.

One worker per model replica; with model.tp_size > 1 it is rank 0 of a
tensor-parallel group and starts the other ranks itself (tensor_group.py). It
binds the `worker` endpoint of its epoch, announces itself to the scheduler
with its cache size, and then executes step plans as they come, one at a time.
Started beside a running worker (a blue-green reload), it first checks that it
fits in the memory left (see memory.py).
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import time
from pathlib import Path

import msgspec
import structlog
import zmq

from daemon.config.schema import DaemonSettings
from daemon.engine.blocks import BLOCK_SIZE
from daemon.engine.grammar import LazyCompiler, compiler_for_dir, eos_token_ids
from daemon.engine.locate import locate_model, served_context
from daemon.engine.model_dir import inspect_model_dir
from daemon.engine.parallel import SINGLE, Parallel, join_group
from daemon.engine.runner import ModelRunner, SequenceChunk, resolve_device
from daemon.engine.warm_up import WarmUp, blocks_needed, largest_step, prompt_end, warm_up
from daemon.ipc.heartbeat import Pulse
from daemon.ipc.messages import (
    Broadcast,
    ConfigApplied,
    ConfigUpdate,
    Constraint,
    ConstraintReady,
    LoadedModel,
    ModelRank,
    PrepareConstraint,
    StepPlan,
    TierReady,
    ToWorker,
    WorkerReady,
)
from daemon.ipc.sockets import READY_GRACE_MS, PeerGone, Receiver, open_socket, send
from daemon.tier import Tier
from daemon.worker.execute import NOT_SAMPLED, engine_constraint, execute
from daemon.worker.memory import CacheAllocationFailed, cache_blocks, check_room_beside, gib, weights_size
from daemon.worker.nodes import gather, node_layout
from daemon.worker.tensor_group import (
    COLLECTIVE_TIMEOUT_S,
    KEEPALIVE_S,
    NODES_KEEPALIVE_S,
    TCP,
    Followers,
    GroupBroken,
    device_type,
    group_ranks,
    init_method,
    lead,
    meeting_place,
)

log = structlog.get_logger("daemon.worker")
ANNOUNCE_INTERVAL_S = 1.0  # how often an idle worker tells the scheduler it is there
FIRST_ANNOUNCE_WAIT_MS = 2000  # at most this long for the path to the scheduler before the first


def cpu_threads(configured: int | None) -> int:
    """Engine threads on CPU: what model.cpu_threads says, else all CPUs but two for the other tiers."""
    return configured or max(1, len(os.sched_getaffinity(0)) - 2)


def load_runner(
    settings: DaemonSettings, *, beside: bool = False, parallel: Parallel = SINGLE
) -> tuple[ModelRunner, LoadedModel]:
    """The model with its KV cache, and where it came from and the context it serves. `beside`:
    another worker runs (NoRoomBeside if this one would not fit beside it). `parallel`: this
    process's rank of a tensor-parallel group (every rank of it calls this at once)."""
    import torch

    from daemon.engine.kv_cache import KVCache

    # CUDA runs ignore it; the ranks of a group, and the replicas, on one machine share its CPUs
    processes = node_layout(settings).per_node * settings.model.dp_size
    torch.set_num_threads(max(1, cpu_threads(settings.model.cpu_threads) // processes))

    model_dir = locate_model(settings.model.path, settings.runtime.cache_dir, build=True)
    context = served_context(inspect_model_dir(model_dir), settings.model.context_length)
    if beside:
        check_room_beside(settings, weights_size(model_dir), resolve_device(settings.model.device).type)
    probe = ModelRunner(
        model_dir,
        num_blocks=1,
        device=settings.model.device,
        dtype=settings.model.dtype,
        max_positions=context,
        seed=settings.model.seed,
        parallel=parallel,
    )
    warmed = _warm_up(probe, settings, context)
    model = probe.model
    per_token = KVCache.bytes_per_token(model.num_layers, model.num_kv_heads, model.head_dim, probe.dtype)
    blocks = cache_blocks(settings, per_token, context, probe.device.type, warmed.peak_bytes)
    blocks = parallel.fewest(blocks)  # every rank holds it
    size = blocks * BLOCK_SIZE * per_token
    if beside:
        check_room_beside(settings, size, probe.device.type, what="the KV cache")
    try:
        probe.resize_cache(blocks)
    except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        raise CacheAllocationFailed(
            f"the KV cache of {blocks * BLOCK_SIZE} tokens ({gib(size)}) could not be allocated on "
            f"{probe.device.type}: {str(exc).splitlines()[0]}; lower scheduler.max_total_tokens"
        ) from None
    if probe.device.type == "cuda" and parallel.size == 1 and not settings.model.enforce_eager:
        probe.use_decode_graphs(settings.scheduler.max_running_requests, capture=True)
    log.info(
        "worker.warmed_up",
        tokens=warmed.tokens,
        sequences=warmed.sequences,
        step_peak_mib=round(warmed.peak_bytes / 2**20, 1) if warmed.peak_bytes is not None else None,
        seconds=warmed.seconds,
        cache_tokens=blocks * BLOCK_SIZE,
        decode_graphs=probe.graphs is not None,
    )
    return probe, LoadedModel(str(model_dir.resolve()), context, vocab_size=probe.vocab_size)


def _warm_up(runner: ModelRunner, settings: DaemonSettings, context: int) -> WarmUp:
    """Run the largest step the scheduler may plan, over a cache just large enough for it, and
    measure its transient memory; the cache is then freed (engine/warm_up.py)."""
    import torch

    scheduler = settings.scheduler
    tokens, sequences = largest_step(scheduler.max_running_requests, scheduler.chunked_prefill_size, context)
    end = prompt_end(runner, tokens, sequences, context)
    try:
        runner.resize_cache(blocks_needed(sequences, BLOCK_SIZE, end))
        warmed = warm_up(runner, tokens, sequences, end)
    except (RuntimeError, MemoryError) as exc:
        # Only a lack of memory is the step's size: a collective that failed (a rank of the group
        # gone) is a RuntimeError too, and must not read as "lower chunked_prefill_size"
        if not _out_of_memory(exc):
            raise
        raise CacheAllocationFailed(
            f"a step of {tokens} tokens over {sequences} sequences (scheduler.chunked_prefill_size, "
            f"scheduler.max_running_requests) does not fit on {runner.device.type}: "
            f"{str(exc).splitlines()[0]}; lower them, or model.context_length"
        ) from None
    runner.resize_cache(1)
    if runner.device.type == "cuda":  # what the warm-up's cache and steps took goes back to the device
        torch.cuda.empty_cache()
    return warmed


def _out_of_memory(exc: BaseException) -> bool:
    """Whether torch (CUDA's allocator, or the CPU's: a RuntimeError that says so) ran out of memory."""
    import torch

    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(exc)


class WorkerService:
    def __init__(self, tier: Tier, *, beside: bool = False):
        self.tier = tier
        settings = tier.settings
        self.followers: Followers | None = None
        self.parallel = SINGLE
        self.other_nodes: list[ModelRank] = []  # the ranks the other nodes hold (distributed.nnodes > 1)
        self._last_order = time.monotonic()  # when the other ranks last heard from this one
        self._keepalive_s = NODES_KEEPALIVE_S if settings.distributed.nnodes > 1 else KEEPALIVE_S
        try:
            if settings.model.tp_size > 1:
                self._start_group(settings)
            self.runner, self.model = load_runner(settings, beside=beside, parallel=self.parallel)
            pids = [os.getpid(), *(self.followers.pids if self.followers else [])]
            ranks = group_ranks(settings, self.runner.device, pids) + self.other_nodes
            self.model = msgspec.structs.replace(self.model, ranks=ranks)
        except BaseException:
            if self.followers is not None:
                self.followers.stop()
            raise
        tokenizer_ref = settings.tokenizer.path or settings.model.path
        tokenizer_dir = locate_model(tokenizer_ref, settings.runtime.cache_dir, build=False)
        model_dir = Path(self.model.directory)
        # Made on a thread when the first constrained request is announced (PrepareConstraint), not
        # at start: importing xgrammar takes seconds of CPU that unconstrained serving never needs.
        self.grammars = LazyCompiler(
            functools.partial(compiler_for_dir, tokenizer_dir, self.runner.vocab_size, eos_token_ids(model_dir))
        )
        self.runner.enable_grammars(self.grammars)
        self.context = self.model.max_model_len
        self.num_blocks = self.runner.cache.num_blocks
        context = zmq.Context()
        endpoints = tier.endpoints
        self.plans = Receiver(open_socket(context, zmq.PULL, bind=endpoints.worker(tier.epoch)), ToWorker)
        self.scheduler = open_socket(context, zmq.PUSH, connect=endpoints.scheduler)
        self.control = open_socket(context, zmq.DEALER, connect=endpoints.control)
        self.pulse = Pulse(self.control, tier.role, tier.index)
        self.events = Receiver(open_socket(context, zmq.SUB, connect=endpoints.events), Broadcast)
        self.poller = zmq.Poller()
        self.poller.register(self.plans.socket, zmq.POLLIN)
        self.poller.register(self.events.socket, zmq.POLLIN)
        self.scheduler_epoch: int | None = None
        # constraints compiled on the grammar thread, to announce from this one (sockets are not
        # for two threads): a pipe wakes the loop
        self._compiled: queue.SimpleQueue[Constraint] = queue.SimpleQueue()
        self._compiled_read, self._compiled_write = os.pipe()
        os.set_blocking(self._compiled_read, False)
        self.poller.register(self._compiled_read, zmq.POLLIN)

    def _start_group(self, settings: DaemonSettings) -> None:
        """Start this node's other ranks and join them (and, over several nodes, the other nodes'
        ranks, once each arrived with the same config: nodes.py); the model is found (the demo model
        built) first, so that they find it there."""
        locate_model(settings.model.path, settings.runtime.cache_dir, build=True)
        layout = node_layout(settings)
        if layout.nnodes == 1:
            group = init_method(self.tier.endpoints.directory, self.tier.epoch)
            with contextlib.suppress(FileNotFoundError):  # a file store left by a group that died
                os.unlink(group.removeprefix("file://"))
            # The ranks all run here: gloo connects them over loopback, rather than over the address
            # the host name resolves to, which a container may not even have. Inherited by the followers.
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        else:
            group = TCP + str(settings.distributed.dist_init_addr)
        meeting = meeting_place(group, 0)  # over several nodes: the store, served from here
        if layout.per_node > 1:
            self.followers = Followers(layout.ranks[1:], group, self.tier.index)
        if layout.nnodes > 1:
            self.other_nodes = gather(meeting, settings)  # type: ignore[arg-type]
        self.parallel = join_group(
            0, settings.model.tp_size, meeting, device_type=device_type(settings), timeout_s=COLLECTIVE_TIMEOUT_S
        )

    def run(self) -> None:
        try:
            self._serve()
        finally:
            if self.followers is not None:
                self.followers.stop()

    def _serve(self) -> None:
        tier = self.tier
        log.info(
            "worker.ready",
            architecture=self.runner.family.model_class,
            device=str(self.runner.device),
            dtype=str(self.runner.dtype),
            # where the engine's CPU kernel was not built (no C compiler at install), decodes
            # attend through torch over copied blocks: slower, and said here
            attention="paged kernel" if self.runner.cache.keys_transposed else "torch over gathered blocks",
            cache_tokens=self.num_blocks * BLOCK_SIZE,
            context=self.context,
            ranks=[(r.rank, r.pid, r.device, r.node) for r in self.model.ranks] if self.parallel.size > 1 else None,
        )
        send(self.control, TierReady(tier.role, tier.index, os.getpid(), self.model), READY_GRACE_MS)
        # The first announcement must not be lost to a connection still being made: the
        # scheduler, holding requests for us, would wait a whole interval for the next one.
        self.scheduler.poll(FIRST_ANNOUNCE_WAIT_MS, zmq.POLLOUT)
        announced = 0.0
        while True:
            if time.monotonic() - announced >= ANNOUNCE_INTERVAL_S:
                self._announce()
                announced = time.monotonic()
            self.pulse.beat()
            ready = dict(self.poller.poll(int(ANNOUNCE_INTERVAL_S * 1000)))
            if self.parallel.size > 1 and time.monotonic() - self._last_order >= self._keepalive_s:
                self._order(None)
            if self.events.socket in ready:
                for event in self.events.recv_ready():
                    if isinstance(event, ConfigUpdate):  # nothing of the worker's is live but its logging
                        tier.adopt(event.generation)
                        send(self.control, ConfigApplied(tier.role, tier.index, os.getpid(), event.generation))
            if self.plans.socket in ready:
                for plan in self.plans.recv_ready():
                    if isinstance(plan, StepPlan):
                        self._run(plan)
                    elif isinstance(plan, PrepareConstraint):
                        self._prepare(plan.constraint)
            if self._compiled_read in ready:
                self._announce_compiled()

    def _run(self, plan: StepPlan) -> None:
        if plan.scheduler_epoch != self.scheduler_epoch:
            self.runner.forget_all()  # a new scheduler: sequence ids start again
            self.scheduler_epoch = plan.scheduler_epoch
        # the other ranks run the same step, on the same chunks
        share = self._order if self.parallel.size > 1 else None
        result = execute(self.runner, plan, self.tier.epoch, share=share)
        if result.error:
            log.error("worker.step_failed", step=plan.step, error=result.error)
            if self.parallel.size > 1:
                # Most likely a rank is gone (its collective failed), and either way the ranks may
                # have stopped at different collectives: the group ends, unreported, and the
                # scheduler ends its requests as for any lost worker (503), as when rank 0 dies.
                raise GroupBroken(f"step {plan.step} failed: {result.error}")
        for seq_id, why in result.failed.items():  # a sequence skipped after its failure is no news
            (log.debug if why == NOT_SAMPLED else log.error)(
                "worker.sequence_failed", step=plan.step, seq_id=seq_id, error=why
            )
        try:
            send(self.scheduler, result)
        except PeerGone:
            log.warning("worker.scheduler_gone", step=plan.step)

    def _order(self, chunks: list[SequenceChunk] | None) -> None:
        """Send the other ranks a step's chunks (None: a keep-alive)."""
        try:
            lead(self.parallel, chunks)
        except RuntimeError as exc:  # gloo's, when a rank is gone
            raise GroupBroken(f"the other ranks cannot be reached: {exc}") from None
        self._last_order = time.monotonic()

    def _prepare(self, constraint: Constraint) -> None:
        def then() -> None:  # on the grammar thread
            self._compiled.put(constraint)
            os.write(self._compiled_write, b"\0")

        self.grammars.prepare(engine_constraint(constraint), then)

    def _announce_compiled(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._compiled_read, 4096):
                pass
        while not self._compiled.empty():
            with contextlib.suppress(PeerGone):  # a scheduler that left asks again when it is back
                send(self.scheduler, ConstraintReady(self.tier.epoch, self._compiled.get_nowait()))

    def _announce(self) -> None:
        ready = WorkerReady(
            self.tier.epoch,
            self.num_blocks,
            BLOCK_SIZE,
            self.context,
            prefix_cacheable=self.runner.prefix_cacheable,
            replica=self.tier.index,  # its data-parallel replica (model.dp_size)
        )
        with contextlib.suppress(PeerGone):  # no scheduler yet: it will hear the next announcement
            send(self.scheduler, ready)
