"""A bare hello-world ASGI app under Granian, with the settings the daemon's front-end uses.

The baseline for the /health comparison in bench/serve.py: it answers every request
with the same small JSON body as the daemon's /health, and nothing else runs in it.

    python bench/hello_app.py --host 127.0.0.1 --port 9000

Granian runs with the arguments the daemon's front-end derives from
configs/server.toml (daemon.frontend.server.granian_options), on the given host and port.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

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


def granian_options(host: str, port: int) -> dict:
    """The daemon front-end's Granian arguments for configs/server.toml, on `host`:`port`."""
    from daemon.config import load_config
    from daemon.frontend.server import granian_options as daemon_options

    config_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "server.toml")
    config = load_config(Path(config_file), environ={}, sets=[f"server.host={host}", f"server.port={port}"])
    return daemon_options(config.settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()

    from granian import Granian

    # Granian's workers import the app by name: make this directory importable for them.
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, here)
    Granian("hello_app:app", **granian_options(args.host, args.port)).serve()


if __name__ == "__main__":
    main()
