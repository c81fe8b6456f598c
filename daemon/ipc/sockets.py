"""ZeroMQ sockets carrying typed messages.

All sockets use linger 0 (a process that exits never blocks on unsent
messages) and, for outgoing pipes, `immediate` (messages queue only to peers
that are connected, so nothing is kept for a peer that died and handed to its
successor). Sends that cannot complete at once raise `PeerGone`: a tier never
blocks on a slow or absent peer.
"""

from __future__ import annotations

from typing import Any

import msgspec
import zmq
import zmq.asyncio

from daemon.ipc.messages import decoder, encode


class PeerGone(Exception):
    """The message could not be queued: the peer is not connected (or not keeping up)."""


RECONNECT_MS = 20


def configure(socket: zmq.Socket, kind: int) -> zmq.Socket:
    socket.setsockopt(zmq.LINGER, 0)
    if kind in (zmq.PUSH, zmq.DEALER):
        socket.setsockopt(zmq.IMMEDIATE, 1)
        # A restarted peer binds again within milliseconds: find it as soon (default 100 ms).
        socket.setsockopt(zmq.RECONNECT_IVL, RECONNECT_MS)
    if kind == zmq.SUB:
        socket.setsockopt(zmq.SUBSCRIBE, b"")
    return socket


def open_socket(context: zmq.Context, kind: int, *, bind: str | None = None, connect: str | None = None) -> zmq.Socket:
    socket = configure(context.socket(kind), kind)
    if bind:
        socket.bind(bind)
    if connect:
        socket.connect(connect)
    return socket


CONNECT_GRACE_MS = 50  # a fresh connection completes asynchronously; give it this long
# ... but a tier's "ready" to the supervisor, sent once on a fresh connection, must not be lost to a
# busy machine (the supervisor would wait for it until the tier's start timed out): this long
READY_GRACE_MS = 5000


def send(socket: zmq.Socket, message: msgspec.Struct, grace_ms: int = CONNECT_GRACE_MS) -> None:
    """Queue `message` for the peer, waiting at most `grace_ms` for a connection to complete."""
    frame = encode(message)
    try:
        socket.send(frame, zmq.NOBLOCK)
        return
    except zmq.Again:
        pass
    if not socket.poll(grace_ms, zmq.POLLOUT):
        raise PeerGone
    try:
        socket.send(frame, zmq.NOBLOCK)
    except zmq.Again:
        raise PeerGone from None


async def send_async(socket: zmq.asyncio.Socket, message: msgspec.Struct, grace_ms: int = CONNECT_GRACE_MS) -> None:
    """As `send`, from an event loop: the wait for a connection never blocks the loop."""
    frame = encode(message)
    for attempt in range(2):
        try:
            await socket.send(frame, zmq.NOBLOCK)
            return
        except zmq.Again:
            if attempt == 1 or not await socket.poll(grace_ms, zmq.POLLOUT):
                raise PeerGone from None


class Receiver:
    """Decodes one channel's messages; a malformed message is dropped and counted, never fatal."""

    def __init__(self, socket: zmq.Socket, channel: Any):
        self.socket = socket
        self._decoder = decoder(channel)
        self.malformed = 0

    def decode(self, frame: bytes) -> msgspec.Struct | None:
        try:
            return self._decoder.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.malformed += 1
            return None

    def recv(self, timeout_ms: int | None = None) -> msgspec.Struct | None:
        """The next message, or None on timeout or a malformed frame."""
        if timeout_ms is not None and not self.socket.poll(timeout_ms):
            return None
        return self.decode(self.socket.recv())

    def recv_ready(self) -> list[msgspec.Struct]:
        """Every message already waiting, without blocking."""
        messages = []
        while True:
            try:
                frame = self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return messages
            if (message := self.decode(frame)) is not None:
                messages.append(message)
