"""Launcher detection for `torchrun`: one code path for one CPU, one GPU and N GPUs on M nodes.

Under `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) the process group is started
with NCCL on GPUs and gloo on CPUs; otherwise this is a single process of world size 1.
"""

from __future__ import annotations

import atexit
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kind.core.device import pick_device


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    # the group host tensors (sample shares) travel over: under NCCL a gloo group, so they stay
    # in host memory; None: the default group (gloo already, or a single process)
    host: dist.ProcessGroup | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world() -> int:
    """How many ranks torchrun started (its WORLD_SIZE); 1 for a plain process."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(preference: str = "auto") -> DistInfo:
    """Start (or join) the process group when launched by torchrun; no-op otherwise."""
    world = launched_world()
    if world == 1:
        return DistInfo(0, 1, 0, pick_device(preference))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(shutdown)  # the group this process started ends with it
    host = None if dist.get_backend() == "gloo" else _gloo_group()
    return DistInfo(rank, world, local_rank, device, host)


@functools.cache
def _gloo_group() -> dist.ProcessGroup:
    """One gloo group beside NCCL's, made when the job starts (every rank, in the same order), so
    a network gloo cannot use (see GLOO_SOCKET_IFNAME) fails before any work, not after it."""
    return dist.new_group(backend="gloo")


def shutdown() -> None:
    """Destroy the process group while the interpreter is still whole. Left to the interpreter's
    teardown, gloo's worker threads can outlive it and the process dies with SIGABRT
    ("terminate called without an active exception", pytorch/pytorch#190489), which torchrun
    reports as a failed rank (and restarts, with --max-restarts) after a run that succeeded."""
    if dist.is_initialized():
        _gloo_group.cache_clear()
        dist.destroy_process_group()


def all_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a tensor over ranks (for logging)."""
    if info.world > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= info.world
    return value


def all_min(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The minimum of a tensor over ranks (a flag every rank must agree on)."""
    if info.world > 1:
        value = value.to(torch.float32).clone()
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def broadcast_object(value, info: DistInfo):
    """Rank 0's `value` on every rank (a small picklable object: a plan, an error message)."""
    if info.world == 1:
        return value
    box = [value if info.is_main else None]
    dist.broadcast_object_list(box, src=0, group=info.host)
    return box[0]
