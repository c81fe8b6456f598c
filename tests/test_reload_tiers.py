"""Hot reloads that restart tiers, on the real daemon under constant load.

A reload that changes a tokenizer key starts a new tokenizer pool (new indices) and lets the
old one finish what it holds; one that changes a front-end key starts a new Granian instance
on the supervisor-owned listening socket and drains the old one; server.tls.refresh rotates
the certificate the same way. Every test here keeps clients busy through the reload (bounded
loops, streaming and not, HTTP/1.1 and HTTP/2), records how every request ended, and checks
what a client may see: nothing at all for a tokenizer change; for a front-end handover, at
most a keep-alive connection closed before its next response (clients that never retry see
those), never a 5xx, never a cut stream, and every request in flight on the old instance
completed.

HTTP/2 is spoken by httpx and by curl. Python's h2 library ends a connection the moment a
GOAWAY arrives, so httpx fails the streams it still has on a draining instance, which the
server finishes all the same (python-hyper/h2#1181): those are counted apart ("goaway"), and
the HTTP/2 guarantees are checked with curl (nghttp2), which reads them to their end.

The daemons read their settings from the config file only (no --set, which a reload keeps),
so that editing the file is what changes them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from harness.daemons import REPO, RunningDaemon, clean_environ, popen_daemon, run_daemon, short_dir, stop_daemons
from harness.files import make_authority, make_server_certificate
from harness.load import (
    CURL,
    FRESH,
    KEEPALIVE,
    Client,
    Options,
    Outcome,
    Requests,
    Traffic,
    http_client,
    report,
    request_body,
)
from harness.logs import logged_at
from harness.procs import children, descendants, describe, free_port, taken_port, watches
from harness.wait import until

pytestmark = pytest.mark.timeout(240)

TRAFFIC_MAX_TOKENS = 200  # the background load: short requests, some always in flight
PINNED_MAX_TOKENS = 900  # requests started before a reload, still running through it (several times its length)
# ... through a front-end handover, which waits for a new Granian instance (and for a certificate rotation, the
# file watch): as long as the demo model's 2,048-token context allows, since 900 tokens once ended before it
HANDOVER_PINNED_MAX_TOKENS = 2000
CLIENT_REQUESTS = 400  # most requests one background client sends ...
CLIENT_LIMIT_S = 150.0  # ... and for at most this long
FAILURE_PAUSE_S = 0.05  # a client whose request failed waits this long before the next: no busy loop
READ_TIMEOUT_S = 60.0  # a worker reload holds new requests while the new worker loads: generous
RELOAD_TIMEOUT_S = 150.0
STOP_S = READ_TIMEOUT_S + 40  # the background clients' last requests end within this long of being stopped
PINNED_S = 120.0  # the pinned requests end within this long


# --- daemons started from a config file -------------------------------------------------------------


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(str(value))  # a TOML basic string


def render_toml(settings: dict[str, object]) -> str:
    """A config file from dotted keys ({"server.tls.certfile": ...})."""
    sections: dict[str, list[str]] = {}
    for key, value in settings.items():
        section, name = key.rsplit(".", 1)
        sections.setdefault(section, []).append(f"{name} = {toml_value(value)}")
    return "".join(f"[{section}]\n" + "\n".join(lines) + "\n" for section, lines in sorted(sections.items()))


@dataclass
class FileDaemon(RunningDaemon):
    settings: dict[str, object] = field(default_factory=dict)

    def edit(self, **changes: object) -> None:
        """Write the config file anew (temporary file, then rename, as editors do)."""
        self.settings.update({key.replace("__", "."): value for key, value in changes.items()})
        staging = self.config_path.with_suffix(".tmp")
        staging.write_text(render_toml(self.settings))
        os.replace(staging, self.config_path)

    def status(self) -> dict:
        """`daemon status --format json`."""
        result = run_daemon(
            "status", "--runtime-dir", str(self.runtime_dir), "--pid", str(self.pid), "--format", "json"
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout)

    def tiers(self) -> dict[str, int]:
        """Tier name -> PID, from `daemon status`."""
        return {f"{t['tier']}-{t['index']}": t["pid"] for t in self.status()["tiers"]}

    def reload(self) -> tuple[int, dict]:
        """`daemon reload --format json`: its exit status and the report it printed."""
        result = run_daemon(
            "reload",
            "--runtime-dir",
            str(self.runtime_dir),
            "--pid",
            str(self.pid),
            "--format",
            "json",
            timeout=RELOAD_TIMEOUT_S,
        )
        assert result.stdout.strip(), result.stderr + self.log_tail()
        return result.returncode, json.loads(result.stdout)

    def reload_events(self) -> list[dict]:
        return self.events("config.reload")


@dataclass
class Daemons:
    base: Path
    runtime_dir: Path
    cache_dir: Path
    started: list[FileDaemon]

    def __call__(self, settings: dict[str, object] | None = None) -> FileDaemon:
        directory = self.base / f"d{len(self.started)}"
        directory.mkdir()
        port = free_port()
        effective: dict[str, object] = {
            "server.port": port,
            "model.path": "builtin:demo",
            "runtime.dir": self.runtime_dir,
            "runtime.cache_dir": self.cache_dir,
            "runtime.drain_timeout_s": 30,
            "runtime.watch_config": False,
            **(settings or {}),
        }
        config_path = directory / "server.toml"
        config_path.write_text(render_toml(effective))
        log_path = directory / "daemon.log"
        process = popen_daemon(["-c", str(config_path)], log_path)
        scheme = "https" if effective.get("server.tls.certfile") else "http"
        daemon = FileDaemon(process, port, config_path, self.runtime_dir, log_path, scheme, settings=effective)
        self.started.append(daemon)
        daemon.wait_for_event("daemon.ready")
        return daemon


@pytest.fixture
def daemons(tmp_path: Path, model_cache: Path) -> Iterator[Daemons]:
    """Start daemons from config files; stop them all afterwards and check none left a process."""
    runtime_dir = short_dir()
    launcher = Daemons(tmp_path, runtime_dir, model_cache, [])
    try:
        yield launcher
    finally:
        stop_daemons(launcher.started, runtime_dir, drain_s=60)


# --- clients ----------------------------------------------------------------------------------------


LOAD = Options(max_tokens=TRAFFIC_MAX_TOKENS, read_timeout=READ_TIMEOUT_S)


def background(daemon: FileDaemon, clients: list, directory: Path, *, cafile: Path | None = None) -> Traffic:
    """Background clients (KEEPALIVE, CURL, FRESH), each sending short requests one after another until stopped."""
    options = dataclasses.replace(LOAD, directory=directory, cafile=cafile)
    return Traffic(
        daemon.url,
        clients,
        options,
        requests=CLIENT_REQUESTS,
        time_limit_s=CLIENT_LIMIT_S,
        failure_pause_s=FAILURE_PAUSE_S,
    )


def pinned_requests(
    daemon: FileDaemon, directory: Path, *, cafile: Path | None = None, max_tokens: int = PINNED_MAX_TOKENS
) -> Requests:
    """Long requests sent before a reload and confirmed running (their streams' first chunks arrived): HTTP/1.1
    by httpx and HTTP/2 by curl, a full response and a stream each (the full ones first: running by the time
    the streams' first chunks come)."""
    clients = [Client(protocol, stream) for stream in (False, True) for protocol in ("h1", "curl")]
    options = dataclasses.replace(LOAD, max_tokens=max_tokens, directory=directory, cafile=cafile)
    pinned = Requests(daemon.url, clients, options, first_index=100)
    pinned.wait_streaming(30)
    return pinned


def assert_all_complete(calls: list[Outcome], daemon: FileDaemon) -> None:
    assert calls and all(c.kind == "complete" for c in calls), report(calls, daemon.log_tail(30))


def assert_in_flight_through(held: list[Outcome], window: tuple[float, float]) -> None:
    """The pinned streams were sent before the new front-end started and ran until the old one was told to stop."""
    start, end = window
    early = [
        f"{c}: sent {c.started_wall - start:+.2f} s, ended {(c.ended_wall or end) - end:+.2f} s"
        for c in held
        if c.stream and not c.spans(start, end)
    ]
    assert not early, f"pinned streams not in flight through the handover (times from its start, from its end): {early}"


def handover_window(daemon: FileDaemon, old_frontend: int) -> tuple[float, float]:
    """(when the new front-end started, when the old one was told to stop), from the log."""
    started = [
        e for e in daemon.events("tier.started", tier="frontend") if e["child_pid"] != old_frontend and e["epoch"] > 1
    ]
    assert started, daemon.log_tail()
    stopping = [
        e for e in daemon.log_events() if e.get("pid") == old_frontend and e.get("event") == "Shutting down granian"
    ]
    assert stopping, f"the old front-end {old_frontend} never stopped\n{daemon.log_tail()}"
    return logged_at(started[-1]), logged_at(stopping[0])


def check_handover(calls: list[Outcome], window: tuple[float, float], daemon: FileDaemon) -> dict[str, int]:
    """What clients may see of a front-end handover; the counts of what they saw.

    Requests in flight on the old instance (sent before the new one started, still running when
    the old one was told to stop) complete. A keep-alive connection of the old instance may be
    closed before its next response (the old instance closes its idle connections): a client
    that never retries sees that. Nothing else: no refused connection, no 5xx, no cut stream, no
    hang. httpx's HTTP/2 streams in flight at the GOAWAY are counted apart (see GOAWAY_SIGNS).
    """
    new_started, old_stopping = window
    text = report(calls, daemon.log_tail(30))
    in_flight = [c for c in calls if c.spans(new_started, old_stopping)]
    lost = [c for c in in_flight if c.kind not in ("complete", "goaway")]
    assert not lost, f"requests in flight on the old instance failed: {[str(c) for c in lost]}\n{text}"
    for call in calls:
        assert call.kind in ("complete", "connection-error", "goaway"), text
        assert not call.refused, f"a connection was refused: {call}\n{text}"
        assert call.kind != "goaway" or call.http2, text
    return {
        "requests": len(calls),
        "in_flight_at_sigterm": sum(c.spans(old_stopping, old_stopping) for c in calls),
        "in_flight_on_old": len(in_flight),
        "connection_closed": sum(c.kind == "connection-error" for c in calls),
        "httpx_h2_goaway": sum(c.kind == "goaway" for c in calls),
    }


# --- 1, 2. the tokenizer pool -----------------------------------------------------------------------


def test_tokenizer_workers_1_to_2_under_load(daemons, tmp_path):
    daemon = daemons({"tokenizer.workers": 1})
    before = daemon.tiers()
    assert set(before) == {"worker-0", "scheduler-0", "tokenizer-0", "frontend-0"}, before
    traffic = background(daemon, KEEPALIVE + CURL, tmp_path)
    pinned = None
    try:
        traffic.wait_completed(8)
        pinned = pinned_requests(daemon, tmp_path)  # held by the old pool: it finishes them
        daemon.edit(tokenizer__workers=2)
        status, outcome = daemon.reload()
        assert status == 0 and outcome["result"] == "applied", outcome
        assert outcome["restarted"] == ["tokenizer"] and outcome["generation"] == 2, outcome
        assert outcome["changes"] == {"tokenizer.workers": {"old": 1, "new": 2, "scope": "tokenizer"}}, outcome
        traffic.more()  # the new pool serves
    finally:
        calls = traffic.stop(STOP_S)
        held = pinned.join(PINNED_S) if pinned else []
    assert_all_complete(calls + held, daemon)

    after = daemon.tiers()
    assert set(after) == {"worker-0", "scheduler-0", "tokenizer-1", "tokenizer-2", "frontend-0"}, after
    for tier in ("worker-0", "scheduler-0", "frontend-0"):
        assert after[tier] == before[tier], (before, after)
    old_tokenizer = before["tokenizer-0"]
    assert old_tokenizer not in after.values() and old_tokenizer not in descendants(daemon.pid)
    (draining,) = daemon.events("tokenizer.draining", pid=old_tokenizer)
    assert draining["requests"] >= 1, draining  # it held requests (the pinned ones) when told to drain ...
    assert daemon.events("tokenizer.drained", pid=old_tokenizer), daemon.log_tail()  # ... finished them, left
    (event,) = daemon.reload_events()
    assert event["result"] == "applied" and event["plan"]["restart"] == ["tokenizer"], event
    status = daemon.status()
    assert status["generation"] == 2 and status["last_reload"]["result"] == "applied", status
    assert all(t["state"] == "up" for t in status["tiers"]), status
    info = httpx.get(daemon.url + "/server_info", timeout=10).json()
    assert info["config"]["generation"] == 2 and info["config"]["last_reload"]["restarted"] == ["tokenizer"], info


def test_tokenizer_that_cannot_load_rolls_back_and_the_old_pool_keeps_serving(daemons, tmp_path):
    broken = tmp_path / "broken-tokenizer"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{}")  # there, so `daemon check` passes; not a tokenizer
    daemon = daemons()
    before = daemon.tiers()
    traffic = background(daemon, KEEPALIVE + CURL, tmp_path)
    try:
        traffic.wait_completed(8)
        daemon.edit(tokenizer__path=broken, tokenizer__workers=2)
        checked = run_daemon("check", "-c", str(daemon.config_path))
        assert checked.returncode == 0, checked.stdout + checked.stderr
        status, outcome = daemon.reload()
        assert status == 1 and outcome["result"] == "rolled_back", outcome
        assert "tokenizer" in outcome["reason"] and outcome["generation"] == 1, outcome
        assert outcome["restarted"] == [], outcome
        traffic.more()  # the old pool still serves
    finally:
        calls = traffic.stop(STOP_S)
    assert_all_complete(calls, daemon)
    assert daemon.tiers() == before
    started = [e["child_pid"] for e in daemon.events("tier.started", tier="tokenizer") if e["index"] > 0]
    assert started, daemon.log_tail()  # the new pool was tried ...
    assert not set(started) & set(descendants(daemon.pid)), describe(started)  # ... and is gone
    (event,) = daemon.reload_events()
    assert event["result"] == "rolled_back" and event["level"] == "warning", event
    status = daemon.status()
    assert status["generation"] == 1 and status["last_reload"]["result"] == "rolled_back", status
    assert status["reloads"] == {"rolled_back": 1}, status


# --- 3, 4. front-end handovers ----------------------------------------------------------------------


@pytest.mark.parametrize("connections", ["keepalive", "fresh"])
def test_frontend_workers_1_to_2_hands_over_under_load(daemons, tmp_path, connections):
    daemon = daemons({"server.workers": 1})
    before = daemon.tiers()
    old_frontend = before["frontend-0"]
    old_workers = until(lambda: children(old_frontend), 10, what="Granian's worker")
    traffic = background(daemon, KEEPALIVE + CURL if connections == "keepalive" else FRESH, tmp_path)
    pinned = None
    try:
        traffic.wait_completed(8)
        pinned = pinned_requests(daemon, tmp_path, max_tokens=HANDOVER_PINNED_MAX_TOKENS)
        daemon.edit(server__workers=2)
        if connections == "fresh":  # the triggers: SIGHUP here, `daemon reload` in the other case
            daemon.process.send_signal(signal.SIGHUP)
            outcome = daemon.wait_for_event("config.reload", timeout=RELOAD_TIMEOUT_S)
            assert outcome["trigger"] == "sighup" and outcome["plan"]["restart"] == ["frontend"], outcome
        else:
            status, outcome = daemon.reload()
            assert status == 0 and outcome["restarted"] == ["frontend"], outcome
        assert outcome["result"] == "applied", outcome
        traffic.more()  # the new instance serves
    finally:
        calls = traffic.stop(STOP_S)
        held = pinned.join(PINNED_S) if pinned else []

    window = handover_window(daemon, old_frontend)
    assert_all_complete(held, daemon)
    assert_in_flight_through(held, window)
    counts = check_handover(calls, window, daemon)
    counts["pinned_in_flight"] = sum(c.spans(*window) for c in held)
    print(f"\nfront-end handover, {connections} connections: {counts}")
    if connections == "fresh":
        assert counts["connection_closed"] == 0, report(calls, daemon.log_tail(30))

    after = daemon.tiers()
    assert after["frontend-0"] != old_frontend and old_frontend not in descendants(daemon.pid)
    for tier in ("worker-0", "scheduler-0", "tokenizer-0"):
        assert after[tier] == before[tier], (before, after)
    assert len(children(after["frontend-0"])) == 2
    assert not old_workers & set(descendants(daemon.pid)), describe(sorted(old_workers))
    info = httpx.get(daemon.url + "/server_info", timeout=10).json()
    assert info["config"]["generation"] == 2 and info["effective_config"]["server"]["workers"] == 2, info


def refused(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(5)
        return probe.connect_ex(("127.0.0.1", port)) != 0


def test_port_change_moves_the_listener_and_a_taken_port_is_rejected_untouched(daemons, tmp_path):
    daemon = daemons()
    old_port = daemon.port
    old_frontend = daemon.tiers()["frontend-0"]
    backend = {k: v for k, v in daemon.tiers().items() if not k.startswith("frontend")}

    # 1. a free port: the new instance serves there; the old port refuses once the old instance drained.
    # No httpx HTTP/2 client here: after the GOAWAY it keeps its broken connection open while its next
    # request waits on the old port (see test_old_port_refuses_while_the_old_instance_drains), which
    # holds the old instance until the end of its drain timeout.
    traffic = background(daemon, [c for c in KEEPALIVE if c.protocol == "h1"] + CURL, tmp_path)
    pinned = None
    try:
        traffic.wait_completed(8)
        pinned = pinned_requests(daemon, tmp_path, max_tokens=HANDOVER_PINNED_MAX_TOKENS)
        new_port = free_port()
        daemon.edit(server__port=new_port)
        status, outcome = daemon.reload()
        assert status == 0 and outcome["result"] == "applied" and outcome["restarted"] == ["frontend"], outcome
        reloaded = time.time()
        until(
            lambda: len([c for c in traffic.outcomes if c.started_wall > reloaded]) >= 12,
            30,
            what="clients trying the old port",
        )
    finally:
        calls = traffic.stop(STOP_S)
        held = pinned.join(PINNED_S) if pinned else []
    daemon.port = new_port
    assert refused(old_port), "the old port still accepts connections"
    window = handover_window(daemon, old_frontend)
    assert_all_complete(held, daemon)
    assert_in_flight_through(held, window)
    counts = check_handover([c for c in calls if c.started_wall < window[0]], window, daemon)
    # sent to the old port during the move: served by the old instance, or their connection went
    moving = [c for c in calls if window[0] <= c.started_wall <= reloaded]
    assert all(c.kind in ("complete", "connection-error") for c in moving), report(moving, daemon.log_tail(30))
    after_move = [c for c in calls if c.started_wall > reloaded]
    assert after_move and all(c.refused for c in after_move), report(after_move)
    counts["during_move"] = len(moving)
    counts["during_move_reset"] = sum(c.kind != "complete" and not c.refused for c in moving)
    counts["during_move_refused"] = sum(c.refused for c in moving)  # the old socket closed, `daemon reload` not back
    print(f"\nport change: {counts}")

    frontend = daemon.tiers()["frontend-0"]
    assert frontend != old_frontend
    assert {k: v for k, v in daemon.tiers().items() if not k.startswith("frontend")} == backend

    # 2. a port another program holds, together with a change that replaces the model worker: the
    # port is bound while the reload prepares, before any tier is touched, so it is rejected with
    # every PID unchanged (it used to drain and replace the worker, fail at the front-end, then
    # load the old model again)
    before = daemon.tiers()
    traffic = background(daemon, KEEPALIVE + CURL, tmp_path)
    try:
        traffic.wait_completed(8)
        with taken_port() as taken:
            daemon.edit(server__port=taken, model__context_length=1024)
            status, outcome = daemon.reload()
        assert status == 1 and outcome["result"] == "rejected", outcome
        assert f"cannot listen on 127.0.0.1:{taken}" in outcome["reason"], outcome
        assert "Address already in use" in outcome["reason"] and outcome["generation"] == 2, outcome
        assert outcome["restarted"] == [], outcome
        traffic.more()
    finally:
        calls = traffic.stop(STOP_S)
    assert_all_complete(calls, daemon)
    assert daemon.tiers() == before, "a reload that could never succeed replaced a tier"
    status = daemon.status()
    assert status["generation"] == 2 and status["reloads"] == {"applied": 1, "rejected": 1}, status


class StalledStream:
    """An HTTP/2 stream the client never lets finish: a 1 KiB flow-control window, never opened further,
    keeps a draining front-end instance busy until its drain timeout."""

    def __init__(self, port: int, body: dict):
        import h2.config
        import h2.connection
        import h2.settings

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1024})
        stream = self.conn.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":path", "/v1/completions"),
            (":scheme", "http"),
            (":authority", f"127.0.0.1:{port}"),
            ("content-type", "application/json"),
        ]
        self.conn.send_headers(stream, headers)
        self.conn.send_data(stream, json.dumps(body).encode(), end_stream=True)
        self.sock.sendall(self.conn.data_to_send())

    def wait_data(self, timeout: float = 30) -> None:
        """Until the first bytes of the response body arrived (never acknowledged)."""
        import h2.events

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = self.sock.recv(65536)
            assert data, "the server closed the connection"
            events = self.conn.receive_data(data)
            self.sock.sendall(self.conn.data_to_send())  # SETTINGS acknowledgements; no WINDOW_UPDATE
            if any(isinstance(e, h2.events.DataReceived) for e in events):
                return
        raise AssertionError("no response data")

    def close(self) -> None:
        self.sock.close()


def test_old_port_refuses_while_the_old_instance_drains(daemons):
    """After a port change, new clients of the old port are refused (or reset) at once, not left waiting
    while the old instance drains."""
    daemon = daemons({"runtime.drain_timeout_s": 8})
    old_port, old_frontend = daemon.port, daemon.tiers()["frontend-0"]
    stalled = StalledStream(old_port, request_body(stream=True, chat=False, max_tokens=PINNED_MAX_TOKENS, index=0))
    outcome: dict = {}
    reload = threading.Thread(target=lambda: outcome.update(zip(("status", "report"), daemon.reload(), strict=True)))
    try:
        stalled.wait_data()
        new_port = free_port()
        daemon.edit(server__port=new_port)
        reload.start()  # returns once the old instance has exited: at the end of its drain timeout
        until(
            lambda: [e for e in daemon.log_events() if e.get("pid") == old_frontend and "Shutting down" in e["event"]],
            30,
            what="the old instance told to stop",
        )
        draining_since = time.monotonic()
        assert httpx.get(f"http://127.0.0.1:{new_port}/health", timeout=10).status_code == 200  # the new one serves
        assert old_frontend in descendants(daemon.pid), "the old instance is not draining any more"
        # a new client of the old port, while the old instance drains: refused at once, not left waiting
        with socket.socket() as client:
            client.settimeout(3)
            connected = client.connect_ex(("127.0.0.1", old_port)) == 0
            answer = "nothing"
            if connected:
                client.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
                try:
                    answer = repr(client.recv(100))
                except TimeoutError:
                    answer = "nothing within 3 s"
                except OSError as exc:
                    answer = repr(exc)
        assert time.monotonic() - draining_since < 8, "the probe came too late: the old instance was gone"
        # refused, or, in the second the old instance is given to stop accepting (REFUSE_AFTER_S), accepted
        # by the kernel and reset then: an explicit error either way, never a wait for the drain's end
        assert not connected or answer in ("b''", repr(ConnectionResetError(104, "Connection reset by peer"))), (
            f"the kernel accepted a connection to the old port; its request got {answer}"
        )
    finally:
        reload.join(60)
        stalled.close()
    assert outcome["status"] == 0 and outcome["report"]["result"] == "applied", outcome


# --- 5. certificate rotation ------------------------------------------------------------------------


def served_serial(port: int, verify: ssl.SSLContext) -> int:
    """The serial number of the certificate a new TLS connection to `port` is shown (verified)."""
    from cryptography import x509

    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        verify.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


def test_certificate_rotation_with_tls_refresh_over_http2(daemons, tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    cafile, authority = make_authority(tmp_path)
    cert, key, first = make_server_certificate(certs, "server", authority)
    staged = tmp_path / "staged"  # written elsewhere, then renamed over the served files
    staged.mkdir()
    next_cert, next_key, second = make_server_certificate(staged, "server", authority)
    verify = ssl.create_default_context(cafile=str(cafile))
    daemon = daemons(
        {
            "server.enable_http2": True,
            "server.tls.certfile": cert,
            "server.tls.keyfile": key,
            "server.tls.refresh": True,
        }
    )
    assert served_serial(daemon.port, verify) == first
    with http_client(daemon.url, http2=True, read_timeout=READ_TIMEOUT_S, cafile=cafile) as client:
        probe = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert probe.status_code == 200 and probe.http_version == "HTTP/2", probe  # ALPN chose h2
    before = daemon.tiers()
    old_frontend = before["frontend-0"]
    daemon.wait_for_event("config.watching", trigger="certificates")
    until(lambda: watches(daemon.pid, certs), 10, what="the certificates watched")

    traffic = background(daemon, KEEPALIVE + CURL, tmp_path, cafile=cafile)
    pinned = None
    try:
        traffic.wait_completed(8)
        pinned = pinned_requests(daemon, tmp_path, cafile=cafile, max_tokens=HANDOVER_PINNED_MAX_TOKENS)
        os.replace(next_cert, cert)
        os.replace(next_key, key)
        event = daemon.wait_for_event("config.reload", timeout=RELOAD_TIMEOUT_S)
        traffic.more()
    finally:
        calls = traffic.stop(STOP_S)
        held = pinned.join(PINNED_S) if pinned else []
    assert event["result"] == "applied" and "certificates" in event["trigger"], event
    assert event["plan"]["restart"] == ["frontend"] and event["diff"] == {}, event
    assert any("certificate" in note for note in event["notes"]), event
    assert served_serial(daemon.port, verify) == second, "new connections still see the old certificate"

    window = handover_window(daemon, old_frontend)
    assert_all_complete(held, daemon)
    assert_in_flight_through(held, window)
    counts = check_handover(calls, window, daemon)
    print(f"\ncertificate rotation over TLS, keep-alive connections: {counts}")
    after = daemon.tiers()
    assert after["frontend-0"] != old_frontend
    for tier in ("worker-0", "scheduler-0", "tokenizer-0"):
        assert after[tier] == before[tier], (before, after)
    status = daemon.status()
    assert status["generation"] == 2 and status["last_reload"]["trigger"] == event["trigger"], status


# --- 6. two tiers in one edit -----------------------------------------------------------------------


def test_tokenizer_and_worker_change_in_one_edit(daemons, tmp_path):
    daemon = daemons({"runtime.watch_config": True, "tokenizer.workers": 1, "model.seed": 0})
    daemon.wait_for_event("config.watching", trigger="file")
    until(lambda: watches(daemon.pid, daemon.config_path.parent), 10, what="the config file watched")
    before = daemon.tiers()
    traffic = background(daemon, KEEPALIVE + CURL, tmp_path)
    pinned = None
    try:
        traffic.wait_completed(8)
        pinned = pinned_requests(daemon, tmp_path)
        daemon.edit(tokenizer__workers=2, model__seed=1)  # the file watch reloads
        event = daemon.wait_for_event("config.reload", timeout=RELOAD_TIMEOUT_S)
        traffic.more()
    finally:
        calls = traffic.stop(STOP_S)
        held = pinned.join(PINNED_S) if pinned else []
    assert event["result"] == "applied" and event["trigger"] == "file", event
    assert sorted(event["plan"]["restart"]) == ["tokenizer", "worker"], event
    assert set(event["diff"]) == {"tokenizer.workers", "model.seed"}, event

    after = daemon.tiers()
    assert set(after) == {"worker-0", "scheduler-0", "tokenizer-1", "tokenizer-2", "frontend-0"}, after
    assert after["worker-0"] != before["worker-0"]
    assert after["scheduler-0"] == before["scheduler-0"] and after["frontend-0"] == before["frontend-0"]
    assert not {before["worker-0"], before["tokenizer-0"]} & set(descendants(daemon.pid))
    status = daemon.status()
    assert status["generation"] == 2 and status["last_reload"]["result"] == "applied", status
    info = httpx.get(daemon.url + "/server_info", timeout=10).json()
    assert info["config"]["generation"] == 2 and info["effective_config"]["model"]["seed"] == 1, info
    assert_all_complete(held, daemon)  # the requests running when the worker was told to go finished
    assert_all_complete(calls, daemon)


def kill_during_reload(daemon: FileDaemon, directory: Path, edit: dict, victim) -> tuple[dict, list[Outcome]]:
    """Under background load, edit the config and run `daemon reload` in a thread; kill -9 the PID
    `victim()` returns (it waits for its moment in the reload); the reload's report and every request."""
    traffic = background(daemon, KEEPALIVE + CURL, directory)
    outcome: dict = {}
    reloading = threading.Thread(target=lambda: outcome.update(report=daemon.reload()[1]))
    try:
        traffic.wait_completed(8)
        daemon.edit(**edit)
        reloading.start()
        os.kill(victim(), signal.SIGKILL)
        reloading.join(RELOAD_TIMEOUT_S)
        traffic.more()
    finally:
        if reloading.is_alive():
            reloading.join(RELOAD_TIMEOUT_S)
        calls = traffic.stop(STOP_S)
    return outcome["report"], calls


def assert_complete_or_lost_with_the_worker(calls: list[Outcome], daemon: FileDaemon) -> None:
    """Every request completed, or ended with the explicit error of a worker killed under it."""
    explicit = [c for c in calls if c.kind in ("http-error", "sse-error") and "the request was lost" in c.detail]
    assert all(c.kind == "complete" or c in explicit for c in calls), report(calls, daemon.log_tail(30))


def test_tier_killed_mid_reload_restarts_with_the_generation_it_belongs_to(daemons, tmp_path):
    """kill -9 of the new worker after a blue-green reload switched to it, while the old worker still
    finishes its long requests (the transaction is still open): it restarts with the config it was
    started with (generation 2), not the one the supervisor still runs (1); the requests the old
    worker had started finish, and the reload ends applied with every tier on generation 2."""
    daemon = daemons({"tokenizer.workers": 1, "model.seed": 0, "runtime.model_reload": "blue_green"})
    traffic = background(daemon, KEEPALIVE + CURL, tmp_path)
    pinned = None
    outcome: dict = {}
    reloading = threading.Thread(target=lambda: outcome.update(report=daemon.reload()[1]))
    try:
        traffic.wait_completed(8)
        pinned = pinned_requests(daemon, tmp_path)  # they keep the old worker, and the transaction, busy
        daemon.edit(tokenizer__workers=2, model__seed=1)
        reloading.start()
        new_worker = daemon.wait_for_event("tier.started", tier="worker", child_generation=2, timeout=RELOAD_TIMEOUT_S)
        switched = daemon.wait_for_event("scheduler.worker_switched", timeout=RELOAD_TIMEOUT_S)
        os.kill(new_worker["child_pid"], signal.SIGKILL)
    finally:
        if reloading.is_alive():
            reloading.join(RELOAD_TIMEOUT_S)
        calls = traffic.stop(STOP_S)
        held = pinned.join(PINNED_S) if pinned else []
    assert switched["finishing"] >= 1, switched  # the old worker was still running requests when it died
    report = outcome["report"]
    events = daemon.log_events()
    died = next(i for i, e in enumerate(events) if e.get("event") == "tier.died" and e.get("tier") == "worker")
    ended = next(i for i, e in enumerate(events) if e.get("event") == "config.reload")
    assert died < ended, "the worker died after the reload ended: the test missed its window"
    workers = [e["child_generation"] for e in daemon.events("tier.started", tier="worker")]
    assert workers == [1, 2, 2], workers  # started, beside it the reload's, restarted after the kill
    assert report["result"] == "applied" and report["generation"] == 2, report
    # Each back-end process running now says generation 2 in its last line (started with it, or adopted it).
    last = {e["pid"]: e.get("generation") for e in daemon.log_events() if "pid" in e}
    running = {name: last.get(pid) for name, pid in daemon.tiers().items() if name != "frontend-0"}
    assert set(running.values()) == {2}, running
    assert_all_complete(held, daemon)  # running on the old worker: untouched by the new one's death
    # Those on the new worker when it died end with an explicit error; nothing else fails.
    assert_complete_or_lost_with_the_worker(calls, daemon)
    answer = httpx.post(daemon.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert answer.status_code == 200, answer.text


def test_serving_worker_killed_while_a_blue_green_reload_prepares(daemons, tmp_path):
    """kill -9 of the serving worker while the new one loads beside it: it restarts with the running
    config (generation 1) as after any crash; then the reload switches to the new worker, once the
    restarted one is up, and ends applied. Requests the killed worker was running end with an explicit
    503; every other one completes."""
    daemon = daemons({"model.seed": 0, "runtime.model_reload": "blue_green"})
    serving = daemon.tiers()["worker-0"]
    beside: dict = {}

    def serving_worker() -> int:  # once the new worker is loading beside it
        started = daemon.wait_for_event("tier.started", tier="worker", child_generation=2, timeout=RELOAD_TIMEOUT_S)
        beside.update(started)
        return serving

    report_, calls = kill_during_reload(daemon, tmp_path, {"model__seed": 1}, serving_worker)
    names = [e.get("event") for e in daemon.log_events()]
    assert names.index("tier.died") < names.index("scheduler.worker_switched"), "killed after the switch"
    assert report_["result"] == "applied" and report_["generation"] == 2, report_
    workers = [e["child_generation"] for e in daemon.events("tier.started", tier="worker")]
    assert workers == [1, 2, 1], workers  # the serving one, the reload's, the killed one restarted with its own
    assert daemon.tiers()["worker-0"] == beside["child_pid"]
    assert len(daemon.events("tier.stopped", tier="worker")) == 1  # the restarted one, once the switch was made
    assert_complete_or_lost_with_the_worker(calls, daemon)


def test_new_tier_killed_on_standby_rolls_the_reload_back_untouched(daemons, tmp_path):
    """kill -9 of a new tokenizer waiting on standby while the new worker loads beside the old one
    (blue-green): the reload checks what it prepared before switching, is rolled back naming the dead
    tier, stops the new worker, and no serving process changed; no request failed."""
    daemon = daemons({"tokenizer.workers": 1, "model.seed": 0, "runtime.model_reload": "blue_green"})
    before = daemon.tiers()

    def standby_tokenizer() -> int:  # ready, and waiting while the new worker loads
        standby = daemon.wait_for_event("tier.ready", tier="tokenizer", index=1, timeout=RELOAD_TIMEOUT_S)
        daemon.wait_for_event("tier.started", tier="worker", child_generation=2, timeout=RELOAD_TIMEOUT_S)
        return standby["child_pid"]

    edit = {"tokenizer__workers": 2, "model__seed": 1}
    report_, calls = kill_during_reload(daemon, tmp_path, edit, standby_tokenizer)
    assert report_["result"] == "rolled_back" and report_["generation"] == 1, report_
    assert "tokenizer-1 exited with status -9 before the switch" in report_["reason"], report_
    assert daemon.tiers() == before
    started = [e["child_pid"] for e in daemon.events("tier.started") if e["child_generation"] == 2]
    assert len(started) == 3 and not set(started) & set(descendants(daemon.pid)), started  # 2 tokenizers, 1 worker
    assert not daemon.events("scheduler.worker_switched") and not daemon.events("scheduler.hold")
    assert_all_complete(calls, daemon)


# A moment in a worker reload (model.seed and tokenizer.workers change in one edit), told by the log.
STOP_PHASES = {
    "old worker draining": ("scheduler.hold", {}),
    "new worker loading": ("tier.started", {"tier": "worker", "child_generation": 2}),
    "new tokenizer pool starting": ("tier.started", {"tier": "tokenizer", "child_generation": 2}),
}
STOP_BOUND_S = 30 + 15 + 30 + 20  # the reload's drain and its grace, the stop's drain, slack
BACKLOG_SLACK_S = 0.5  # how long before a stop a fresh connection may still wait to be accepted


@pytest.mark.parametrize("phase", list(STOP_PHASES))
def test_sigterm_during_a_worker_reload_ends_it_then_drains(daemons, tmp_path, phase):
    """SIGTERM in a phase of a worker reload (drain mode): the reload ends early and is reported; the
    requests running finish, those held get an explicit 503, none is cut or left hanging; exit 0."""
    daemon = daemons({"tokenizer.workers": 1, "model.seed": 0})
    traffic = background(daemon, KEEPALIVE + CURL, tmp_path)
    pinned = None
    try:
        traffic.wait_completed(8)
        pinned = pinned_requests(daemon, tmp_path) if phase == "old worker draining" else None
        daemon.edit(model__seed=1, tokenizer__workers=2)
        reloading = threading.Thread(target=daemon.reload, daemon=True)
        reloading.start()
        event, fields = STOP_PHASES[phase]
        daemon.wait_for_event(event, timeout=RELOAD_TIMEOUT_S, **fields)
        stopped = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        status = daemon.process.wait(STOP_BOUND_S)
        took = time.monotonic() - stopped
        reloading.join(30)
    finally:
        calls = traffic.stop(STOP_S)
        held = pinned.join(PINNED_S) if pinned else []
    assert status == 0 and took < STOP_BOUND_S, daemon.log_tail()
    (report_event,) = daemon.events("config.reload")
    assert report_event["result"] in ("applied", "rolled_back"), report_event
    if report_event["result"] == "rolled_back":
        assert "the daemon is stopping" in report_event["reason"], report_event
    if pinned:
        assert_all_complete(held, daemon)  # running on the old worker when the stop came: they finish
    explicit = [c for c in calls if c.kind == "http-error" and c.status == 503 and '"error"' in c.detail]
    # Sent once the stop had begun: refused, or reset in the listen backlog when the supervisor shuts
    # the socket (as at any stop), with nothing read. The front-end stops accepting when the supervisor
    # passes the stop on, a few milliseconds before Granian logs it: a request connecting in between
    # waits in the backlog and is reset (seen once in CI, started 7 ms after daemon.stopping and 16 ms
    # before "Shutting down granian"). On a busy machine (CI runs two test files at once) a fresh
    # connection made just before the stop may still wait in the backlog, not yet accepted, when the
    # stop begins: reset too, with nothing read (seen once, 2026-12-08). So a reset with no byte of
    # answer counts as never read from BACKLOG_SLACK_S before the stop. Requests sent earlier must all
    # end complete or with an explicit error.
    (closing,) = [logged_at(e) for e in daemon.events("daemon.stopping")]

    def never_accepted(c: Outcome) -> bool:
        if c.kind != "connection-error":
            return False
        return c.started_wall >= closing or (c.chunks == 0 and c.started_wall >= closing - BACKLOG_SLACK_S)

    never_read = [c for c in calls if c.refused or c.kind == "goaway" or never_accepted(c)]
    lost = [c for c in calls if c.kind != "complete" and c not in explicit and c not in never_read]
    assert not lost, report(lost, daemon.log_tail(30))
    assert not daemon.events("daemon.failed"), daemon.log_tail()


def test_tier_failing_in_prepare_leaves_the_model_worker_untouched(daemons, tmp_path):
    """model.seed (drain mode) and a tokenizer that cannot load in one edit: the new tokenizer pool
    starts first, beside the serving one, and fails; the reload is rolled back before the worker is
    held, drained or replaced: every PID unchanged, no request waited or failed."""
    broken = tmp_path / "broken-tokenizer"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{}")  # there, so `daemon check` passes; not a tokenizer
    daemon = daemons()
    before = daemon.tiers()
    traffic = background(daemon, KEEPALIVE + CURL, tmp_path)
    try:
        traffic.wait_completed(8)
        daemon.edit(model__seed=7, tokenizer__path=broken)
        status, outcome = daemon.reload()
        assert status == 1 and outcome["result"] == "rolled_back" and outcome["generation"] == 1, outcome
        assert "the new tokenizer did not start" in outcome["reason"], outcome
        traffic.more()
    finally:
        calls = traffic.stop(STOP_S)
    assert_all_complete(calls, daemon)
    assert daemon.tiers() == before
    assert [e["child_generation"] for e in daemon.events("tier.started", tier="worker")] == [1]
    assert not daemon.events("scheduler.hold"), daemon.log_tail()
    (withdrawn,) = daemon.events("tier.started", tier="tokenizer", child_generation=2)
    assert withdrawn["child_pid"] not in descendants(daemon.pid)


WORKER_RELOADS = 8  # the race struck about one worker reload in three: all 8 escape it in 4% of runs


def test_worker_reload_fails_no_request(daemons, tmp_path):
    """model.seed changes (the worker is replaced) under load: none fails a request (once one in three did)."""
    daemon = daemons()
    traffic = background(daemon, KEEPALIVE, tmp_path)
    try:
        traffic.wait_completed(8)
        for seed in range(1, WORKER_RELOADS + 1):
            daemon.edit(model__seed=seed)
            status, outcome = daemon.reload()
            assert status == 0 and outcome["restarted"] == ["worker"], outcome
            traffic.more(4)
            if any(c.kind not in ("complete", "pending") for c in traffic.outcomes):
                break
    finally:
        calls = traffic.stop(STOP_S)
    print(f"\nworker reloads: {seed}, {report(calls).splitlines()[0]}")
    assert_all_complete(calls, daemon)


# --- 7. the Granian pin -----------------------------------------------------------------------------

GUARD_APP = """
import os


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": message["type"] + ".complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = f"{os.getppid()}".encode()  # the Granian main process this worker belongs to
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
"""

GUARD_SERVER = """
import sys
from granian.constants import Interfaces
from daemon.frontend.server import InheritedSocketGranian

fd, port = int(sys.argv[1]), int(sys.argv[2])
InheritedSocketGranian(
    "guard_app:app", listen_fd=fd, address="127.0.0.1", port=port, interface=Interfaces.ASGI, workers=1,
    workers_kill_timeout=5,
).serve()
"""


def test_granian_pin_and_inherited_socket_handover(tmp_path):
    version = importlib.metadata.version("granian")
    assert version.startswith("2.8."), (
        f"InheritedSocketGranian overrides a private method of granian 2.8.x, not {version}"
    )
    (tmp_path / "guard_app.py").write_text(GUARD_APP)
    (tmp_path / "guard_server.py").write_text(GUARD_SERVER)
    env = clean_environ(PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")]))
    servers: list[subprocess.Popen] = []
    logs = [tmp_path / f"server-{n}.log" for n in range(2)]

    def output() -> str:
        return "\n".join(f"--- {log.name}:\n{log.read_text(errors='replace')[-2000:]}" for log in logs if log.exists())

    # no SO_REUSEPORT: a Granian that bound a socket of its own on this port would fail to start
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        port = listener.getsockname()[1]
        for log in logs:
            with open(log, "wb") as stream:
                servers.append(
                    subprocess.Popen(
                        [sys.executable, str(tmp_path / "guard_server.py"), str(listener.fileno()), str(port)],
                        env=env,
                        cwd=tmp_path,
                        pass_fds=(listener.fileno(),),
                        start_new_session=True,
                        stdout=stream,
                        stderr=subprocess.STDOUT,
                    )
                )
    # the two servers hold the socket now
    try:
        answered: dict[int, int] = {}

        def ask() -> int:
            response = httpx.get(f"http://127.0.0.1:{port}/", timeout=10, headers={"connection": "close"})
            main = int(response.raise_for_status().text)
            answered[main] = answered.get(main, 0) + 1
            return main

        first, second = (s.pid for s in servers)
        # both instances accept from the one socket (fresh connections, spread over them by the kernel)
        try:
            until(lambda: ask() and {first, second} <= set(answered), 60, interval=0.01, what="both answering")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {answered} (servers {first}, {second})\n{output()}") from None
        servers[0].send_signal(signal.SIGTERM)
        failures = []
        deadline = time.monotonic() + 30
        while servers[0].poll() is None and time.monotonic() < deadline:  # while the first stops
            try:
                ask()
            except httpx.HTTPError as exc:
                failures.append(repr(exc))
        assert servers[0].wait(10) == 0, output()
        after: dict[int, int] = {}
        for _ in range(20):
            try:
                main = ask()
                after[main] = after.get(main, 0) + 1
            except httpx.HTTPError as exc:
                failures.append(repr(exc))
        assert not failures, f"{failures}\n{output()}"
        assert after == {second: 20}, after
        assert servers[1].poll() is None, output()
    finally:
        for server in servers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
