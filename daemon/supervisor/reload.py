"""Reloading the configuration as one transaction: check, diff, plan, apply, report.

Triggers (SIGHUP, a change of the config file, `daemon reload`) only queue a
request; one reload runs at a time, and requests that arrive meanwhile are
answered together by the next one, which reads the file as it is then. The
file is read and checked exactly as `daemon check` does (same environment,
env file and `--set` as at start). Nothing running is touched until the new
config is known to be valid and applicable; a tier that fails to start with it
is replaced by one running the old config, and the reload is rolled back.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import TYPE_CHECKING

import structlog

from daemon.config.check import check_config
from daemon.config.diff import ConfigDiff, diff_configs
from daemon.config.handoff import write_config
from daemon.config.schema import Reload
from daemon.ipc.messages import ReloadReport
from daemon.supervisor import notify
from daemon.supervisor.triggers import config_changes

if TYPE_CHECKING:
    from daemon.supervisor.supervisor import Supervisor

log = structlog.get_logger("daemon.supervisor")

LIVE_ACK_TIMEOUT_S = 2.0


class TierStartFailed(Exception):
    """A tier started by a reload did not come up; the message says why."""


# The scopes a reload can apply today, and how.
RESTARTABLE = {Reload.WORKER, Reload.SCHEDULER}


class Reloader:
    def __init__(self, supervisor: Supervisor):
        self.supervisor = supervisor
        self.last: ReloadReport | None = None
        self.counts: Counter[str] = Counter()
        self._queue: asyncio.Queue[tuple[str, bytes | None]] = asyncio.Queue()
        self._stop_watching = asyncio.Event()
        self._watcher: asyncio.Task | None = None

    def request(self, trigger: str, reply_to: bytes | None = None) -> None:
        self._queue.put_nowait((trigger, reply_to))

    async def run(self) -> None:
        """Apply requests one at a time, for the supervisor's whole life."""
        self._follow_watch_setting()
        while True:
            trigger, reply_to = await self._queue.get()
            batch = [(trigger, reply_to)]
            while not self._queue.empty():  # requests that piled up: one reload answers them all
                batch.append(self._queue.get_nowait())
            triggers = sorted({t for t, _ in batch})
            report = await self.reload("+".join(triggers))
            for _trigger, identity in batch:
                if identity is not None:
                    await self.supervisor.reply(identity, report)

    async def stop(self) -> None:
        self._stop_watching.set()
        if self._watcher is not None:
            self._watcher.cancel()

    # --- the transaction ----------------------------------------------------------------------

    async def reload(self, trigger: str) -> ReloadReport:
        supervisor = self.supervisor
        started = time.monotonic()
        if not supervisor.serving or supervisor.stopping.is_set():
            return self._finish(trigger, started, "rejected", reason="the daemon is starting or stopping")
        notify.reloading(f"reloading generation {supervisor.generation} ({trigger})")
        report = await asyncio.to_thread(check_config, supervisor.config.path, **supervisor.sources)
        if report.config is None:
            problems = report.errors or report.violations
            reason = "; ".join(f"{v.rule}: {v.message} ({v.origin})" for v in problems[:5])
            return self._finish(trigger, started, "rejected", reason=f"the new config is invalid: {reason}")
        new = report.config
        diff = diff_configs(supervisor.config, new)
        notes = [s.message() for s in diff.shadowed]
        if diff.empty:
            return self._finish(trigger, started, "unchanged", notes=notes)
        if refusal := _refusal(diff):
            return self._finish(trigger, started, "rejected", reason=refusal, diff=diff, notes=notes)
        generation = supervisor.generation + 1
        write_config(new.settings, supervisor.socket_dir, generation)
        restarted = []
        if Reload.WORKER in diff.scopes or Reload.SCHEDULER in diff.scopes:
            try:
                await supervisor.replace_worker(generation)
            except TierStartFailed as exc:
                reason = f"the new worker did not start ({exc}); the old config's worker is serving again"
                return self._finish(trigger, started, "rolled_back", reason=reason, diff=diff, notes=notes)
            restarted.append("worker")
        supervisor.adopt(new, generation)
        missing = await supervisor.push_live(generation, LIVE_ACK_TIMEOUT_S)
        if missing:
            notes.append(f"not acknowledged within {LIVE_ACK_TIMEOUT_S:g} s by: {', '.join(missing)}")
        return self._finish(trigger, started, "applied", diff=diff, notes=notes, restarted=restarted)

    def _finish(
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
        if supervisor.serving:
            notify.ready(supervisor.status_line())
        self._follow_watch_setting()
        return report

    # --- watching the file --------------------------------------------------------------------

    def _follow_watch_setting(self) -> None:
        """Watch the config file while runtime.watch_config says so (a live setting)."""
        wanted = self.supervisor.settings.runtime.watch_config
        if wanted and self._watcher is None:
            self._stop_watching.clear()
            self._watcher = asyncio.create_task(self._watch_file())
        elif not wanted and self._watcher is not None:
            self._stop_watching.set()
            self._watcher = None

    async def _watch_file(self) -> None:
        path = self.supervisor.config.path
        log.info("config.watching", path=str(path))
        async for names in config_changes(path, self._stop_watching):
            log.info("config.changed", path=str(path), entries=sorted(names))
            self.request("file")


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
