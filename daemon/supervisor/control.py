"""The supervisor's control socket: what the tiers and `daemon reload` tell it, and the
events socket on which it tells every tier what became of the others."""

from __future__ import annotations

import contextlib

import msgspec
import structlog
import zmq
import zmq.asyncio

from daemon.ipc.messages import (
    ConfigApplied,
    EngineIdle,
    EngineJoined,
    FrontendWorkerReady,
    Heartbeat,
    ReloadCommand,
    ReloadReport,
    TierReady,
    ToSupervisor,
    encode,
)
from daemon.ipc.sockets import Receiver
from daemon.supervisor.arbiter import Control, ReloadAsked

log = structlog.get_logger("daemon.supervisor")


class ControlChannel:
    """Part of the Supervisor (a mixin): reading the control socket, broadcasting events."""

    async def _read_control(self) -> None:
        """Put every message on the supervisor's queue; its loop acts on them (`_on_control`)."""
        receiver = Receiver(self.control, ToSupervisor)
        while True:
            identity, frame = await self.control.recv_multipart()
            message = receiver.decode(frame)
            if message is not None:
                self.inbox.put_nowait(Control(identity, message))

    def _on_control(self, identity: bytes, message: ToSupervisor) -> None:
        match message:
            case TierReady():
                for child in self.children:
                    if (child.tier, child.index, child.pid) == (message.tier, message.index, message.pid):
                        child.model = message.model
                        self._mark_ready(child)
            case FrontendWorkerReady(pid=pid, main_pid=main_pid):
                for child in self.children:
                    if child.tier == "frontend" and child.pid == main_pid:
                        child.serving_workers.add(pid)
                        if len(child.serving_workers) >= child.expected_workers:
                            self._mark_ready(child)
            case ConfigApplied(pid=pid, generation=generation):
                self._applied.setdefault(generation, set()).add(pid)
                self._acknowledged.set()
            case Heartbeat(pid=pid):
                self.heartbeats.heard(pid)
            case EngineIdle(epoch=epoch, replica=replica):
                self.idle.heard((replica, epoch))
            case EngineJoined(epoch=epoch, replica=replica):
                self.joined.heard((replica, epoch))
            case ReloadCommand():
                self.inbox.put_nowait(ReloadAsked("command", reply_to=identity))

    async def reply(self, identity: bytes, report: ReloadReport) -> None:
        """Answer a `daemon reload` client on the control socket."""
        with contextlib.suppress(zmq.ZMQError):
            await self.control.send_multipart([identity, encode(report)], zmq.NOBLOCK)

    def _broadcast(self, message: msgspec.Struct) -> None:
        with contextlib.suppress(zmq.Again):
            self.events.send(encode(message), zmq.NOBLOCK)
