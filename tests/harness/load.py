"""The clients every suite uses against the real daemon: one request and how it ended (an Outcome), a set of
requests held in flight at once (Requests), and steady background traffic (Traffic).

Clients speak HTTP/1.1 or HTTP/2 (h2c with prior knowledge, or ALPN over TLS) with httpx, or HTTP/2 with
curl (nghttp2): Python's h2 library ends a connection the moment a GOAWAY arrives, so httpx fails the
streams it still has on a draining server, which the server finishes all the same (python-hyper/h2#1181);
curl reads them to their end. Every request is bounded in time: one that waits too long is recorded as
a hang, never waited on forever. No client raises: each records how its request ended.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from harness.wait import until

# How a request ended (Outcome.kind):
#   complete          a 200 with a finish_reason (a stream: that, then [DONE])
#   http-error        a 5xx status
#   unexpected        any other status, a 200 without a finish_reason, the wrong protocol, a client exception
#   sse-error         a stream that ended with an error event
#   incomplete        a stream that ended with neither [DONE] nor an error event
#   connection-error  the connection failed before the response began (refused, reset, closed)
#   cut               the connection failed after the response began
#   goaway            httpx over HTTP/2 lost the connection at a graceful GOAWAY (see GOAWAY_SIGNS)
#   hang              no answer within the read timeout, or a stream that went on past its bound
EXPLICIT_ERRORS = ("http-error", "sse-error", "connection-error", "cut")

# What Python's h2 library makes of a graceful GOAWAY: it closes the whole connection at once, so
# that httpx fails every stream still running on it (python-hyper/h2#1181), though the server
# finishes them. Told apart (kind "goaway") where a client asks for it.
GOAWAY_SIGNS = ("ConnectionTerminated", "ConnectionState.CLOSED")


@dataclass
class Outcome:
    """How one request ended, with its times: monotonic (durations) and wall-clock (to compare with the log)."""

    label: str
    stream: bool = False
    http2: bool = False  # sent by httpx over HTTP/2 (curl's requests: False)
    kind: str = "pending"
    status: int | None = None
    detail: str = ""
    chunks: int = 0
    started_at: float | None = None  # time.monotonic()
    responded_at: float | None = None  # its response headers
    first_chunk_at: float | None = None
    ended_at: float | None = None
    started_wall: float | None = None  # time.time()
    ended_wall: float | None = None

    def __str__(self) -> str:
        return f"{self.label}: {self.kind} {self.status} chunks={self.chunks} {self.detail[:200]}"

    def start(self) -> None:
        self.started_at, self.started_wall = time.monotonic(), time.time()

    def end(self) -> None:
        self.ended_at, self.ended_wall = time.monotonic(), time.time()

    @property
    def explicit_error(self) -> bool:
        """It failed, and said so: an error status or event, or its connection gone."""
        return self.kind in EXPLICIT_ERRORS

    @property
    def connection_lost(self) -> bool:
        return self.kind in ("connection-error", "cut")

    @property
    def refused(self) -> bool:
        """The connection was refused (nothing listened)."""
        return self.kind == "connection-error" and ("ConnectError" in self.detail or "curl exit 7 " in self.detail)

    def spans(self, start_wall: float, end_wall: float) -> bool:
        """Sent before `start_wall` and still running at `end_wall` (wall-clock times)."""
        assert self.started_wall is not None
        return self.started_wall < start_wall and (self.ended_wall is None or self.ended_wall > end_wall)


def request_body(*, chat: bool, stream: bool, max_tokens: int, index: int) -> dict:
    """A greedy request that generates `max_tokens` tokens (ignore_eos); `index` varies its prompt."""
    body: dict = {"max_tokens": max_tokens, "ignore_eos": True, "stream": stream, "temperature": 0}
    if chat:
        body["messages"] = [{"role": "user", "content": f"tell me story number {index}"}]
    else:
        body["prompt"] = f"Once upon a time, story {index}"
    return body


def path_of(body: dict) -> str:
    return "/v1/chat/completions" if "messages" in body else "/v1/completions"


def http_client(
    url: str,
    *,
    http2: bool,
    read_timeout: float = 30.0,
    connect_timeout: float = 10.0,
    keepalive: bool = True,
    cafile: Path | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Client:
    """An httpx client speaking one protocol. Over TLS each client gets its own SSL context: httpx sets its
    ALPN protocols on the context, so a context shared with an HTTP/2 client would make an HTTP/1.1 client
    negotiate h2 too."""
    timeout = httpx.Timeout(connect=connect_timeout, read=read_timeout, write=connect_timeout, pool=connect_timeout)
    limits = httpx.Limits() if keepalive else httpx.Limits(max_keepalive_connections=0)
    verify = ssl.create_default_context(cafile=str(cafile)) if cafile else True
    return httpx.Client(
        base_url=url, http1=not http2, http2=http2, timeout=timeout, limits=limits, verify=verify, headers=headers
    )


def read_stream(response: httpx.Response, outcome: Outcome, give_up_at: float | None) -> None:
    """Read an SSE completion stream into `outcome`: complete after [DONE] with a finish_reason, sse-error on
    an error event, incomplete when it just ends, hang when it goes on past `give_up_at` (time.monotonic())."""
    finished = None
    for line in response.iter_lines():
        if give_up_at is not None and time.monotonic() > give_up_at:
            outcome.kind, outcome.detail = "hang", "the stream went on too long"
            return
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            outcome.kind = "complete" if finished else "unexpected"
            outcome.detail = f"[DONE] after finish_reason {finished}"
            return
        event = json.loads(data)
        if "error" in event:
            outcome.kind, outcome.detail = "sse-error", json.dumps(event["error"])
            return
        outcome.chunks += 1
        if outcome.first_chunk_at is None:
            outcome.first_chunk_at = time.monotonic()
        finished = finished or (event.get("choices") or [{}])[0].get("finish_reason")
    outcome.kind, outcome.detail = "incomplete", "the stream ended with neither [DONE] nor an error event"


def send(
    client: httpx.Client, outcome: Outcome, body: dict, *, give_up_after_s: float | None = None, goaway: bool = False
) -> None:
    """Send `body` on `client` (which speaks HTTP/2 if `outcome.http2`) and read the answer to its end, recording
    how it ended in `outcome`; never raises. A stream is given up `give_up_after_s` after it was sent (a hang);
    with `goaway`, a connection lost at an HTTP/2 GOAWAY is told apart from other losses."""
    outcome.stream = bool(body.get("stream"))
    outcome.start()
    assert outcome.started_at is not None
    give_up_at = None if give_up_after_s is None else outcome.started_at + give_up_after_s
    try:
        with client.stream("POST", path_of(body), json=body) as response:
            outcome.responded_at, outcome.status = time.monotonic(), response.status_code
            spoken, meant = response.http_version, ("HTTP/2" if outcome.http2 else "HTTP/1.1")
            if spoken != meant:  # the client is not what the test says it is
                outcome.kind, outcome.detail = "unexpected", f"spoke {spoken}, not {meant}"
            elif response.status_code != 200:
                outcome.kind = "http-error" if response.status_code >= 500 else "unexpected"
                outcome.detail = response.read().decode(errors="replace")[:300]
            elif not outcome.stream:
                reason = json.loads(response.read())["choices"][0]["finish_reason"]
                outcome.kind = "complete" if reason in ("length", "stop") else "unexpected"
                outcome.detail = f"finish_reason {reason}"
            else:
                read_stream(response, outcome, give_up_at)
    except httpx.TimeoutException as exc:
        outcome.kind, outcome.detail = "hang", repr(exc)
    except Exception as exc:  # noqa: BLE001 - a test client must report, not die in its thread
        outcome.detail = repr(exc)
        if goaway and outcome.http2 and any(sign in outcome.detail for sign in GOAWAY_SIGNS):
            outcome.kind = "goaway"
        elif isinstance(exc, httpx.TransportError):
            outcome.kind = "connection-error" if outcome.responded_at is None else "cut"
        else:
            outcome.kind = "unexpected"
    finally:
        outcome.end()


class Curl:
    """One request by curl over HTTP/2 (nghttp2; h2c with prior knowledge, or ALPN h2 over TLS), which reads the
    streams of a draining connection to their end. Runs as a process from construction: `finish()` waits."""

    def __init__(
        self, url: str, directory: Path, body: dict, label: str, *, cafile: Path | None = None, max_time: int = 120
    ):
        self.outcome = Outcome(label, stream=bool(body.get("stream")))
        self.output = directory / f"curl-{label.replace('/', '-').replace('#', '-')}.out"
        command = ["curl", "-sS", "-N", "--max-time", str(max_time), "-o", str(self.output), "-w", "%{http_code}"]
        command += ["--cacert", str(cafile), "--http2"] if cafile else ["--http2-prior-knowledge"]
        command += ["-H", "content-type: application/json", "-d", json.dumps(body), url + path_of(body)]
        self.outcome.start()
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def streaming(self) -> bool:
        """Its first chunk has come."""
        return self.output.exists() and b"data: " in self.output.read_bytes()

    def ended(self) -> bool:
        return self.process.poll() is not None

    def finish(self, timeout: float) -> Outcome:
        """Wait for curl (killed after `timeout`: a hang); how the request ended."""
        outcome = self.outcome
        try:
            status, error = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
            outcome.kind = "hang"
            outcome.end()
            return outcome
        outcome.end()
        body = self.output.read_text(errors="replace") if self.output.exists() else ""
        outcome.status = int(status) if status.isdigit() and status != "000" else None
        outcome.responded_at = outcome.started_at if outcome.status else None
        outcome.detail = f"curl exit {self.process.returncode} {error.strip()} {body[-200:]}"
        outcome.chunks = body.count("data: ")
        if self.process.returncode != 0:
            outcome.kind = "connection-error" if outcome.status is None else "cut"
        elif outcome.status != 200:
            outcome.kind = "http-error" if outcome.status >= 500 else "unexpected"
        elif not outcome.stream:
            outcome.kind = "complete" if json.loads(body)["choices"][0]["finish_reason"] else "unexpected"
        elif 'data: {"error"' in body:
            outcome.kind = "sse-error"
        else:
            outcome.kind = "complete" if body.rstrip().endswith("data: [DONE]") else "incomplete"
        return outcome


@dataclass(frozen=True)
class Client:
    """How one client sends: httpx over HTTP/1.1 (h1) or HTTP/2 (h2), or curl over HTTP/2; streaming or not
    and chat or not (None: by turns); keeping its connection or not (curl never does)."""

    protocol: str  # h1 | h2 | curl
    stream: bool | None = None
    chat: bool | None = False
    keepalive: bool = True

    def name(self, chat: bool, stream: bool) -> str:
        reuse = "fresh" if self.protocol == "curl" or not self.keepalive else "ka"
        return f"{self.protocol}/{'stream' if stream else 'full'}/{'chat' if chat else 'text'}/{reuse}"

    def shape(self, client: int, number: int) -> tuple[bool, bool]:
        """(chat, stream) of request `number` of client `client`: by turns where not fixed."""
        stream = (number + client) % 2 == 0 if self.stream is None else self.stream
        turn = number // 2 if self.stream is None else number
        chat = (turn + client) % 2 == 1 if self.chat is None else self.chat
        return chat, stream


KEEPALIVE = [Client(protocol, stream, None) for protocol in ("h1", "h2") for stream in (True, False)]
CURL = [Client("curl", stream, None) for stream in (True, False)]
FRESH = [Client(protocol, stream, None, keepalive=False) for protocol in ("h1", "h2") for stream in (True, False)]
FRESH += CURL


@dataclass
class Options:
    """What every request of a load shares."""

    max_tokens: int = 16  # where the load makes the requests' bodies
    read_timeout: float = 30.0
    connect_timeout: float = 10.0
    give_up_after_s: float | None = None  # a stream going on this long after it was sent is a hang
    directory: Path | None = None  # where curl writes its answers
    cafile: Path | None = None  # TLS: the authority to trust
    headers: dict[str, str] | None = None
    curl_max_time: int = 120  # curl gives up (exits 28) after this long

    def client(self, url: str, spec: Client) -> httpx.Client:
        return http_client(
            url,
            http2=spec.protocol == "h2",
            read_timeout=self.read_timeout,
            connect_timeout=self.connect_timeout,
            keepalive=spec.keepalive,
            cafile=self.cafile,
            headers=self.headers,
        )

    def curl(self, url: str, body: dict, label: str) -> Curl:
        assert self.directory is not None, "curl writes its answer into a directory"
        return Curl(url, self.directory, body, label, cafile=self.cafile, max_time=self.curl_max_time)


def request(
    url: str, body: dict, *, http2: bool = False, label: str = "request", options: Options | None = None
) -> Outcome:
    """One request on a connection of its own (bounded as `options` say), to its end: how it ended."""
    options = options or Options()
    outcome = Outcome(label, http2=http2)
    with options.client(url, Client("h2" if http2 else "h1")) as client:
        send(client, outcome, body, give_up_after_s=options.give_up_after_s)
    return outcome


def report(outcomes: list[Outcome], log_tail: str = "") -> str:
    """How many requests ended each way, and the first 30 that did not complete."""
    kinds: dict[str, int] = {}
    for outcome in outcomes:
        kinds[outcome.kind] = kinds.get(outcome.kind, 0) + 1
    failed = [str(o) for o in outcomes if o.kind != "complete"]
    text = f"{len(outcomes)} requests: {kinds}\n" + "\n".join(failed[:30])
    return text + (f"\n--- log:\n{log_tail}" if log_tail else "")


class Requests:
    """A fixed set of requests sent at once, one per `clients` entry, each on a connection and thread of its own
    (curl's in a process of its own), in the order given; their outcomes in `outcomes`, in that order."""

    def __init__(self, url: str, clients: list[Client], options: Options, *, first_index: int = 0):
        self.outcomes: list[Outcome] = []
        self.threads: list[threading.Thread] = []
        self.curls: list[Curl] = []
        for number, spec in enumerate(clients):
            chat, stream = spec.shape(number, 0)
            index = first_index + number
            body = request_body(chat=chat, stream=stream, max_tokens=options.max_tokens, index=index)
            label = f"{spec.name(chat, stream)}#{index}"
            if spec.protocol == "curl":
                curl = options.curl(url, body, label)
                self.curls.append(curl)
                self.outcomes.append(curl.outcome)
                continue
            outcome = Outcome(label, stream=stream, http2=spec.protocol == "h2")
            thread = threading.Thread(target=self._send, args=(options.client(url, spec), outcome, body, options))
            thread.daemon = True
            thread.start()
            self.outcomes.append(outcome)
            self.threads.append(thread)

    @staticmethod
    def _send(client: httpx.Client, outcome: Outcome, body: dict, options: Options) -> None:
        with client:
            send(client, outcome, body, give_up_after_s=options.give_up_after_s)

    @property
    def streams(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.stream]

    def wait_streaming(self, timeout: float = 30.0) -> None:
        """Until every stream has had a first chunk (those sent before them are running by then); none may
        have ended: they are in flight."""

        def streaming(outcome: Outcome) -> bool:
            curl = next((c for c in self.curls if c.outcome is outcome), None)
            if curl is not None:
                return curl.streaming() or curl.ended()
            return outcome.first_chunk_at is not None or outcome.ended_at is not None

        try:
            until(lambda: all(streaming(o) for o in self.streams), timeout, interval=0.02, what="first chunks")
            self.assert_none_ended()
        except BaseException:
            self.kill_curls()
            raise

    def assert_none_ended(self) -> None:
        early = [o for o in self.outcomes if o.ended_at is not None]
        early += [c.outcome for c in self.curls if c.ended()]
        assert not early, f"requests ended while they should be in flight: {[str(o) for o in early]}"

    def kill_curls(self) -> None:
        for curl in self.curls:
            curl.process.kill()
            curl.process.communicate()

    def join(self, timeout: float) -> list[Outcome]:
        """Wait for every request to end (curls that hang are killed): their outcomes; none may still run."""
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for curl in self.curls:
            curl.finish(max(1.0, deadline - time.monotonic()))
        stuck = [str(o) for o in self.outcomes if o.ended_at is None]
        assert not stuck, f"requests still running {timeout} s later (hung): {stuck}"
        return self.outcomes

    def report(self) -> str:
        return "\n".join(f"  {o.label}: {o.kind} {o.status} {o.detail[:160]}" for o in self.outcomes)


class Traffic:
    """Background clients, one thread each, sending requests one after another until stopped; bounded in count
    (`requests` per client) and in time (`time_limit_s`). A client waits `pause_s` after each request, and
    `failure_pause_s` after a failed one (no busy loop while the daemon refuses). Outcomes in `outcomes`."""

    def __init__(
        self,
        url: str,
        clients: list[Client],
        options: Options,
        *,
        requests: int = 400,
        time_limit_s: float = 150.0,
        pause_s: float = 0.0,
        failure_pause_s: float = 0.05,
    ):
        self.url, self.options = url, options
        self.requests, self.time_limit_s = requests, time_limit_s
        self.pause_s, self.failure_pause_s = pause_s, failure_pause_s
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(c, n), daemon=True) for n, c in enumerate(clients)]
        for thread in self.threads:
            thread.start()

    def _run(self, spec: Client, client_number: int) -> None:
        deadline = time.monotonic() + self.time_limit_s
        with contextlib.ExitStack() as stack:
            client = None if spec.protocol == "curl" else stack.enter_context(self.options.client(self.url, spec))
            for number in range(self.requests):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                chat, stream = spec.shape(client_number, number)
                body = request_body(chat=chat, stream=stream, max_tokens=self.options.max_tokens, index=number)
                label = f"{spec.name(chat, stream)}#{client_number}.{number}"
                if client is None:
                    curl = self.options.curl(self.url, body, label)
                    self._record(curl.outcome)
                    outcome = curl.finish(self.options.read_timeout + 30)
                else:
                    outcome = Outcome(label, stream=stream, http2=spec.protocol == "h2")
                    self._record(outcome)
                    send(client, outcome, body, give_up_after_s=self.options.give_up_after_s, goaway=True)
                # the clients' pace, not a wait for the server
                time.sleep(self.pause_s if outcome.kind == "complete" else max(self.pause_s, self.failure_pause_s))

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def completed(self) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if o.kind == "complete"]

    def failures(self) -> list[Outcome]:
        """Those that ended otherwise than complete (and those still running, once stopped)."""
        with self._lock:
            return [o for o in self.outcomes if o.kind != "complete"]

    def completed_between(self, start: float, end: float) -> list[Outcome]:
        """Those that completed between `start` and `end` (time.monotonic())."""
        return [o for o in self.completed() if start <= o.ended_at <= end]

    def wait_completed(self, count: int, timeout: float = 60.0) -> None:
        """Until `count` requests have completed in all."""
        until(
            lambda: len(self.completed()) >= count,
            timeout,
            interval=0.05,
            what=f"{count} requests of the load completed",
            detail=self.report,
        )

    def more(self, count: int = 8, timeout: float = 60.0) -> None:
        """Until `count` more have completed: the daemon serves them."""
        self.wait_completed(len(self.completed()) + count, timeout)

    def stop(self, timeout: float) -> list[Outcome]:
        """Stop the clients and wait for their last requests (none may still run after `timeout`): every outcome."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self.threads if t.is_alive()]
        assert not stuck, f"clients still running {timeout} s after being stopped: {stuck}\n{self.report()}"
        return list(self.outcomes)

    def report(self) -> str:
        with self._lock:
            return report(list(self.outcomes))
