"""Class labels for a class-conditional U-Net: the checks, on the host.

A conditional model (``UNetConfig.num_classes = N > 0``) takes labels ``y [B]`` of an integer
dtype with values in ``0..N``; ``N`` is the "null" class (the unconditional branch of
classifier-free guidance). :func:`check_labels` is the one full check. It reads the values, so
call it where labels are drawn or given (on the host, before they go to the device): the U-Net's
own check (:meth:`sddpm.models.UNet.validate_input`) reads values of CPU tensors only, so that a
GPU step never waits on a device sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def num_classes_of(model: Any) -> int:
    """The class count of a model, ``model.config.num_classes`` (0: unconditional, also for a
    model without a config or a config without the field)."""
    return int(getattr(getattr(model, "config", None), "num_classes", 0) or 0)


def check_label_tensor(y: torch.Tensor, batch: int | None, num_classes: int) -> None:
    """The checks that need no values: ``y`` is a 1-D integer tensor (of length ``batch`` when
    given) and the model is conditional. Raises ``ValueError``."""
    if num_classes <= 0:
        raise ValueError(
            "labels were given to an unconditional model (num_classes=0); pass y=None, or "
            "train a conditional model (UNetConfig(num_classes=N); CLI: --set num_classes=N)"
        )
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor of int64, got {type(y).__name__}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"labels must hold integer class indices (int64), got dtype {y.dtype}")
    if y.dim() != 1 or (batch is not None and y.shape[0] != batch):
        want = "[B]" if batch is None else f"[{batch}]"
        raise ValueError(f"expected labels of shape {want} (one per image), got {tuple(y.shape)}")


def check_label_values(y: torch.Tensor, num_classes: int) -> None:
    """Raise ``ValueError`` unless every label is in ``0..num_classes`` (``num_classes`` being
    the null class). Reads the values: a device sync for a GPU tensor."""
    if y.numel() and (int(y.min()) < 0 or int(y.max()) > num_classes):
        raise ValueError(
            f"labels must be class indices in [0, {num_classes - 1}] or {num_classes} (the null "
            f"class), got values {int(y.min())}..{int(y.max())}"
        )


def check_labels(
    y: torch.Tensor | np.ndarray | Sequence[int],
    num_classes: int,
    batch: int | None = None,
) -> torch.Tensor:
    """Labels for a model of ``num_classes`` classes, checked: an int64 tensor ``[B]``.

    Args:
        y: class indices, one per image: a tensor, numpy array or sequence of ints, values in
            ``0..num_classes - 1``, or ``num_classes`` for the null (unconditional) class.
        num_classes: the model's ``config.num_classes`` (0: unconditional, which takes none).
        batch: the number of images, if the length must match.

    Returns:
        ``y`` as int64 on its device (a CPU tensor for a sequence or an array).

    Raises:
        ValueError: an unconditional model, labels that are not 1-D integers (or of the wrong
            length), or values out of range; the message names the allowed ones.
    """
    if not isinstance(y, torch.Tensor):
        arr = np.asarray(y)
        if arr.size and arr.dtype.kind not in "iu":
            raise ValueError(f"labels must be integer class indices, got {arr.dtype} values")
        y = torch.from_numpy(arr.astype(np.int64))
    check_label_tensor(y, batch, num_classes)
    check_label_values(y, num_classes)
    return y.to(torch.int64)
