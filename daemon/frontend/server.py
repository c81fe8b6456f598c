"""The front-end tier process: runs Granian, which serves the ASGI app from its own worker processes.

This process imports neither torch nor the app: Granian's workers import the
app themselves (daemon.frontend.app:app) and bootstrap as tier processes from
the ASGI lifespan.

Granian does not bind: the supervisor owns the listening socket and passes it
down (LISTEN_FD_VAR), so that a new front-end can take over from an old one on
the same socket without a connection being refused or reset. Granian has no
option for an inherited socket; `InheritedSocketGranian` overrides the one
private method that makes its listener (pinned: granian 2.8.x, guarded by a test).
"""

from __future__ import annotations

import math
import os
import resource
import socket
from typing import Any

from granian import Granian
from granian._granian import SocketHolder
from granian.constants import HTTPModes, Interfaces, Loops
from granian.http import HTTP1Settings, HTTP2Settings

from daemon.config.schema import DaemonSettings
from daemon.ipc.endpoints import LISTEN_FD_VAR
from daemon.tier import SPAWNER_VAR, Tier

APP = "daemon.frontend.app:app"
# Granian's loggers pass their records to the root logger, which the tier's logging setup owns.
GRANIAN_LOGGING = {
    "loggers": {
        "_granian": {"handlers": [], "propagate": True},
        # Granian's Rust side logs through pyo3-log under its module path. Its ASGI I/O logs one
        # INFO "ASGI transport error" per send() after the client went away (tens of thousands
        # for a few stalled streams that then leave); the app notices the client has gone and logs
        # one frontend.client_gone line itself. Only a level on this very logger stops them: a
        # filter on "_granian" never sees records propagated from its children.
        "_granian.asgi.io": {"handlers": [], "propagate": True, "level": "WARNING"},
        "granian.access": {"handlers": [], "propagate": True},
    }
}


def granian_options(settings: DaemonSettings) -> dict[str, Any]:
    """Granian's arguments for these settings (all but the app), in one place: the bench's bare
    Granian baseline runs with exactly these too."""
    server, tls = settings.server, settings.server.tls
    return {
        "address": server.host,
        "port": server.port,
        "interface": Interfaces.ASGI,
        "http": HTTPModes.auto if server.enable_http2 else HTTPModes.http1,
        "workers": server.workers,
        "loop": Loops.uvloop,
        "backlog": server.backlog,
        # Granian's default (backlog / workers) lets ~1,000 silent connections lock everyone out.
        "backpressure": server.max_connections,
        # In HTTP/1.1 the header timeout is also the keep-alive idle timeout (hyper has no other).
        "http1_settings": HTTP1Settings(header_read_timeout=round(server.header_read_timeout_s * 1000)),
        "http2_settings": HTTP2Settings(
            max_concurrent_streams=server.http2_max_concurrent_streams,
            keep_alive_interval=(
                None if server.http2_keepalive_interval_s is None else round(server.http2_keepalive_interval_s * 1000)
            ),
            keep_alive_timeout=math.ceil(server.http2_keepalive_timeout_s),
        ),
        "ssl_cert": tls.certfile,
        "ssl_key": tls.keyfile,
        "ssl_key_password": tls.keyfile_password.get_secret_value() if tls.keyfile_password else None,
        "ssl_ca": tls.ca_certs,
        "ssl_client_verify": tls.verify_client,
        "ssl_protocol_min": f"tls{tls.min_version}",
        # Granian's default is to wait forever for connections to finish: bound it by the drain time.
        "workers_kill_timeout": max(1, math.ceil(settings.runtime.drain_timeout_s)),
        "respawn_failed_workers": True,
        "log_level": settings.logging.level,
        "log_dictconfig": GRANIAN_LOGGING,
        "log_access": settings.logging.access_log,
    }


class InheritedSocketGranian(Granian):
    """Granian serving from a listening socket it inherited instead of binding its own."""

    def __init__(self, *args: Any, listen_fd: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.listen_fd = listen_fd

    def _init_shared_socket(self) -> None:
        # What Granian does on platforms where its workers share one socket, with ours.
        self._ssp = None
        self._shd = SocketHolder(self.listen_fd, False, self.backlog)
        self._sfd = self.listen_fd
        shared = socket.socket(fileno=os.dup(self.listen_fd))
        shared.set_inheritable(True)
        self._sso = shared


def raise_open_file_limit(settings: DaemonSettings) -> None:
    """Let the workers hold max_connections sockets each, within the hard limit: the usual soft
    limit (1,024) would make accept() fail long before Granian's own bound."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # each worker also holds its ZeroMQ sockets, logs and libraries: a margin for those
    wanted = settings.server.max_connections + 1024
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def main(tier: Tier) -> None:
    # One for every front-end process of the daemon's life (files are per process, so two
    # instances side by side in a handover do not mix): a restart does not reset the counters.
    # The supervisor removes it with the socket directory when the daemon stops.
    metrics_dir = tier.endpoints.metrics
    metrics_dir.mkdir(mode=0o700, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)  # the workers inherit it
    os.environ[SPAWNER_VAR] = str(os.getpid())  # Granian's workers die with this process
    options = granian_options(tier.settings)
    raise_open_file_limit(tier.settings)  # the workers inherit it
    if listen_fd := os.environ.get(LISTEN_FD_VAR):
        InheritedSocketGranian(APP, listen_fd=int(listen_fd), **options).serve()
    else:  # started by hand, outside a supervisor's tree
        Granian(APP, **options).serve()
