"""Non-finite values never pass silently: one error type and the checks that raise it.

A NaN weight makes NaN images (saved as a black grid), NaN Inception features, a NaN FID, and a
sweep that would rank the NaN row first. Each stage that produces numbers (generated images,
features, FID / IS / KID) checks them and stops with a :class:`NonFiniteError` naming the stage,
before anything is written.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

__all__ = ["NonFiniteError", "check_finite", "check_finite_weights"]


class NonFiniteError(ValueError):
    """A stage produced NaN or infinite values; the message names the stage."""


def check_finite(value: torch.Tensor | float | Iterable[float], stage: str) -> None:
    """Raise :class:`NonFiniteError` naming ``stage`` unless every number of ``value`` (a
    tensor, a number, or numbers) is finite. A tensor is checked on its device (one sync)."""
    if isinstance(value, torch.Tensor):
        bad = int((~torch.isfinite(value)).sum()) if value.is_floating_point() else 0
        if bad:
            raise NonFiniteError(
                f"{stage}: {bad} of {value.numel()} values are NaN or infinite; nothing was written"
            )
        return
    numbers = [value] if isinstance(value, (int, float)) else list(value)
    if not all(math.isfinite(float(v)) for v in numbers):
        raise NonFiniteError(f"{stage} is not finite ({value}); nothing was written")


def check_finite_weights(model: torch.nn.Module) -> None:
    """Refuse a model whose parameters or floating-point buffers hold NaN or infinite values
    (a damaged checkpoint or a diverged training run), naming the first such tensors. Anything
    that is not an ``nn.Module`` has no weights to check."""
    if not isinstance(model, torch.nn.Module):
        return
    tensors = [
        (name, t)
        for name, t in (*model.named_parameters(), *model.named_buffers())
        if t.is_floating_point() and t.numel()
    ]
    if not tensors:
        return
    finite = torch.stack([torch.isfinite(t).all() for _, t in tensors]).cpu()  # one sync
    bad = [name for (name, _), ok in zip(tensors, finite.tolist(), strict=True) if not ok]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise NonFiniteError(
            f"the model's weights hold NaN or infinite values ({', '.join(bad[:3])}{more}): the "
            "checkpoint is damaged or its training diverged; nothing was generated"
        )
