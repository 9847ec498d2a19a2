"""Memory layout of a neuron layer's ``[T, ...]`` tensors.

A neuron layer is elementwise, so it may keep whatever layout one SNN step of its input has:
a channels-last feature map stays channels-last, and the conv it feeds reads it without a copy.
Its outputs are laid out as ``T`` dense copies of one step's layout, the step axis outermost
(the layout :func:`torch.empty_like` gives one step, stacked). The Triton kernels walk each step
as a flat run of ``n`` values; they take and give tensors in this layout only.
"""

from __future__ import annotations

import torch


def empty_steps(x_seq: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised ``[T, ...]`` tensor shaped as ``x_seq``: ``T`` dense steps, each laid out
    as one step of ``x_seq`` (``torch.empty_like(x_seq[0])``), the step axis outermost.

    Unlike ``torch.empty_like(x_seq)`` it keeps a step's layout when ``x_seq`` is not dense
    itself: an image broadcast over the steps (stride 0 on the step axis) gives channels-last
    steps if the image is channels-last."""
    one = torch.empty_like(x_seq[0], dtype=dtype) if x_seq.shape[0] else None
    if one is None:  # no steps: nothing to lay out
        return torch.empty_like(x_seq, dtype=dtype)
    return torch.empty_strided(
        x_seq.shape, (one.numel(), *one.stride()), dtype=one.dtype, device=one.device
    )


def has_step_layout(x_seq: torch.Tensor, like: torch.Tensor) -> bool:
    """Whether ``x_seq`` has the layout of ``like`` (same shape and strides: both as
    :func:`empty_steps` lays them out)."""
    return x_seq.shape == like.shape and x_seq.stride() == like.stride()


def in_step_layout(x_seq: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """``x_seq`` itself if it is laid out as :func:`empty_steps` lays out ``like`` (default:
    ``x_seq``), else a copy in that layout."""
    target = empty_steps(x_seq if like is None else like, dtype=x_seq.dtype)
    if has_step_layout(x_seq, target):
        return x_seq
    return target.copy_(x_seq)
