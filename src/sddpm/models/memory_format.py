"""The memory layout a U-Net computes in: ``contiguous`` (NCHW) or ``channels_last`` (NHWC).

cuDNN runs 16-bit convolutions on tensor cores in NHWC; an NCHW network pays a transpose on
either side of every such conv. :func:`set_memory_format` lays out the model's conv weights and
makes its forward pass take its input in that layout; every layer keeps it, the spiking
neurons included (:mod:`sddpm.snn.layout`), so no conv sees its input in the other layout.
Results are the same up to the summation order of the convolutions; checkpoints are always
written contiguous.
"""

from __future__ import annotations

import torch
from torch import nn

MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
"""Names of the layouts a model can compute in, and their torch memory formats."""


def check_memory_format(name: str) -> torch.memory_format:
    """The torch memory format called ``name``; a ``ValueError`` naming the choices."""
    if name not in MEMORY_FORMATS:
        raise ValueError(f"unknown memory format {name!r}; choose one of {sorted(MEMORY_FORMATS)}")
    return MEMORY_FORMATS[name]


def set_memory_format(model: nn.Module, name: str) -> nn.Module:
    """Make ``model`` (a :class:`~sddpm.models.UNet`) compute in layout ``name``
    (``"contiguous"`` or ``"channels_last"``), in place; returns ``model``.

    Every 4-D parameter and buffer (the 2-D conv weights) is given that format's strides, and
    the forward pass lays out its input so. Call it before making the optimiser (it replaces the
    parameters' storage, as ``Module.to(memory_format=...)`` does; that method refuses the
    model's one 5-D weight)."""
    fmt = check_memory_format(name)
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.dim() == 4:
                tensor.data = laid_out(tensor.data, fmt)
    model.memory_format = fmt
    return model


def laid_out(x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """A 4-D ``x`` with ``fmt``'s strides: ``x`` itself if it has them, else a copy.

    By strides, not ``Tensor.contiguous``: a tensor with one channel counts as contiguous in
    both formats and would keep its NCHW strides, yet cuDNN and oneDNN pick a conv output's
    layout from its inputs' strides."""
    target = torch.empty_like(x, memory_format=fmt)
    return x if target.stride() == x.stride() else target.copy_(x)


def memory_format_name(model: nn.Module) -> str:
    """The name of the layout ``model`` computes in."""
    fmt = getattr(model, "memory_format", torch.contiguous_format)
    return next(name for name, f in MEMORY_FORMATS.items() if f == fmt)
