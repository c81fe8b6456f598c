"""A bare hello-world ASGI app under Granian, with the settings the daemon's front-end uses.

The baseline for the /health comparison in bench/serve.py: it answers every request
with the same small JSON body as the daemon's /health, and nothing else runs in it.

    python bench/hello_app.py --host 127.0.0.1 --port 9000

The Granian arguments mirror daemon/frontend/server.py for the default configuration
(configs/server.toml: HTTP/1.1 + HTTP/2, one worker, uvloop, backlog 1024, 200
HTTP/2 streams, no TLS, no access log).
"""

from __future__ import annotations

import argparse
import os
import sys

BODY = b'{"status":"ok"}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    elif scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": BODY})


# The keyword arguments bench/serve.py prints, so the report shows exactly what ran.
def granian_settings(host: str, port: int) -> dict:
    return {
        "address": host,
        "port": port,
        "interface": "asgi",
        "http": "auto",
        "workers": 1,
        "loop": "uvloop",
        "backlog": 1024,
        "http2_max_concurrent_streams": 200,
        "workers_kill_timeout": 30,
        "respawn_failed_workers": True,
        "log_level": "info",
        "log_access": False,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()

    from granian import Granian
    from granian.constants import HTTPModes, Interfaces, Loops
    from granian.http import HTTP2Settings

    # Granian's workers import the app by name: make this directory importable for them.
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, here)
    s = granian_settings(args.host, args.port)
    Granian(
        "hello_app:app",
        address=s["address"],
        port=s["port"],
        interface=Interfaces.ASGI,
        http=HTTPModes.auto,
        workers=s["workers"],
        loop=Loops.uvloop,
        backlog=s["backlog"],
        http2_settings=HTTP2Settings(max_concurrent_streams=s["http2_max_concurrent_streams"]),
        workers_kill_timeout=s["workers_kill_timeout"],
        respawn_failed_workers=s["respawn_failed_workers"],
        log_level=s["log_level"],
        log_access=s["log_access"],
    ).serve()


if __name__ == "__main__":
    main()
