"""Clients that go away badly hurt no one else, against a real daemon.

A stream whose client stops reading and then disconnects is counted as gone and its request is
aborted, with at most one log line; early refusals (401, 413) over HTTP/2 reach the client as
responses, not as stream resets. Raw sockets where a well-behaved client cannot produce the
abuse; every loop is bounded in count and time; every socket and process is closed.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.settings
import httpx
import pytest
from harness.daemons import RunningDaemon, serving
from harness.metrics import scrape
from harness.procs import descendants
from harness.wait import until

STALLED_CLIENTS = 20
# Long enough that no stream can finish by itself while its client sits unread.
STREAM_TOKENS = 1500


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, model_cache) -> Iterator[RunningDaemon]:
    with serving(tmp_path_factory.mktemp("stream-gone"), model_cache) as running:
        yield running


def running_requests(daemon: RunningDaemon) -> float:
    return scrape(daemon).get(("daemon_running_requests", ()), 0.0)


def stalled_stream(daemon: RunningDaemon, http2: bool) -> socket.socket:
    """A connection that asks for a long stream and never reads it: its receive buffer is tiny
    (set before connecting, so the window it advertises stays small) so the server's sends stall."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", daemon.port))
    body = json.dumps(
        {"prompt": "a", "max_tokens": STREAM_TOKENS, "ignore_eos": True, "stream": True, "temperature": 0}
    ).encode()
    if http2:
        # h2c with prior knowledge; a tiny stream window that is never reopened stalls the stream
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1024})
        headers = [
            (":method", "POST"),
            (":path", "/v1/completions"),
            (":scheme", "http"),
            (":authority", "x"),
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
        ]
        conn.send_headers(1, headers)
        conn.send_data(1, body, end_stream=True)
        sock.sendall(conn.data_to_send())
    else:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
    return sock


def unread_bytes(sock: socket.socket) -> int:
    import fcntl
    import termios

    return int.from_bytes(fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"), "little")


def log_count(daemon: RunningDaemon, text: str) -> int:
    return daemon.log_path.read_text(errors="replace").count(text)


def stall_then_leave(daemon: RunningDaemon, http2: bool) -> None:
    """STALLED_CLIENTS streams that stop reading once begun, then leave; until all are aborted."""
    gone_before = log_count(daemon, "frontend.client_gone")
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(stalled_stream(daemon, http2)) for _ in range(STALLED_CLIENTS)]
        # every stream has begun (bytes wait unread at the client), and all are generating
        until(lambda: all(unread_bytes(s) > 0 for s in socks), 30, what="every stream started", retry_on=())
        until(lambda: running_requests(daemon) >= 1, 30, what="generating", retry_on=())
        for sock in socks:
            # unread data at close: the kernel answers with a reset, as a crashed client's would
            sock.close()
    until(lambda: running_requests(daemon) == 0, 30, what="every stalled request aborted", retry_on=())
    until(
        lambda: log_count(daemon, "frontend.client_gone") - gone_before >= STALLED_CLIENTS,
        30,
        what="every stalled client counted as gone",
        retry_on=(),
    )


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
def test_clients_that_stop_reading_then_leave_are_aborted_quietly(daemon: RunningDaemon, http2: bool) -> None:
    errors_before = log_count(daemon, "ASGI transport error")
    stall_then_leave(daemon, http2)
    noise = log_count(daemon, "ASGI transport error") - errors_before
    assert noise <= STALLED_CLIENTS, f"{noise} transport error lines for {STALLED_CLIENTS} clients"


def frontend_rss_kib(daemon: RunningDaemon) -> int:
    """Resident memory of the front-end tier and its Granian worker processes."""
    frontend = str(daemon.tier_pids()["frontend-0"])
    workers = [p for p in descendants(daemon.pid) if Path(f"/proc/{p}/stat").read_text().split()[3] == frontend]
    assert workers, "no Granian worker process found"
    total = 0
    for pid in [int(frontend), *workers]:
        status = Path(f"/proc/{pid}/status").read_text()
        total += int(status.split("VmRSS:")[1].split()[0])
    return total


MEMORY_ROUNDS = 4
MEMORY_SLACK_KIB = 16 * 1024  # allocator noise; a leak of the stalled streams' buffers is far more


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
def test_front_end_memory_returns_after_stalled_clients_leave(daemon: RunningDaemon, http2: bool) -> None:
    """Rounds of clients that stop reading (their unsent chunks pile up in the front-end) and leave:
    after the first round (the allocator's warm-up), memory stays at its level round after round."""
    stall_then_leave(daemon, http2)
    level = frontend_rss_kib(daemon)
    after = []
    for _round in range(MEMORY_ROUNDS - 1):
        stall_then_leave(daemon, http2)
        after.append(frontend_rss_kib(daemon))
    assert max(after) <= level + MEMORY_SLACK_KIB, f"front-end RSS {level} KiB, then {after} KiB"


API_KEY = "stream-gone-key"
BODY_LIMIT = 1024 * 1024


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, model_cache) -> Iterator[RunningDaemon]:
    settings = {"server.api_key": API_KEY, "server.max_request_body_bytes": BODY_LIMIT}
    with serving(tmp_path_factory.mktemp("early-errors"), model_cache, settings) as running:
        yield running


EARLY_ERRORS = {
    # (status, authorized, body size): a refused key with a body that fits; a body over the limit
    "401": (401, False, 500 * 1000),
    "413": (413, True, BODY_LIMIT + 1024 * 1024),
}


def early_error_body(size: int) -> bytes:
    padding = "x" * max(0, size - 40)
    return json.dumps({"prompt": padding, "max_tokens": 1}).encode()[:size].ljust(size, b" ")


@pytest.mark.parametrize("case", EARLY_ERRORS)
def test_early_errors_reach_httpx_over_h2c(guarded: RunningDaemon, case: str) -> None:
    status, authorized, size = EARLY_ERRORS[case]
    headers = {"content-type": "application/json"}
    if authorized:
        headers["authorization"] = f"Bearer {API_KEY}"
    with httpx.Client(http1=False, http2=True, timeout=15) as client:
        response = client.post(guarded.url + "/v1/completions", content=early_error_body(size), headers=headers)
    assert response.http_version == "HTTP/2"
    assert response.status_code == status, response.text
    assert "error" in response.json()


@pytest.mark.parametrize("case", EARLY_ERRORS)
def test_early_errors_reach_curl_over_h2c(guarded: RunningDaemon, case: str, tmp_path) -> None:
    status, authorized, size = EARLY_ERRORS[case]
    body = tmp_path / "body.json"
    body.write_bytes(early_error_body(size))
    auth = ["-H", f"Authorization: Bearer {API_KEY}"] if authorized else []
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--http2-prior-knowledge",
            "--max-time",
            "15",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
            "-H",
            "Content-Type: application/json",
            *auth,
            "--data-binary",
            f"@{body}",
            guarded.url + "/v1/completions",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.stdout == f"2 {status}", result.stderr
