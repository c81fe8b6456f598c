"""The daemon's files as bench/reload.py reads and writes them: the config file it edits (the way
editors do), and the JSON log it follows as it grows.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from datetime import datetime
from pathlib import Path

# --- the config file ------------------------------------------------------------------------------


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for anything JSON escapes the same way
    raise TypeError(f"no TOML for {value!r}")


def config_text(values: dict[str, dict]) -> str:
    lines = ["# written by bench/reload.py"]
    for section, keys in values.items():
        lines.append(f"\n[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> float:
    """Write `text` to a temp file beside `path` and rename it over `path`; the time.time() right after."""
    staging = path.with_name(f".{path.name}.new")
    with open(staging, "w") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(staging, path)
    return time.time()


def lookup(values: dict, dotted: str) -> object:
    for part in dotted.split("."):
        values = values[part]
    return values


# --- the daemon's log -------------------------------------------------------------------------------


def log_time(record: dict) -> float:
    """A log line's timestamp (structlog, ISO 8601 UTC) as time.time() seconds; nan if it has none."""
    with contextlib.suppress(KeyError, ValueError, TypeError):
        return datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()
    return float("nan")


class LogTail:
    """The daemon's JSON log, read as it grows; every parsed line is kept with its time in `ts`."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = b""
        self.records: list[dict] = []

    def poll(self) -> list[dict]:
        with contextlib.suppress(OSError), open(self.path, "rb") as stream:
            stream.seek(self.offset)
            chunk = stream.read()
            self.offset += len(chunk)
            self.partial += chunk
        *complete, self.partial = self.partial.split(b"\n")
        new = []
        for line in complete:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    record["ts"] = log_time(record)
                    new.append(record)
        self.records += new
        return new

    def find(self, event: str, since: float, **fields: object) -> list[dict]:
        return [
            r
            for r in self.records
            if r.get("event") == event and r["ts"] >= since and all(r.get(k) == v for k, v in fields.items())
        ]


def tier_startups(records: list[dict], since: float = 0.0) -> list[dict]:
    """Each tier process the supervisor started after `since`: tier, pid, started, ready (nan: never)."""
    started = {
        r["child_pid"]: r for r in records if r.get("event") == "tier.started" and r["ts"] >= since and "child_pid" in r
    }
    ready = {r["child_pid"]: r["ts"] for r in records if r.get("event") == "tier.ready" and "child_pid" in r}
    return [
        {"tier": r["tier"], "pid": pid, "started": r["ts"], "ready": ready.get(pid, float("nan"))}
        for pid, r in started.items()
    ]
