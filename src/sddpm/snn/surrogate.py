"""Surrogate gradients: a Heaviside spike forward, an analytic derivative backward.

Every surrogate is an autograd Function whose forward is ``heaviside(u) = (u >= 0)`` (exactly
0.0 or 1.0) and whose backward multiplies the incoming gradient by the derivative of a smooth
stand-in for the step. ``u`` is the membrane potential minus the threshold.

The published SDDPM model uses spikingjelly's ``surrogate.ATan()`` (alpha 2); sigmoid and
rectangular are the other two surrogates in common use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def heaviside(u: torch.Tensor) -> torch.Tensor:
    """``1.0`` where ``u >= 0`` else ``0.0``, in the dtype of ``u`` (a spike fires at threshold)."""
    return (u >= 0).to(u.dtype)


def atan_grad(u: torch.Tensor, alpha: float) -> torch.Tensor:
    """d/du of ``atan(pi/2 * alpha * u) / pi + 1/2``: ``alpha / 2 / (1 + (pi/2 * alpha * u)^2)``."""
    return (alpha / 2) / (1 + (math.pi / 2 * alpha * u) ** 2)


def sigmoid_grad(u: torch.Tensor, alpha: float) -> torch.Tensor:
    """d/du of ``sigmoid(alpha * u)``: ``alpha * s * (1 - s)``."""
    s = torch.sigmoid(alpha * u)
    return alpha * s * (1 - s)


def rectangular_grad(u: torch.Tensor, width: float) -> torch.Tensor:
    """A box of unit area: ``1 / width`` where ``|u| < width / 2``, else 0."""
    return (u.abs() < width / 2).to(u.dtype) / width


class _SurrogateSpike(torch.autograd.Function):
    """Heaviside forward; backward multiplies by ``grad_fn(u, width)``.

    Elementwise, like the built-in ops autocast leaves alone: spikes and the gradient have
    ``u``'s dtype whatever autocast is doing."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, grad_fn, width: float) -> torch.Tensor:
        ctx.save_for_backward(u)
        ctx.grad_fn, ctx.width = grad_fn, width
        return heaviside(u)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (u,) = ctx.saved_tensors
        return (grad_out * ctx.grad_fn(u, ctx.width)).to(u.dtype), None, None


_GRADS = {"atan": atan_grad, "sigmoid": sigmoid_grad, "rectangular": rectangular_grad}
_DEFAULT_WIDTH = {"atan": 2.0, "sigmoid": 4.0, "rectangular": 1.0}


@dataclass(frozen=True)
class Surrogate:
    """A surrogate gradient: ``kind`` is ``atan``, ``sigmoid`` or ``rectangular``.

    ``width`` is the shape parameter: alpha for atan (published default 2) and sigmoid
    (default 4), the box width for rectangular (default 1). ``None`` takes the default.
    Calling it on ``u = v - threshold`` returns spikes (0.0 or 1.0) with the surrogate backward.
    """

    kind: str = "atan"
    width: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in _GRADS:
            raise ValueError(f"unknown surrogate {self.kind!r}; choose one of {sorted(_GRADS)}")
        if self.width is not None and not self.width > 0:
            raise ValueError(f"surrogate width must be > 0, got {self.width}")

    @property
    def resolved_width(self) -> float:
        return float(_DEFAULT_WIDTH[self.kind] if self.width is None else self.width)

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        return _SurrogateSpike.apply(u, self.grad_fn, self.resolved_width)

    @property
    def grad_fn(self):
        """The derivative as a plain function ``grad_fn(u, width)`` (see :meth:`grad`)."""
        return _GRADS[self.kind]

    def grad(self, u: torch.Tensor) -> torch.Tensor:
        """The analytic surrogate derivative at ``u`` (what backward multiplies by)."""
        return self.grad_fn(u, self.resolved_width)
