"""The Ansible role (contrib/ansible) run for real: ansible-playbook against localhost.

The example playbook runs with a local connection into a temporary prefix (virtualenv, config,
runtime, log directories), with service management switched to direct start (no systemd here):
the role installs daemon from a copy of this checkout, templates server.toml, validates it with
`daemon check`, starts the daemon with daemonctl and reloads it with `daemon reload`. The tests
share that one deployment and run in order: first run, idempotent second run, a live change
(reloaded, not restarted), check mode, and invalid configs that validation stops. The last three
change nothing, whatever they find: their plays run at once (`quiet_plays`), and each test then
checks its own play's output and that the deployment is as it was before the three.

To keep the install fast, the prefix's virtualenv sees this environment's site-packages through
a .pth file, so torch and the other dependencies are already satisfied there (the role's torch
step runs, with --no-deps, and finds torch==2.13.0 installed) while daemon itself is installed by
the role.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from harness.daemons import REPO, clean_environ
from harness.procs import descendants, free_port
from harness.wait import until

ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
ANSIBLE = REPO / "contrib" / "ansible"
PLAYBOOK = ANSIBLE / "playbook.yml"
ROLE = ANSIBLE / "roles" / "daemon"
PLAY_TIMEOUT_S = 540
RECAP = re.compile(
    r"^localhost\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+unreachable=\d+\s+failed=(?P<failed>\d+)"
)

pytestmark = [
    pytest.mark.skipif(
        not ANSIBLE_PLAYBOOK.exists(), reason="ansible-core is not installed (pip install -e '.[test]')"
    ),
    pytest.mark.timeout(600),
]


@dataclass
class Play:
    returncode: int
    output: str
    changed: int
    failed: int

    def __str__(self) -> str:
        return f"ansible-playbook exited {self.returncode}:\n{self.output[-12000:]}"


@dataclass
class Deployment:
    prefix: Path
    port: int
    variables: dict[str, object]
    supervisor_pids: set[int] = field(default_factory=set)

    @property
    def venv(self) -> Path:
        return self.prefix / "venv"

    @property
    def config(self) -> Path:
        return Path(str(self.variables["daemon_config_dir"])) / "server.toml"

    @property
    def env_file(self) -> Path:
        return Path(str(self.variables["daemon_config_dir"])) / "daemon.env"

    @property
    def pidfile(self) -> Path:
        return Path(str(self.variables["daemon_runtime_dir"])) / "daemon.pid"

    def environ(self) -> dict[str, str]:
        env = clean_environ(
            ANSIBLE_HOME=str(self.prefix / "ansible"),
            ANSIBLE_LOCAL_TEMP=str(self.prefix / "ansible" / "tmp"),
            ANSIBLE_REMOTE_TEMP=str(self.prefix / "ansible" / "remote-tmp"),
            ANSIBLE_NOCOLOR="1",
            ANSIBLE_FORCE_COLOR="0",
            ANSIBLE_RETRY_FILES_ENABLED="0",
            ANSIBLE_PIPELINING="1",
            ANSIBLE_STDOUT_CALLBACK="default",
            LC_ALL="C.UTF-8",
        )
        env.pop("PYTHONPATH", None)  # the daemon must run from the virtualenv the role installed it into
        env.pop("ANSIBLE_CONFIG", None)
        return env

    def play(self, *options: str, extra: dict[str, object] | None = None) -> Play:
        """Run the example playbook on localhost with the deployment's variables (and `extra`)."""
        descriptor, name = tempfile.mkstemp(prefix="vars-", suffix=".json", dir=self.prefix)  # one per play
        os.close(descriptor)
        variables = Path(name)
        variables.write_text(json.dumps({**self.variables, **(extra or {})}))
        result = subprocess.run(
            [str(ANSIBLE_PLAYBOOK), "-i", str(self.prefix / "inventory.ini"), str(PLAYBOOK), "-e", f"@{variables}"]
            + list(options),
            capture_output=True,
            text=True,
            timeout=PLAY_TIMEOUT_S,
            env=self.environ(),
            cwd=self.prefix,
        )
        output = result.stdout + result.stderr
        self._note_pid()
        recap = [m for line in output.splitlines() if (m := RECAP.match(line))]
        assert recap, f"no PLAY RECAP for localhost:\n{output[-12000:]}"
        return Play(result.returncode, output, int(recap[-1]["changed"]), int(recap[-1]["failed"]))

    def _note_pid(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.supervisor_pids.add(int(self.pidfile.read_text().split()[0]))

    def daemon(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.venv / "bin" / "daemon"), *args, "-c", str(self.config), "--env-file", str(self.env_file)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.environ(),
        )

    def status(self) -> dict:
        result = self.daemon("status", "--format", "json")
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout)

    def pid(self) -> int:
        if not self.pidfile.exists():
            pytest.fail(f"no daemon is running ({self.pidfile} is missing): see the first failure above")
        return int(self.pidfile.read_text().split()[0])

    def health(self) -> int:
        return httpx.get(f"http://127.0.0.1:{self.port}/health_generate", timeout=30).status_code

    def server_info(self) -> dict:
        return httpx.get(f"http://127.0.0.1:{self.port}/server_info", timeout=30).json()


def _build_venv(prefix: Path) -> None:
    """A virtualenv that sees this one's packages (torch and the rest), without daemon installed in it."""
    subprocess.run([sys.executable, "-m", "venv", str(prefix / "venv")], check=True, timeout=300)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(prefix / "venv")}))
    ours = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "_test_dependencies.pth").write_text("".join(f"{p}\n" for p in ours))


def _copy_source(destination: Path) -> None:
    """What pip needs to build daemon, copied so that building it leaves nothing in the checkout."""
    destination.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, destination / name)
    shutil.copytree(REPO / "daemon", destination / "daemon", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _ours(pid: int, prefix: Path) -> bool:
    """The process runs something under `prefix` (its command line names it)."""
    with contextlib.suppress(OSError):
        return str(prefix).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    return False


def _cleanup(deployment: Deployment) -> None:
    """Stop the daemon (daemonctl: SIGTERM, then SIGKILL), then kill by PID whatever is left of it."""
    ctl = deployment.venv / "bin" / "daemonctl"
    if ctl.exists():
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run([str(ctl), "stop"], capture_output=True, timeout=120, env=deployment.environ())
    deployment._note_pid()
    leftovers = set()
    for pid in deployment.supervisor_pids:
        leftovers |= {pid, *descendants(pid)}
    for entry in Path("/proc").iterdir():  # anything else started from the prefix (its virtualenv, its config)
        if entry.name.isdigit() and int(entry.name) != os.getpid() and _ours(int(entry.name), deployment.prefix):
            leftovers.add(int(entry.name))
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def deployment(model_cache: Path) -> Iterator[Deployment]:
    prefix = Path(tempfile.mkdtemp(prefix="dm-ans-", dir="/tmp"))  # short: runtime.dir holds Unix sockets
    port = free_port()
    deployment = Deployment(
        prefix,
        port,
        {
            "daemon_hosts": "localhost",
            "daemon_become": False,
            "daemon_service_manager": "direct",
            "daemon_venv": str(prefix / "venv"),
            "daemon_package": str(prefix / "src"),
            "daemon_config_dir": str(prefix / "etc"),
            "daemon_runtime_dir": str(prefix / "run"),
            "daemon_cache_dir": str(model_cache),
            "daemon_log_dir": str(prefix / "log"),
            "daemon_port": port,
            "daemon_drain_timeout_s": 10,
            # The handler, not the file watch, applies changes: the test sees the reload it ran.
            "daemon_watch_config": False,
            # torch is there (see above): pip need not walk its dependencies again in every play.
            "daemon_torch_pip_args": "--no-deps",
        },
    )
    (prefix / "inventory.ini").write_text(
        f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n"
    )
    try:
        _build_venv(prefix)
        _copy_source(prefix / "src")
        yield deployment
    finally:
        _cleanup(deployment)
        shutil.rmtree(prefix, ignore_errors=True)


def test_first_run_installs_configures_and_starts_the_daemon(deployment: Deployment):
    play = deployment.play()
    assert play.returncode == 0, play
    assert play.changed > 0, play
    assert (deployment.venv / "bin" / "daemon").exists()
    assert tomllib.loads(deployment.config.read_text())["server"]["port"] == deployment.port
    assert deployment.health() == 200
    status = deployment.status()
    assert status["generation"] == 1
    assert status["supervisor_pid"] == deployment.pid()
    # It runs the daemon the role installed, from the prefix's virtualenv.
    assert str(deployment.venv / "bin" / "daemon") in Path(f"/proc/{deployment.pid()}/cmdline").read_text()


def test_second_run_changes_nothing(deployment: Deployment):
    pid = deployment.pid()
    play = deployment.play()
    assert play.returncode == 0, play
    assert play.changed == 0, play
    status = deployment.status()
    assert (status["generation"], status["supervisor_pid"]) == (1, pid)


def test_live_change_is_reloaded_in_place(deployment: Deployment):
    pid, tiers = deployment.pid(), {t["tier"]: t["pid"] for t in deployment.status()["tiers"]}
    deployment.variables["daemon_max_queued_requests"] = 7
    play = deployment.play()
    assert play.returncode == 0, play
    assert play.changed >= 1, play
    assert "RUNNING HANDLER [daemon : Reload daemon (direct)]" in play.output, play
    assert "RUNNING HANDLER [daemon : Restart daemon (direct)]" not in play.output, play
    status = deployment.status()
    assert (status["generation"], status["supervisor_pid"]) == (2, pid)
    assert status["last_reload"]["result"] == "applied"
    assert status["last_reload"]["trigger"] == "command"
    assert {t["tier"]: t["pid"] for t in status["tiers"]} == tiers  # a live key: no tier restarted
    assert deployment.server_info()["effective_config"]["scheduler"]["max_queued_requests"] == 7
    assert deployment.health() == 200


# The plays that change nothing: check mode, and two invalid configs (one per path validation
# takes: server.toml, and the env file, which is checked against the current config before it
# replaces the live one).
QUIET_PLAYS: dict[str, tuple[tuple[str, ...], dict[str, object]]] = {
    "check-mode": (("--check", "--diff"), {"daemon_max_queued_requests": 9}),
    "unknown-key": ((), {"daemon_config_extra": {"server": {"prot": 8001}}}),
    "env-file-unknown-variable": ((), {"daemon_env": {"DAEMON_SERVER__PROT": "8001"}}),
}


@dataclass
class QuietPlays:
    plays: dict[str, Play]
    config: bytes  # the deployment before the plays
    env_file: bytes
    pid: int

    def assert_nothing_changed(self, deployment: Deployment) -> None:
        assert deployment.config.read_bytes() == self.config
        assert deployment.env_file.read_bytes() == self.env_file
        status = deployment.status()
        assert (status["generation"], status["supervisor_pid"]) == (2, self.pid)
        assert deployment.health() == 200


@pytest.fixture(scope="module")
def quiet_plays(deployment: Deployment) -> QuietPlays:
    """The QUIET_PLAYS, run at once (ansible-playbook is one process a play, each waited on in a thread),
    once the live change is in place; the deployment as it was before them."""
    before = QuietPlays({}, deployment.config.read_bytes(), deployment.env_file.read_bytes(), deployment.pid())
    with ThreadPoolExecutor(len(QUIET_PLAYS)) as threads:
        running = {
            name: threads.submit(deployment.play, *options, extra=extra)
            for name, (options, extra) in QUIET_PLAYS.items()
        }
    before.plays = {name: future.result() for name, future in running.items()}
    return before


def test_check_mode_shows_the_diff_and_changes_nothing(deployment: Deployment, quiet_plays: QuietPlays):
    play = quiet_plays.plays["check-mode"]  # --check --diff, daemon_max_queued_requests: 9
    assert play.returncode == 0, play
    assert "-max_queued_requests = 7" in play.output, play
    assert "+max_queued_requests = 9" in play.output, play
    quiet_plays.assert_nothing_changed(deployment)


@pytest.mark.parametrize(
    ("case", "messages"),
    [
        ("unknown-key", ["error[schema.unknown-key] server.prot", "did you mean server.port?"]),
        ("env-file-unknown-variable", ["error[env.unknown-variable]", "did you mean DAEMON_SERVER__PORT?"]),
    ],
    ids=["unknown-key", "env-file-unknown-variable"],
)
def test_invalid_config_fails_validation_and_changes_nothing(
    deployment: Deployment, quiet_plays: QuietPlays, case: str, messages: list[str]
):
    play = quiet_plays.plays[case]  # the extra variables of QUIET_PLAYS[case]
    assert play.returncode != 0, play
    assert play.failed == 1, play
    assert "failed to validate" in play.output, play
    for message in messages:
        assert message in play.output, play
    quiet_plays.assert_nothing_changed(deployment)


def test_stopped_state_stops_the_daemon_and_all_it_started(deployment: Deployment):
    pid = deployment.pid()
    children = descendants(pid)
    assert children
    play = deployment.play(extra={"daemon_service_state": "stopped"})
    assert play.returncode == 0, play
    assert play.changed == 1, play
    assert not deployment.pidfile.exists()
    # stopped (exited: a zombie until init reaps it, or gone)
    until(lambda: not [p for p in (pid, *children) if _running(p)], 30, 0.2, "every process stopped", retry_on=())
    log = (Path(str(deployment.variables["daemon_log_dir"])) / "daemon.log").read_text()
    assert '"event": "daemon.stopped"' in log  # a graceful stop, not the kill after the timeout


def _running(pid: int) -> bool:
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    return False


@pytest.mark.parametrize("unit_type", ["notify-reload", "notify"])
def test_systemd_unit(tmp_path: Path, unit_type: str):
    """The role's unit, rendered with its defaults; `systemd-analyze verify` where this systemd knows the type."""
    playbook = tmp_path / "render.yml"
    unit = tmp_path / "daemon.service"
    playbook.write_text(
        json.dumps(
            [
                {
                    "hosts": "localhost",
                    "gather_facts": False,
                    "tasks": [
                        {"ansible.builtin.include_vars": str(ROLE / "defaults" / "main.yml")},
                        {
                            "ansible.builtin.template": {
                                "src": str(ROLE / "templates" / "daemon.service.j2"),
                                "dest": str(unit),
                            }
                        },
                    ],
                }
            ]
        )
    )
    venv = tmp_path / "venv"  # systemd-analyze wants the ExecStart= command to exist
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "daemon").write_text("#!/bin/sh\n")
    (venv / "bin" / "daemon").chmod(0o755)
    extra = {"daemon_unit_type": unit_type, "daemon_venv": str(venv), "ansible_python_interpreter": sys.executable}
    env = clean_environ(
        ANSIBLE_HOME=str(tmp_path / "ansible"),
        ANSIBLE_LOCAL_TEMP=str(tmp_path / "tmp"),
        ANSIBLE_REMOTE_TEMP=str(tmp_path / "remote-tmp"),
        ANSIBLE_NOCOLOR="1",
        LC_ALL="C.UTF-8",
    )
    result = subprocess.run(
        [str(ANSIBLE_PLAYBOOK), "-i", "localhost,", "-c", "local", str(playbook), "-e", json.dumps(extra)],
        capture_output=True,
        text=True,
        timeout=PLAY_TIMEOUT_S,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = unit.read_text().splitlines()
    assert f"Type={unit_type}" in lines
    assert f"ExecStartPre={venv}/bin/daemon check -c /etc/daemon/server.toml" in lines
    assert f"ExecStart={venv}/bin/daemon -c /etc/daemon/server.toml" in lines
    assert "EnvironmentFile=-/etc/daemon/daemon.env" in lines
    assert "RuntimeDirectory=daemon" in lines
    reload = [line for line in lines if line.startswith("ExecReload=")]
    assert reload == (
        []
        if unit_type == "notify-reload"
        else [f"ExecReload={venv}/bin/daemon reload -c /etc/daemon/server.toml --timeout 900"]
    )
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    version = int(subprocess.run(["systemctl", "--version"], capture_output=True, text=True).stdout.split()[1])
    if unit_type == "notify-reload" and version < 253:
        return  # notify-reload is systemd 253's
    verify = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and "daemon.service" not in verify.stderr, verify.stderr


# --- the role's filters, without Ansible running ------------------------------------------------


def _filters():
    spec = importlib.util.spec_from_file_location("daemon_filters", ROLE / "filter_plugins" / "daemon_filters.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_toml_filter_round_trips():
    filters = _filters()
    config = {
        "server": {"host": "127.0.0.1", "port": 8000, "enable_http2": True, "api_key": None, "tls": {"refresh": False}},
        "model": {"path": 'C:\\odd "path"\n\x7f', "served_model_name": "modèle"},
        "runtime": {"drain_timeout_s": 2.5},
        "extra": {"list": [1, "two", {"three": 3}], "dotted.key": 1},
    }
    expected = {
        "server": {"host": "127.0.0.1", "port": 8000, "enable_http2": True, "tls": {"refresh": False}},
        "model": {"path": 'C:\\odd "path"\n\x7f', "served_model_name": "modèle"},
        "runtime": {"drain_timeout_s": 2.5},
        "extra": {"list": [1, "two", {"three": 3}], "dotted.key": 1},
    }
    assert tomllib.loads(filters.daemon_toml(config)) == expected


def test_typed_filters_convert_strings_and_pass_the_rest_on():
    filters = _filters()
    assert filters.daemon_int("8000") == 8000
    assert filters.daemon_int("80x") == "80x"  # daemon check rejects it, with its own message
    assert filters.daemon_int(None) is None
    assert filters.daemon_number("2.5") == 2.5
    assert filters.daemon_number("30") == 30
    assert filters.daemon_bool("True") is True
    assert filters.daemon_bool("no") is False
    assert filters.daemon_bool("maybe") == "maybe"
    assert filters.daemon_env_value("plain/value:1") == "plain/value:1"
    assert filters.daemon_env_value("has $dollar and space") == "'has $dollar and space'"
