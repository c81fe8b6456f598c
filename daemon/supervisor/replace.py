"""How a reload replaces each tier, and pushes live settings: the mechanics under the
transaction in reload.py (which decides what to replace, in which order, and how to
roll back). Each tier has a start (prepare: beside the serving one), a switch (commit)
and a retirement of the old one, and a composite `replace_*` for a rollback.

- worker: the model's replicas, in replicas.py (rolling, drain or blue-green);
- tokenizer: a new pool starts on standby; at the switch new requests go to it and
  the old one drains;
- front-end: a new Granian instance accepts on the same (or a newly bound) listening
  socket from its start; at the switch the old one drains its requests and streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time

import structlog
import zmq
import zmq.asyncio

from daemon.config.schema import ServerSettings
from daemon.ipc.messages import ConfigUpdate, FrontendRetiring, encode
from daemon.supervisor.process import STOP_GRACE_S, Child, StartupFailed, TierStartFailed, address, kill, listen
from daemon.tier import STOP_SIGNAL

log = structlog.get_logger("daemon.supervisor")

HANDOVER_CLOSE_S = 1.0  # answers with Connection: close from the old front-end before it stops


class TierReplacement:
    """Part of the Supervisor (a mixin): replacing tiers during a reload."""

    async def push_live(self, generation: int, frontend_workers: int, timeout: float) -> list[str]:
        """Tell every tier to adopt `generation`; the tiers that did not acknowledge in time.

        A tier that acknowledged now belongs to `generation`: if it dies later, it restarts with it."""
        await self.owned(self._push, generation)
        # A tier started with `generation` (a reload's new tier, or one restarted since) runs it
        # already, and may still be loading, deaf to the push.
        expected = {c.name: c for c in self.children if c.tier != "frontend" and c.generation != generation}
        deadline = time.monotonic() + timeout
        while True:
            acked = self._applied.get(generation, set())
            missing = [name for name, c in expected.items() if c.pid not in acked]
            frontends = len(acked - {c.pid for c in self.children})
            if frontends < frontend_workers and self._child("frontend").generation != generation:
                missing.append(f"{frontend_workers - frontends} front-end worker(s)")
            if not missing or time.monotonic() > deadline:
                await self.owned(self._belong_to, generation, acked)
                return missing
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self._acknowledged.wait()
            self._acknowledged.clear()

    def _push(self, generation: int) -> None:
        self._acknowledged.clear()
        self._applied.pop(generation, None)  # acknowledgements of an earlier push of that number
        with contextlib.suppress(zmq.Again):
            self.events.send(encode(ConfigUpdate(generation)), zmq.NOBLOCK)

    def _belong_to(self, generation: int, acknowledged: set[int]) -> None:
        """The tiers whose processes all acknowledged `generation` now run it: if one dies, it
        restarts with it."""
        for child in self.children:
            served_by = child.serving_workers if child.tier == "frontend" else {child.pid}
            if served_by and served_by <= acknowledged:
                child.generation = generation

    def belong_to_all(self, generation: int) -> None:
        """Every tier runs `generation` from now on: restarted, it starts with it."""
        for child in self.children:
            child.generation = generation

    def _forget(self, child: Child) -> None:
        """`child` is gone for good (a reload replaced it)."""
        self.children.remove(child)
        self.write_status()

    @staticmethod
    def _retire_one(child: Child) -> None:
        child.retiring = True

    async def replace_tokenizers(self, generation: int, workers: int) -> None:
        """Replace the tokenizer pool with `workers` running `generation`, start to end."""
        old, new = await self.start_tokenizers(generation, workers)
        await self.owned(self.switch_tokenizers, old, new)
        await self.retire_tokenizers(old)

    async def start_tokenizers(self, generation: int, workers: int) -> tuple[list[Child], list[Child]]:
        """Prepare: start a new pool of `workers` running `generation` beside the serving one,
        which no front-end sends to before it commits; (serving pool, new pool). TierStartFailed
        (nothing changed) if the new one does not come up."""
        old = [c for c in self.children if c.tier == "tokenizer" and not c.retiring]
        first = max(c.index for c in self.children if c.tier == "tokenizer") + 1  # requests name their worker
        new = [Child("tokenizer", first + i, "daemon.tokenizer", standby=True) for i in range(workers)]
        try:
            await self.owned(self._start_after, old[-1], new, generation)
            await self._all_ready(new)
        except StartupFailed as exc:
            await self.withdraw(new)
            raise TierStartFailed(str(exc)) from None
        return old, new

    async def _start_after(self, last: Child, new: list[Child], generation: int) -> None:
        """Start `new`, listed after `last`."""
        position = self.children.index(last) + 1
        self.children[position:position] = new
        for child in new:
            await self._start(child, generation)

    def switch_tokenizers(self, old: list[Child], new: list[Child]) -> None:
        """Commit a tokenizer pool: the front-ends send new requests to `new` ("up"), and `old`
        leaves their pools ("draining"), finishes its requests and exits."""
        for child in new:
            child.standby = False
            self._publish(child, "up")
            self._supervise(child)
        for child in old:
            child.retiring = True
            self._publish(child, "draining")

    async def retire_tokenizers(self, old: list[Child]) -> None:
        await self._retire(old, self.settings.runtime.drain_timeout_s)

    def listener_for(self, server: ServerSettings) -> socket.socket:
        """The listening socket a front-end with `server` serves from: the running one, or a new
        one bound now if the address changed (TierStartFailed if it cannot be)."""
        if address(server) == self.listener_address:
            return self.listener  # type: ignore[return-value]
        try:
            return listen(server)
        except StartupFailed as exc:
            raise TierStartFailed(str(exc)) from None

    async def replace_frontend(self, generation: int, server: ServerSettings, listener: socket.socket) -> None:
        """Replace the front-end with one running `generation` on `listener`, start to end."""
        old, new = await self.start_frontend(generation, server, listener)
        await self.switch_frontend(old, new, server, listener)

    async def start_frontend(
        self, generation: int, server: ServerSettings, listener: socket.socket
    ) -> tuple[Child, Child]:
        """Prepare: start a front-end running `generation` beside the running one; (running, new).

        Unlike the other tiers it serves from its start: both accept from the same listening
        socket (`listener`, a new one if the address changed), so connections queued meanwhile
        are served by whichever accepts them, never reset. TierStartFailed (old front-end
        untouched) if the new one does not come up; the caller then closes a new `listener`."""
        old = self._child("frontend")
        new = Child(
            "frontend",
            0,
            "daemon.frontend",
            epoch=old.epoch,
            deaths=old.deaths,
            restarts=old.restarts,
            expected_workers=server.workers,
        )
        try:
            await self.owned(self._start_frontend, new, generation, listener)
            await self._until_ready(new)
        except StartupFailed as exc:
            await self.withdraw([new])
            raise TierStartFailed(str(exc)) from None
        return old, new

    async def switch_frontend(self, old: Child, new: Child, server: ServerSettings, listener: socket.socket) -> None:
        """Commit a front-end: `new` serves alone from `listener`, `old` drains and stops."""
        # No wait for the new instance to reach accept(): both share one listening socket, so a
        # connection the old one no longer takes waits in the backlog for the new one, never reset.
        moved = listener is not self.listener
        await self.owned(self._supervise, new)
        await self._retire_frontend(old)
        previous = self.listener
        await self.owned(self._hand_over, old, listener, server)
        if moved:  # the new address serves from now on; the old one refuses once the old instance stops
            refuse = asyncio.create_task(self._refuse_new_connections(previous))
        # Granian stops accepting and finishes its requests and streams, bounded by its kill timeout.
        await self._terminate([old], signal.SIGTERM, self.settings.runtime.drain_timeout_s + STOP_GRACE_S)
        await self.owned(self._forget, old)
        if moved:
            await refuse
            previous.close()  # type: ignore[union-attr]

    async def _retire_frontend(self, child: Child) -> None:
        """HTTP/1.1 has no "go away" for idle keep-alive connections, which Granian closes when it
        stops: first let the clients of `child` leave them after their next answer."""
        await self.owned(self._broadcast, FrontendRetiring(child.pid))  # type: ignore[arg-type]
        await asyncio.sleep(HANDOVER_CLOSE_S)

    async def withdraw_frontend(self, new: Child) -> None:
        """Roll back a front-end a reload started: it drains (it may have served) and stops; the
        running one serves on alone."""
        await self.owned(self._retire_one, new)
        await self._retire_frontend(new)
        await self._terminate([new], signal.SIGTERM, self.settings.runtime.drain_timeout_s + STOP_GRACE_S)
        await self.owned(self._forget_abandoned, new)

    async def _start_frontend(self, new: Child, generation: int, listener: socket.socket) -> None:
        self.children.append(new)
        await self._start(new, generation, listener)

    def _hand_over(self, old: Child, listener: socket.socket, server: ServerSettings) -> None:
        """The new front-end serves from `listener` from now on; `old` is not to be restarted."""
        old.retiring = True
        self.listener, self.listener_address = listener, address(server)

    async def withdraw(self, children: list[Child]) -> None:
        """Kill children a reload started that serve nothing yet (it failed), and forget them."""
        for child in children:
            await self.owned(kill, child)
        for child in children:
            if child.process is not None:
                await child.process.wait()
            await self.owned(self._forget_abandoned, child)

    def _forget_abandoned(self, child: Child) -> None:
        self.remove_sockets(child)
        self._publish(child, "stopped")
        self._forget(child)  # a worker's "stopped" tells the scheduler to expect none beside

    async def _retire(self, children: list[Child], grace: float) -> None:
        """Wait for draining `children` to exit by themselves, then stop the laggards."""
        waits = [c.process.wait() for c in children if c.process is not None]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await asyncio.gather(*waits)
        for child in children:
            if child.process is not None and child.process.returncode is not None:
                await self.owned(self._publish, child, "stopped")
                log.info("tier.stopped", tier=child.tier, index=child.index, status=child.process.returncode)
        await self._terminate(children, STOP_SIGNAL, STOP_GRACE_S)  # the laggards: their requests fail
        for child in children:
            await self.owned(self._forget, child)
