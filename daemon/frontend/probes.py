"""What probes and dashboards read: /health_generate's real token, and /server_info.

Both stay open without the API key, as orchestrators need them; so neither may cost
much or say much. A readiness probe costs at most one token a second per front-end
worker, however many probe it at once (concurrent probes share the one in flight,
and a success is reused for HEALTH_GENERATE_REUSE_S). /server_info without the key
(when one is set) tells versions, generations and tier states, but no path, PID or
configuration.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import msgspec

from daemon import __version__
from daemon.config.schema import config_hash, flat_values, nested_values
from daemon.frontend.gateway import Gateway
from daemon.ipc.messages import DaemonStatus, ErrorInfo, GenerateRequest, ReplicaStats, Sampling
from daemon.tier import Tier

HEALTH_GENERATE_TIMEOUT_S = 20.0
HEALTH_GENERATE_REUSE_S = 1.0  # a probe answered this recently is answered again without a token


class GenerationProbe:
    """One real token through every tier, shared by the probes that ask at once."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        self._in_flight: asyncio.Future[dict[str, Any] | ErrorInfo] | None = None
        self._passed: tuple[float, dict[str, Any]] | None = None  # when, and what it answered

    async def check(self) -> dict[str, Any] | ErrorInfo:
        if self._passed is not None and time.monotonic() - self._passed[0] < HEALTH_GENERATE_REUSE_S:
            return self._passed[1]
        if self._in_flight is None:
            self._in_flight = asyncio.ensure_future(self._generate())
            self._in_flight.add_done_callback(self._landed)
        # shielded: a probe whose client leaves must not cancel the token the others wait for
        return await asyncio.shield(self._in_flight)

    def _landed(self, done: asyncio.Future) -> None:
        self._in_flight = None
        if not done.cancelled() and isinstance(result := done.result(), dict):
            self._passed = (time.monotonic(), result)

    async def _generate(self) -> dict[str, Any] | ErrorInfo:
        probe = GenerateRequest(
            f"health-{uuid.uuid4().hex}",
            self.gateway.address,
            Sampling(max_tokens=1, temperature=0.0, ignore_eos=True),
            prompt="health",
        )
        last = None
        try:
            async with asyncio.timeout(HEALTH_GENERATE_TIMEOUT_S):
                async for output in self.gateway.generate(probe):
                    last = output
        except TimeoutError:
            return ErrorInfo(503, "no token within the health check's time", type="server_error")
        if last is None or last.error is not None:
            message = last.error.message if last and last.error else "the engine is not ready"
            return ErrorInfo(503, message, type="server_error")
        return {"status": "ok", "completion_tokens": last.completion_tokens}


def server_info(
    tier: Tier,
    status: DaemonStatus | None,
    model: dict[str, Any] | None,
    *,
    full: bool,
    replicas: list[ReplicaStats] | None = None,
) -> dict:
    """The daemon's state; `full` adds what only the key holder may see (PIDs, paths, the config).
    `replicas`: the scheduler's figures of each model replica (without the key, only their states)."""
    settings = tier.settings
    last_reload = msgspec.to_builtins(status.last_reload) if status and status.last_reload else None
    tiers = msgspec.to_builtins(status.tiers) if status else []
    info: dict[str, Any] = {
        "version": __version__,
        "config": {"generation": tier.generation, "hash": config_hash(settings)},
    }
    figures = msgspec.to_builtins(replicas or [])
    if not full:  # states and restarts, not where anything is
        info["config"]["last_reload"] = (
            {"result": last_reload["result"], "at": last_reload["at"]} if last_reload else None
        )
        info["tiers"] = [{k: t[k] for k in ("tier", "index", "epoch", "state", "since", "restarts")} for t in tiers]
        info["replicas"] = [{k: r[k] for k in ("replica", "state")} for r in figures]
        info["detail"] = "PIDs, paths and the effective config need the API key (Authorization: Bearer)"
        return info
    info["config"]["last_reload"] = last_reload
    info["supervisor"] = {"pid": status.supervisor_pid, "started": status.started} if status else {}
    info["tiers"] = tiers
    info["replicas"] = figures
    info["model"] = model
    info["effective_config"] = nested_values(flat_values(settings))
    return info
