"""Adam over the trainable parameters, with a linear learning-rate warm-up."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import OptimSettings


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad`` (the frozen time-embedding table is left out)."""
    return [p for p in model.parameters() if p.requires_grad]


def warmup_factor(update: int, warmup_steps: int) -> float:
    """Learning-rate multiplier of the ``update``-th optimiser update (0-based) from warm-up.

    ``min(1, (update + 1) / warmup_steps)``: update 0 uses ``lr / warmup_steps`` and updates
    ``warmup_steps - 1`` onwards use the full ``lr``. (The published pytorch-ddpm lambda,
    ``min(step, warmup) / warmup``, gives update 0 a learning rate of exactly 0; shifting by one
    spends no update on a zero step.) ``warmup_steps = 0`` means no warm-up.
    """
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (update + 1) / warmup_steps)


def lr_factor(update: int, warmup_steps: int, decay: str = "none", total_steps: int = 0) -> float:
    """Warm-up (:func:`warmup_factor`) times the decay after it.

    ``decay``: ``"none"`` (constant, the published recipe); ``"linear"`` or ``"cosine"``: from
    1 at the end of warm-up to 0 after update ``total_steps - 1`` (the last update uses
    ``lr / (total_steps - warmup_steps)`` with linear decay, never exactly 0).
    """
    factor = warmup_factor(update, warmup_steps)
    if decay == "none" or update < warmup_steps:
        return factor
    span = max(1, total_steps - max(warmup_steps - 1, 0))
    done = min(1.0, (update - max(warmup_steps - 1, 0)) / span)
    if decay == "linear":
        return factor * (1.0 - done)
    if decay == "cosine":
        return factor * 0.5 * (1.0 + math.cos(math.pi * done))
    raise ValueError(f"unknown lr decay {decay!r}; choose none, linear or cosine")


class _Warmup:
    """A picklable ``lr_lambda`` (its settings go into the scheduler's state_dict as numbers)."""

    def __init__(self, warmup_steps: int, decay: str = "none", total_steps: int = 0) -> None:
        self.warmup_steps = int(warmup_steps)
        self.decay = str(decay)
        self.total_steps = int(total_steps)

    def __call__(self, update: int) -> float:
        return lr_factor(update, self.warmup_steps, self.decay, self.total_steps)


def build_optimizer(
    model: nn.Module, settings: OptimSettings, total_steps: int = 0
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.LambdaLR]:
    """Adam over :func:`trainable_parameters` and its warm-up (+ decay) ``LambdaLR``.

    Call ``scheduler.step()`` after every ``optimizer.step()``; the lr of update ``i`` is then
    ``settings.lr * lr_factor(i, settings.warmup_steps, settings.decay, total_steps)``.
    """
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.Adam(
        params,
        lr=settings.lr,
        betas=tuple(settings.betas),
        eps=settings.eps,
        weight_decay=settings.weight_decay,
    )
    schedule = _Warmup(settings.warmup_steps, settings.decay, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return optimizer, scheduler
