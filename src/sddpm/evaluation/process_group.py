"""Process-group helpers for evaluation under ``torchrun``: ranks, devices, sharding, gathers.

(The same functions are moving to one process-group module shared with training.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_gather_rows",
    "check_device",
    "distributed_from_env",
    "rank_and_world",
    "shard_indices",
]


def shard_indices(num: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """The image indices rank ``rank`` of ``world_size`` handles: ``range(num)[rank::world]``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(range(num))[rank::world_size]


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device`; a ``ValueError`` for a bad name or missing CUDA."""
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device {device!r} is not a device name ({err})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but CUDA is not available here")
    return dev


@contextmanager
def distributed_from_env(device: str = "cpu") -> Iterator[tuple[int, int, torch.device]]:
    """Join the ``torchrun`` process group if ``WORLD_SIZE`` > 1; yields ``(rank, world, dev)``.

    ``device`` ``"cuda"`` becomes ``cuda:LOCAL_RANK`` (NCCL); anything else uses Gloo. A group
    that already exists is used as is; one created here is destroyed on exit.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = check_device(device)
    if dev.type == "cuda" and dev.index is None and world > 1:
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    created = False
    if world > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        created = True
    try:
        rank, world = rank_and_world()
        yield rank, world, dev
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def all_gather_rows(x: Tensor, device: torch.device) -> Tensor:
    """Concatenate ``[n_r, D]`` tensors of every rank (n_r may differ), in rank order, on the
    CPU. A collective: every rank calls it."""
    x = x.to(device)
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)]).cpu()
