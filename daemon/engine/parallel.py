"""Tensor parallelism: which share of a model this process holds, and the collectives that join the shares.

A model built with a Parallel of size N holds 1/N of each large matrix (layers/linear.py,
layers/vocab.py, layers/moe.py); a forward pass is the same on every rank, and the shares meet
in an all-reduce after each row-parallel product and an all-gather of the logits. At size 1
(SINGLE) every collective here is a no-op, and the layers test `size > 1` before calling one,
so a single-process model pays nothing for it.

The group is torch.distributed's default one: gloo between CPU processes, NCCL between CUDA
devices (rank r on device r of its host). The engine never starts processes; whoever does calls
join_group in each of them.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


class ParallelError(ValueError):
    """A model cannot be split across this many ranks (a dimension that does not divide)."""


@dataclass(frozen=True)
class Parallel:
    rank: int = 0
    size: int = 1
    group: Any = None  # a torch.distributed ProcessGroup; None at size 1 (or the default group)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the ranks, in place."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's x, concatenated along `dim` in rank order."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)

    def fewest(self, value: int) -> int:
        """The smallest of every rank's `value`."""
        if self.size == 1:
            return value
        device = "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"  # NCCL reduces on the device
        count = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(count, op=dist.ReduceOp.MIN, group=self.group)
        return int(count.item())

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        """Rank `src`'s `obj` (anything picklable), returned on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def shard(self, total: int, what: str = "a dimension") -> tuple[int, int]:
        """(start, length) of this rank's even share of `total` items; `what` names them in the error."""
        if total % self.size:
            raise ParallelError(f"{what} ({total}) is not divisible by the tensor-parallel size {self.size}")
        length = total // self.size
        return self.rank * length, length


SINGLE = Parallel()


def open_store(address: str, *, master: bool, timeout_s: float) -> dist.TCPStore:
    """The key-value store at `address` ("host:port") where a group spanning several machines meets:
    `master` serves it (on every interface), the others connect to it, retrying for `timeout_s`."""
    host, _, port = address.rpartition(":")
    return dist.TCPStore(
        host.strip("[]"),
        int(port),
        is_master=master,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


def join_group(rank: int, size: int, meeting: str | dist.Store, *, device_type: str, timeout_s: float) -> Parallel:
    """Join the process group of `size` ranks that meet at `meeting`: an init method
    ("file:///path") or a store every rank opened (open_store). NCCL for CUDA (this rank then works
    on CUDA device `rank` of its host, modulo its devices), gloo otherwise. Collectives that wait
    longer than `timeout_s` fail rather than hang."""
    if size == 1:
        return SINGLE
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        # NCCL's collectives, broadcast_object's among them, run on the current device
        torch.cuda.set_device(rank % torch.cuda.device_count())
    where = {"init_method": meeting} if isinstance(meeting, str) else {"store": meeting}
    dist.init_process_group(backend, world_size=size, rank=rank, timeout=datetime.timedelta(seconds=timeout_s), **where)
    return Parallel(rank, size, dist.group.WORLD)


def leave_group(parallel: Parallel) -> None:
    """Leave the group join_group made (nothing at size 1, or when already left)."""
    if parallel.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
