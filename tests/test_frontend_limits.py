"""The front-end cannot be held hostage: connection limits and timeouts, against a real daemon.

Real clients where they can produce the abuse (httpx), raw sockets where a well-behaved client
cannot (silence, a short body, a trickle). Every loop is bounded in count and time; every socket
is closed by the test that opened it.
"""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from harness.daemons import RunningDaemon, serving

IDLE_CONNECTIONS = 2000
HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, model_cache) -> Iterator[RunningDaemon]:
    settings = {
        "server.header_read_timeout_s": HEADER_TIMEOUT_S,
        "server.body_read_timeout_s": BODY_TIMEOUT_S,
    }
    with serving(tmp_path_factory.mktemp("limits"), model_cache, settings) as running:
        yield running


@contextlib.contextmanager
def raw(daemon: RunningDaemon, timeout: float = 10.0) -> Iterator[socket.socket]:
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=timeout) as sock:
        yield sock


def read_until_closed(sock: socket.socket, deadline_s: float) -> bytes:
    """Everything the server sends until it closes the connection; fails after `deadline_s`."""
    data, deadline = b"", time.monotonic() + deadline_s
    while True:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"still open after {deadline_s} s; got {data[:200]!r}") from None
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def status_and_json(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


@contextlib.contextmanager
def open_file_limit(wanted: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"the hard open-file limit ({hard}) is below {wanted}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_health_answers_beside_2000_silent_connections(daemon):
    with open_file_limit(IDLE_CONNECTIONS + 256), contextlib.ExitStack() as stack:
        started = time.monotonic()
        for _ in range(IDLE_CONNECTIONS):
            stack.enter_context(socket.create_connection(("127.0.0.1", daemon.port), timeout=5))
            assert time.monotonic() - started < 30, "opening the idle connections took too long"
        # the kernel accepts before Granian does: a plain request proves Granian took them all
        # and still has room for one more
        asked = time.monotonic()
        response = httpx.get(daemon.url + "/health", timeout=10)
        assert response.status_code == 200 and time.monotonic() - asked < 5
        with httpx.Client(base_url=daemon.url, http1=False, http2=True, timeout=10) as client:
            assert client.get("/health").status_code == 200
    # and after they all leave, it still serves
    assert httpx.get(daemon.url + "/health", timeout=10).status_code == 200


def test_body_shorter_than_its_content_length_gets_408(daemon):
    with raw(daemon) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"prompt": '
        )
        sent = time.monotonic()
        sock.settimeout(BODY_TIMEOUT_S + 10)
        data = b""
        while b"\r\n\r\n" not in data or not data.endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        took = time.monotonic() - sent
    status, body = status_and_json(data)
    assert status == 408 and body["error"]["type"] == "invalid_request_error", body
    assert BODY_TIMEOUT_S * 0.9 <= took < BODY_TIMEOUT_S + 5, took


def test_trickled_chunked_body_gets_408(daemon):
    with raw(daemon) as sock:
        sock.sendall(
            b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        sent = time.monotonic()
        sock.setblocking(False)
        data = b""
        # one byte every 0.1 s: never done, never silent, until the server answers (bounded)
        for _ in range(int((BODY_TIMEOUT_S + 10) / 0.1)):
            with contextlib.suppress(BlockingIOError):
                sock.sendall(b"1\r\n \r\n")
            with contextlib.suppress(BlockingIOError):
                data += sock.recv(65536)
            if b"\r\n\r\n" in data and data.endswith(b"}"):
                break
            time.sleep(0.1)  # the trickle's own pace, not a wait for the server
        took = time.monotonic() - sent
    status, body = status_and_json(data)
    assert status == 408, data
    assert took < BODY_TIMEOUT_S + 5, took


def test_slowloris_headers_are_cut_at_the_header_timeout(daemon):
    with raw(daemon) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        opened = time.monotonic()
        sock.setblocking(False)
        closed = False
        # a header line every 0.2 s, never the blank line that ends them (bounded)
        for i in range(int((HEADER_TIMEOUT_S + 10) / 0.2)):
            try:
                sock.sendall(f"X-Slow-{i}: y\r\n".encode())
                if sock.recv(65536) == b"":
                    closed = True
                    break
            except BlockingIOError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.2)  # the slow client's own pace
        took = time.monotonic() - opened
    assert closed, f"the connection was still open after {took:.1f} s"
    assert HEADER_TIMEOUT_S * 0.9 <= took < HEADER_TIMEOUT_S + 3, took


def test_idle_keep_alive_connection_is_closed_at_the_header_timeout(daemon):
    with raw(daemon) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(10)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200"), first
        answered = time.monotonic()
        rest = read_until_closed(sock, HEADER_TIMEOUT_S + 5)
        assert rest == b"", rest  # closed without a response
        assert time.monotonic() - answered >= HEADER_TIMEOUT_S * 0.9, "closed too early"


def test_64_kib_of_headers_are_served_and_larger_get_431(daemon):
    big = {"x-big": "a" * 64 * 1024}
    assert httpx.get(daemon.url + "/health", headers=big, timeout=10).status_code == 200
    with raw(daemon) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Huge: " + b"a" * (1024 * 1024) + b"\r\n\r\n")
        response = read_until_closed(sock, 10)
    assert response.startswith(b"HTTP/1.1 431"), response[:200]
