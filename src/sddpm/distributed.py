"""Process groups for training and evaluation: the same command runs alone or under ``torchrun``.

``torchrun --nproc_per_node=N`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``
and ``MASTER_PORT``; :func:`setup_distributed` reads them (``env://``), picks the backend (NCCL
for CUDA devices, Gloo otherwise) and pins each rank to ``cuda:LOCAL_RANK``. Without those
variables it returns a single-process context and initialises nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: ``rank`` of ``world_size``, its ``device``, whether it logs."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False  # this context created the process group (and destroys it)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, writes checkpoints and draws samples."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:LOCAL_RANK`` if CUDA is available, else CPU; ``"cuda"`` ->
    ``cuda:LOCAL_RANK``; anything else as given (``"cpu"``, ``"cuda:1"``)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = check_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def setup_distributed(device: str = "auto") -> DistContext:
    """Initialise the default process group from the ``torchrun`` environment, if present.

    A group that already exists (e.g. made by a test harness) is used as is.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        dev = resolve_device(device, local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistContext(dist.get_rank(), local_rank, dist.get_world_size(), dev, False)
    if world_size <= 1:
        return DistContext(0, 0, 1, resolve_device(device, 0), False)
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    _init_group(dev)
    return DistContext(dist.get_rank(), local_rank, dist.get_world_size(), dev, True)


def _init_group(dev: torch.device) -> None:
    """The ``env://`` default group: NCCL bound to ``dev`` for CUDA, Gloo otherwise."""
    kwargs: dict[str, Any] = {"backend": "nccl" if dev.type == "cuda" else "gloo"}
    kwargs["init_method"] = "env://"
    if dev.type == "cuda":
        kwargs["device_id"] = dev
    dist.init_process_group(**kwargs)


def cleanup_distributed(ctx: DistContext) -> None:
    """Destroy the process group if :func:`setup_distributed` created it."""
    if ctx.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        if ctx.device.type == "cuda":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def all_reduce_mean(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks (in place; returned for convenience)."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= ctx.world_size
    return tensor


def all_gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable objects)."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(ctx: DistContext, obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(ctx: DistContext, flag: bool, device: torch.device | None = None) -> bool:
    """Whether ``flag`` is true on any rank (one all-reduce; every rank must call it)."""
    if not ctx.distributed:
        return bool(flag)
    box = torch.tensor([1.0 if flag else 0.0], device=device or ctx.device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item() > 0)


# --------------------------------------------------------------------------- evaluation's view
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
    """``device`` as a :class:`torch.device`: the one check of a device name, and its message
    (``SamplingOptions.device``, the CLI's ``--device`` and the process groups all use it).

    Raises ``ValueError`` for a name torch does not know and for a CUDA device where CUDA is not
    available (a CPU-only build of torch, or no GPU or driver).
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"{device!r} is not a device name; use 'cpu', 'cuda' or 'cuda:N' (a torch.device)"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        if torch.version.cuda is None:
            why, fix = "this torch is a CPU-only build", "install a CUDA build of torch"
        else:
            why, fix = "no CUDA GPU or driver found", "run on a machine with a CUDA GPU"
        raise ValueError(
            f"device '{dev}' asked for, but CUDA is not available here ({why}); use "
            f"device='cpu' (CLI: --device cpu), or {fix}"
        )
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
        _init_group(dev)
        created = True
    try:
        rank, world = rank_and_world()
        yield rank, world, dev
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def all_gather_rows(x: torch.Tensor, device: torch.device) -> torch.Tensor:
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
