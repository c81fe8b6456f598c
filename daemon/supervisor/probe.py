"""The supervisor's view of the front-end from outside: plain HTTP/1.1 requests to its port."""

from __future__ import annotations

import asyncio
import contextlib
import ssl

from daemon.config.schema import ServerSettings


def probe_host(server: ServerSettings) -> str:
    """Where to reach our own listener: a wildcard address means loopback will do."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(server.host, server.host)


def base_url(server: ServerSettings) -> str:
    scheme = "https" if server.tls.certfile else "http"
    host = probe_host(server)
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{server.port}"


async def http_status(server: ServerSettings, path: str, timeout: float) -> int | None:
    """Status of GET `path` on our own front-end; None if it cannot be reached or does not answer."""
    context = None
    if server.tls.certfile:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # our own certificate, whatever name it carries
    host = probe_host(server)
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, server.port, ssl=context)
            try:
                key = server.api_key
                auth = f"Authorization: Bearer {key.get_secret_value()}\r\n" if key else ""
                writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n".encode())
                await writer.drain()
                status_line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()
    except (OSError, TimeoutError, ssl.SSLError):
        return None
    parts = status_line.split()
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None
