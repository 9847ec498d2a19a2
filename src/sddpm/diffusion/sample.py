"""The one sampling entry point: validation, per-image seeds, threshold guidance."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from .analytic import analytic_sample, check_moments
from .ddim import ddim_sample
from .ddpm import ddpm_sample
from .dpm_solver import dpm_solver_sample
from .guidance import GuidedModel, cycle_labels
from .loss import Model, check_prediction
from .options import (
    DEFAULT_SPACING,
    DEFAULT_STEPS,
    MOMENT_SAMPLERS,
    SAMPLERS,
    SamplingOptions,
)
from .schedule import NoiseSchedule, timesteps
from .seeding import SAMPLER_NOISE_STREAM, PerImageRandn, _as_indices, initial_noise

__all__ = ["DEFAULT_SPACING", "DEFAULT_STEPS", "SAMPLERS", "initial_noise", "sample"]

# sample()'s own defaults for the settings that options= may carry instead.
_KEYWORD_DEFAULTS = dict(
    sampler="ddpm", steps=None, spacing=None, eta=0.0, threshold=None, seed=0, moments=None,
    labels=None, guidance=None,
)  # fmt: skip


def sample(
    model: Model,
    x_T: torch.Tensor,
    sampler: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    threshold: float | None = None,
    seed: int = 0,
    schedule: NoiseSchedule | None = None,
    progress: bool = False,
    indices: Sequence[int] | torch.Tensor | None = None,
    prediction: str = "eps",
    clip_x0: bool = True,
    spacing: str | None = None,
    moments: torch.Tensor | None = None,
    *,
    labels: Sequence[int] | torch.Tensor | None = None,
    guidance: float | None = None,
    options: SamplingOptions | None = None,
) -> torch.Tensor:
    """Generate images from the initial noise ``x_T``.

    Args:
        model: ``model(x_t [B,C,H,W] float32, t [B] int64) -> eps`` (or ``v``); put it in eval
            mode first. If it has ``validate_input(x)``, that is called on ``x_T`` first.
        x_T: ``[B, C, H, W]`` initial noise, N(0, I); :func:`initial_noise` draws it with the
            same per-image seeds.
        sampler: ``"ddpm"`` (ancestral, published), ``"ddim"``, ``"dpm-solver++"`` (2M),
            ``"dpm-solver++3m"`` (third-order multistep) or ``"analytic-ddpm"`` /
            ``"analytic-ddim"`` (Analytic-DPM, Bao et al. 2022: needs ``moments``).
        steps: model calls. ``None``: the sampler's natural default, every step of the
            schedule (1000) for DDPM, 100 for DDIM, 20 for DPM-Solver++ (2M and 3M), 50 for
            Analytic-DPM (capped at ``T``).
            Must be in ``[1, T]``; DDPM with fewer than ``T`` steps is respaced.
        eta: DDIM only: 0 deterministic, 1 the DDPM posterior variance.
        threshold: the paper's threshold guidance: every spiking neuron's threshold is
            ``threshold`` while sampling, restored afterwards (also on error). ``None``: as is.
        seed, indices: the noise a stochastic sampler adds to image ``b`` comes from its own
            generator seeded by ``(seed, indices[b])`` (``indices`` default ``range(B)``), so an
            image does not depend on the batch size or on how the work is split.
        schedule: the noise schedule; default :meth:`NoiseSchedule.linear` (1e-4..0.02, 1000).
        progress: show a tqdm bar over the steps.
        prediction: what the model outputs, ``"eps"`` or ``"v"``.
        clip_x0: clip every x0 estimate (and so the result) to [-1, 1] (published behaviour).
        spacing: the step grid (see :func:`sddpm.diffusion.timesteps`); default per sampler:
            ``"linear"`` for respaced DDPM, ``"uniform"`` (published) for DDIM, ``"logsnr"``
            for DPM-Solver++, ``"linear"`` for Analytic-DPM.
        moments: Analytic-DPM only: ``[T]`` ``Gamma_t = E||eps(x_t, t)||^2 / d`` from
            :func:`sddpm.diffusion.estimate_eps_moments`, finite at every step of the grid.
        labels: a class-conditional model's classes, cycled over the image indices: image
            ``b`` gets ``labels[indices[b] % len(labels)]`` (so ``labels`` of length ``B`` with
            the default indices is one label per image). ``None``: the model as it is called
            without labels (the null class of a conditional model).
        guidance: classifier-free guidance weight w >= 0 with ``labels``
            (:class:`~sddpm.diffusion.GuidedModel`: one batched call of 2B images per step; w = 1
            calls the conditional model alone); ``None``: the default
            (:data:`sddpm.diffusion.DEFAULT_GUIDANCE`).
        options: the same settings (``sampler``, ``steps``, ``spacing``, ``eta``,
            ``threshold``, ``seed``, ``moments``, ``labels``, ``guidance``) as one
            :class:`SamplingOptions`, instead of the keywords; its batching, autocast, compile,
            kernel and device fields are not used here (see
            :func:`sddpm.generation.generate_batches`).

    Returns:
        ``x_0`` ``[B, C, H, W]`` float32, in [-1, 1] when ``clip_x0``.

    Raises:
        ValueError: before any model call, for an unknown sampler, prediction or spacing,
            ``steps`` outside ``[1, T]``, ``threshold <= 0``, ``eta`` < 0 or given to a sampler
            other than DDIM, an ``x_T`` that is not a 4-D floating tensor or that the model
            rejects, ``indices`` that do not match the batch, keywords together with
            ``options``, or (Analytic-DPM) missing ``moments`` or NaN moments at a step of
            the grid; labels out of the model's range or given to an unconditional model, or a
            guidance other than 1 without labels.
    """
    # ---- validate everything before any work
    keywords = dict(
        sampler=sampler, steps=steps, spacing=spacing, eta=eta, threshold=threshold, seed=seed,
        moments=moments, labels=labels, guidance=guidance,
    )  # fmt: skip
    if options is None:
        options = SamplingOptions(**keywords)
    elif not isinstance(options, SamplingOptions):
        raise TypeError(f"options must be a SamplingOptions, got {type(options).__name__}")
    elif both := [k for k, v in keywords.items() if not _is_default(v, _KEYWORD_DEFAULTS[k])]:
        raise ValueError(f"give the sampling settings as keywords or as options=, not both {both}")
    check_prediction(prediction)
    schedule = NoiseSchedule.linear() if schedule is None else schedule
    if not isinstance(schedule, NoiseSchedule):
        raise ValueError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    n = options.steps_for(schedule.T)
    spacing = options.resolved_spacing
    sampler, eta, threshold, seed = options.sampler, options.eta, options.threshold, options.seed
    if threshold is not None and not isinstance(model, nn.Module):
        raise ValueError("threshold guidance needs a torch.nn.Module with spiking neurons")
    moments = options.moments
    if sampler in MOMENT_SAMPLERS:
        moments = check_moments(moments, schedule, timesteps(schedule, n, spacing))
    if not isinstance(x_T, torch.Tensor) or x_T.dim() != 4:
        shape = tuple(x_T.shape) if isinstance(x_T, torch.Tensor) else type(x_T).__name__
        raise ValueError(f"x_T must be a 4-D tensor [B, C, H, W], got {shape}")
    if not x_T.is_floating_point():
        raise ValueError(f"x_T must be a floating-point tensor, got {x_T.dtype}")
    batch = x_T.shape[0]
    idx = list(range(batch)) if indices is None else _as_indices(indices)
    if len(idx) != batch:
        raise ValueError(f"{len(idx)} indices given for a batch of {batch} images")
    if options.labels is not None:
        # Checked here, on the host (range and an unconditional model: GuidedModel).
        model = GuidedModel(model, cycle_labels(idx, options.labels), options.resolved_guidance)
    elif options.guidance is not None:
        raise ValueError(
            f"guidance={options.guidance:g} needs class labels (labels=...); a model sampled "
            "without labels takes guidance 1"
        )
    validate = getattr(model, "validate_input", None)
    if callable(validate):
        validate(x_T)

    threshold_guidance = (
        _override_threshold(model, threshold) if threshold is not None else contextlib.nullcontext()
    )
    x = x_T.to(torch.float32)
    with torch.inference_mode(), threshold_guidance:
        if sampler == "ddpm":
            noise = PerImageRandn(idx, int(seed), SAMPLER_NOISE_STREAM, x.device)
            out = ddpm_sample(
                model, x, schedule, steps=n, spacing=spacing, prediction=prediction,
                clip_x0=clip_x0, randn_like=noise.randn_like, progress=progress,
            )  # fmt: skip
        elif sampler == "ddim":
            noise = PerImageRandn(idx if eta > 0 else [], int(seed), SAMPLER_NOISE_STREAM, x.device)
            out = ddim_sample(
                model, x, schedule, steps=n, eta=float(eta), spacing=spacing,
                prediction=prediction, clip_x0=clip_x0, randn_like=noise.randn_like,
                progress=progress,
            )  # fmt: skip
        elif sampler in MOMENT_SAMPLERS:
            noise = PerImageRandn(idx, int(seed), SAMPLER_NOISE_STREAM, x.device)
            out = analytic_sample(
                model, x, schedule, moments, steps=n, variant=sampler.removeprefix("analytic-"),
                spacing=spacing, prediction=prediction, clip_x0=clip_x0,
                randn_like=noise.randn_like, progress=progress,
            )  # fmt: skip
        else:
            out = dpm_solver_sample(
                model, x, schedule, steps=n, spacing=spacing, prediction=prediction,
                order=3 if sampler == "dpm-solver++3m" else 2, clip_x0=clip_x0, progress=progress,
            )  # fmt: skip
    # An inference tensor cannot enter autograd later; a clone made outside the mode can.
    return out.clone()


def _is_default(value, default) -> bool:
    return value is default or (not isinstance(value, torch.Tensor) and value == default)


def _override_threshold(model: nn.Module, value: float):
    # Imported here: diffusion works with any model; only threshold guidance needs the SNN.
    from sddpm.snn import override_threshold

    return override_threshold(model, value)
