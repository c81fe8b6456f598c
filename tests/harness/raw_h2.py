"""A bare HTTP/2 client for tests: the h2 library on a socket, h2c with prior knowledge.

It sends what well-behaved clients never do (RST_STREAM right after HEADERS, streams
beyond the server's limit), which httpx cannot.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable

import h2.config
import h2.connection
import h2.errors
import h2.events


class RawH2:
    def __init__(self, port: int, timeout: float = 10):
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        if data := self.conn.data_to_send():
            self.sock.sendall(data)

    def headers(self, path: str, method: str = "POST") -> list[tuple[str, str]]:
        return [
            (":method", method),
            (":path", path),
            (":scheme", "http"),
            (":authority", f"127.0.0.1:{self.port}"),
            ("content-type", "application/json"),
        ]

    def request(self, method: str, path: str, body: bytes = b"") -> int:
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, self.headers(path, method), end_stream=not body)
        if body:
            self.conn.send_data(stream_id, body, end_stream=True)
        self.flush()
        return stream_id

    def read(self, stream_id: int, until: Callable[[bytes, bool], bool], timeout: float = 10) -> tuple[int, bytes]:
        """Read frames until `until(body so far, ended)`; the status and the body of `stream_id`."""
        status, body, ended = 0, b"", False
        deadline = time.monotonic() + timeout
        while not until(body, ended):
            if time.monotonic() > deadline:
                raise AssertionError(f"stream {stream_id}: nothing conclusive within {timeout} s: {body[-200:]!r}")
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError("the server closed the HTTP/2 connection")
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    if event.stream_id == stream_id:
                        body += event.data
                elif isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset) and event.stream_id == stream_id:
                    ended = True
                elif isinstance(event, h2.events.ConnectionTerminated):
                    raise AssertionError(f"the server ended the HTTP/2 connection: {event}")
            self.flush()
        return status, body

    def reset(self, stream_id: int) -> None:
        self.conn.reset_stream(stream_id, error_code=h2.errors.ErrorCodes.CANCEL)
        self.flush()

    def receive(self, timeout: float) -> list[h2.events.Event]:
        """The events of what arrives within `timeout` seconds (nothing: an empty list)."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return []
        if not data:
            raise ConnectionError("the server closed the connection")
        events = self.conn.receive_data(data)
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        with contextlib.suppress(OSError):
            self.flush()
        return events

    def close(self) -> None:
        self.sock.close()
