"""A daemon run from a config file of its own, which the test edits as an operator would (in place, or by
renaming a new file over it) and has reloaded (by the file watch, SIGHUP or `daemon reload`).

The file holds configs/server.toml's settings, on a free port, with a short runtime dir; it sits alone
in its directory (the daemon watches the directory), its log beside that directory.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import tomli_w

from harness.daemons import REPO, RunningDaemon, popen_daemon, run_daemon
from harness.load import http_client
from harness.logs import READY_TIMEOUT_S, Log
from harness.procs import children

API_KEY = "reload-test-key"  # the key tests set as server.api_key
AUTH = {"Authorization": f"Bearer {API_KEY}"}
RELOAD_TIMEOUT_S = 60.0  # a reload (file change seen, worker replaced) is over within this long
READ_TIMEOUT_S = 30.0  # a client read that waits this long is a hang


def server_toml_settings(port: int, runtime_dir: Path, cache_dir: Path, **sections: dict) -> dict:
    """configs/server.toml's settings, on `port`, with its runtime files under `runtime_dir`."""
    settings = tomllib.loads((REPO / "configs" / "server.toml").read_text())
    settings["server"]["port"] = port
    settings["runtime"].update(dir=str(runtime_dir), cache_dir=str(cache_dir))
    for section, values in sections.items():
        settings.setdefault(section, {}).update(values)
    return settings


def changed(settings: dict, changes: dict[str, object] | None) -> dict:
    """`settings` with dotted keys set (None: removed)."""
    result = copy.deepcopy(settings)
    for key, value in (changes or {}).items():
        *sections, name = key.split(".")
        node = result
        for section in sections:
            node = node.setdefault(section, {})
        if value is None:
            node.pop(name, None)
        else:
            node[name] = value
    return result


def toml_text(settings: dict) -> str:
    return "# written by the test harness (tests/harness/reloadable.py)\n" + tomli_w.dumps(settings)


@dataclass
class Reloadable:
    """A running daemon and the config file it was started from, which the test edits."""

    daemon: RunningDaemon
    directory: Path  # the config file's directory: nothing else is written there
    base: dict  # the settings it was started with
    watches: bool = True  # runtime.watch_config
    base_hash: str = ""  # the config hash of `base`

    @property
    def url(self) -> str:
        return self.daemon.url

    @property
    def config(self) -> Path:
        return self.daemon.config_path

    @property
    def log(self) -> Log:
        return self.daemon.log

    def client(self, http2: bool) -> httpx.Client:
        """An httpx client of this daemon (with the API key tests may set)."""
        return http_client(self.url, http2=http2, read_timeout=READ_TIMEOUT_S, headers=AUTH)

    def write(self, changes: dict[str, object] | None = None, *, atomic: bool = False) -> str:
        """Write the base settings with `changes` into the config file (in place, or renamed over it)."""
        return self.write_text(toml_text(changed(self.base, changes)), atomic=atomic)

    def write_text(self, text: str, *, atomic: bool = False) -> str:
        if atomic:  # as editors and Ansible do: a new file renamed over the old one
            staging = self.directory / f".{self.config.name}.tmp"
            staging.write_text(text)
            os.replace(staging, self.config)
        else:
            self.config.write_text(text)
        return text

    def reload_command(self, *args: str, by_config: bool = False) -> tuple[int, dict | None, str]:
        """`daemon reload --format json`: (exit status, the report, stdout + stderr)."""
        finding = ["-c", str(self.config)] if by_config else ["--runtime-dir", str(self.daemon.runtime_dir)]
        result = run_daemon("reload", *finding, "--format", "json", *args, timeout=RELOAD_TIMEOUT_S + 30)
        report = None
        with contextlib.suppress(ValueError):
            report = json.loads(result.stdout)
        return result.returncode, report, result.stdout + result.stderr

    def server_info(self) -> dict:
        """The whole of it: some tests set server.api_key, and without it /server_info says less."""
        return httpx.get(self.url + "/server_info", headers=AUTH, timeout=10).raise_for_status().json()

    def generation(self) -> int:
        return self.server_info()["config"]["generation"]

    def status(self) -> dict:
        return json.loads((self.daemon.socket_dir / "status.json").read_text())

    def processes(self) -> dict[str, int]:
        """Every tier's PID, and those of the front-end's (Granian's) worker processes."""
        pids = self.daemon.tier_pids()
        for number, pid in enumerate(sorted(children(pids["frontend-0"]))):
            pids[f"frontend-process-{number}"] = pid
        return pids

    def next_reload(self, since: int, timeout: float = RELOAD_TIMEOUT_S) -> dict:
        return self.log.wait("config.reload", since=since, timeout=timeout)

    def reloads_since(self, since: int) -> list[dict]:
        return self.log.since(since, "config.reload")

    def apply(self, changes: dict[str, object] | None = None, *, atomic: bool = False) -> dict:
        """Write the file, have it reloaded (by the watcher, or `daemon reload`): its config.reload event."""
        mark = self.log.mark()
        self.write(changes, atomic=atomic)
        if not self.watches:
            self.reload_command()
        return self.next_reload(mark)

    def reset(self) -> None:
        """Back to the settings it started with, file and daemon, if a test left them otherwise."""
        with contextlib.suppress(tomllib.TOMLDecodeError):
            if tomllib.loads(self.config.read_text()) == self.base and self.status()["config_hash"] == self.base_hash:
                return
        self.apply()


def start(
    directory: Path, runtime_dir: Path, settings: dict, *, env: dict | None = None, config: Path | None = None
) -> Reloadable:
    """Start `daemon -c` on a config file in `directory` (its own directory: the daemon watches it)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = config or directory / "server.toml"
    if not config.exists():
        config.write_text(toml_text(settings))
    log_path = directory.parent / f"{directory.name}.log"  # outside the watched directory
    process = popen_daemon(["-c", str(config)], log_path, env)
    daemon = RunningDaemon(process, settings["server"]["port"], config, runtime_dir, log_path)
    handle = Reloadable(daemon, directory, settings)
    handle.watches = settings["runtime"].get("watch_config", True)
    try:
        daemon.wait_for_event("daemon.ready", timeout=READY_TIMEOUT_S)
        handle.base_hash = handle.status()["config_hash"]
    except BaseException:
        daemon.stop_checked()
        raise
    return handle


@contextlib.contextmanager
def running(directory: Path, settings: dict, runtime_dir: Path, **kwargs) -> Iterator[Reloadable]:
    """A Reloadable for the length of the block; then it must stop cleanly (exit 0, nothing left behind)."""
    handle = None
    try:
        handle = start(directory, runtime_dir, settings, **kwargs)
        yield handle
    finally:
        if handle is not None:
            status, left = handle.daemon.stop_checked()
        shutil.rmtree(runtime_dir, ignore_errors=True)
    assert status == 0 and not left, f"exit status {status}, left behind: {left}\n{handle.log.tail()}"
