"""Reloading the configuration as one transaction: check, diff, plan, apply, report.

Triggers (SIGHUP, a change of the config file, `daemon reload`) only put a
request on the supervisor's queue; its loop (arbiter.py) runs one reload at a
time, and requests that arrive meanwhile are answered together by the next one,
which reads the file as it is then. The
file is read and checked exactly as `daemon check` does (same environment,
env file and `--set` as at start).

Prepare does what can fail without touching a serving tier: check, bind a new
address, then start the new tiers beside the serving ones (a tokenizer pool and
a blue-green worker on standby, then the front-end, which serves from its
start). Commit replaces the model's replicas that were not prepared (rolling or
drain: replicas.py), switches every prepared tier at once, lets the old ones
drain, and pushes the live settings. A failure in prepare stops only what it
started; one in commit puts the old config back.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from daemon.config.check import LoadedConfig, check_config
from daemon.config.diff import ConfigDiff, diff_configs
from daemon.config.handoff import write_config
from daemon.config.schema import Reload, ServerSettings
from daemon.ipc.messages import ReloadReport
from daemon.supervisor import notify
from daemon.supervisor.arbiter import ReloadAsked
from daemon.supervisor.process import TierStartFailed
from daemon.supervisor.replicas import devices_move
from daemon.supervisor.triggers import file_changes

if TYPE_CHECKING:
    from daemon.supervisor.process import Child
    from daemon.supervisor.supervisor import Supervisor

log = structlog.get_logger("daemon.supervisor")

CHECK_TIMEOUT_S = 60.0
STOPPING_IN_RELOAD = "the daemon is stopping during a model reload; retry the request"
LIVE_ACK_TIMEOUT_S = 5.0  # a tier busy with a long step, on a loaded machine, answers late


@dataclass
class Beside:
    """What a reload's prepare started beside the serving tiers: (serving, new) for each."""

    listener: socket.socket | None  # newly bound for a new address, else None
    tokenizers: tuple[list[Child], list[Child]] | None = None
    worker: tuple[Child, Child] | None = None  # blue-green, on standby
    frontend: tuple[Child, Child] | None = None

    def started(self) -> list[Child]:
        return [
            *(self.tokenizers[1] if self.tokenizers else []),
            *([self.worker[1]] if self.worker else []),
            *([self.frontend[1]] if self.frontend else []),
        ]

    def exited(self) -> Child | None:
        """One of the tiers started that died while it waited for the switch."""
        return next((c for c in self.started() if c.process is not None and c.process.returncode is not None), None)


# The scopes a reload can apply today by restarting a tier.
RESTARTABLE = {Reload.WORKER, Reload.SCHEDULER, Reload.TOKENIZER, Reload.FRONTEND}
CERTIFICATES = "certificates"  # the trigger of a change of the TLS files (server.tls.refresh)


class Reloader:
    def __init__(self, supervisor: Supervisor):
        self.supervisor = supervisor
        self.last: ReloadReport | None = None
        self.counts: Counter[str] = Counter()
        self._watches: dict[str, tuple[tuple[Path, ...], asyncio.Event, asyncio.Task]] = {}  # by trigger

    def request(self, trigger: str) -> None:
        """Ask for a reload: the supervisor's loop starts one when none runs."""
        self.supervisor.inbox.put_nowait(ReloadAsked(trigger))

    def stop_watching(self) -> None:
        """The daemon is stopping: no file change asks for a reload any more."""
        for trigger in list(self._watches):
            self._unwatch(trigger)

    # --- the transaction ----------------------------------------------------------------------

    async def reload(self, trigger: str) -> ReloadReport:
        supervisor = self.supervisor
        started = time.monotonic()
        if supervisor.stopping.is_set():
            return self.report(trigger, started, "rejected", reason="the daemon is stopping")
        notify.reloading(f"reloading generation {supervisor.generation} ({trigger})")
        try:  # in a thread, bounded: a file system that hangs (NFS) must not wedge the reloader
            report = await asyncio.wait_for(
                asyncio.to_thread(check_config, supervisor.config.path, **supervisor.sources), CHECK_TIMEOUT_S
            )
        except TimeoutError:
            reason = f"reading and checking the config took longer than {CHECK_TIMEOUT_S:g} s"
            return self.report(trigger, started, "rejected", reason=reason)
        if report.config is None:
            problems = report.errors or report.violations
            reason = "; ".join(
                f"{v.rule} ({v.key or v.origin}): {v.message} at {v.origin}; fix: {v.fix}" for v in problems[:5]
            )
            return self.report(trigger, started, "rejected", reason=f"the new config is invalid: {reason}")
        new = report.config
        diff = diff_configs(supervisor.config, new)
        notes = [s.message() for s in diff.shadowed]
        rotate = CERTIFICATES in trigger and new.settings.server.tls.refresh  # same config, new certificates
        if diff.empty and not rotate:
            return self.report(trigger, started, "unchanged", notes=notes)
        if refusal := _refusal(diff):
            return self.report(trigger, started, "rejected", reason=refusal, diff=diff, notes=notes)
        if not supervisor.head:
            return await self._reload_node(trigger, started, new, diff, notes)
        replaces_frontend = Reload.FRONTEND in diff.scopes or rotate
        replaces_worker = Reload.WORKER in diff.scopes or Reload.SCHEDULER in diff.scopes
        worker_mode = new.settings.runtime.model_reload
        # One replica before and after: a blue-green worker is prepared beside it; otherwise the
        # replicas are replaced in the commit, one at a time or (drain) all at once.
        replicas = (supervisor.settings.model.dp_size, new.settings.model.dp_size)
        single = replicas == (1, 1)
        running_frontend_workers = supervisor.settings.server.workers
        # Prepare: what can still fail without touching a serving tier, cheapest first. The config
        # was checked above (certificates and memory fit included); a new address is bound now, so
        # a taken port rejects the reload before any tier is started.
        try:
            listener = supervisor.listener_for(new.settings.server) if replaces_frontend else None
        except TierStartFailed as exc:
            return self.report(trigger, started, "rejected", reason=str(exc), diff=diff, notes=notes)
        generation = supervisor.generation + 1
        write_config(new.settings, supervisor.socket_dir, generation)
        if rotate:
            notes.append("the TLS certificate files changed")
        beside = Beside(listener if listener is not supervisor.listener else None)
        stage, workers_touched = "", False
        try:
            # New tiers start beside the serving ones, which serve alone meanwhile: a tokenizer
            # pool and a blue-green worker wait on standby; the front-end, which serves from its
            # start, comes last, once nothing else in prepare can fail.
            if Reload.TOKENIZER in diff.scopes:
                stage = "tokenizer"
                beside.tokenizers = await supervisor.start_tokenizers(generation, new.settings.tokenizer.workers)
            if replaces_worker and worker_mode == "blue_green" and single:
                stage = "worker"
                beside.worker = await supervisor.start_worker_beside(generation)  # None: no room beside
            if replaces_frontend:
                stage = "frontend"
                beside.frontend = await supervisor.start_frontend(generation, new.settings.server, listener)
            # Commit. Replicas not prepared beside the serving ones are replaced now (on failure
            # the undo below puts the old config's back).
            if replaces_worker and beside.worker is None:
                stage, workers_touched = "worker", True
                mode = "drain" if single else worker_mode  # one replica rolling is drained
                moved = devices_move(supervisor.settings, new.settings)
                await supervisor.replace_replicas(generation, new.settings.model.dp_size, mode, devices_move=moved)
                notes.append(_replicas_note(mode, *replicas))
            if (gone := beside.exited()) is not None:  # switching to it would fail its requests
                stage = gone.tier
                raise TierStartFailed(f"{gone.name} exited with status {gone.process.returncode} before the switch")  # type: ignore[union-attr]
        except TierStartFailed as exc:
            await self._withdraw(beside)
            if supervisor.stopping.is_set():  # nothing is put back: every tier drains as it is
                if workers_touched:  # what the scheduler holds for a replica is answered now
                    await supervisor.owned(supervisor.abandon_holds, STOPPING_IN_RELOAD)
                reason = f"the daemon is stopping: the reload was abandoned while starting the new {stage}"
                return self.report(trigger, started, "rolled_back", reason=reason, diff=diff, notes=notes)
            if workers_touched:
                await self._undo(["worker"], generation)
            reason = f"the new {stage} did not start ({exc}); the running config keeps serving"
            return self.report(trigger, started, "rolled_back", reason=reason, diff=diff, notes=notes)
        restarted = await self._switch(beside, new.settings.server)
        if replaces_worker:
            restarted.insert(0, "worker")
            if beside.worker is not None:
                notes.append("the model worker was replaced in blue_green mode")
        missing = await supervisor.push_live(generation, new.settings.server.workers, LIVE_ACK_TIMEOUT_S)
        if missing:  # some tier may not run the new live values: every tier goes back to the running ones
            await supervisor.push_live(supervisor.generation, running_frontend_workers, LIVE_ACK_TIMEOUT_S)
            await self._undo(restarted, generation)
            reason = (
                f"not acknowledged within {LIVE_ACK_TIMEOUT_S:g} s by: {', '.join(missing)}; "
                "the running config was pushed again and keeps serving"
            )
            return self.report(trigger, started, "rolled_back", reason=reason, diff=diff, notes=notes)
        await supervisor.owned(supervisor.adopt, new, generation)
        return self.report(trigger, started, "applied", diff=diff, notes=notes, restarted=restarted)

    async def _reload_node(
        self, trigger: str, started: float, new: LoadedConfig, diff: ConfigDiff, notes: list[str]
    ) -> ReloadReport:
        """A node other than the head runs only its worker, whose share of the group follows the
        head's: a change of the worker's settings restarts it, and it rejoins once the head runs the
        same config (nodes.py). There is nothing to roll back to: the group it left has ended."""
        supervisor = self.supervisor
        generation = supervisor.generation + 1
        write_config(new.settings, supervisor.socket_dir, generation)
        restarted = []
        if Reload.WORKER in diff.scopes:
            await supervisor.restart_node_worker(generation)
            restarted.append("worker")
            notes.append("this node's worker restarted; it rejoins node 0's group once node 0 runs the same config")
        if missing := await supervisor.push_live(generation, 0, LIVE_ACK_TIMEOUT_S):
            # one starting again (its group ended meanwhile) reads the new generation's settings
            notes.append(f"not acknowledged within {LIVE_ACK_TIMEOUT_S:g} s by: {', '.join(missing)}")
        await supervisor.owned(supervisor.belong_to_all, generation)
        await supervisor.owned(supervisor.adopt, new, generation)
        return self.report(trigger, started, "applied", diff=diff, notes=notes, restarted=restarted)

    async def _switch(self, beside: Beside, server: ServerSettings) -> list[str]:
        """Commit the tiers started beside the serving ones: all switch at once (nothing here can
        fail), then the old ones drain and stop, side by side. The tiers switched."""
        supervisor = self.supervisor
        switched: list[str] = []
        retiring: list[Awaitable[None]] = []
        if beside.worker is not None:
            await supervisor.owned(supervisor.switch_worker, *beside.worker)
            retiring.append(supervisor.retire_worker(beside.worker[0]))
        if beside.tokenizers is not None:
            await supervisor.owned(supervisor.switch_tokenizers, *beside.tokenizers)
            retiring.append(supervisor.retire_tokenizers(beside.tokenizers[0]))
            switched.append("tokenizer")
        if beside.frontend is not None:
            listener = beside.listener or supervisor.listener
            retiring.append(supervisor.switch_frontend(*beside.frontend, server, listener))
            switched.append("frontend")
        await asyncio.gather(*retiring)
        return switched

    async def _withdraw(self, beside: Beside) -> None:
        """A reload failed before switching: stop what it started beside the serving tiers."""
        supervisor = self.supervisor
        if beside.frontend is not None:
            await supervisor.withdraw_frontend(beside.frontend[1])
        await supervisor.withdraw([c for c in beside.started() if c.tier != "frontend"])
        if beside.listener is not None:
            beside.listener.close()

    async def _undo(self, restarted: list[str], failed: int) -> None:
        """Put back tiers of the running config where a failed reload (of generation `failed`) had
        replaced them."""
        supervisor = self.supervisor
        running = supervisor.settings
        try:
            for stage in reversed(restarted):
                if stage == "tokenizer":
                    await supervisor.replace_tokenizers(supervisor.generation, running.tokenizer.workers)
                elif stage == "worker":  # the replicas it started, added or removed
                    await supervisor.replace_replicas(
                        supervisor.generation,
                        running.model.dp_size,
                        running.runtime.model_reload,
                        stale=lambda child: child.started_generation == failed,
                        devices_move=devices_move(supervisor.settings_of(failed), running),
                    )
                elif stage == "frontend":
                    listener = supervisor.listener_for(running.server)
                    await supervisor.replace_frontend(supervisor.generation, running.server, listener)
        except TierStartFailed as exc:  # the running config no longer starts: nothing to fall back on
            reason = f"a reload failed and the running config could not be restored: {exc}"
            await supervisor.owned(supervisor.give_up, reason)

    def report(
        self,
        trigger: str,
        started: float,
        result: str,
        *,
        reason: str | None = None,
        diff: ConfigDiff | None = None,
        notes: list[str] | None = None,
        restarted: list[str] | None = None,
    ) -> ReloadReport:
        supervisor = self.supervisor
        report = ReloadReport(
            result=result,  # type: ignore[arg-type]
            trigger=trigger,
            generation=supervisor.generation,
            config_hash=supervisor.config.hash,
            at=time.time(),
            duration_s=round(time.monotonic() - started, 3),
            reason=reason,
            changes=diff.as_log() if diff else {},
            restarted=restarted or [],
            notes=notes or [],
        )
        self.last = report
        self.counts[result] += 1
        supervisor.write_status()
        level = log.warning if result in ("rejected", "rolled_back") else log.info
        level(
            "config.reload",
            result=result,
            trigger=trigger,
            duration_s=report.duration_s,
            reason=reason,
            diff=report.changes,
            plan={"restart": report.restarted, "live": [k for k, c in report.changes.items() if c["scope"] == "live"]},
            notes=report.notes,
            config_hash=report.config_hash,
        )
        if supervisor.stopping.is_set():  # no READY=1 after STOPPING=1, no watch armed again
            return report
        if supervisor.serving.is_set():
            notify.ready(supervisor.status_line())
        self.follow_settings()
        return report

    # --- watching the file --------------------------------------------------------------------

    def follow_settings(self) -> None:
        """Watch the config file while runtime.watch_config says so, and the TLS files while
        server.tls.refresh does (both live settings)."""
        settings = self.supervisor.settings
        config = (self.supervisor.config.path,) if settings.runtime.watch_config else ()
        tls = settings.server.tls
        certificates = tuple(p for p in (tls.certfile, tls.keyfile, tls.ca_certs) if p) if tls.refresh else ()
        for trigger, paths in (("file", config), (CERTIFICATES, certificates)):
            if trigger in self._watches and self._watches[trigger][0] != paths:
                self._unwatch(trigger)
            if paths and trigger not in self._watches:
                stop = asyncio.Event()
                self._watches[trigger] = (paths, stop, asyncio.create_task(self._watch(trigger, paths, stop)))

    def _unwatch(self, trigger: str) -> None:
        _paths, stop, task = self._watches.pop(trigger)
        stop.set()
        task.cancel()

    async def _watch(self, trigger: str, paths: tuple[Path, ...], stop: asyncio.Event) -> None:
        def armed() -> None:  # logged once a change made from now on is seen: tests and operators wait for it
            log.info("config.watching", trigger=trigger, paths=[str(p) for p in paths])

        async for names in file_changes(list(paths), stop, armed):
            log.info("config.changed", trigger=trigger, entries=sorted(names))
            self.request(trigger)


def _replicas_note(mode: str, before: int, after: int) -> str:
    if (before, after) == (1, 1):
        return f"the model worker was replaced in {mode} mode"
    note = f"the model's replicas were replaced in {mode} mode"
    return note + (f"; model.dp_size {before} -> {after}" if before != after else "")


def _refusal(diff: ConfigDiff) -> str | None:
    """Why `diff` cannot be applied by a reload, if it cannot."""
    if full := diff.needs_full_restart:
        keys = ", ".join(c.key for c in full)
        return f"{keys} cannot change while the daemon runs: restart it to apply the new config"
    if pending := [c.key for c in diff.changes if c.scope not in RESTARTABLE and c.scope is not Reload.LIVE]:
        scopes = sorted({c.scope.value for c in diff.changes if c.key in pending})
        return (
            f"{', '.join(pending)} would restart the {'/'.join(scopes)} tier, which this version cannot do "
            "without dropping requests: restart the daemon to apply the new config"
        )
    return None
