"""Moved to :mod:`sddpm.distributed` (one process-group module for training and evaluation);
re-exported here for existing imports."""

from ..distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_mean,
    any_rank,
    barrier,
    broadcast_object,
    cleanup_distributed,
    resolve_device,
    setup_distributed,
)

__all__ = [
    "DistContext",
    "all_gather_objects",
    "all_reduce_mean",
    "any_rank",
    "barrier",
    "broadcast_object",
    "cleanup_distributed",
    "resolve_device",
    "setup_distributed",
]
