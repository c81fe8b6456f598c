"""The daemon's log: one JSON object a line (structlog), read incrementally as the file grows."""

from __future__ import annotations

import contextlib
import datetime
import json
import subprocess
from pathlib import Path

from harness.wait import until

READY_TIMEOUT_S = 90.0  # the default wait for a log event: long enough for a start on a slow machine


class Log:
    """A daemon's JSON log lines, read incrementally (the log grows all along under load), and waits on them.

    Events are numbered in the order they were logged: `mark()` is a position, `since(mark, ...)`
    what was logged after it. `process` (the daemon) lets a wait fail at once when it exits."""

    def __init__(self, path: Path, process: subprocess.Popen | None = None):
        self.path = path
        self.process = process
        self.events: list[dict] = []
        self._offset = 0
        self._partial = b""

    def poll(self) -> list[dict]:
        """Every event logged so far."""
        with contextlib.suppress(FileNotFoundError), open(self.path, "rb") as stream:
            stream.seek(self._offset)
            data = stream.read()
            self._offset += len(data)
            *lines, self._partial = (self._partial + data).split(b"\n")
            for line in lines:
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if isinstance(event, dict):
                        self.events.append(event)
        return self.events

    def mark(self) -> int:
        """A position: `since(mark)` is what was logged after it."""
        return len(self.poll())

    def since(self, mark: int = 0, event: str | None = None, **fields) -> list[dict]:
        """The events after `mark` (all of them by default) named `event`, with `fields` of these values."""
        return [
            e
            for e in self.poll()[mark:]
            if (event is None or e.get("event") == event) and all(e.get(k) == v for k, v in fields.items())
        ]

    def wait(
        self, event: str, *, since: int = 0, timeout: float = READY_TIMEOUT_S, or_exit: bool = False, **fields
    ) -> dict | None:
        """The first `event` with `fields` after `since`, once logged. If the daemon exits first: None with
        `or_exit`, else AssertionError (as after `timeout`)."""

        def found() -> list[dict] | str:
            if matching := self.since(since, event, **fields):
                return matching
            if self.process is not None and self.process.poll() is not None:
                if matching := self.since(since, event, **fields):  # its last lines
                    return matching
                if or_exit:
                    return "exited"
                raise AssertionError(f"the daemon exited ({self.process.returncode}) before {event}:\n{self.tail()}")
            return []

        result = until(found, timeout, interval=0.05, what=f"{event} {fields}", retry_on=(), detail=self.tail)
        return None if result == "exited" else result[0]

    def tail(self, lines: int = 40) -> str:
        """The last `lines` lines of the file as written (tracebacks and other non-JSON lines too)."""
        with contextlib.suppress(OSError):
            return "\n".join(self.path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def logged_at(event: dict) -> float:
    """An event's wall-clock time, as time.time() tells it."""
    return datetime.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
