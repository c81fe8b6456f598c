"""The supervisor's one loop: every event that can change the process tree is put on one
queue, and one loop takes them off, one at a time, and alone changes the tree.

Producers only put events: a waiter per process (Exited), the control socket's reader
(Control: a tier ready, an acknowledgement, a heartbeat, a reload command), the signal
handlers (Signalled), the file watches and triggers (ReloadAsked), timers (Tick,
RestartDue, StartupDeadline) and the procedures that take time (the start, a reload
transaction, the stop), which wait outside the loop and change the tree only through
Step events (`owned`). No handler waits on anything slow (a tier's readiness, a drain,
a backoff): those come back as events. So no two tasks change the tree between each
other's awaits, a tier that dies in the middle of a reload step is handled after that
step, and systemd's watchdog, pinged from the loop's Tick, proves the loop still turns.

The lifecycle state the loop owns: the tiers (`children`) and, for each, its process,
epoch, generation, readiness, published state, restarts and whether it is supervised
(restarted when it dies) or retiring; `listener`; `stopping` and `fatal`; the reload
requests waiting and the transaction running.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from daemon.ipc.messages import ReloadReport, ToSupervisor
from daemon.supervisor import notify
from daemon.supervisor.process import STARTUP_TIMEOUT_S, Child
from daemon.tier import EXIT_REGROUP

log = structlog.get_logger("daemon.supervisor")

CRASH_LOOP_RESTARTS = 5  # this many restarts of one tier process ...
CRASH_LOOP_WINDOW_S = 60.0  # ... within this many seconds: give up
BACKOFF_MAX_S = 8.0
REGROUP_AFTER_S = 1.0  # a worker leaving a group that ended elsewhere starts again this much later
TICK_S = 1.0  # how often hung tiers are looked for and systemd's watchdog may be pinged
SILENT_FOR_WATCHDOG_S = 5.0  # a tier silent this long (or a watchdog interval, if longer) stops the pings


# --- the events ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exited:
    """`process`, the process `child` ran, exited with `status`."""

    child: Child
    process: asyncio.subprocess.Process
    status: int


@dataclass(frozen=True)
class RestartDue:
    """The backoff after `process` (of `child`) died is over."""

    child: Child
    process: asyncio.subprocess.Process


@dataclass(frozen=True)
class StartupDeadline:
    """`process`, restarted, had until now to be ready."""

    child: Child
    process: asyncio.subprocess.Process


@dataclass(frozen=True)
class Control:
    """A message on the control socket, from a tier or from `daemon reload` (`identity`)."""

    identity: bytes
    message: ToSupervisor


@dataclass(frozen=True)
class Signalled:
    signum: int


@dataclass(frozen=True)
class Tick:
    pass


@dataclass(frozen=True)
class ReloadAsked:
    trigger: str
    reply_to: bytes | None = None  # a `daemon reload` client waiting for the report


@dataclass(frozen=True)
class ReloadEnded:
    asked: list[ReloadAsked]
    report: ReloadReport


@dataclass
class Step:
    """A change of the tree a procedure asks for; `done` gets what `action` returned (or raised)."""

    action: Callable[..., Any]
    args: tuple
    done: asyncio.Future = field(repr=False)


Event = Exited | RestartDue | StartupDeadline | Control | Signalled | Tick | ReloadAsked | ReloadEnded | Step


class Arbiter:
    """Part of the Supervisor (a mixin): the loop, and what it does with each event."""

    def _init_arbiter(self) -> None:
        self.inbox: asyncio.Queue[Event] = asyncio.Queue()
        self._arbiter: asyncio.Task | None = None
        self._exit_waiters: set[asyncio.Task] = set()
        self._reloads_asked: list[ReloadAsked] = []
        self._reload_running: asyncio.Task | None = None
        self._reloads_idle = asyncio.Event()  # no reload running and none asked for
        self._reloads_idle.set()

    def _start_arbiter(self) -> None:
        self._arbiter = asyncio.create_task(self._arbitrate(), name="arbiter")

    async def _arbitrate(self) -> None:
        while True:
            event = await self.inbox.get()
            if isinstance(event, Step):
                await self._run_step(event)
                continue
            try:
                await self._handle(event)
            except Exception:  # one event handled wrong must not leave the tree without an owner
                log.exception("supervisor.event_failed", event=repr(event))

    async def owned(self, action: Callable[..., Any], *args: Any) -> Any:
        """Run `action(*args)` on the loop, between two events, and return what it returns.
        Procedures change the tree only this way; a handler (already on the loop) runs it at once."""
        if asyncio.current_task() is self._arbiter or self._arbiter is None:
            result = action(*args)
            return await result if inspect.isawaitable(result) else result
        done = asyncio.get_running_loop().create_future()
        self.inbox.put_nowait(Step(action, args, done))
        return await done

    @staticmethod
    async def _run_step(step: Step) -> None:
        try:
            result = step.action(*step.args)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            if not step.done.done():
                step.done.set_exception(exc)
            return
        if not step.done.done():  # the procedure asking may have been cancelled meanwhile
            step.done.set_result(result)

    async def _handle(self, event: Event) -> None:
        match event:
            case Exited():
                self._on_exit(event)
            case RestartDue():
                await self._on_restart_due(event)
            case StartupDeadline():
                self._on_startup_deadline(event)
            case Control(identity=identity, message=message):
                self._on_control(identity, message)
            case Signalled(signum=signum):
                self._on_signal(signum)
            case Tick():
                self._on_tick()
            case ReloadAsked():
                self._reloads_asked.append(event)
                self._next_reload()
            case ReloadEnded(asked=asked, report=report):
                self._reload_running = None
                for request in asked:
                    if request.reply_to is not None:
                        await self.reply(request.reply_to, report)
                self._next_reload()

    # --- processes ----------------------------------------------------------------------------

    def _wait_for_exit(self, child: Child) -> None:
        """Put an Exited event when the process `child` runs now exits."""
        process = child.process
        assert process is not None

        async def wait() -> None:
            status = await process.wait()
            self.inbox.put_nowait(Exited(child, process, status))

        waiter = asyncio.create_task(wait())
        self._exit_waiters.add(waiter)
        waiter.add_done_callback(self._exit_waiters.discard)

    def _supervise(self, child: Child) -> None:
        """From now on `child` is restarted whenever it dies (until it retires or we stop)."""
        child.supervised = True
        if child.process is not None and child.process.returncode is not None:  # died before this
            self._on_exit(Exited(child, child.process, child.process.returncode))

    def _on_exit(self, event: Exited) -> None:
        child, process, status = event.child, event.process, event.status
        self.heartbeats.forget(process.pid)
        if child.process is not process or child.exit_handled:  # a process it ran before, or handled
            return
        child.hung = False
        self.remove_sockets(child)
        if child.retiring or not child.supervised:  # a procedure stopped it, or is starting it
            return
        child.exit_handled = True
        if self.stopping.is_set():
            self._publish(child, "down")  # its requests must end now, not at the drain's deadline
            return
        if status == EXIT_REGROUP:  # its group ended on another node, or node 0 refused it: no crash here
            log.warning("tier.regrouping", tier=child.tier, index=child.index, child_pid=process.pid)
            self._publish(child, "down", restarting=True)  # its requests end now, with a 503
            asyncio.get_running_loop().call_later(REGROUP_AFTER_S, self.inbox.put_nowait, RestartDue(child, process))
            return
        if not child.ready.is_set():  # supervised, so a restart: it died before it came up
            reason = f"{child.name} exited with status {status} while starting"
            log.error("tier.restart_failed", tier=child.tier, index=child.index, reason=reason)
        log.error("tier.died", tier=child.tier, index=child.index, child_pid=process.pid, status=status)
        child.deaths += 1
        now = time.monotonic()
        child.restarts.append(now)
        while child.restarts and now - child.restarts[0] > CRASH_LOOP_WINDOW_S:
            child.restarts.popleft()
        crash_loop = len(child.restarts) > CRASH_LOOP_RESTARTS
        self._publish(child, "down", restarting=not crash_loop)
        if crash_loop:
            self.give_up(f"{child.name} crash-looped: {len(child.restarts)} restarts in {CRASH_LOOP_WINDOW_S:.0f} s")
            return
        backoff = min(0.25 * 2 ** (len(child.restarts) - 1), BACKOFF_MAX_S)
        asyncio.get_running_loop().call_later(backoff, self.inbox.put_nowait, RestartDue(child, process))

    async def _on_restart_due(self, event: RestartDue) -> None:
        child = event.child
        if self.stopping.is_set() or child.retiring or child not in self.children or child.process is not event.process:
            return
        # The generation it ran, not the supervisor's: mid-transaction the two differ.
        await self._start(child, child.generation, child.listener)
        timeout = STARTUP_TIMEOUT_S[child.tier]
        asyncio.get_running_loop().call_later(timeout, self.inbox.put_nowait, StartupDeadline(child, child.process))

    def _on_startup_deadline(self, event: StartupDeadline) -> None:
        child, process = event.child, event.process
        if child.process is not process or child.ready.is_set() or process.returncode is not None:
            return
        reason = f"{child.name} was not ready within {STARTUP_TIMEOUT_S[child.tier]:.0f} s"
        log.error("tier.restart_failed", tier=child.tier, index=child.index, reason=reason)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # its death is then handled as any other

    def _mark_ready(self, child: Child) -> None:
        if child.ready.is_set():
            return
        child.ready.set()
        self.heartbeats.heard(child.pid)  # its silence is counted from now
        self._publish(child, "standby" if child.standby else "up")
        log.info("tier.ready", tier=child.tier, index=child.index, child_pid=child.pid, epoch=child.epoch)

    def give_up(self, reason: str) -> None:
        """Stop the daemon, to exit non-zero with `reason`."""
        if self.fatal is None:
            self.fatal = reason
        self.stopping.set()

    # --- signals and timers -------------------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            self._reloads_asked.append(ReloadAsked("sighup"))
            self._next_reload()
            return
        if not self.stopping.is_set():
            log.info("daemon.stopping", signal=signal.Signals(signum).name)
        self.stopping.set()

    async def _tick(self) -> None:
        period = min(TICK_S, notify.watchdog_interval() or TICK_S)
        while True:
            await asyncio.sleep(period)
            self.inbox.put_nowait(Tick())

    def _on_tick(self) -> None:
        self._kill_hung_tiers()
        self._ping_watchdog()

    def _kill_hung_tiers(self) -> None:
        """Kill every tier silent for longer than runtime.hang_timeout_s; its death is then handled
        like a crash (its requests end with a 503, it restarts)."""
        for child in self.heartbeats.hung(self.children, self.settings.runtime.hang_timeout_s):
            if child.hung or child.process is None or child.process.returncode is not None:
                continue
            child.hung = True
            silent = round(self.heartbeats.silent_for(child.pid), 1)
            log.error("tier.hung", tier=child.tier, index=child.index, child_pid=child.pid, silent_s=silent)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.process.pid, signal.SIGKILL)  # it and whatever it started

    def _ping_watchdog(self) -> None:
        """Ping systemd's watchdog while the tiers are healthy: none has stayed down longer than a
        ping interval (a tier restarted by a reload or after a death is not down for long; one
        that cannot come back ends in a crash loop, or here, with systemd restarting us), and
        none has been silent that long. The ping comes from this loop: a wedged loop stops it."""
        interval = notify.watchdog_interval()
        if interval is None or self.stopping.is_set():
            return  # after STOPPING=1, systemd's stop timeout governs, not its watchdog
        now = time.time()
        stuck = [c.name for c in self.children if c.state == "down" and now - c.since > interval]
        # a tier whose main loop has not turned for a ping interval: systemd's watchdog, set longer
        # than the longest model step, is the last resort if ours (hang_timeout_s) is off or the
        # hung process will not die (a driver call in uninterruptible sleep)
        stuck += [c.name for c in self.heartbeats.hung(self.children, max(interval, SILENT_FOR_WATCHDOG_S))]
        if not stuck:
            notify.watchdog()  # every tick: at least as often as systemd asks

    # --- reloads ------------------------------------------------------------------------------

    def _next_reload(self) -> None:
        """Start a transaction for every request waiting, if none runs: requests that piled up
        meanwhile are answered together by one reload, which reads the file as it is then. A
        change seen while the daemon starts applies once it serves (or is rejected at a stop)."""
        ready = self.serving.is_set() or self.stopping.is_set()
        if self._reload_running is None and self._reloads_asked and ready:
            asked, self._reloads_asked = self._reloads_asked, []
            trigger = "+".join(sorted({request.trigger for request in asked}))
            self._reload_running = asyncio.create_task(self._transact(asked, trigger), name=f"reload {trigger}")
        if self._reload_running is None and not self._reloads_asked:
            self._reloads_idle.set()
        else:
            self._reloads_idle.clear()

    async def _transact(self, asked: list[ReloadAsked], trigger: str) -> None:
        try:
            report = await self.reloader.reload(trigger)
        except Exception as exc:  # a bug: the tree may be half-changed, so the daemon stops and says why
            log.exception("config.reload_failed", trigger=trigger)
            await self.owned(self.give_up, f"a reload failed unexpectedly: {exc!r}")
            report = self.reloader.report(trigger, time.monotonic(), "rolled_back", reason=f"internal error: {exc!r}")
        self.inbox.put_nowait(ReloadEnded(asked, report))
