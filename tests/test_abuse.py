"""What held, and must keep holding: abusive clients against a real daemon (issue 10).

Bytes no JSON or HTTP parser should accept, numbers no sampler can use, HTTP/2 clients that
open more streams than allowed or reset them as fast as they open them (CVE-2023-44487), and
hundreds of clients that vanish mid-request. Each is answered (or cut off) without hurting the
daemon: it keeps serving, runs nothing for the departed, and leaks no file descriptor.

Slowloris, header sizes (tests/test_frontend_limits.py) and RST_STREAM aborting a request
(tests/test_faults.py) are tested where they live. Raw sockets and the h2 library stand in for
clients that no well-behaved library can be made to be. Every loop is bounded in count and
time; every socket is closed by the test that opened it.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import httpx
import pytest
from harness.daemons import RunningDaemon, serving
from harness.metrics import scrape
from harness.procs import descendants
from harness.raw_h2 import RawH2
from harness.wait import until

MAX_STREAMS = 8  # small, so a client can exceed it with a dozen streams


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, model_cache) -> Iterator[RunningDaemon]:
    settings = {"server.http2_max_concurrent_streams": MAX_STREAMS}
    with serving(tmp_path_factory.mktemp("abuse"), model_cache, settings) as running:
        yield running


# --- helpers ---------------------------------------------------------------------------------------


def openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def post(daemon: RunningDaemon, path: str, body: bytes, *, http2: bool = False) -> httpx.Response:
    with httpx.Client(base_url=daemon.url, http2=http2, http1=not http2, timeout=30) as http:
        return http.post(path, content=body, headers={"content-type": "application/json"})


def assert_serving(daemon: RunningDaemon) -> None:
    """A real completion still comes back, over both protocols."""
    for http2 in (False, True):
        with httpx.Client(base_url=daemon.url, http2=http2, http1=not http2, timeout=30) as http:
            body = {"prompt": "still there", "max_tokens": 2, "ignore_eos": True}  # sampled: EOS may come first
            response = http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 2


def running_and_queued(daemon: RunningDaemon) -> tuple[float, float]:
    samples = scrape(daemon)
    return samples[("daemon_running_requests", ())], samples[("daemon_queued_requests", ())]


def wait_nothing_running(daemon: RunningDaemon, timeout: float = 15) -> None:
    idle = "idle engine (running and queued back to 0)"
    until(lambda: running_and_queued(daemon) == (0, 0), timeout, 0.05, idle, retry_on=())


def raw_exchange(daemon: RunningDaemon, request: bytes, timeout: float = 10) -> bytes:
    """Send `request` on a fresh HTTP/1.1 connection; what comes back until the server closes
    the connection or goes quiet for `timeout` seconds (keep-alive)."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=timeout) as conn:
        conn.sendall(request)
        received = b""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while time.monotonic() < deadline and (chunk := conn.recv(65536)):
                received += chunk
                if response_complete(received):
                    break
        return received


def response_complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response.split(b" ", 2)[1])


def body_of(response: bytes) -> bytes:
    return response.partition(b"\r\n\r\n")[2]


def frontend_pids(daemon: RunningDaemon) -> list[int]:
    """The front-end tier's process and its Granian workers (its children)."""
    tier = next(pid for name, pid in daemon.tier_pids().items() if name.startswith("frontend"))
    pids = [tier]
    for pid in descendants(daemon.pid):
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{pid}/status").read_text()
            if f"\nPPid:\t{tier}\n" in status:
                pids.append(pid)
    return sorted(pids)


def open_fds(pids: list[int]) -> int:
    return sum(len(list(Path(f"/proc/{pid}/fd").iterdir())) for pid in pids)


# --- invalid UTF-8 and NUL bytes -------------------------------------------------------------------

BAD_BYTES = {
    "invalid-utf8-in-a-string": b"\xff\xfe",
    "overlong-utf8-in-a-string": b"\xc0\xaf",
    "lone-surrogate-utf8-in-a-string": b"\xed\xa0\x80",
    "raw-nul-in-a-string": b"\x00",
}


def completion_with(text: bytes) -> bytes:
    return b'{"prompt": "a' + text + b'b", "max_tokens": 2, "ignore_eos": true}'


def chat_with(text: bytes) -> bytes:
    return b'{"messages": [{"role": "user", "content": "a' + text + b'b"}], "max_tokens": 2, "ignore_eos": true}'


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "http2"])
@pytest.mark.parametrize("bad", list(BAD_BYTES.values()), ids=list(BAD_BYTES))
@pytest.mark.parametrize(
    ("path", "body_with"),
    [("/v1/completions", completion_with), ("/v1/chat/completions", chat_with), ("/tokenize", completion_with)],
    ids=["prompt", "messages-content", "tokenize"],
)
def test_invalid_utf8_and_nul_inside_json_strings_are_a_400(daemon, path, body_with, bad, http2):
    error = openai_error(post(daemon, path, body_with(bad), http2=http2), 400)
    assert error["type"] == "invalid_request_error", error


@pytest.mark.parametrize(
    "body",
    [
        b'{"prompt": "x", "max_tokens": 2}\xff',
        b'\xff{"prompt": "x", "max_tokens": 2}',
        b'{"prompt": "x",\x00 "max_tokens": 2}',
        b'{"prompt": "x", "max_tokens": 2}\x00',
        b'{"pro\xffmpt": "x", "max_tokens": 2}',
        b"\x00" * 64,
        b"\xff" * 64,
    ],
    ids=["trailing-ff", "leading-ff", "nul-between-members", "trailing-nul", "ff-in-a-key", "all-nul", "all-ff"],
)
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
def test_invalid_utf8_and_nul_outside_json_strings_are_a_400(daemon, path, body):
    openai_error(post(daemon, path, body), 400)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_escaped_nul_in_a_prompt_is_an_ordinary_character(daemon, path):
    """`\\u0000` is valid JSON and a valid character: the request is served like any other."""
    body = completion_with(b"\\u0000") if path == "/v1/completions" else chat_with(b"\\u0000")
    response = post(daemon, path, body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2


def request_with(request_line: bytes, header: bytes = b"") -> bytes:
    body = completion_with(b"")
    return (
        request_line
        + b"\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + header
        + b"Content-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (request_with(b"POST /v1/completions HTTP/1.1", b"X-Note: a\x00b\r\n"), 400),
        (request_with(b"POST /v1/completions HTTP/1.1", b"X-Note: a\xff\xfeb\r\n"), 200),
        (request_with(b"POST /v1/completions HTTP/1.1", b"X-No\xffte: ab\r\n"), 400),
        (request_with(b"POST /v1/compl\x00etions HTTP/1.1"), 400),
        (request_with(b"POST /v1/compl\xffetions HTTP/1.1"), 400),
        (request_with(b"POST /v1/completions?q=\xff HTTP/1.1"), 400),
    ],
    ids=[
        "nul-in-a-value",
        "invalid-utf8-in-a-value",
        "invalid-utf8-in-a-name",
        "nul-in-the-path",
        "invalid-utf8-in-the-path",
        "invalid-utf8-in-the-query",
    ],
)
def test_invalid_bytes_in_headers_and_path_are_refused_by_the_http_layer(daemon, request_bytes, status):
    response = raw_exchange(daemon, request_bytes)
    assert status_of(response) == status, response[:300]
    if status == 200:
        assert json.loads(body_of(response))["usage"]["completion_tokens"] == 2
    assert_serving(daemon)


# --- NaN, Infinity, 1e999 --------------------------------------------------------------------------

NUMERIC_FIELDS = ["temperature", "top_p", "max_tokens", "presence_penalty", "frequency_penalty", "top_k", "seed"]


def body_with_number(path: str, field: str, literal: str) -> bytes:
    start = b'{"prompt": "x"' if path == "/v1/completions" else b'{"messages": [{"role": "user", "content": "x"}]'
    extra = b', "max_tokens": 2' if field != "max_tokens" else b""
    return start + extra + b', "' + field.encode() + b'": ' + literal.encode() + b"}"


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field", NUMERIC_FIELDS)
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_nan_and_infinity_literals_are_not_json_and_a_400(daemon, path, field, literal):
    """Python's json writes these, but they are not JSON: the parser stops at them, before any
    field is known, so the 400 says where (the byte), not which field."""
    error = openai_error(post(daemon, path, body_with_number(path, field, literal)), 400)
    assert error["message"].startswith("the request body is not valid JSON"), error


@pytest.mark.parametrize("literal", ["1e999", "-1e999"])
@pytest.mark.parametrize("field", NUMERIC_FIELDS)
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_numbers_beyond_a_double_are_a_400_naming_the_field(daemon, path, field, literal):
    # valid JSON, but no double holds it: refused at the door, naming where it is
    error = openai_error(post(daemon, path, body_with_number(path, field, literal)), 400)
    assert error["param"] == field and "out of range" in error["message"], error


@pytest.mark.parametrize("literal", ['"NaN"', '"Infinity"', '"1e999"'])
def test_non_finite_numbers_as_strings_are_a_400_naming_the_field(daemon, literal):
    body = b'{"prompt": "x", "max_tokens": 2, "temperature": ' + literal.encode() + b"}"
    error = openai_error(post(daemon, "/v1/completions", body), 400)
    assert error["param"] == "temperature", error


# --- HTTP/2 stream limits ---------------------------------------------------------------------------

BEYOND = 4  # streams opened past the limit


def test_streams_beyond_the_limit_are_refused_and_those_within_complete(daemon):
    """The client opens MAX_STREAMS + BEYOND streams before the server's SETTINGS can reach it
    (h2 assumes 100 until then), each a POST whose body is held back, so all are open at once.
    Those past the limit get RST_STREAM REFUSED_STREAM; the others, once given their bodies, a 200."""
    client = RawH2(daemon.port)
    try:
        streams = []
        for _ in range(MAX_STREAMS + BEYOND):
            stream = client.conn.get_next_available_stream_id()
            client.conn.send_headers(stream, client.headers("/v1/completions"))
            streams.append(stream)
        client.flush()
        advertised, refused, deadline = None, {}, time.monotonic() + 10
        while (advertised is None or len(refused) < BEYOND) and time.monotonic() < deadline:
            for event in client.receive(0.5):
                if isinstance(event, h2.events.RemoteSettingsChanged):
                    changed = event.changed_settings.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS)
                    advertised = changed.new_value if changed else advertised
                elif isinstance(event, h2.events.StreamReset):
                    refused[event.stream_id] = event.error_code
        assert advertised == MAX_STREAMS
        assert refused == {s: h2.errors.ErrorCodes.REFUSED_STREAM for s in streams[MAX_STREAMS:]}, refused

        within = streams[:MAX_STREAMS]
        for stream in within:
            client.conn.send_data(
                stream,
                json.dumps({"prompt": f"s{stream}", "max_tokens": 2, "ignore_eos": True}).encode(),
                end_stream=True,
            )
        client.flush()
        statuses, bodies, ended = {}, {s: b"" for s in within}, set()
        deadline = time.monotonic() + 20
        while len(ended) < len(within) and time.monotonic() < deadline:
            for event in client.receive(0.5):
                if isinstance(event, h2.events.ResponseReceived):
                    statuses[event.stream_id] = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    bodies[event.stream_id] += event.data
                elif isinstance(event, h2.events.StreamEnded):
                    ended.add(event.stream_id)
                elif isinstance(event, h2.events.StreamReset | h2.events.ConnectionTerminated):
                    raise AssertionError(f"a stream within the limit was cut: {event}")
        assert statuses == dict.fromkeys(within, 200), (statuses, bodies)
        assert all(json.loads(body)["usage"]["completion_tokens"] == 2 for body in bodies.values())
    finally:
        client.close()
    assert_serving(daemon)


# --- HTTP/2 rapid reset -----------------------------------------------------------------------------

RAPID_RESETS = 2000


def test_rapid_reset_is_cut_off_and_everyone_else_is_served(daemon):
    """CVE-2023-44487: open a stream (a complete completion request) and reset it at once, 2,000
    times. The server sends GOAWAY (or closes the connection) long before the end; meanwhile and
    afterwards a second client's /health answers, and nothing is left running."""
    health: list[int] = []
    stop = threading.Event()

    def probe() -> None:  # a second client, the whole time the attack runs
        with httpx.Client(base_url=daemon.url, timeout=10) as http:
            while not stop.is_set() and len(health) < 1000:
                health.append(http.get("/health").status_code)
                stop.wait(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    until(lambda: len(health) >= 1, 10, 0.05, "a first /health answer before the attack", retry_on=())
    client = RawH2(daemon.port)
    sent, goaway, closed = 0, None, False
    body = json.dumps({"prompt": "reset me", "max_tokens": 50, "ignore_eos": True}).encode()
    try:
        deadline = time.monotonic() + 20
        while sent < RAPID_RESETS and goaway is None and not closed and time.monotonic() < deadline:
            for _ in range(50):  # a batch of open-and-reset in one write, as the attack does
                stream = client.conn.get_next_available_stream_id()
                client.conn.send_headers(stream, client.headers("/v1/completions"))
                client.conn.send_data(stream, body, end_stream=True)
                client.conn.reset_stream(stream, error_code=h2.errors.ErrorCodes.CANCEL)
                sent += 1
            try:
                client.flush()
                events = client.receive(0.01)
            except (ConnectionError, OSError, h2.exceptions.ProtocolError):
                closed = True
                break
            goaway = next((e for e in events if isinstance(e, h2.events.ConnectionTerminated)), None)
        # whatever was still in flight: drain until GOAWAY or close (bounded)
        deadline = time.monotonic() + 10
        while goaway is None and not closed and time.monotonic() < deadline:
            try:
                events = client.receive(0.5)
            except (ConnectionError, OSError, h2.exceptions.ProtocolError):
                closed = True
                break
            goaway = next((e for e in events if isinstance(e, h2.events.ConnectionTerminated)), None)
        answered = len(health)
        until(lambda: len(health) > answered, 10, 0.05, "a /health answer after the attack", retry_on=())
    finally:
        client.close()
        stop.set()
        prober.join(15)
    assert goaway is not None or closed, f"{sent} streams opened and reset, and the server never cut the client off"
    assert sent < RAPID_RESETS, f"cut off only after all {sent} streams"
    if goaway is not None:
        assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, goaway
    assert health and set(health) == {200}, health
    wait_nothing_running(daemon)
    assert_serving(daemon)


# --- clients that vanish ----------------------------------------------------------------------------

DISCONNECTS = 300
OPEN_AT_ONCE = 16  # connections held before the oldest random one is dropped
FD_MARGIN = 8  # the front-end's own sockets come and go (metrics files, IPC): a small slack


def http1_request(rng: random.Random, body: bytes) -> bytes:
    kind = rng.choice(["health", "full", "stream"])
    if kind == "health":
        return b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    return (
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + b"Content-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


def http2_request(rng: random.Random, body: bytes) -> bytes:
    """Every byte an h2c client sends for one request: preface, SETTINGS, HEADERS, DATA."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    headers = [(":method", "POST"), (":path", "/v1/completions"), (":scheme", "http"), (":authority", "127.0.0.1")]
    conn.send_headers(1, [*headers, ("content-type", "application/json")])
    conn.send_data(1, body, end_stream=True)
    return conn.data_to_send()


def drop(rng: random.Random, sock: socket.socket) -> None:
    """Close the way a vanishing client does: a FIN, or a RST (SO_LINGER 0), after maybe reading."""
    with contextlib.suppress(OSError):
        if rng.random() < 0.3:
            sock.settimeout(rng.choice([0.01, 0.1, 0.3]))  # some leave mid-response
            with contextlib.suppress(TimeoutError):
                sock.recv(rng.randint(1, 4096))
        if rng.random() < 0.5:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def test_300_random_disconnects_leak_nothing(daemon):
    """Clients connect, send part or all of a request (HTTP/1.1 or h2c; /health, a full or a
    streamed completion), and vanish at a random point. Afterwards the front-end holds as many
    file descriptors as before (within a small margin), runs nothing, and serves as usual."""
    assert_serving(daemon)  # warm: the front-end's lazily opened sockets and files exist already
    wait_nothing_running(daemon)
    pids = frontend_pids(daemon)
    before = open_fds(pids)
    rng = random.Random(10)  # reproducible: the same 300 clients every run
    held: list[socket.socket] = []
    started = time.monotonic()
    try:
        for n in range(DISCONNECTS):
            assert time.monotonic() - started < 60, f"only {n} clients in 60 s"  # bounded, with room for slow CI
            body = json.dumps(
                {"prompt": f"client {n}", "max_tokens": rng.choice([1, 8, 64]), "stream": rng.random() < 0.5}
            ).encode()
            request = (http2_request if rng.random() < 0.5 else http1_request)(rng, body)
            sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
            held.append(sock)
            with contextlib.suppress(OSError):
                sock.sendall(request[: rng.randint(0, len(request))] if rng.random() < 0.6 else request)
            if len(held) > OPEN_AT_ONCE:
                drop(rng, held.pop(rng.randrange(len(held))))
    finally:
        while held:
            drop(rng, held.pop())
    wait_nothing_running(daemon)
    assert frontend_pids(daemon) == pids, "a front-end worker was replaced: the count below would mean nothing"
    until(lambda: open_fds(pids) <= before + FD_MARGIN, 15, 0.05, f"front-end fds back near {before}", retry_on=())
    assert_serving(daemon)
