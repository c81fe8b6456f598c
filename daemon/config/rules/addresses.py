"""Host names, IP addresses and host:port strings, as the rules read them."""

from __future__ import annotations

import ipaddress
import re

_HOSTNAME = re.compile(r"^(?=.{1,253}$)(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?$")


def is_ip_or_hostname(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return bool(_HOSTNAME.match(host))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_host_port(addr: str) -> tuple[str, int] | None:
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]\s]+):(\d{1,5})", addr)
    if not match:
        return None
    host, port = (match[1], match[2]) if match[1] else (match[3], match[4])
    return (host, int(port)) if 1 <= int(port) <= 65535 and is_ip_or_hostname(host) else None
