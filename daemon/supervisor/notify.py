"""systemd's notification protocol (sd_notify): one datagram per message to $NOTIFY_SOCKET.

A no-op when the variable is unset (not started by systemd with Type=notify or
notify-reload). A leading "@" names a socket in the abstract namespace.
"""

from __future__ import annotations

import os
import socket
import time

NOTIFY_SOCKET_VAR = "NOTIFY_SOCKET"


def notify(*fields: str) -> None:
    address = os.environ.get(NOTIFY_SOCKET_VAR)
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError:
        pass  # systemd went away, or the socket is not ours: nothing to tell


def ready(status: str) -> None:
    notify("READY=1", f"STATUS={status}")


def reloading(status: str) -> None:
    # MONOTONIC_USEC lets systemd tell this reload from an earlier one; without it
    # `systemctl reload` may wait for its timeout.
    notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}", f"STATUS={status}")


def stopping(status: str) -> None:
    notify("STOPPING=1", f"STATUS={status}")


def status(text: str) -> None:
    notify(f"STATUS={text}")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings systemd expects of this process (half its WatchdogSec=),
    or None when it expects none."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None


def watchdog() -> None:
    notify("WATCHDOG=1")
