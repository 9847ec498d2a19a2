"""Classifier-free guidance (Ho & Salimans 2022): one network, conditional and unconditional.

Training drops each label to the null class with probability ``p`` (:func:`drop_labels`), so
the network learns ``eps(x_t, t, y)`` and ``eps(x_t, t, null)``; the trainer's decisions are a
function of (seed, step, the image's position in the global batch) alone
(:func:`label_dropout_uniforms`), like its diffusion times and noise. Sampling mixes the two
with a guidance weight w (Ho & Salimans, Eq. 6, written with w = 1 + their w):

    eps = eps_uncond + w (eps_cond - eps_uncond)

w = 1 is the conditional model alone, w = 0 the unconditional one, w > 1 pushes further
towards the class. :class:`GuidedModel` turns a conditional model, the labels and w into a plain
``model(x_t, t) -> eps`` that every sampler takes; both branches run in ONE model call on the
2B images ``[x_t; x_t]`` with labels ``[y; null]`` (so a guided image costs two U-Net
evaluations per step, in one batched call), and w = 1 (or 0) needs one branch only.

v-prediction: the formula is applied to the model's output whatever it predicts. For fixed
``(x_t, t)``, ``eps = sqrt(1 - abar) x_t + sqrt(abar) v`` is affine in v and the weights
``(1 - w) + w`` sum to 1, so guiding v gives exactly the eps of guiding eps.

Per-image seeds: row b of the batch keeps its own label; which labels go with which image is the
caller's choice. :func:`cycle_labels` gives image ``i`` (its global index) the label
``classes[i % len(classes)]``, so an image's label, like its noise, does not depend on the
batch it lands in.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..models.labels import check_label_tensor, check_labels, num_classes_of


def check_guidance(guidance: float) -> float:
    """``guidance`` as a float if it is a finite number >= 0, else ``ValueError``."""
    if isinstance(guidance, bool) or not (
        isinstance(guidance, numbers.Real) and math.isfinite(guidance) and guidance >= 0
    ):
        raise ValueError(
            f"guidance must be a finite number >= 0 (1: the conditional model alone, 0: the "
            f"unconditional one), got {guidance!r}"
        )
    return float(guidance)


class GuidedModel(nn.Module):
    """A class-conditional model with fixed labels and guidance weight, as ``model(x_t, t)``.

    Args:
        model: a conditional model, ``model(x_t [N,C,H,W], t [N], y [N]) -> eps (or v)``;
            a :class:`sddpm.models.UNet` with ``config.num_classes > 0``, or any module when
            ``num_classes`` is given.
        labels: one class per image of the batch to sample, ``[B]`` (tensor, array or list),
            values in ``0..num_classes - 1`` (or the null class ``num_classes``). Checked here,
            on the host.
        guidance: w >= 0; ``eps_uncond + w (eps_cond - eps_uncond)``.
        num_classes: the model's class count (default ``model.config.num_classes``); the null
            class is ``num_classes``.

    ``forward(x_t [B,C,H,W], t [B])`` returns the guided output ``[B,C,H,W]``, from one call of
    ``model`` on 2B images (on B when w is 1 or 0). The wrapped model is a submodule, so
    threshold guidance (:func:`sddpm.snn.override_threshold`, ``sample(..., threshold=)``),
    ``.eval()``, ``.to()`` and forward hooks reach its neurons.
    """

    def __init__(
        self,
        model: nn.Module,
        labels: torch.Tensor | np.ndarray | Sequence[int],
        guidance: float = 1.0,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if num_classes is None:
            num_classes = num_classes_of(model)
        self.model = model
        self.num_classes = int(num_classes)
        self.guidance = check_guidance(guidance)
        labels = check_labels(labels, self.num_classes)
        # On the model's device now (outside any inference mode), and moved by ``.to()``: a
        # host-to-device copy at every step would be a device sync.
        device = next((p.device for p in model.parameters()), labels.device)
        self.register_buffer("labels", labels.to(device), persistent=False)

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def config(self):
        """The wrapped model's config (``None`` if it has none)."""
        return getattr(self.model, "config", None)

    def validate_input(self, x: torch.Tensor, t: torch.Tensor | None = None) -> None:
        """The wrapped model's checks of ``x`` (and ``t``), and one label per image."""
        if x.dim() < 1 or x.shape[0] != self.labels.shape[0]:
            raise ValueError(
                f"{self.labels.shape[0]} labels were given for a batch of "
                f"{x.shape[0] if x.dim() else 0} images; give one label per image"
            )
        validate = getattr(self.model, "validate_input", None)
        if callable(validate):
            validate(x, t)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self.labels.shape[0]:
            self.validate_input(x)
        y = self.labels.to(x.device)  # a no-op on the model's device
        w = self.guidance
        if w == 1.0:
            return self.model(x, t, y)
        null = torch.full_like(y, self.null_class)
        if w == 0.0:
            return self.model(x, t, null)
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out.chunk(2)
        return uncond + w * (cond - uncond)

    def extra_repr(self) -> str:
        return f"guidance={self.guidance}, num_classes={self.num_classes}"


def cycle_labels(
    indices: int | Sequence[int] | torch.Tensor, classes: Sequence[int]
) -> torch.Tensor:
    """Labels for images by global index: image ``i`` gets ``classes[i % len(classes)]``.

    ``indices`` is a count ``n`` (images ``0..n-1``) or the images' global indices (as passed
    to :func:`sddpm.diffusion.sample`). ``classes=range(num_classes)`` spreads the images
    uniformly over the classes; ``classes=[k]`` asks for class k only. Returns int64 ``[B]``.
    """
    classes = [int(c) for c in classes]
    if not classes:
        raise ValueError("classes must name at least one class")
    idx = torch.arange(indices) if isinstance(indices, int) else torch.as_tensor(indices)
    if idx.dim() != 1 or idx.dtype.is_floating_point or (idx.numel() and int(idx.min()) < 0):
        raise ValueError(f"indices must be image indices >= 0, got {indices!r}")
    return torch.tensor(classes, dtype=torch.int64)[idx.to(torch.int64) % len(classes)]


LABEL_DROPOUT_STREAM = 2  # beside seeding's streams 0 (initial noise) and 1 (sampler noise)


def label_dropout_generator(seed: int, step: int = 0) -> torch.Generator:
    """The CPU generator of training update ``step``'s label-dropout uniforms, seeded from
    ``image_seed(seed, step, LABEL_DROPOUT_STREAM)``: from ``(seed, step)`` alone, apart from
    the per-image sampling streams and from the step's ``t`` and noise. Nothing about it needs
    saving: a resumed run re-creates it for the step it resumes at.

    (Before the decisions became a function of the step, the second argument was the rank and
    the generator one stream per rank whose state the training state carried.)"""
    from .seeding import image_seed

    return torch.Generator().manual_seed(image_seed(int(seed), int(step), LABEL_DROPOUT_STREAM))


def label_dropout_uniforms(seed: int, step: int, batch_size: int) -> torch.Tensor:
    """The ``batch_size`` uniforms in [0, 1) of update ``step``'s whole global batch (CPU,
    float32): entry ``g`` decides the label at global position ``g`` (dropped when below
    ``p``; pass a rank's entries to :func:`drop_labels` as ``uniforms=``). Each entry depends
    on ``(seed, step, g)`` only, not on how the batch is split over processes and
    micro-batches."""
    if int(batch_size) < 0:
        raise ValueError(f"batch_size must be >= 0, got {batch_size!r}")
    return torch.rand(int(batch_size), generator=label_dropout_generator(seed, step))


def drop_labels(
    y: torch.Tensor,
    p: float,
    null_class: int,
    generator: torch.Generator | None = None,
    *,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Label dropout for classifier-free guidance training: each label becomes ``null_class``
    with probability ``p``, independently. A pure function of its arguments (and of the
    generator's state, when one is given).

    Label ``b`` is dropped when its uniform ``u[b]`` in [0, 1) is below ``p``, so ``p = 0``
    drops none and ``p = 1`` all. Give exactly one of ``generator`` and ``uniforms``.

    Args:
        y: labels ``[B]`` of an integer dtype (not modified).
        p: the dropout probability in [0, 1] (``cond_drop``).
        null_class: the null label, the model's ``config.num_classes``.
        generator: a random stream: ``B`` uniforms are drawn from it on the generator's device
            whatever ``p`` is, so the stream advances by ``B`` every call.
        uniforms: the uniforms themselves, ``[B]`` floats in [0, 1) (the trainer passes its
            rows of :func:`label_dropout_uniforms`); nothing is drawn.

    Returns:
        A new tensor like ``y``, on ``y``'s device.
    """
    if isinstance(p, bool) or not (isinstance(p, numbers.Real) and 0.0 <= p <= 1.0):
        raise ValueError(f"label dropout probability must be in [0, 1], got {p!r}")
    if int(null_class) < 1:
        raise ValueError(
            f"null_class must be the model's num_classes (>= 1), got {null_class!r}: label "
            "dropout is for class-conditional models"
        )
    check_label_tensor(y, None, int(null_class))
    if (generator is None) == (uniforms is None):
        raise ValueError("drop_labels takes exactly one of generator= and uniforms=")
    if uniforms is None:
        u = torch.rand(y.shape, generator=generator, device=generator.device)
    else:
        u = uniforms
        if not (isinstance(u, torch.Tensor) and u.dtype.is_floating_point):
            what = f"dtype {u.dtype}" if isinstance(u, torch.Tensor) else type(u).__name__
            raise ValueError(f"uniforms must be a floating-point tensor, got {what}")
        if tuple(u.shape) != tuple(y.shape):
            raise ValueError(
                f"expected one uniform per label, {tuple(y.shape)}, got {tuple(u.shape)}"
            )
    drop = (u < p).to(y.device)
    return torch.where(drop, torch.full_like(y, int(null_class)), y)
