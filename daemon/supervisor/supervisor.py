"""The supervisor: starts the tiers in order, restarts the ones that die, and stops them all.

One asyncio loop owns the process tree. Signals only set events on it (no work
in signal handlers). Each tier process reports readiness over the control
socket (the front-end over HTTP), and every start, death and drain is
published to all tiers on the events socket, so that requests in flight on a
dead tier end at once with an error instead of hanging. A tier that keeps
dying is a crash loop: the daemon stops and exits non-zero, so that systemd or
Kubernetes restart the whole.
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
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field

import msgspec
import structlog
import zmq
import zmq.asyncio

from daemon.config import LoadedConfig
from daemon.config.handoff import GENERATION_VAR, write_config
from daemon.config.schema import DaemonSettings, ServerSettings
from daemon.engine.demo_spec import DEMO_MODEL_REF, demo_model_dir
from daemon.ipc.endpoints import LISTEN_FD_VAR, PARENT_PID_VAR, RUNTIME_DIR_VAR, STATUS_FILE, Endpoints
from daemon.ipc.heartbeat import HEARTBEAT_INTERVAL_S
from daemon.ipc.messages import (
    ConfigApplied,
    ConfigUpdate,
    DaemonStatus,
    EngineBeside,
    EngineHold,
    EngineHoldAbandoned,
    EngineIdle,
    FrontendRetiring,
    FrontendWorkerReady,
    Heartbeat,
    LoadedModel,
    ReloadCommand,
    ReloadReport,
    TierEvent,
    TierReady,
    TierStatus,
    ToSupervisor,
    encode,
)
from daemon.ipc.sockets import Receiver, configure
from daemon.logs import configure_logging, set_generation
from daemon.supervisor import notify, probe
from daemon.supervisor.liveness import Heartbeats
from daemon.supervisor.reload import Reloader, TierStartFailed
from daemon.supervisor.runtime_dir import create_socket_dir
from daemon.tier import BESIDE_VAR, EPOCH_VAR, EXIT_NO_ROOM_BESIDE, SPAWNER_VAR, STOP_SIGNAL

log = structlog.get_logger("daemon.supervisor")

STARTUP_TIMEOUT_S = {"worker": 900.0, "scheduler": 60.0, "tokenizer": 120.0, "frontend": 60.0}
FIRST_GENERATION_TIMEOUT_S = 120.0
CRASH_LOOP_RESTARTS = 5  # this many restarts of one tier process ...
CRASH_LOOP_WINDOW_S = 60.0  # ... within this many seconds: give up
BACKOFF_MAX_S = 8.0
STOP_GRACE_S = 5.0  # after SIGTERM, how long a back-end tier may take before SIGKILL
SILENT_FOR_WATCHDOG_S = 5.0  # a tier silent this long (or a watchdog interval, if longer) stops the pings
RELOAD_END_GRACE_S = 15.0  # a reload in progress at a stop ends within runtime.drain_timeout_s plus this
REFUSE_AFTER_S = 1.0  # how long a stopping front-end's workers may take to stop accepting
HANDOVER_CLOSE_S = 1.0  # answers with Connection: close from the old front-end before it stops
HANDOVER_SETTLE_S = 0.3  # after a new front-end's workers report, before the old one stops accepting

EXIT_OK, EXIT_FAILED = 0, 1


class StartupFailed(Exception):
    pass


@dataclass
class Child:
    tier: str
    index: int
    module: str
    epoch: int = 0
    state: str = "starting"
    since: float = field(default_factory=time.time)
    process: asyncio.subprocess.Process | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    restarts: deque[float] = field(default_factory=deque)
    generation: int = 1  # the config generation it runs
    retiring: bool = False  # stopped on purpose (a reload replaces it): not to be restarted
    deaths: int = 0
    serving_workers: set[int] = field(default_factory=set)  # a front-end's Granian workers that are up
    expected_workers: int = 1
    listener: socket.socket | None = None  # a front-end's listening socket
    model: LoadedModel | None = None  # a worker's, from its TierReady
    hung: bool = False  # declared hung and killed; true until its process is reaped

    @property
    def name(self) -> str:
        return f"{self.tier}-{self.index}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None


class Supervisor:
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
        self.children = [
            Child("worker", 0, "daemon.worker"),
            Child("scheduler", 0, "daemon.scheduler"),
            *(Child("tokenizer", i, "daemon.tokenizer") for i in range(settings.tokenizer.workers)),
            Child("frontend", 0, "daemon.frontend", expected_workers=settings.server.workers),
        ]
        self.stopping = asyncio.Event()
        self.fatal: str | None = None
        self.started = time.time()
        self.serving = asyncio.Event()  # the first generation went through: reloads may start
        self.listener: socket.socket | None = None
        self.listener_address: tuple[str, int, int] | None = None  # (host, port, backlog) it is bound with
        self._watchers: list[asyncio.Task] = []
        self._applied: dict[int, set[int]] = {}  # generation -> PIDs that acknowledged it
        self._acknowledged = asyncio.Event()
        self._engine_idle = asyncio.Event()
        self._idle_epochs: set[int] = set()  # workers the scheduler said idle (0: the one held)
        self._worker_epoch = 0  # the last worker started
        self.heartbeats = Heartbeats()
        self.reloader = Reloader(self)

    # --- the whole life -----------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._request_stop, signal.Signals(signum).name)
        loop.add_signal_handler(signal.SIGHUP, self._on_hangup)
        reader = asyncio.create_task(self._read_control())
        reloads = asyncio.create_task(self.reloader.run())
        try:
            # The port first (the likeliest failure, and the cheapest); then every tier at once: each
            # finds its peers over sockets that connect whenever the other end comes up, as it does
            # when one of them restarts.
            self.listener = self._listen(self.settings.server)
            self.listener_address = _address(self.settings.server)
            builder = [c for c in self.children if c.tier == "worker"] if _demo_to_build(self.settings) else []
            for group in (builder, [c for c in self.children if c not in builder]):
                for child in group:
                    await self._start(child)
                await self._all_ready(group)
            for child in self.children:
                self._watch_child(child)
            await self._first_generation()
            self.serving.set()
            notify.ready(self.status_line())
            pinger = asyncio.create_task(self._watchdog())
            hangs = asyncio.create_task(self._kill_hung_tiers())
            await self.stopping.wait()
            pinger.cancel()
            hangs.cancel()
        except StartupFailed as exc:
            if not self.stopping.is_set():
                self.fatal = str(exc)
        finally:
            notify.stopping("stopping: draining requests in flight")
            await self.reloader.stop()
            if self.serving.is_set():
                # A reload in progress ends first (early: a tier it starts now is abandoned, a drain
                # it began runs its course) and reports; reloads asked for meanwhile are rejected.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.settings.runtime.drain_timeout_s + RELOAD_END_GRACE_S):
                        await asyncio.shield(reloads)
            reloads.cancel()
            await self._stop_all()  # the watchers still run: a tier dying in the drain is announced
            for watcher in self._watchers:
                watcher.cancel()
            reader.cancel()
            if self.listener is not None:
                self.listener.close()
            self.context.destroy(linger=0)
            shutil.rmtree(self.socket_dir, ignore_errors=True)
        if self.fatal:
            log.error("daemon.failed", reason=self.fatal)
            return EXIT_FAILED
        log.info("daemon.stopped")
        return EXIT_OK

    def _request_stop(self, signame: str) -> None:
        if not self.stopping.is_set():
            log.info("daemon.stopping", signal=signame)
        self.stopping.set()

    def _on_hangup(self) -> None:
        self.reloader.request("sighup")

    async def _watchdog(self) -> None:
        """Ping systemd's watchdog while the tiers are healthy: none has stayed down longer than
        a ping interval (a tier being restarted by a reload or after a death is not down for long;
        one that cannot come back ends in a crash loop, or here, with systemd restarting us)."""
        interval = notify.watchdog_interval()
        if interval is None:
            return
        while True:
            now = time.time()
            stuck = [c.name for c in self.children if c.state == "down" and now - c.since > interval]
            # a tier whose main loop has not turned for a ping interval: systemd's watchdog, set
            # longer than the longest model step, is the last resort if ours (hang_timeout_s) is off
            # or the hung process will not die (a driver call in uninterruptible sleep)
            stuck += [c.name for c in self.heartbeats.hung(self.children, max(interval, SILENT_FOR_WATCHDOG_S))]
            if not stuck:
                notify.watchdog()
            await asyncio.sleep(interval)

    async def _kill_hung_tiers(self) -> None:
        """Kill every tier silent for longer than runtime.hang_timeout_s; its watcher then handles
        the death like a crash (its requests end with a 503, it restarts)."""
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            timeout = self.settings.runtime.hang_timeout_s
            for child in self.heartbeats.hung(self.children, timeout):
                if child.hung or child.process is None or child.process.returncode is not None:
                    continue
                child.hung = True
                silent = round(self.heartbeats.silent_for(child.pid), 1)
                log.error("tier.hung", tier=child.tier, index=child.index, child_pid=child.pid, silent_s=silent)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, signal.SIGKILL)  # it and whatever it started

    def status_line(self) -> str:
        """One line for humans (systemctl status): the generation, its hash, the last reload."""
        line = f"serving generation {self.generation} (config {self.config.hash})"
        if (last := self.reloader.last) is not None:
            line += f"; last reload {last.result}" + (f": {last.reason}" if last.reason else "")
        return line

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
        if child.tier == "worker":  # two may run at once (blue-green): a worker's epoch is never reused
            child.epoch = max(child.epoch, self._worker_epoch)
        child.epoch += 1
        if child.tier == "worker":
            self._worker_epoch = child.epoch
        child.generation = generation or self.generation
        child.ready.clear()
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
        """Wait for `child` to be ready; StartupFailed if it dies, times out, or we are told to stop."""
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
        self.heartbeats.heard(child.pid)  # its silence is counted from now
        self._publish(child, "up")
        log.info("tier.ready", tier=child.tier, index=child.index, child_pid=child.pid, epoch=child.epoch)

    @staticmethod
    def _listen(server: ServerSettings) -> socket.socket:
        """The front-end's listening socket, owned here for the daemon's life and handed to each
        front-end instance: a new one accepts on it while the old one drains, so no connection
        is refused or reset in between. No SO_REUSEPORT: no other server can share the port."""
        family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # our own TIME_WAITs only
            listener.bind((server.host, server.port))
            listener.listen(server.backlog)
        except OSError as exc:
            listener.close()
            raise StartupFailed(f"cannot listen on {server.host}:{server.port}: {exc.strerror or exc}") from None
        return listener

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

    # --- watching -----------------------------------------------------------------------------

    async def _read_control(self) -> None:
        receiver = Receiver(self.control, ToSupervisor)
        while True:
            identity, frame = await self.control.recv_multipart()
            match receiver.decode(frame):
                case TierReady() as message:
                    for child in self.children:
                        if (child.tier, child.index, child.pid) == (message.tier, message.index, message.pid):
                            child.model = message.model
                            child.ready.set()
                case FrontendWorkerReady(pid=pid, main_pid=main_pid):
                    for child in self.children:
                        if child.tier == "frontend" and child.pid == main_pid:
                            child.serving_workers.add(pid)
                            if len(child.serving_workers) >= child.expected_workers:
                                child.ready.set()
                case ConfigApplied(pid=pid, generation=generation):
                    self._applied.setdefault(generation, set()).add(pid)
                    self._acknowledged.set()
                case Heartbeat(pid=pid):
                    self.heartbeats.heard(pid)
                case EngineIdle(epoch=epoch):
                    self._idle_epochs.add(epoch)
                    self._engine_idle.set()
                case ReloadCommand():
                    self.reloader.request("command", reply_to=identity)

    async def reply(self, identity: bytes, report: ReloadReport) -> None:
        """Answer a `daemon reload` client on the control socket."""
        with contextlib.suppress(zmq.ZMQError):
            await self.control.send_multipart([identity, encode(report)], zmq.NOBLOCK)

    # --- reload mechanics (the transaction is in reload.py) -------------------------------------

    def adopt(self, config: LoadedConfig, generation: int) -> None:
        """Make `config` the running one, as `generation`."""
        logging = config.settings.logging
        if (logging.level, logging.format) != (self.settings.logging.level, self.settings.logging.format):
            configure_logging("supervisor", level=logging.level, fmt=logging.format)
        self.config, self.settings, self.generation = config, config.settings, generation
        set_generation(generation)
        self.write_status()

    async def push_live(self, generation: int, frontend_workers: int, timeout: float) -> list[str]:
        """Tell every tier to adopt `generation`; the tiers that did not acknowledge in time.

        A tier that acknowledged now belongs to `generation`: if it dies later, it restarts with it."""
        self._acknowledged.clear()
        self._applied.pop(generation, None)  # acknowledgements of an earlier push of that number
        with contextlib.suppress(zmq.Again):
            self.events.send(encode(ConfigUpdate(generation)), zmq.NOBLOCK)
        expected = {c.name: c for c in self.children if c.tier != "frontend"}
        deadline = time.monotonic() + timeout
        while True:
            acked = self._applied.get(generation, set())
            missing = [name for name, c in expected.items() if c.pid not in acked]
            frontends = len(acked - {c.pid for c in self.children})
            if frontends < frontend_workers:
                missing.append(f"{frontend_workers - frontends} front-end worker(s)")
            if not missing or time.monotonic() > deadline:
                for child in self.children:
                    served_by = child.serving_workers if child.tier == "frontend" else {child.pid}
                    if served_by and served_by <= acked:
                        child.generation = generation
                return missing
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self._acknowledged.wait()
            self._acknowledged.clear()

    async def replace_worker(self, generation: int, *, mode: str = "drain") -> str:
        """Replace the model worker with one running `generation` in `mode` (runtime.model_reload),
        and say which mode it took; TierStartFailed if it does not come up, after making sure
        that one running the current generation serves.

        Drain mode: the scheduler holds new requests meanwhile and lets those running finish on
        the old worker (bounded by runtime.drain_timeout_s), then the new one loads. Blue-green:
        the new one loads beside the old, which keeps serving; drain mode if it does not fit."""
        if mode == "blue_green" and await self._replace_worker_beside(generation):
            return "blue_green"
        old = self._child("worker")
        self._idle_epochs.discard(0)
        self._broadcast(EngineHold())
        await self._until_engine_idle(0)
        try:
            await self._replace(old, generation)
        except TierStartFailed:
            if self.stopping.is_set():  # nothing to start now: what the scheduler holds is answered
                self._broadcast(EngineHoldAbandoned("the daemon is stopping during a model reload; retry the request"))
                raise
            try:
                await self._replace(self._child("worker"), self.generation)
            except TierStartFailed as exc:  # the old config no longer starts either: nothing to serve with
                self.fatal = f"the worker failed to start with the new config, then with the old one: {exc}"
                self.stopping.set()
            raise
        return "drain"

    async def _replace_worker_beside(self, generation: int) -> bool:
        """Blue-green: start a worker running `generation` beside the old one; the scheduler sends
        new requests to it once it is up, and the old one is stopped when it has finished its
        own. False (nothing changed) if the new one does not fit in memory beside the old;
        TierStartFailed (the old one still serving, untouched) if it fails otherwise."""
        old = self._child("worker")
        new = Child("worker", old.index, old.module, epoch=old.epoch, deaths=old.deaths, restarts=old.restarts)
        self.children.insert(self.children.index(old) + 1, new)
        self._idle_epochs.discard(old.epoch)
        self._broadcast(EngineBeside(self._worker_epoch + 1))  # what _start makes the new one's epoch
        try:
            await self._start(new, generation, beside=True)
            await self._until_ready(new)
        except StartupFailed as exc:
            no_room = new.process is not None and new.process.returncode == EXIT_NO_ROOM_BESIDE
            await self._abandon(new)
            self._broadcast(EngineBeside(0))
            if no_room:
                log.warning("reload.no_room_beside", detail="the model worker is replaced in drain mode")
                return False
            raise TierStartFailed(str(exc)) from None
        self._watch_child(new)
        old.retiring = True  # the new one is the worker now: the old one is not to be restarted
        await self._until_engine_idle(old.epoch, old)
        if old.process is not None and old.process.returncode is not None:  # it died meanwhile
            self._publish(old, "down")  # the scheduler fails what still ran on it
        await self._terminate([old], STOP_SIGNAL, STOP_GRACE_S)
        self.children.remove(old)
        self.write_status()
        return True

    async def _until_engine_idle(self, epoch: int, child: Child | None = None) -> None:
        """Until the scheduler says nothing runs on the worker of `epoch` (0: the one held), or
        `child` exited, or runtime.drain_timeout_s passed: what still runs fails when it stops."""
        deadline = time.monotonic() + self.settings.runtime.drain_timeout_s
        while epoch not in self._idle_epochs:
            self._engine_idle.clear()
            if epoch in self._idle_epochs:  # said between the check and the clear
                break
            waits: dict[str, Awaitable[object]] = {"idle": self._engine_idle.wait()}
            if child is not None and child.process is not None:
                waits["exited"] = child.process.wait()
            first = await first_of(max(0.0, deadline - time.monotonic()), **waits)
            if first == "exited":
                return
            if first is None:
                log.warning("reload.drain_timeout", tier="worker", detail="requests still running are failed")
                return

    async def _replace(self, old: Child, generation: int) -> None:
        """Stop `old`, then start a child like it running `generation`; TierStartFailed if it fails."""
        old.retiring = True
        await self._terminate([old], STOP_SIGNAL, STOP_GRACE_S)
        new = Child(old.tier, old.index, old.module, epoch=old.epoch, deaths=old.deaths, restarts=old.restarts)
        self.children[self.children.index(old)] = new
        await self._start(new, generation)
        try:
            await self._until_ready(new)
        except StartupFailed as exc:
            await self._kill(new)
            self._publish(new, "down")  # its slot stays: the caller starts another in it
            raise TierStartFailed(str(exc)) from None
        self._watch_child(new)

    async def replace_tokenizers(self, generation: int, workers: int) -> None:
        """Start a new tokenizer pool of `workers` running `generation`, send new requests to it,
        and let the old pool finish what it holds; TierStartFailed (old pool untouched) if the
        new one does not come up."""
        old = [c for c in self.children if c.tier == "tokenizer"]
        first = max(c.index for c in old) + 1  # new indices: requests name the worker that has them
        new = [Child("tokenizer", first + i, "daemon.tokenizer") for i in range(workers)]
        position = self.children.index(old[-1]) + 1
        self.children[position:position] = new
        try:
            for child in new:
                await self._start(child, generation)
            for child in new:
                await self._until_ready(child)  # "up": the front-ends route to it from now on
        except StartupFailed as exc:
            for child in new:
                await self._abandon(child)
            raise TierStartFailed(str(exc)) from None
        for child in new:
            self._watch_child(child)
        for child in old:
            child.retiring = True
            self._publish(child, "draining")  # it leaves the pools, finishes its requests, and exits
        await self._retire(old, self.settings.runtime.drain_timeout_s)

    def listener_for(self, server: ServerSettings) -> socket.socket:
        """The listening socket a front-end with `server` serves from: the running one, or a new
        one bound now if the address changed (TierStartFailed if it cannot be)."""
        if _address(server) == self.listener_address:
            return self.listener  # type: ignore[return-value]
        try:
            return self._listen(server)
        except StartupFailed as exc:
            raise TierStartFailed(str(exc)) from None

    async def replace_frontend(self, generation: int, server: ServerSettings, listener: socket.socket) -> None:
        """Start a front-end running `generation` beside the running one, then drain the old one.

        Both accept from the same listening socket (`listener`, a new one if the address
        changed), so connections queued meanwhile are served by whichever accepts them, never
        reset. TierStartFailed (old front-end untouched) if the new one does not come up; the
        caller then closes a new `listener`."""
        old = self._child("frontend")
        moved = listener is not self.listener
        new = Child(
            "frontend",
            0,
            "daemon.frontend",
            epoch=old.epoch,
            deaths=old.deaths,
            restarts=old.restarts,
            expected_workers=server.workers,
        )
        self.children.append(new)
        try:
            await self._start(new, generation, listener)
            await self._until_ready(new)
        except StartupFailed as exc:
            await self._abandon(new)
            raise TierStartFailed(str(exc)) from None
        await asyncio.sleep(HANDOVER_SETTLE_S)
        self._watch_child(new)
        # HTTP/1.1 has no "go away" for idle keep-alive connections, which Granian closes when it
        # stops: first let the clients of the old instance leave them after their next answer.
        self._broadcast(FrontendRetiring(old.pid))  # type: ignore[arg-type]
        await asyncio.sleep(HANDOVER_CLOSE_S)
        old.retiring = True
        previous = self.listener
        if moved:  # the new address serves from now on; the old one refuses once the old instance stops
            self.listener, self.listener_address = listener, _address(server)
            refuse = asyncio.create_task(self._refuse_new_connections(previous))
        # Granian stops accepting and finishes its requests and streams, bounded by its kill timeout.
        await self._terminate([old], signal.SIGTERM, self.settings.runtime.drain_timeout_s + STOP_GRACE_S)
        self.children.remove(old)
        if moved:
            await refuse
            previous.close()  # type: ignore[union-attr]
        self.write_status()

    async def _abandon(self, child: Child) -> None:
        """Kill a child started by a reload that failed, and forget it."""
        await self._kill(child)
        self._publish(child, "stopped")
        self.children.remove(child)

    @staticmethod
    async def _kill(child: Child) -> None:
        child.retiring = True
        if child.process is not None and child.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.process.pid, signal.SIGKILL)  # it and whatever it started
            await child.process.wait()

    async def _retire(self, children: list[Child], grace: float) -> None:
        """Wait for draining `children` to exit by themselves, then stop the laggards."""
        waits = [c.process.wait() for c in children if c.process is not None]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await asyncio.gather(*waits)
        for child in children:
            if child.process is not None and child.process.returncode is not None:
                self._publish(child, "stopped")
                log.info("tier.stopped", tier=child.tier, index=child.index, status=child.process.returncode)
        await self._terminate(children, STOP_SIGNAL, STOP_GRACE_S)  # the laggards: their requests fail
        for child in children:
            self.children.remove(child)
        self.write_status()

    def _child(self, tier: str, index: int = 0) -> Child:
        return next(c for c in self.children if (c.tier, c.index) == (tier, index))

    def _broadcast(self, message: msgspec.Struct) -> None:
        with contextlib.suppress(zmq.Again):
            self.events.send(encode(message), zmq.NOBLOCK)

    def _watch_child(self, child: Child) -> None:
        self._watchers.append(asyncio.create_task(self._watch(child)))

    async def _watch(self, child: Child) -> None:
        """Restart `child` whenever it dies, until we stop, it crash-loops, or a reload retires it."""
        while True:
            assert child.process is not None
            status = await child.process.wait()
            self.heartbeats.forget(child.pid)
            child.hung = False
            if child.retiring:
                return
            if self.stopping.is_set():
                self._publish(child, "down")  # its requests must end now, not at the drain's deadline
                return
            log.error("tier.died", tier=child.tier, index=child.index, child_pid=child.pid, status=status)
            child.deaths += 1
            self._publish(child, "down")
            now = time.monotonic()
            child.restarts.append(now)
            while child.restarts and now - child.restarts[0] > CRASH_LOOP_WINDOW_S:
                child.restarts.popleft()
            if len(child.restarts) > CRASH_LOOP_RESTARTS:
                self.fatal = f"{child.name} crash-looped: {len(child.restarts)} restarts in {CRASH_LOOP_WINDOW_S:.0f} s"
                self.stopping.set()
                return
            await asyncio.sleep(min(0.25 * 2 ** (len(child.restarts) - 1), BACKOFF_MAX_S))
            if self.stopping.is_set():
                return
            # The generation it ran, not the supervisor's: mid-transaction the two differ.
            await self._start(child, child.generation, child.listener)
            try:
                await self._until_ready(child)
            except StartupFailed as exc:
                log.error("tier.restart_failed", tier=child.tier, index=child.index, reason=str(exc))
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()

    def _publish(self, child: Child, state: str) -> None:
        """Tell every tier (events socket) and every reader of status.json what became of `child`."""
        self._broadcast(TierEvent(child.tier, child.index, child.epoch, state, child.model))  # type: ignore[arg-type]
        if state in ("starting", "up", "draining", "down", "stopped"):
            child.state, child.since = state, time.time()
            self.write_status()

    def write_status(self) -> None:
        tiers = [
            TierStatus(c.tier, c.index, c.pid, c.epoch, c.state, c.since, c.deaths, c.model)  # type: ignore[arg-type]
            for c in self.children
        ]
        status = DaemonStatus(
            supervisor_pid=os.getpid(),
            generation=self.generation,
            config_hash=self.config.hash,
            started=self.started,
            tiers=tiers,
            last_reload=self.reloader.last,
            reloads=dict(self.reloader.counts),
        )
        staging = self.socket_dir / f".{STATUS_FILE}"
        staging.write_bytes(msgspec.json.encode(status))
        os.replace(staging, self.socket_dir / STATUS_FILE)

    # --- stopping -----------------------------------------------------------------------------

    async def _stop_all(self) -> None:
        """Drain the front-end (in-flight requests finish), then stop the back-end tiers."""
        frontends = [c for c in self.children if c.tier == "frontend"]
        for child in frontends:
            self._publish(child, "draining")
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
            self._publish(child, "stopped")
            log.info("tier.stopped", tier=child.tier, index=child.index, status=process.returncode)


def _address(server: ServerSettings) -> tuple[str, int, int]:
    return server.host, server.port, server.backlog


def _demo_to_build(settings: DaemonSettings) -> bool:
    """Whether the built-in demo model is used and not built yet: the worker builds it, and the
    tiers that read it (the tokenizer) start once it is up."""
    used = DEMO_MODEL_REF in (settings.model.path, settings.tokenizer.path or settings.model.path)
    return used and not demo_model_dir(settings.runtime.cache_dir).is_dir()


async def first_of(timeout: float, **waits: Awaitable[object]) -> str | None:
    """The name of the first of `waits` to finish within `timeout` s (None: none did); the
    others are cancelled."""
    tasks = {asyncio.ensure_future(wait): name for name, wait in waits.items()}
    try:
        done, _pending = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
    return tasks[next(iter(done))] if done else None
