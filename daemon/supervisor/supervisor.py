"""The supervisor: owns the process tree. It starts the tiers, restarts the ones that die
or hang, replaces them when a reload asks, and stops them all.

One loop owns the tree (arbiter.py): signals, deaths, control messages, timers
and the steps of the procedures here (start, stop) and in a reload go through
one queue, and only that loop changes the tree. Each tier process reports
readiness over the control socket, and every start, death and drain is published to all
tiers on the events socket, so that requests in flight on a dead tier end at
once with an error instead of hanging. A tier that keeps dying is a crash loop:
the daemon stops and exits non-zero, so that systemd or Kubernetes restart the
whole.

This file is the lifecycle's procedures (start, stop) and the primitives the
loop uses to start and stop a tier. Beside it: arbiter.py (the loop: deaths,
restarts, hangs, the watchdog, reload requests), process.py (one process:
Child, its socket, kill), replace.py (replacing a tier during a reload),
replicas.py (the model's data-parallel replicas and their rolling replacement),
control.py (the control and events sockets), status.py (status.json, tier
events), liveness.py (heartbeats), reload.py (the reload transaction).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import time

import structlog
import zmq
import zmq.asyncio

from daemon.config import LoadedConfig
from daemon.config.handoff import GENERATION_VAR, write_config
from daemon.config.schema import DaemonSettings
from daemon.engine.demo_spec import DEMO_MODEL_REF, demo_model_dir
from daemon.ipc.endpoints import LISTEN_FD_VAR, PARENT_PID_VAR, RUNTIME_DIR_VAR, Endpoints
from daemon.ipc.sockets import configure
from daemon.logs import configure_logging, set_generation
from daemon.supervisor import notify, probe
from daemon.supervisor.arbiter import Arbiter, Signalled
from daemon.supervisor.control import ControlChannel
from daemon.supervisor.liveness import Heartbeats
from daemon.supervisor.process import (
    STARTUP_TIMEOUT_S,
    STOP_GRACE_S,
    Child,
    StartupFailed,
    address,
    first_of,
    listen,
)
from daemon.supervisor.reload import Reloader
from daemon.supervisor.replace import TierReplacement
from daemon.supervisor.replicas import Replicas, SchedulerNews, replica_devices
from daemon.supervisor.runtime_dir import create_socket_dir
from daemon.supervisor.status import StatusReports
from daemon.tier import BESIDE_VAR, EPOCH_VAR, SPAWNER_VAR, STOP_SIGNAL

log = structlog.get_logger("daemon.supervisor")

FIRST_GENERATION_TIMEOUT_S = 120.0
RELOAD_END_GRACE_S = 15.0  # a reload in progress at a stop ends within runtime.drain_timeout_s plus this
REFUSE_AFTER_S = 1.0  # how long a stopping front-end's workers may take to stop accepting

EXIT_OK, EXIT_FAILED = 0, 1


class Supervisor(Arbiter, TierReplacement, Replicas, ControlChannel, StatusReports):
    def __init__(self, config: LoadedConfig, sources: dict | None = None):
        self.config = config
        # How `config` was read (env file, --set): a reload reads the file again the same way.
        self.sources = {"environ": dict(os.environ), **(sources or {})}
        self.generation = 1
        set_generation(self.generation)
        settings = config.settings
        self.settings = settings
        self.socket_dir, self._lock = create_socket_dir(settings.runtime.dir, os.getpid())
        write_config(settings, self.socket_dir, self.generation)
        self.endpoints = Endpoints(self.socket_dir)
        self.context = zmq.asyncio.Context()
        self.control = configure(self.context.socket(zmq.ROUTER), zmq.ROUTER)
        self.control.bind(self.endpoints.control)
        self.events = configure(self.context.socket(zmq.PUB), zmq.PUB)
        self.events.bind(self.endpoints.events)
        # Node 0 (the head) runs every tier; any other node of a model spread over several runs
        # only its worker, which holds its share of the head's tensor-parallel group.
        self.head = settings.distributed.node_rank == 0
        self.children = [
            *(Child("worker", i, "daemon.worker") for i in range(settings.model.dp_size)),  # one per replica
            Child("scheduler", 0, "daemon.scheduler"),
            *(Child("tokenizer", i, "daemon.tokenizer") for i in range(settings.tokenizer.workers)),
            Child("frontend", 0, "daemon.frontend", expected_workers=settings.server.workers),
        ][: None if self.head else 1]
        self.stopping = asyncio.Event()
        self.fatal: str | None = None
        self.started = time.time()
        self.serving = asyncio.Event()  # the first generation went through: reloads may start
        self.listener: socket.socket | None = None
        self.listener_address: tuple[str, int, int] | None = None  # (host, port, backlog) it is bound with
        self._applied: dict[int, set[int]] = {}  # generation -> PIDs that acknowledged it
        self._acknowledged = asyncio.Event()
        self.idle = SchedulerNews()  # (replica, worker epoch) the scheduler said idle (epoch 0: the one held)
        self.joined = SchedulerNews()  # (replica, worker epoch) the scheduler drives
        self._worker_epoch = 0  # the last worker started, of any replica
        self.heartbeats = Heartbeats()
        self.reloader = Reloader(self)
        self._init_arbiter()

    # --- the whole life -----------------------------------------------------------------------

    async def run(self) -> int:
        self._start_arbiter()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # handled by the loop, in turn
            loop.add_signal_handler(signum, self.inbox.put_nowait, Signalled(signum))
        reader = asyncio.create_task(self._read_control())
        ticker: asyncio.Task | None = None
        self.reloader.follow_settings()  # a change seen while starting applies once serving
        try:
            await (self._start_head() if self.head else self._start_node())
            ticker = asyncio.create_task(self._tick())
            await self.stopping.wait()
        except StartupFailed as exc:
            if not self.stopping.is_set():
                await self.owned(self.give_up, str(exc))
        finally:
            notify.stopping("stopping: draining requests in flight")
            self.reloader.stop_watching()
            await self.owned(self._next_reload)  # those asked for while starting: rejected now
            # A reload in progress ends first (early: a tier it starts now is abandoned, a drain it
            # began runs its course) and reports; reloads asked for meanwhile are rejected.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.runtime.drain_timeout_s + RELOAD_END_GRACE_S):
                    await self._reloads_idle.wait()
            await self._stop_all()  # the loop still runs: a tier dying in the drain is announced
            for task in (ticker, reader, self._reload_running, self._arbiter, *self._exit_waiters):
                if task is not None:
                    task.cancel()
            if self.listener is not None:
                self.listener.close()
            self.context.destroy(linger=0)
            shutil.rmtree(self.socket_dir, ignore_errors=True)
        if self.fatal:
            log.error("daemon.failed", reason=self.fatal)
            return EXIT_FAILED
        log.info("daemon.stopped")
        return EXIT_OK

    async def _start_head(self) -> None:
        """Node 0 (or the only one): every tier, serving once a token went through them all."""
        # The port first (the likeliest failure, and the cheapest); then every tier at once: each
        # finds its peers over sockets that connect whenever the other end comes up, as it does
        # when one of them restarts.
        await self.owned(self._listen)
        # one worker builds it: several at once would race to write one directory
        builder = [self._child("worker", 0)] if _demo_to_build(self.settings) else []
        for group in (builder, [c for c in self.children if c not in builder]):
            for child in group:
                await self.owned(self._start, child)
            await self._all_ready(group)
        for child in self.children:
            await self.owned(self._supervise, child)
        await self._first_generation()
        await self.owned(self._now_serving)

    async def _start_node(self) -> None:
        """A node other than the head: its worker, restarted until it has joined the head's group
        (which may not be up yet, or may run another config until its own reload)."""
        worker = self._child("worker")
        await self.owned(self._start, worker)
        await self.owned(self._supervise, worker)
        await first_of(None, ready=worker.ready.wait(), stopping=self.stopping.wait())  # type: ignore[arg-type]
        if worker.ready.is_set():
            await self.owned(self._now_serving)
            nodes = self.settings.distributed
            log.info("daemon.ready", node=nodes.node_rank, head=nodes.dist_init_addr)

    def _listen(self) -> None:
        self.listener = listen(self.settings.server)
        self.listener_address = address(self.settings.server)

    def _now_serving(self) -> None:
        self.serving.set()
        notify.ready(self.status_line())
        self._ping_watchdog()  # from READY=1 on, not a tick later
        self._next_reload()  # a change seen while starting

    # --- starting -----------------------------------------------------------------------------

    async def _start(
        self,
        child: Child,
        generation: int | None = None,
        listener: socket.socket | None = None,
        *,
        beside: bool = False,
    ) -> None:
        """Start `child` with the config of `generation` (the running one by default); a
        front-end serves from `listener` (the daemon's by default); `beside`: a worker starting
        beside the running one."""
        if child.tier == "worker":  # several run at once (replicas, blue-green): a worker's epoch is never reused
            child.epoch = max(child.epoch, self._worker_epoch)
        child.epoch += 1
        if child.tier == "worker":
            self._worker_epoch = child.epoch
        child.generation = child.started_generation = generation or self.generation
        child.ready.clear()
        child.exit_handled = False
        child.model = None  # until this process reports what it loaded
        env = {
            **{k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
            PARENT_PID_VAR: str(os.getpid()),
            SPAWNER_VAR: str(os.getpid()),
            RUNTIME_DIR_VAR: str(self.settings.runtime.dir),
            EPOCH_VAR: str(child.epoch),
            GENERATION_VAR: str(child.generation),
        }
        if beside:
            env[BESIDE_VAR] = "1"
        if child.tier == "worker":
            settings = self.settings_of(child.generation)
            env.update(replica_devices(settings, child.index, os.environ.get("CUDA_VISIBLE_DEVICES")))
        inherited: tuple[int, ...] = ()
        if child.tier == "frontend":
            listener = listener or self.listener
            env[LISTEN_FD_VAR] = str(listener.fileno())
            inherited = (listener.fileno(),)
            child.listener, child.serving_workers = listener, set()
        child.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            child.module,
            str(child.index),
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # a terminal's ^C reaches only us
            pass_fds=inherited,
        )
        self._wait_for_exit(child)
        self._publish(child, "starting")
        log.info(
            "tier.started",
            tier=child.tier,
            index=child.index,
            child_pid=child.pid,
            epoch=child.epoch,
            child_generation=child.generation,
        )

    async def _all_ready(self, children: list[Child]) -> None:
        """Until every one of `children` is ready; the first StartupFailed, the others no longer awaited."""
        waits = [asyncio.create_task(self._until_ready(child)) for child in children]
        try:
            for ready in asyncio.as_completed(waits):
                await ready
        finally:
            for wait in waits:
                wait.cancel()

    async def _until_ready(self, child: Child) -> None:
        """Wait for `child` to be ready (the loop marks it, and publishes it up); StartupFailed if it
        dies, times out, or we are told to stop."""
        process = child.process
        assert process is not None
        first = await first_of(
            STARTUP_TIMEOUT_S[child.tier],
            ready=child.ready.wait(),
            exited=process.wait(),
            stopping=self.stopping.wait(),
        )
        if not child.ready.is_set():
            if first == "exited":
                raise StartupFailed(f"{child.name} exited with status {process.returncode} while starting")
            if first == "stopping":
                raise StartupFailed("stopped while starting")
            raise StartupFailed(f"{child.name} was not ready within {STARTUP_TIMEOUT_S[child.tier]:.0f} s")

    async def _first_generation(self) -> None:
        """Log the one 'ready' line once a real token has gone through every tier."""
        server = self.settings.server
        deadline = time.monotonic() + FIRST_GENERATION_TIMEOUT_S
        while not server.tls.verify_client:
            status = await probe.http_status(server, "/health_generate", timeout=30.0)
            if status == 200:
                break
            if time.monotonic() > deadline:
                raise StartupFailed("no generation went through the tiers in time")
            if self.stopping.is_set():
                return
            await asyncio.sleep(0.1)
        log.info("daemon.ready", url=probe.base_url(server), model=self.settings.model.served_model_name)

    # --- reload mechanics (the transaction is in reload.py) -------------------------------------

    def adopt(self, config: LoadedConfig, generation: int) -> None:
        """Make `config` the running one, as `generation`."""
        logging = config.settings.logging
        if (logging.level, logging.format) != (self.settings.logging.level, self.settings.logging.format):
            configure_logging("supervisor", level=logging.level, fmt=logging.format)
        self.config, self.settings, self.generation = config, config.settings, generation
        set_generation(generation)
        self.write_status()

    def _child(self, tier: str, index: int = 0) -> Child:
        return next(c for c in self.children if (c.tier, c.index) == (tier, index))

    def remove_sockets(self, child: Child) -> None:
        """The socket files `child` bound that no successor binds again: gone with it."""
        for path in self.endpoints.bound_by(child.tier, epoch=child.epoch, frontend_workers=child.serving_workers):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # --- stopping -----------------------------------------------------------------------------

    async def _stop_all(self) -> None:
        """Drain the front-end (in-flight requests finish), then stop the back-end tiers."""
        frontends = [c for c in self.children if c.tier == "frontend"]
        for child in frontends:
            await self.owned(self._publish, child, "draining")
        refuse = asyncio.create_task(self._refuse_new_connections(self.listener))
        await self._terminate(frontends, signal.SIGTERM, self.settings.runtime.drain_timeout_s + STOP_GRACE_S)
        refuse.cancel()
        back = [c for c in self.children if c.tier != "frontend"]
        await self._terminate(list(reversed(back)), STOP_SIGNAL, STOP_GRACE_S)

    @staticmethod
    async def _refuse_new_connections(listener: socket.socket | None) -> None:
        """Shut `listener` once the stopping front-end's workers no longer accept from it: new
        connections are then refused at once rather than queued until the drain ends.

        Not at once: a Granian worker still accepting when its socket shuts cannot stop gracefully.
        The workers keep the socket open until they exit, so time is the only sign to go by."""
        await asyncio.sleep(REFUSE_AFTER_S)
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)

    async def _terminate(self, children: list[Child], signum: int, grace: float) -> None:
        running = [c for c in children if c.process is not None and c.process.returncode is None]
        for child in running:
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signum)  # type: ignore[union-attr]
        for child in running:
            process = child.process
            assert process is not None
            try:
                async with asyncio.timeout(grace):
                    await process.wait()
            except TimeoutError:
                log.warning("tier.killed", tier=child.tier, index=child.index, child_pid=child.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)  # the tier and whatever it started
                await process.wait()
            await self.owned(self._publish, child, "stopped")
            log.info("tier.stopped", tier=child.tier, index=child.index, status=process.returncode)


def _demo_to_build(settings: DaemonSettings) -> bool:
    """Whether the built-in demo model is used and not built yet: the worker builds it, and the
    tiers that read it (the tokenizer) start once it is up."""
    used = DEMO_MODEL_REF in (settings.model.path, settings.tokenizer.path or settings.model.path)
    return used and not demo_model_dir(settings.runtime.cache_dir).is_dir()
