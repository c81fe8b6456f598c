"""The worker of a node other than node 0 (distributed.node_rank > 0): its share of the group.

Its supervisor starts it alone (no front-end, scheduler or tokenizer run on this node). It
starts this node's other ranks, arrives at node 0 with its config's digests (nodes.py), joins
the group, loads its share of the model, reports ready, then runs the steps node 0's rank 0
broadcasts, like any rank but 0 (tensor_group.follow). It speaks ZeroMQ only to its own
supervisor: the steps come over torch.distributed.

While it waits in a broadcast its main thread cannot beat, so a thread does, and acknowledges
live settings (the log level). A wait that never ends is still bounded: the collective fails
after tensor_group.COLLECTIVE_TIMEOUT_S, which node 0's keep-alives keep an idle group under.
When its group ends (a rank gone, here or elsewhere, or node 0's worker replaced in a reload)
or node 0 refuses it, it exits with EXIT_REGROUP and its supervisor starts it again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import msgspec
import structlog
import zmq

from daemon.engine.locate import locate_model
from daemon.engine.parallel import join_group, open_store
from daemon.engine.runner import resolve_device
from daemon.ipc.heartbeat import HEARTBEAT_INTERVAL_S, Pulse
from daemon.ipc.messages import Broadcast, ConfigApplied, ConfigUpdate, TierReady
from daemon.ipc.sockets import READY_GRACE_MS, PeerGone, Receiver, open_socket, send
from daemon.tier import STOP_SIGNAL, Tier
from daemon.worker.nodes import arrive, node_layout
from daemon.worker.service import load_runner
from daemon.worker.tensor_group import (
    COLLECTIVE_TIMEOUT_S,
    TCP,
    Followers,
    GroupBroken,
    device_type,
    follow,
    group_ranks,
)

log = structlog.get_logger("daemon.worker")


class NodeWorker:
    def __init__(self, tier: Tier):
        self.tier = tier
        settings = tier.settings
        # Its main thread waits in collectives, where no Python signal handler runs: the
        # supervisor's stop ends it at once (this node's other ranks die with it).
        signal.signal(STOP_SIGNAL, signal.SIG_DFL)
        layout = node_layout(settings)
        locate_model(settings.model.path, settings.runtime.cache_dir, build=True)
        address = str(settings.distributed.dist_init_addr)
        self.followers = Followers(layout.ranks[1:], TCP + address, tier.index) if layout.per_node > 1 else None
        try:
            pids = [os.getpid(), *(self.followers.pids if self.followers else [])]
            ranks = group_ranks(settings, resolve_device(settings.model.device), pids, layout.first_rank)
            try:
                store = open_store(address, master=False, timeout_s=COLLECTIVE_TIMEOUT_S)
            except RuntimeError as exc:  # torch's DistNetworkError, DistStoreError
                raise GroupBroken(f"node 0 cannot be reached at {address}: {exc}") from None
            arrive(store, settings, ranks)  # NodeRefused if node 0 runs another config
            self.parallel = join_group(
                layout.first_rank,
                settings.model.tp_size,
                store,
                device_type=device_type(settings),
                timeout_s=COLLECTIVE_TIMEOUT_S,
            )
            self.runner, loaded = load_runner(settings, parallel=self.parallel)
            self.ranks = group_ranks(settings, self.runner.device, pids, layout.first_rank)
            self.model = msgspec.structs.replace(loaded, ranks=self.ranks)  # what node 0 shows of them
        except BaseException:
            if self.followers is not None:
                self.followers.stop()
            raise

    def run(self) -> None:
        tier = self.tier
        context = zmq.Context()
        control = open_socket(context, zmq.DEALER, connect=tier.endpoints.control)
        log.info("worker.ready", node=tier.settings.distributed.node_rank, ranks=[r.rank for r in self.ranks])
        send(control, TierReady(tier.role, tier.index, os.getpid(), self.model), READY_GRACE_MS)
        events = Receiver(open_socket(context, zmq.SUB, connect=tier.endpoints.events), Broadcast)
        # the sockets belong to this thread from now on
        threading.Thread(target=self._beat, args=(control, events), name="beat", daemon=True).start()
        try:
            follow(self.parallel, self.runner)
        except RuntimeError as exc:  # gloo's or NCCL's, when a rank is gone or rank 0 left
            raise GroupBroken(f"the group ended: {exc}") from None
        finally:
            if self.followers is not None:
                self.followers.stop()

    def _beat(self, control: zmq.Socket, events: Receiver) -> None:
        pulse = Pulse(control, self.tier.role, self.tier.index)
        while True:
            pulse.beat()
            if events.socket.poll(int(HEARTBEAT_INTERVAL_S * 1000)):
                for event in events.recv_ready():
                    if isinstance(event, ConfigUpdate):  # nothing of the worker's is live but its logging
                        self.tier.adopt(event.generation)
                        with contextlib.suppress(PeerGone):
                            send(control, ConfigApplied(self.tier.role, self.tier.index, os.getpid(), event.generation))
