"""The operations integrations in contrib/ hold together with the daemon they run.

systemd: the unit passes `systemd-analyze verify` and its security review, its
numbers agree with the daemon's (drain, watchdog, start-up), and the daemon
speaks sd_notify as Type=notify-reload expects (checked against a fake
NOTIFY_SOCKET). Kubernetes: the manifests pass the API schemas, their ports,
probes, grace period and mounts agree with the ConfigMap's config, which passes
`daemon check`; so do the multi-node example's LeaderWorkerSet pods, each with the
environment LWS gives it. Grafana: every metric the dashboard charts is one the
daemon exports. Editors: the example configs pass the JSON Schema, and Taplo.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
import tomli
import yaml
from harness.daemons import DAEMON, REPO, RunningDaemon, run_daemon, serving, start_daemon
from harness.notify import NotifySocket

from daemon.config.schema import RuntimeSettings
from daemon.frontend.probes import HEALTH_GENERATE_TIMEOUT_S
from daemon.supervisor.arbiter import BACKOFF_MAX_S
from daemon.supervisor.process import STARTUP_TIMEOUT_S, STOP_GRACE_S
from daemon.supervisor.supervisor import FIRST_GENERATION_TIMEOUT_S

CONTRIB = REPO / "contrib"
SYSTEMD = CONTRIB / "systemd"
KUBERNETES = CONTRIB / "kubernetes"
MULTI_NODE = KUBERNETES / "multi-node"
GRAFANA = CONTRIB / "grafana"
SCHEMA = json.loads((REPO / "schemas" / "server.schema.json").read_text())
EXAMPLES = sorted((REPO / "configs").glob("*.toml"))
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
SYSTEMD_SYSUSERS = shutil.which("systemd-sysusers")
UNIT_DAEMON = "/opt/daemon/venv/bin/daemon"
UNIT_CONFIG = "/etc/daemon/server.toml"
API_KEY = {"DAEMON_SERVER__API_KEY": "test-key"}


def tool(name: str) -> str | None:
    """A command-line tool from the test virtual environment, else from PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


# --- systemd --------------------------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """A unit file's sections as (key, value) lists, in order (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in text.replace("\\\n", " ").splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"a key outside a section: {line}"
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def unit_value(unit: dict, section: str, key: str) -> str:
    values = [v for k, v in unit[section] if k == key]
    assert values, f"[{section}] {key}= is not set"
    return values[-1]


def timespan_s(text: str) -> float:
    """systemd's time span syntax ("3min 20s", "180", "90s") in seconds."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text)
    assert parts and "".join(n + u for n, u in parts) == text.replace(" ", ""), f"not a time span: {text}"
    return sum(float(number) * units[unit] for number, unit in parts)


UNIT = parse_unit((SYSTEMD / "daemon.service").read_text())


def env_file_values(path: Path) -> dict[str, str]:
    return dict(
        line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")
    )


def systemd_version() -> int:
    out = subprocess.run([SYSTEMD_ANALYZE, "--version"], capture_output=True, text=True, timeout=30).stdout
    return int(re.match(r"systemd (\d+)", out).group(1))


def unit_copy(directory: Path, text: str | None = None) -> Path:
    """The unit with its ExecStart paths pointing at this test environment's `daemon` (verify
    checks that the executables exist)."""
    path = directory / "daemon.service"
    text = (SYSTEMD / "daemon.service").read_text() if text is None else text
    path.write_text(text.replace(UNIT_DAEMON, str(DAEMON)))
    return path


def verify(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", "--generators=no", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=path.parent,
    )


# systemd older than 253 does not know these two; with them ignored, the unit is the documented
# fallback minus ExecReload= (which the next test checks separately).
NOTIFY_RELOAD_ONLY = (
    re.compile(r"Failed to parse service type, ignoring: notify-reload"),
    re.compile(r"Unknown key '?ReloadSignal'? in section '?\[?Service\]?'?"),
)


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path):
    result = verify(unit_copy(tmp_path))
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    if systemd_version() >= 253:
        assert result.returncode == 0 and not lines, "\n".join(lines)
    else:  # only notify-reload is beyond it: the rest of the unit must be clean
        unexpected = [line for line in lines if not any(p.search(line) for p in NOTIFY_RELOAD_ONLY)]
        assert not unexpected, "\n".join(unexpected)


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_unit_fallback_for_systemd_before_253_verifies_clean(tmp_path: Path):
    # What the unit's header tells users of older systemd to do.
    text = (SYSTEMD / "daemon.service").read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text
    text = text.replace("Type=notify-reload\n", "Type=notify\nExecReload=/bin/kill -HUP $MAINPID\n")
    text = text.replace("ReloadSignal=SIGHUP\n", "")
    result = verify(unit_copy(tmp_path, text))
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_unit_security_exposure_stays_low(tmp_path: Path):
    path = unit_copy(tmp_path)
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--threshold=45", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert "Overall exposure level" in result.stdout


def test_unit_runs_the_checked_config_as_notify_reload():
    service = dict(UNIT["Service"])
    assert service["Type"] == "notify-reload"
    assert service.get("ReloadSignal", "SIGHUP") == "SIGHUP"  # what the supervisor reloads on
    assert service["NotifyAccess"] == "main"
    assert unit_value(UNIT, "Service", "ExecStartPre") == f"{UNIT_DAEMON} check -c {UNIT_CONFIG}"
    assert unit_value(UNIT, "Service", "ExecStart") == f"{UNIT_DAEMON} -c {UNIT_CONFIG}"
    assert unit_value(UNIT, "Service", "EnvironmentFile") == "-/etc/daemon/daemon.env"
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"  # daemon's exit status for an invalid config


def test_unit_timeouts_fit_the_daemon():
    service = dict(UNIT["Service"])
    # The watchdog is pinged every WatchdogSec/2 unless a tier has been down that long: a tier
    # waiting out its restart backoff must not stop the pings.
    assert timespan_s(service["WatchdogSec"]) / 2 > BACKOFF_MAX_S
    # ... and the supervisor's own hang detection, which restarts only the hung tier, acts first.
    assert timespan_s(service["WatchdogSec"]) > RuntimeSettings().hang_timeout_s
    # Start-up ends with READY=1, after the model worker's start and the first generation.
    assert timespan_s(service["TimeoutStartSec"]) > STARTUP_TIMEOUT_S["worker"] + FIRST_GENERATION_TIMEOUT_S
    # Stop: the front-end drains (drain_timeout_s, then STOP_GRACE_S), then each back-end tier
    # gets STOP_GRACE_S. The longest drain of the example configs must fit.
    drains = [30.0] + [tomli.loads(p.read_text()).get("runtime", {}).get("drain_timeout_s", 30) for p in EXAMPLES]
    tiers = 2 + max(tomli.loads(p.read_text()).get("tokenizer", {}).get("workers", 1) for p in EXAMPLES)
    assert timespan_s(service["TimeoutStopSec"]) > max(drains) + STOP_GRACE_S * (1 + tiers)


def test_unit_lets_the_supervisor_drain():
    service = dict(UNIT["Service"])
    assert service["KillMode"] in ("mixed", "control-group")  # not process: leftovers would survive
    assert service.get("KillSignal", "SIGTERM") in ("SIGTERM", "SIGINT")  # the supervisor drains on these


def test_unit_hardening_leaves_the_daemon_its_directories():
    service = dict(UNIT["Service"])
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "RuntimeDirectory": "daemon",
    }.items():
        assert service[key] == value, key
    assert "PrivateDevices" not in service, "PrivateDevices= hides the GPUs"
    assert "MemoryDenyWriteExecute" not in service, "PyTorch and CUDA need writable executable memory"
    assert service["User"] not in ("root", "daemon", "nobody"), "a dedicated user"
    env = env_file_values(SYSTEMD / "daemon.env")
    assert env["DAEMON_RUNTIME__DIR"] == "/run/" + service["RuntimeDirectory"]
    writable = [f"/var/cache/{service['CacheDirectory']}"] + service.get("ReadWritePaths", "").split()
    assert env["DAEMON_RUNTIME__CACHE_DIR"] in writable
    assert len(env["DAEMON_RUNTIME__DIR"]) <= 59  # rule runtime.dir-too-long


@pytest.mark.skipif(SYSTEMD_SYSUSERS is None, reason="systemd-sysusers is not installed")
def test_sysusers_file_creates_the_units_user(tmp_path: Path):
    (tmp_path / "etc").mkdir()
    result = subprocess.run(
        [SYSTEMD_SYSUSERS, f"--root={tmp_path}", str(SYSTEMD / "daemon.sysusers.conf")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    users = {line.split(":")[0]: line for line in (tmp_path / "etc" / "passwd").read_text().splitlines()}
    groups = {line.split(":")[0] for line in (tmp_path / "etc" / "group").read_text().splitlines()}
    service = dict(UNIT["Service"])
    assert service["User"] in users and service["Group"] in groups
    assert users[service["User"]].endswith(":/usr/sbin/nologin")


def effective_offline(path: Path, environ: dict[str, str], env_file: Path | None = None):
    """The effective settings of a config meant for another machine (`daemon config show` checks
    this host's model directory and GPUs, so the check's pipeline is called offline instead)."""
    from daemon.config.check import check_config

    report = check_config(path, environ=environ, env_file=env_file, offline=True)
    assert report.config is not None, [v.to_line() for v in report.violations]
    return report.config.settings


def test_env_file_configures_the_example_as_the_unit_runs_it():
    args = ["--env-file", str(SYSTEMD / "daemon.env")]
    result = run_daemon("check", "-c", "configs/gpu.toml", "--offline", "--strict", *args, env=API_KEY)
    assert result.returncode == 0, result.stdout + result.stderr
    settings = effective_offline(REPO / "configs" / "gpu.toml", API_KEY, SYSTEMD / "daemon.env")
    assert settings.runtime.dir == Path("/run/daemon")
    assert settings.runtime.cache_dir == Path("/var/cache/daemon")


def test_watchdog_pings_come_from_the_supervisor_only(monkeypatch):
    # systemd sets WATCHDOG_PID to the main PID; the tiers inherit it and must not ping.
    from daemon.supervisor import notify

    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert notify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notify.watchdog_interval() == 15.0


@pytest.fixture
def notify_socket(short_tmp: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(short_tmp / "notify")
    yield listener
    listener.close()


def test_daemon_speaks_sd_notify_as_notify_reload_expects(
    tmp_path: Path, short_tmp: Path, model_cache: Path, notify_socket: NotifySocket
):
    env = {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "2000000"}  # a ping every second
    # The file watch is off so that only the two `daemon reload` commands below reload.
    daemon = start_daemon(tmp_path, short_tmp / "run", model_cache, {"runtime.watch_config": False}, env=env)
    try:
        reload_command = ["reload", "--runtime-dir", str(daemon.runtime_dir), "--format", "json"]
        original = daemon.config_path.read_text()
        daemon.config_path.write_text(original.replace("drain_timeout_s = 10", "drain_timeout_s = 12"))  # live
        applied = run_daemon(*reload_command, timeout=300)
        assert applied.returncode == 0, applied.stdout + applied.stderr
        applied_report = json.loads(applied.stdout)
        assert (applied_report["result"], applied_report["generation"]) == ("applied", 2)

        daemon.config_path.write_text(original.replace(f"port = {daemon.port}", 'port = "not a port"'))
        rejected = run_daemon(*reload_command, timeout=300)
        assert rejected.returncode == 1, rejected.stdout + rejected.stderr
        assert json.loads(rejected.stdout)["result"] == "rejected"
        # a few more watchdog intervals: pings that come after the last READY=1
        last_ready = notify_socket.received("READY")[-1].received_usec
        notify_socket.wait(2, kind="WATCHDOG", after_usec=last_ready, timeout=10)
    finally:
        status = daemon.stop()
    assert status == 0, daemon.log_tail()
    notify_socket.wait(1, kind="STOPPING", timeout=10)  # the last datagram is read
    messages = list(notify_socket.messages)

    assert {m.pid for m in messages} == {daemon.pid}, "only the supervisor notifies (NotifyAccess=main)"
    lifecycle = [m for m in messages if m.kind != "WATCHDOG"]
    assert [m.kind for m in lifecycle] == ["READY", "RELOADING", "READY", "RELOADING", "READY", "STOPPING"], [
        m.fields for m in messages
    ]
    ready1, reloading1, ready2, reloading2, ready3, stopping = lifecycle
    assert all("STATUS" in m.fields for m in lifecycle)
    hash1 = re.fullmatch(r"serving generation 1 \(config (\w+)\)", ready1.fields["STATUS"]).group(1)
    assert reloading1.fields["STATUS"] == "reloading generation 1 (command)"
    served2 = re.fullmatch(r"serving generation 2 \(config (\w+)\); last reload applied", ready2.fields["STATUS"])
    hash2 = served2.group(1)
    assert hash2 != hash1 and hash2 == applied_report["config_hash"]
    assert reloading2.fields["STATUS"] == "reloading generation 2 (command)"
    assert ready3.fields["STATUS"].startswith(f"serving generation 2 (config {hash2}); last reload rejected: ")
    assert "port" in ready3.fields["STATUS"]
    assert stopping.fields["STATUS"].startswith("stopping")
    for reloading in (reloading1, reloading2):
        # MONOTONIC_USEC: CLOCK_MONOTONIC when the reload started, which tells systemd this
        # RELOADING=1 from an earlier one.
        sent = int(reloading.fields["MONOTONIC_USEC"])
        assert 0 <= reloading.received_usec - sent < 5_000_000
    assert int(reloading1.fields["MONOTONIC_USEC"]) < int(reloading2.fields["MONOTONIC_USEC"])

    pings = [m for m in messages if m.kind == "WATCHDOG"]
    assert all(m.fields == {"WATCHDOG": "1"} for m in pings)
    assert all(ready1.received_usec <= m.received_usec <= stopping.received_usec for m in pings), (
        "the watchdog runs from READY=1 to STOPPING=1"
    )
    assert len(pings) >= 2
    # Every second (WATCHDOG_USEC / 2); gaps of more than the whole WATCHDOG_USEC would get the
    # daemon killed by systemd. Generous for a loaded machine, still far from no pings at all.
    times = [ready1.received_usec] + [m.received_usec for m in pings] + [stopping.received_usec]
    assert max(b - a for a, b in zip(times, times[1:], strict=False)) < 4_000_000


FROZEN_S = 12.0  # longer than the supervisor's 5 s threshold for a silent tier, plus a few pings


def test_watchdog_is_not_fed_while_a_tier_is_frozen(
    tmp_path: Path, short_tmp: Path, model_cache: Path, notify_socket: NotifySocket
):
    """The scheduler frozen (SIGSTOP) with the daemon's own hang detection off: systemd's watchdog
    stops being fed once the tier has been silent for 5 s, and is fed again once it is back."""
    env = {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "2000000"}  # a ping every second
    settings = {"runtime.watch_config": False, "runtime.hang_timeout_s": 0}
    daemon = start_daemon(tmp_path, short_tmp / "run", model_cache, settings, env=env)
    try:
        scheduler = daemon.tier_pids()["scheduler-0"]
        frozen = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        os.kill(scheduler, signal.SIGSTOP)
        try:
            time.sleep(FROZEN_S)  # the freeze itself is what is measured
        finally:
            os.kill(scheduler, signal.SIGCONT)
        thawed = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notify_socket.wait(2, kind="WATCHDOG", after_usec=thawed, timeout=15)  # the pings resume
    finally:
        status = daemon.stop()
    assert status == 0, daemon.log_tail()
    pings = [m.received_usec for m in notify_socket.messages if m.kind == "WATCHDOG"]
    assert any(t < frozen for t in pings), "no ping before the freeze"
    silent_from = frozen + 9_000_000  # 5 s of silence, a ping interval, slack for a loaded machine
    assert not [t for t in pings if silent_from < t < thawed], "pinged while the scheduler was frozen"
    assert len([t for t in pings if t > thawed]) >= 2, "the pings did not resume"
    assert not [e for e in daemon.log_events() if e.get("event") == "tier.hung"], "hang detection was off"


# --- Kubernetes -----------------------------------------------------------------------------------


def load_manifests(directory: Path = KUBERNETES) -> dict[str, dict]:
    """Every object in the directory's *.yaml (not its subdirectories') but the kustomization, by kind."""
    objects: dict[str, dict] = {}
    for path in sorted(directory.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is None or document.get("kind") == "Kustomization":
                continue
            assert document["kind"] not in objects, f"two {document['kind']} objects"
            objects[document["kind"]] = document
    return objects


MANIFESTS = load_manifests()
DEPLOYMENT = MANIFESTS["Deployment"]
POD = DEPLOYMENT["spec"]["template"]["spec"]
CONTAINER = POD["containers"][0]
CONFIGMAP_TOML_TEXT = MANIFESTS["ConfigMap"]["data"]["server.toml"]
CONFIGMAP_TOML = tomli.loads(CONFIGMAP_TOML_TEXT)


def container_port(port: int | str) -> int:
    """A probe's or Service's port, named or numbered, as the container's port number."""
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in CONTAINER["ports"] if p.get("name") == port)


def container_env() -> dict[str, str]:
    """The container's environment; Secret references get a stand-in value."""
    env = {}
    for entry in CONTAINER["env"]:
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            assert "secretKeyRef" in entry["valueFrom"], entry
            env[entry["name"]] = "stand-in-secret"
    return env


def test_manifests_are_the_expected_objects():
    assert set(MANIFESTS) == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert "configMapGenerator" not in kustomization, "a generated (hashed) name would defeat hot reload"


def assert_valid_for_kubernetes(documents: dict[str, dict], version: str) -> None:
    """Each of `documents` (by a name for the message) passes Kubernetes `version`'s API schema."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    version = kubernetes_validate.latest_version() if version == "latest" else version
    for name, document in documents.items():
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} against Kubernetes {version}: {exc}")


def kustomize(directory: Path) -> list[dict]:
    """What `kubectl kustomize` builds from `directory`."""
    result = subprocess.run([tool("kubectl"), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.mark.parametrize("version", ["1.30.0", "latest"])
def test_manifests_pass_the_kubernetes_api_schemas(version: str):
    assert_valid_for_kubernetes(MANIFESTS, version)


@pytest.mark.skipif(tool("kubectl") is None, reason="kubectl is not installed")
def test_kustomization_builds():
    built = kustomize(KUBERNETES)
    assert {d["kind"] for d in built} == set(MANIFESTS)
    assert next(d for d in built if d["kind"] == "ConfigMap")["metadata"]["name"] == "daemon-config"


def test_ports_agree_with_the_configmaps_server_port():
    port = CONFIGMAP_TOML["server"]["port"]
    assert CONFIGMAP_TOML["server"]["host"] in ("0.0.0.0", "::"), "reachable from outside the pod"
    assert [p["containerPort"] for p in CONTAINER["ports"]] == [port]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container_port(CONTAINER[probe]["httpGet"]["port"]) == port, probe
    service = MANIFESTS["Service"]
    assert service["spec"]["selector"].items() <= DEPLOYMENT["spec"]["template"]["metadata"]["labels"].items()
    assert [container_port(p["targetPort"]) for p in service["spec"]["ports"]] == [port]
    if any(p.get("appProtocol") == "kubernetes.io/h2c" for p in service["spec"]["ports"]):
        assert CONFIGMAP_TOML["server"].get("enable_http2", True), "h2c needs server.enable_http2"
    annotations = DEPLOYMENT["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == port and annotations["prometheus.io/path"] == "/metrics"


def test_probes_use_the_daemons_health_endpoints():
    assert CONTAINER["livenessProbe"]["httpGet"]["path"] == "/health"
    assert CONTAINER["readinessProbe"]["httpGet"]["path"] == "/health_generate"
    assert CONTAINER["readinessProbe"]["timeoutSeconds"] > HEALTH_GENERATE_TIMEOUT_S
    startup = CONTAINER["startupProbe"]
    assert startup["httpGet"]["path"] in ("/health", "/health_generate")
    assert startup["periodSeconds"] * startup["failureThreshold"] >= STARTUP_TIMEOUT_S["worker"], "model load"


def test_grace_period_covers_prestop_and_the_drain():
    drain = CONFIGMAP_TOML["runtime"]["drain_timeout_s"]
    pre_stop = CONTAINER["lifecycle"]["preStop"]
    sleep = pre_stop["sleep"]["seconds"] if "sleep" in pre_stop else int(pre_stop["exec"]["command"][-1])
    assert 0 < sleep <= 15
    # The front-end drains, then the back-end tiers (worker, scheduler, tokenizers) stop.
    tiers = 2 + CONFIGMAP_TOML.get("tokenizer", {}).get("workers", 1)
    assert POD["terminationGracePeriodSeconds"] > sleep + drain + STOP_GRACE_S
    assert POD["terminationGracePeriodSeconds"] >= sleep + drain + STOP_GRACE_S * (1 + tiers)


def test_config_is_mounted_as_a_directory_and_the_command_reads_it():
    volume = next(v for v in POD["volumes"] if v.get("configMap", {}).get("name") == "daemon-config")
    mount = next(m for m in CONTAINER["volumeMounts"] if m["name"] == volume["name"])
    assert "subPath" not in mount and "subPathExpr" not in mount, "a subPath mount never sees ConfigMap updates"
    assert "items" not in volume["configMap"] or any(i["path"] == "server.toml" for i in volume["configMap"]["items"])
    command = CONTAINER["command"] + CONTAINER.get("args", [])
    assert Path(command[0]).name == "daemon"
    config = Path(command[command.index("-c") + 1])
    assert config.parent == Path(mount["mountPath"]) and config.name in MANIFESTS["ConfigMap"]["data"]
    assert CONFIGMAP_TOML["runtime"].get("watch_config", True), "reload on ConfigMap updates"


def test_runtime_dir_is_an_emptydir_and_the_overrides_name_real_keys():
    env = container_env()
    overrides = {k: v for k, v in env.items() if k.startswith("DAEMON_")}
    assert {"DAEMON_RUNTIME__DIR", "DAEMON_SERVER__API_KEY"} <= set(overrides)
    mounts = {m["mountPath"]: m["name"] for m in CONTAINER["volumeMounts"]}
    volumes = {v["name"]: v for v in POD["volumes"]}
    for key in ("DAEMON_RUNTIME__DIR", "DAEMON_RUNTIME__CACHE_DIR"):
        assert "emptyDir" in volumes[mounts[env[key]]], key
    assert len(env["DAEMON_RUNTIME__DIR"]) <= 59  # rule runtime.dir-too-long
    model = Path(CONFIGMAP_TOML["model"]["path"])
    assert any(model.is_relative_to(path) for path in mounts), "model.path is on a mounted volume"


def test_pod_requests_a_gpu():
    resources = CONTAINER["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"].get("nvidia.com/gpu", 1) == 1
    assert CONFIGMAP_TOML["model"]["device"] in ("cuda", "auto")


def test_configmap_config_passes_daemon_check_with_the_deployments_environment(tmp_path: Path):
    config = tmp_path / "server.toml"
    config.write_text(CONFIGMAP_TOML_TEXT)
    # The pod's model directory and GPUs are not here: --offline checks everything else.
    result = run_daemon("check", "-c", str(config), "--offline", "--strict", env=container_env())
    assert result.returncode == 0, result.stdout + result.stderr
    settings = effective_offline(config, container_env())
    assert settings.runtime.dir == Path("/run/daemon") and settings.logging.format == "json"


class ConfigMapVolume:
    """A directory laid out as the kubelet lays out a ConfigMap volume: the files are symlinks
    into ..data, itself a symlink to a timestamped directory that an update replaces whole."""

    def __init__(self, root: Path, files: dict[str, str]):
        self.root, self.version = root, 0
        root.mkdir(parents=True, exist_ok=True)
        self.update(files)
        for name in files:
            (root / name).symlink_to(Path("..data") / name)

    def update(self, files: dict[str, str]) -> None:
        """The kubelet's atomic update: write a new timestamped directory, swap ..data to it
        with a rename, remove the old one."""
        self.version += 1
        stamp = f"..2026_01_01_00_00_{self.version:02d}.{self.version:09d}"
        (self.root / stamp).mkdir()
        for name, text in files.items():
            (self.root / stamp / name).write_text(text)
        previous = (self.root / "..data").readlink() if (self.root / "..data").is_symlink() else None
        (self.root / "..data_tmp").symlink_to(stamp)
        os.rename(self.root / "..data_tmp", self.root / "..data")
        if previous is not None:
            shutil.rmtree(self.root / previous)


@pytest.fixture(scope="module")
def configmap_daemon(tmp_path_factory, model_cache: Path) -> Iterator[tuple[ConfigMapVolume, RunningDaemon]]:
    """A daemon whose config is a ConfigMap volume, as the Deployment runs it; it must stop cleanly (exit 0)
    at the module's end. The dashboard's test scrapes it too, rather than start a daemon of its own."""
    volume = ConfigMapVolume(tmp_path_factory.mktemp("k8s") / "etc-daemon", {"server.toml": "# by start_daemon\n"})
    env = {"NOTIFY_SOCKET": "", "WATCHDOG_USEC": ""}  # not the test runner's systemd, if any
    with serving(volume.root, model_cache, env=env) as daemon:  # start_daemon writes through the symlink
        yield volume, daemon


def test_configmap_update_reloads_the_daemon_in_place(configmap_daemon: tuple[ConfigMapVolume, RunningDaemon]):
    # The Deployment mounts the ConfigMap as a directory: the daemon must see the ..data swap.
    volume, daemon = configmap_daemon
    assert daemon.config_path.is_symlink()
    text = daemon.config_path.read_text()
    volume.update({"server.toml": text.replace("drain_timeout_s = 10", "drain_timeout_s = 11")})
    event = daemon.wait_for_event("config.reload", timeout=60, result="applied")
    assert event["trigger"] == "file" and event["diff"]["runtime.drain_timeout_s"]["new"] == 11
    assert json.loads((daemon.socket_dir / "status.json").read_text())["generation"] == 2


def test_poddisruptionbudget_leaves_one_serving():
    budget = MANIFESTS["PodDisruptionBudget"]["spec"]
    assert budget["selector"]["matchLabels"] == DEPLOYMENT["spec"]["selector"]["matchLabels"]
    replicas = DEPLOYMENT["spec"]["replicas"]
    assert budget.get("maxUnavailable", 0) < replicas or budget.get("minAvailable", replicas) < replicas


# --- Kubernetes over several nodes (LeaderWorkerSet) ----------------------------------------------

MN = load_manifests(MULTI_NODE)
LWS = MN["LeaderWorkerSet"]
GROUP = LWS["spec"]["leaderWorkerTemplate"]
LEADER, WORKER = GROUP["leaderTemplate"], GROUP["workerTemplate"]
MN_TOML_TEXT = MN["ConfigMap"]["data"]["server.toml"]
MN_TOML = tomli.loads(MN_TOML_TEXT)
LWS_LABEL = "leaderworkerset.sigs.k8s.io/"


def lws_pod(template: dict, index: int) -> dict:
    """The Pod LWS makes of a template for worker index `index` of group 0, with the labels it adds."""
    name = LWS["metadata"]["name"] + ("-0" if index == 0 else f"-0-{index}")
    labels = {**template["metadata"].get("labels", {}), LWS_LABEL + "name": LWS["metadata"]["name"]}
    labels |= {LWS_LABEL + "group-index": "0", LWS_LABEL + "worker-index": str(index)}
    metadata = {**template["metadata"], "name": name, "labels": labels}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}


def lws_env(template: dict, index: int) -> dict[str, str]:
    """The container's environment in that Pod: LWS's variables first, then the template's, whose
    $(VAR) Kubernetes expands from the variables listed before them. Secrets get a stand-in."""
    lws = LWS["metadata"]["name"]
    env = {"LWS_LEADER_ADDRESS": f"{lws}-0.{lws}.default", "LWS_GROUP_SIZE": str(GROUP["size"])}
    env["LWS_WORKER_INDEX"] = str(index)
    for entry in template["spec"]["containers"][0]["env"]:
        if "value" in entry:  # a KeyError: a reference to a variable not defined before it
            env[entry["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], entry["value"])
        else:
            assert "secretKeyRef" in entry["valueFrom"], entry
            env[entry["name"]] = "stand-in-secret"
    return env


def test_multi_node_manifests_are_a_group_of_nnodes_pods():
    assert set(MN) == {"ConfigMap", "LeaderWorkerSet", "Service"}
    kustomization = yaml.safe_load((MULTI_NODE / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == {p.name for p in MULTI_NODE.glob("*.yaml")} - {"kustomization.yaml"}
    assert "configMapGenerator" not in kustomization, "a generated (hashed) name would defeat hot reload"
    # LeaderWorkerSet is a CRD: no schema here, so its structure is checked by hand.
    assert (LWS["apiVersion"], LWS["kind"]) == ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet")
    assert GROUP["size"] == MN_TOML["distributed"]["nnodes"] > 1
    # Not LeaderReady: the leader is ready only once the worker has joined its group.
    assert LWS["spec"].get("startupPolicy", "LeaderCreated") == "LeaderCreated"
    assert LEADER["spec"]["containers"] and WORKER["spec"]["containers"]
    # The rules of several nodes: one replica over the nodes, tp_size split evenly, no blue-green.
    model = MN_TOML["model"]
    assert model.get("dp_size", 1) == 1 and model["tp_size"] % GROUP["size"] == 0
    assert MN_TOML["runtime"]["model_reload"] != "blue_green"
    for template in (LEADER, WORKER):
        resources = template["spec"]["containers"][0]["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == model["tp_size"] // GROUP["size"]
    # Beside the single-node example in one namespace: no shared names, no Service picking the other's pods.
    assert MN["ConfigMap"]["metadata"]["name"] != MANIFESTS["ConfigMap"]["metadata"]["name"]
    assert MN["Service"]["metadata"]["name"] not in (LWS["metadata"]["name"], MANIFESTS["Service"]["metadata"]["name"])
    for pod in (lws_pod(LEADER, 0), lws_pod(WORKER, 1)):
        assert not MANIFESTS["Service"]["spec"]["selector"].items() <= pod["metadata"]["labels"].items()


@pytest.mark.parametrize("version", ["1.30.0", "latest"])
def test_multi_node_pods_pass_the_kubernetes_api_schemas(version: str):
    documents = (lws_pod(LEADER, 0), lws_pod(WORKER, 1), MN["ConfigMap"], MN["Service"])
    assert_valid_for_kubernetes({d["metadata"]["name"]: d for d in documents}, version)


@pytest.mark.skipif(tool("kubectl") is None, reason="kubectl is not installed")
def test_multi_node_kustomization_builds():
    built = {d["kind"]: d for d in kustomize(MULTI_NODE)}
    assert set(built) == set(MN)
    assert built["LeaderWorkerSet"] == LWS, "kustomize expands the YAML anchors as PyYAML does"


@pytest.mark.parametrize("index", [0, 1], ids=["leader", "worker"])
def test_multi_node_config_passes_daemon_check_on_each_node(tmp_path: Path, index: int):
    config = tmp_path / "server.toml"
    config.write_text(MN_TOML_TEXT)
    env = lws_env(LEADER if index == 0 else WORKER, index)
    # The pods' model directory and GPUs are not here: --offline checks everything else.
    result = run_daemon("check", "-c", str(config), "--offline", "--strict", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    settings, head = effective_offline(config, env), effective_offline(config, lws_env(LEADER, 0))
    assert settings.distributed.node_rank == index
    assert settings.distributed.dist_init_addr.rpartition(":")[0] == env["LWS_LEADER_ADDRESS"]
    # Node 0 refuses a node whose config differs from its own: only the rank may.
    ranked = {"distributed": {"node_rank"}}
    assert settings.model_dump(exclude=ranked) == head.model_dump(exclude=ranked)


def test_leader_serves_http_and_the_rendezvous():
    container = LEADER["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    port = MN_TOML["server"]["port"]
    rendezvous = int(lws_env(LEADER, 0)["DAEMON_DISTRIBUTED__DIST_INIT_ADDR"].rpartition(":")[2])
    assert ports == {"http": port, "dist": rendezvous}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in ("http", port), probe
    assert container["readinessProbe"]["httpGet"]["path"] == "/health_generate"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= STARTUP_TIMEOUT_S["worker"], "model load"
    service = MN["Service"]["spec"]
    assert service["selector"] == {LWS_LABEL + "name": LWS["metadata"]["name"], LWS_LABEL + "worker-index": "0"}
    assert service["selector"].items() <= lws_pod(LEADER, 0)["metadata"]["labels"].items()
    assert [ports.get(p["targetPort"], p["targetPort"]) for p in service["ports"]] == [port]


def test_worker_pod_serves_no_http_and_its_probe_is_a_daemon_command(
    tmp_path: Path, configmap_daemon: tuple[ConfigMapVolume, RunningDaemon]
):
    from daemon.cli import build_parser

    container = WORKER["spec"]["containers"][0]
    assert "ports" not in container and "readinessProbe" not in container and "startupProbe" not in container
    probe = container["livenessProbe"]["exec"]["command"]
    assert probe[0] == container["command"][0] and Path(probe[0]).name == "daemon"
    args = build_parser().parse_args(probe[1:])  # exits (a failed test) on an option `daemon status` lacks
    assert args.command == "status" and str(args.runtime_dir) == lws_env(WORKER, 1)["DAEMON_RUNTIME__DIR"]
    # It succeeds on a running daemon's runtime dir, fails on one where none runs.
    running = run_daemon(*probe[1:-1], str(configmap_daemon[1].runtime_dir))
    assert running.returncode == 0, running.stdout + running.stderr
    assert run_daemon(*probe[1:-1], str(tmp_path)).returncode == 1


def test_multi_node_grace_periods_cover_the_drain():
    drain = MN_TOML["runtime"]["drain_timeout_s"]
    leader, worker = LEADER["spec"], WORKER["spec"]
    leader_sleep = leader["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    tiers = 2 + MN_TOML.get("tokenizer", {}).get("workers", 1)
    assert leader["terminationGracePeriodSeconds"] >= leader_sleep + drain + STOP_GRACE_S * (1 + tiers)
    # Deleted together, the worker pod keeps its ranks up until the leader has drained.
    worker_sleep = worker["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert worker_sleep >= leader_sleep + drain
    assert worker["terminationGracePeriodSeconds"] > worker_sleep + STOP_GRACE_S


def test_multi_node_pods_mount_the_config_as_a_directory_like_the_single_node_pod():
    for template in (LEADER, WORKER):
        container, spec = template["spec"]["containers"][0], template["spec"]
        assert container["command"] == CONTAINER["command"] and container["image"] == CONTAINER["image"]
        assert container["volumeMounts"] == CONTAINER["volumeMounts"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["config"]["configMap"]["name"] == MN["ConfigMap"]["metadata"]["name"]
        assert {n: v for n, v in volumes.items() if n not in ("config", "shm")} == {
            v["name"]: v for v in POD["volumes"] if v["name"] not in ("config", "shm")
        }
        assert spec["securityContext"] == POD["securityContext"]
        assert container["securityContext"] == CONTAINER["securityContext"]


# --- Grafana --------------------------------------------------------------------------------------

DASHBOARD = json.loads((GRAFANA / "daemon-dashboard.json").read_text())
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and the variables' queries."""
    queries = [t["expr"] for p in DASHBOARD["panels"] for t in p.get("targets", [])]
    for variable in DASHBOARD["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            assert match, query
            queries.append(match.group(1))
    return queries


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (parsed, when promql-parser is installed)."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    try:
        import promql_parser
    except ImportError:  # a rough fallback: identifiers that look like the daemon's metrics
        return set(re.findall(r"\bdaemon_[a-z0-9_]+\b", re.sub(r'"[^"]*"', '""', expr)))
    names: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name in {expr}"
            names.add(node.name)
        for attribute in dir(node):
            if attribute.startswith("_") or attribute in ("parse", "prettify"):
                continue
            value = getattr(node, attribute)
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, promql_parser.Expr):
                    walk(child)

    walk(promql_parser.parse(expr))
    return names


def test_dashboard_is_a_grafana_dashboard():
    assert DASHBOARD["title"] and DASHBOARD["uid"] and isinstance(DASHBOARD["schemaVersion"], int)
    panels = DASHBOARD["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in panels:
        assert panel["title"] and panel["type"] and set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}" and target["expr"].strip()
    titles = " / ".join(p["title"].lower() for p in panels)
    for wanted in ("request rate", "error", "time to first token", "latency", "running and queued"):
        assert wanted in titles
    for wanted in ("tokens per second", "restarts", "reloads", "generation", "kv-cache"):
        assert wanted in titles


def test_dashboard_queries_parse_and_use_the_daemons_metrics():
    pytest.importorskip("promql_parser", reason="promql-parser is not installed: queries not parsed")
    for expr in dashboard_queries():
        assert metric_names(expr), expr
    quantiles = [e for e in dashboard_queries() if "histogram_quantile" in e]
    assert quantiles and all("_bucket" in e and "by (le" in e for e in quantiles)


@pytest.fixture
def serving_daemon(configmap_daemon: tuple[ConfigMapVolume, RunningDaemon]) -> RunningDaemon:
    """A serving daemon: the ConfigMap test's (a start costs seconds; every daemon exports the same metrics)."""
    return configmap_daemon[1]


def exported_metrics(url: str) -> dict[str, set[str]]:
    """The daemon's metric families, each with the names of its samples (_bucket, _total...)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {f.name: {s.name for s in f.samples} | {f.name} for f in text_string_to_metric_families(text)}


def test_every_metric_in_the_dashboard_is_exported(serving_daemon: RunningDaemon):
    for path, body in (
        ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 4}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
    ):
        request = urllib.request.Request(
            serving_daemon.url + path, json.dumps(body).encode(), {"content-type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200
    families = exported_metrics(serving_daemon.url)
    samples = {name for names in families.values() for name in names if name.startswith("daemon_")}
    # Histograms only have samples once observed: the two requests above observed them.
    assert "daemon_time_to_first_token_seconds_bucket" in samples and "daemon_reloads_total" in samples
    used = set()
    for expr in dashboard_queries():
        names = metric_names(expr)
        missing = names - samples
        assert not missing, f"{expr}: not exported: {sorted(missing)}"
        used |= names
    charted = {family for family, names in families.items() if family.startswith("daemon_") and names & used}
    assert charted == {family for family in families if family.startswith("daemon_")}, "every metric is charted"


# --- editors --------------------------------------------------------------------------------------

SCHEMA_CHECKED = [*EXAMPLES, "contrib/kubernetes/configmap.yaml", "contrib/kubernetes/multi-node/configmap.yaml"]


def config_text(example: Path | str) -> str:
    if str(example).endswith(".yaml"):
        return yaml.safe_load((REPO / example).read_text())["data"]["server.toml"]
    return Path(example).read_text()


@pytest.mark.parametrize("example", SCHEMA_CHECKED, ids=lambda p: p.name if isinstance(p, Path) else p)
def test_example_configs_validate_against_the_json_schema(example: Path | str):
    document = tomli.loads(config_text(example))
    errors = sorted(jsonschema.Draft202012Validator(SCHEMA).iter_errors(document), key=str)
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)


def taplo_command() -> list[str] | None:
    if found := tool("taplo"):
        return [found]
    npx = shutil.which("npx")
    if npx is None:
        return None
    with contextlib.suppress(subprocess.SubprocessError, OSError):  # offline and not cached: none
        probe = subprocess.run(
            [npx, "--no-install", "@taplo/cli", "--version"], capture_output=True, text=True, timeout=60
        )
        if probe.returncode == 0:
            return [npx, "--no-install", "@taplo/cli"]
    return None


TAPLO = taplo_command()


@pytest.mark.skipif(TAPLO is None, reason="taplo is not installed (pip install taplo, or npm's @taplo/cli)")
def test_taplo_checks_the_examples_with_their_schema_directive(tmp_path: Path):
    # Each example's first line, #:schema ../schemas/server.schema.json, is what editors follow.
    result = subprocess.run(
        [*TAPLO, "check", "--no-auto-config", *map(str, EXAMPLES)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # A mistake the schema catches must fail the same check: the directive is really followed.
    bad = tmp_path / "bad.toml"
    bad.write_text(f"#:schema {REPO / 'schemas' / 'server.schema.json'}\n[server]\nprot = 8000\n[model]\npath = 'x'\n")
    result = subprocess.run(
        [*TAPLO, "check", "--no-auto-config", str(bad)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode != 0 and "prot" in result.stdout + result.stderr, result.stdout + result.stderr


def test_contrib_readme_indexes_the_integrations():
    readme = (CONTRIB / "README.md").read_text()
    for directory in ("systemd", "kubernetes", "grafana"):
        assert f"{directory}/" in readme
        assert (CONTRIB / directory / "README.md").exists() or directory == "grafana"
    assert "#:schema" in readme and "taplo" in readme.lower()
