"""A stand-in for systemd's notification socket (NOTIFY_SOCKET): it records every datagram, its sender and
when it came, and waits for them."""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from harness.wait import until

KINDS = ("READY", "RELOADING", "STOPPING", "WATCHDOG")
CREDENTIALS = struct.calcsize("iII")  # struct ucred: pid, uid, gid


@dataclass
class Notification:
    received_usec: int  # CLOCK_MONOTONIC when it arrived, as MONOTONIC_USEC counts
    received_wall: float  # time.time() when it arrived, to compare with the daemon's log timestamps
    pid: int  # the sender, from SCM_CREDENTIALS
    fields: dict[str, str]

    @property
    def kind(self) -> str:
        """READY, RELOADING, STOPPING or WATCHDOG (its field set to 1), else STATUS."""
        for kind in KINDS:
            if self.fields.get(kind) == "1":
                return kind
        return "STATUS"


class NotifySocket:
    """The datagram socket NOTIFY_SOCKET names: records every notification in `messages`, as it comes."""

    def __init__(self, path: Path):
        self.path = path
        self.messages: list[Notification] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data, ancillary, _flags, _address = self.sock.recvmsg(65536, socket.CMSG_SPACE(CREDENTIALS))
            except TimeoutError:
                continue
            except OSError:
                return
            received_usec, received_wall = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000, time.time()
            pid = -1
            for level, kind, payload in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                    pid = struct.unpack("iII", payload[:CREDENTIALS])[0]
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(Notification(received_usec, received_wall, pid, fields))

    def kinds(self) -> list[str]:
        return [m.kind for m in self.messages]

    def received(self, kind: str | None = None, after_usec: int = 0) -> list[Notification]:
        """The notifications so far (of `kind`, received after `after_usec`)."""
        return [m for m in self.messages if (kind is None or m.kind == kind) and m.received_usec > after_usec]

    def wait(self, count: int = 1, *, kind: str | None = None, after_usec: int = 0, timeout: float = 60.0) -> None:
        """Until `count` notifications (of `kind`, received after `after_usec`) have come."""
        what = f"{count} {kind or ''} notifications".replace("  ", " ")
        until(lambda: len(self.received(kind, after_usec)) >= count, timeout, interval=0.05, what=what)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
