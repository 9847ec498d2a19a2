"""Generate many images from a trained model: batches, per-image seeds, progress, sharding.

Image ``i`` of a generation with seed ``s`` depends only on ``(s, i)``: its initial noise and
the noise the sampler adds come from per-image generators (:mod:`sddpm.diffusion.seeding`), so
the images do not change with the batch size or with the number of processes sharing the work.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .diffusion import (
    NoiseSchedule,
    OptionError,
    SamplingOptions,
    cycle_labels,
    initial_noise,
    sample,
)
from .finite import check_finite, check_finite_weights
from .models import fold_batchnorm, memory_format_name, set_memory_format
from .models.labels import check_labels, num_classes_of
from .models.unet import UNet
from .rundir import load_model
from .snn import set_neuron_kernel


@dataclass
class SamplingSetup:
    """What sampling a saved model needs: the network, its schedule, its output kind."""

    model: UNet
    schedule: NoiseSchedule
    prediction: str = "eps"
    directory: Path | None = None  # the model directory it was read from (the checkpoint)


def load_for_sampling(
    path: str | os.PathLike,
    weights: str | None = None,
    device: str | torch.device = "cpu",
    neuron_kernel: str = "auto",
) -> SamplingSetup:
    """Load a model directory or a run directory's newest good checkpoint, with its schedule.

    The run directory module (:func:`sddpm.rundir.load_model`) verifies the files (a corrupt
    newest checkpoint of a run is skipped with a warning; a corrupt model directory named
    explicitly raises :class:`sddpm.rundir.CorruptCheckpointError`) and reads the schedule and
    prediction from the checkpoint's ``diffusion`` section; a model directory without one (a
    converted published model) uses the published linear schedule over the model's
    ``diffusion_steps``. ``neuron_kernel`` is how its spiking neurons run
    (:func:`sddpm.snn.set_neuron_kernel`; copies made for sampling keep it)."""
    loaded = load_model(path, weights=weights, map_location=device)
    set_neuron_kernel(loaded.model, neuron_kernel, device=device)
    return SamplingSetup(loaded.model, loaded.schedule, loaded.prediction, loaded.directory)


def class_options(options: SamplingOptions, model: torch.nn.Module) -> SamplingOptions:
    """``options`` fitted to ``model``'s classes, checked before any image is made.

    A class-conditional model (``config.num_classes = N > 0``) sampled without ``labels`` gets
    ``labels = (0, ..., N-1)``: image ``i`` of a generation is of class ``i mod N``, so a set of
    images is spread uniformly over the classes. Given labels are checked against the model:
    ``ValueError`` for labels out of ``0..N`` (``N`` the null class) or given to an
    unconditional model."""
    n = num_classes_of(model)
    if options.labels is None:
        return options.replace(labels=tuple(range(n))) if n > 0 else options
    try:
        check_labels(list(options.labels), n)
    except ValueError as err:  # named as the option (the CLI names its flag)
        raise OptionError("labels", str(err)) from None
    return options


def image_labels(indices: int | Sequence[int], options: SamplingOptions) -> torch.Tensor | None:
    """The class of every image (by global index) that ``options`` asks for, int64 ``[N]``
    (``labels`` cycled over the indices), or ``None`` without labels."""
    if options.labels is None:
        return None
    return cycle_labels(indices, options.labels)


def generate_batches(
    model: torch.nn.Module,
    indices: int | Sequence[int],
    image_shape: Sequence[int],
    options: SamplingOptions | None = None,
    *,
    schedule: NoiseSchedule | None = None,
    prediction: str = "eps",
    progress: bool = True,
    desc: str | None = None,
    fold_bn: bool = True,
    **changes,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield ``(image indices, images [b, C, H, W] in [-1, 1] on device)`` batch by batch for
    image indices ``range(N)`` or the given global indices; a tqdm bar shows images/s and ETA.

    ``options`` (:class:`~sddpm.diffusion.SamplingOptions`; keyword ``changes`` such as
    ``steps=4`` are applied on top) says how: the sampler settings go to
    :func:`sddpm.diffusion.sample`; ``batch_size`` images per call, drawn on ``device``;
    ``bf16`` (bfloat16 autocast of the U-Net; the membranes still integrate in float32 and the
    sampler's arithmetic stays float32) and ``compile`` (``torch.compile`` of the network;
    ``compile_model`` is the old keyword). The neurons run with the model's own kernel
    (:func:`sddpm.snn.set_neuron_kernel`, or ``load_for_sampling(neuron_kernel=...)``).

    With ``fold_bn`` a U-Net samples through one copy with BatchNorm folded into its convs
    (:func:`sddpm.models.fold_batchnorm`), made once and laid out in ``memory_format``: the
    same function, fewer passes over memory. Pass ``fold_bn=False`` to sample with ``model``
    itself (e.g. one already folded and carrying measurement hooks).

    A class-conditional model samples image ``i`` with class ``labels[i % len(labels)]``
    (``options.labels``; without them, ``i mod num_classes``: see :func:`class_options`) and
    classifier-free guidance ``options.guidance``: one batched U-Net call of ``2b`` images per
    step (``b`` when the guidance is 1).

    Raises:
        NonFiniteError: before any image, when the model holds NaN or infinite weights; and
            for a batch whose images are not finite (nothing of that batch is yielded).
    """
    if "compile_model" in changes:
        changes["compile"] = changes.pop("compile_model")
    opts = class_options(SamplingOptions.build(options, **changes), model)
    idx = list(range(indices)) if isinstance(indices, int) else [int(i) for i in indices]
    check_finite_weights(model)
    if fold_bn and isinstance(model, UNet):
        model = set_memory_format(fold_batchnorm(model.eval()), opts.memory_format)  # the copy
    elif isinstance(model, UNet) and memory_format_name(model) != opts.memory_format:
        raise OptionError(
            "memory_format",
            f"the model computes in {memory_format_name(model)} and fold_bn=False samples with "
            f"it as it is: lay it out first (set_memory_format(model, {opts.memory_format!r})) "
            "or sample with fold_bn=True",
        )
    if opts.compile:
        model = torch.compile(model)
    device = torch.device(opts.device)
    bar = tqdm(total=len(idx), unit="img", desc=desc or opts.sampler, disable=not progress)
    try:
        for start in range(0, len(idx), opts.batch_size):
            chunk = idx[start : start + opts.batch_size]
            x_T = initial_noise(chunk, image_shape, opts.seed, device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=opts.bf16):
                x0 = sample(
                    model, x_T, schedule=schedule, indices=chunk, prediction=prediction,
                    options=opts,
                )  # fmt: skip
            check_finite(x0, f"generated images {chunk[0]}..{chunk[-1]}")
            yield chunk, x0
            bar.update(len(chunk))
    finally:
        bar.close()


def generate(
    model: torch.nn.Module,
    indices: int | Sequence[int],
    image_shape: Sequence[int],
    options: SamplingOptions | None = None,
    **kwargs,
) -> torch.Tensor:
    """All images of :func:`generate_batches` (same arguments), ``[N, C, H, W]`` in [-1, 1] on
    the CPU."""
    batches = generate_batches(model, indices, image_shape, options, **kwargs)
    out = [x0.cpu() for _, x0 in batches]
    if not out:
        return torch.empty((0, *image_shape))
    return torch.cat(out)
