"""Analytic-DPM (Bao et al., "Analytic-DPM: an Analytic Estimate of the Optimal Reverse Variance
in Diffusion Probabilistic Models", ICLR 2022): the optimal reverse variance of a trained
eps-model, from one moment of its output, without retraining.

On a trajectory of steps ``s > r`` (``r = -1``: clean data), with ``abar``, ``bbar = 1 - abar``,
``a_{s|r} = abar_s / abar_r`` and a base variance ``lambda^2`` (DDPM's posterior variance
``bbar_r / bbar_s (1 - a_{s|r})`` for ``"analytic-ddpm"``, 0 for ``"analytic-ddim"``), the
reverse kernel ``p(x_r | x_s) = N(mean, sigma*^2 I)`` has (the paper's Theorem 1, its
trajectory form in Sec. 4)

    mean    = sqrt(abar_r) x0 + sqrt(bbar_r - lambda^2) (x_s - sqrt(abar_s) x0) / sqrt(bbar_s)
    sigma*^2 = lambda^2 + (sqrt(bbar_s / a_{s|r}) - sqrt(bbar_r - lambda^2))^2 (1 - Gamma_s)

with ``x0`` the model's (clipped) data estimate and ``Gamma_s = E ||eps_model(x_s, s)||^2 / d``
over ``x_s ~ q(x_s)``, estimated once from training images (:func:`estimate_eps_moments`).
The estimate is clipped to the paper's bounds (Theorem 2, for data in ``[a, b]^d``; ours
``[-1, 1]``, so ``(b - a) / 2 = 1``):

    lambda^2 <= sigma*^2 <= lambda^2 + (sqrt(abar_r) - sqrt(bbar_r - lambda^2)
                                        sqrt(abar_s / bbar_s))^2 ((b - a) / 2)^2.

For ``lambda^2`` of DDPM the mean is the usual posterior mean; for ``lambda = 0`` it is DDIM's.
The last step (from the grid's last point to clean data) returns the x0 estimate, as DDPM does.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..io import atomic_path
from .loss import Model, check_prediction, output_to_eps, output_to_x0
from .schedule import NoiseSchedule, timesteps
from .seeding import image_seed

ANALYTIC_VARIANTS = ("ddpm", "ddim")
DATA_HALF_RANGE = 1.0  # (b - a) / 2 for data in [-1, 1]
MOMENTS_NOISE_STREAM = 2  # seeding streams: 0 initial noise, 1 sampler noise

__all__ = [
    "ANALYTIC_VARIANTS",
    "analytic_sample",
    "analytic_step_variance",
    "check_moments",
    "estimate_eps_moments",
    "load_moments",
    "save_moments",
]


@torch.inference_mode()
def estimate_eps_moments(
    model: Model,
    images: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    timesteps: Sequence[int] | torch.Tensor | None = None,
    batch_size: int = 64,
    repeats: int = 1,
    seed: int = 0,
    prediction: str = "eps",
    progress: bool = False,
) -> torch.Tensor:
    """Monte Carlo estimate of ``Gamma_t = E ||eps_model(x_t, t)||^2 / d`` (Analytic-DPM).

    Args:
        model: any ``model(x_t [B,C,H,W] float32, t [B] int64) -> eps`` (or ``v``) callable;
            put a module in eval mode first.
        images: ``[N, C, H, W]`` training images in [-1, 1] (on the device the model runs on).
        schedule: the noise schedule (``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``).
        timesteps: the steps to estimate; ``None``: all ``T``. The others are NaN.
        batch_size: images per model call.
        repeats: noise draws per image and step (the estimate averages ``N * repeats`` terms).
        seed: the noise of step t comes from its own generator, seeded by ``(seed, t)``
            (:func:`sddpm.diffusion.image_seed`): the same seed, images and batch size give the
            same estimate, whichever steps are asked for.
        prediction: what the model outputs, ``"eps"`` or ``"v"``.

    Returns:
        ``[T]`` float64, ``Gamma_t`` at the requested steps and NaN elsewhere.
    """
    check_prediction(prediction)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] < 1:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a non-empty [N, C, H, W] tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [-1, 1], got {images.dtype}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if int(repeats) != repeats or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    T = schedule.T
    if timesteps is None:
        steps = list(range(T))
    else:
        steps = sorted({int(t) for t in torch.as_tensor(timesteps).flatten().tolist()})
        bad = [t for t in steps if not 0 <= t < T]
        if not steps or bad:
            raise ValueError(f"timesteps must be steps in [0, {T - 1}], got {bad or 'none'}")
    out = torch.full((T,), float("nan"), dtype=torch.float64)
    x0_all = images.to(torch.float32)
    n, d = x0_all.shape[0], x0_all[0].numel()
    for t in tqdm(steps, desc="eps moments", disable=not progress):
        gen = torch.Generator().manual_seed(image_seed(int(seed), t, MOMENTS_NOISE_STREAM))
        a = math.sqrt(float(schedule.alphas_cumprod[t]))
        sigma = math.sqrt(1.0 - float(schedule.alphas_cumprod[t]))
        total = 0.0
        for _ in range(int(repeats)):
            for start in range(0, n, int(batch_size)):
                x0 = x0_all[start : start + int(batch_size)]
                noise = torch.randn(x0.shape, generator=gen).to(x0.device)
                x_t = a * x0 + sigma * noise
                t_vec = torch.full((x0.shape[0],), t, dtype=torch.int64, device=x0.device)
                eps = output_to_eps(model(x_t, t_vec), x_t, t_vec, schedule, prediction)
                total += float(eps.double().square().sum())
        out[t] = total / (n * int(repeats) * d)
    return out


def check_moments(moments, schedule: NoiseSchedule, needed: Sequence[int]) -> torch.Tensor:
    """``moments`` as a float64 ``[T]`` tensor; ``ValueError`` naming the problem when it is
    missing, mis-shaped, or NaN/infinite at a step in ``needed``."""
    if moments is None:
        raise ValueError(
            "the analytic samplers need moments: Gamma_t = E||eps(x_t, t)||^2 / d per step, "
            "from sddpm.diffusion.estimate_eps_moments(model, images, schedule) or the "
            "`sddpm eps-moments` command (pass moments=...)"
        )
    m = torch.as_tensor(moments).detach().to("cpu", torch.float64).flatten()
    if m.numel() != schedule.T:
        raise ValueError(
            f"moments must hold one value per diffusion step ({schedule.T}), got {m.numel()}"
        )
    missing = [int(t) for t in needed if not math.isfinite(float(m[t]))]
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
        raise ValueError(
            f"moments are NaN at step(s) {shown} that this trajectory needs; estimate them at "
            "the sampler's steps and spacing (estimate_eps_moments(..., timesteps=timesteps("
            "schedule, steps, spacing)); CLI: `sddpm eps-moments --steps N --spacing S`), or at "
            "all steps"
        )
    return m


def analytic_step_variance(
    schedule: NoiseSchedule, s: int, r: int, gamma_s: float, variant: str = "ddpm"
) -> tuple[float, float]:
    """``(sigma^2, lambda^2)`` of the reverse step ``s -> r`` (``0 <= r < s``): the optimal
    variance for ``Gamma_s = gamma_s``, clipped to the paper's bounds (module docstring)."""
    if variant not in ANALYTIC_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {ANALYTIC_VARIANTS}")
    abar_s, abar_r = float(schedule.alphas_cumprod[s]), float(schedule.alphas_cumprod[r])
    bbar_s, bbar_r = 1.0 - abar_s, 1.0 - abar_r
    a_sr = abar_s / abar_r
    lam2 = bbar_r / bbar_s * (1.0 - a_sr) if variant == "ddpm" else 0.0
    c = math.sqrt(bbar_r - lam2)
    optimal = lam2 + (math.sqrt(bbar_s / a_sr) - c) ** 2 * (1.0 - gamma_s)
    # Bao et al. 2022, Theorem 2: lambda^2 <= sigma*^2 <= lambda^2 + (sqrt(abar_r) -
    # sqrt(bbar_r - lambda^2) sqrt(abar_s / bbar_s))^2 ((b - a) / 2)^2.
    upper = lam2 + (math.sqrt(abar_r) - c * math.sqrt(abar_s / bbar_s)) ** 2 * DATA_HALF_RANGE**2
    return min(max(optimal, lam2), upper), lam2


def analytic_sample(
    model: Model,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    moments: torch.Tensor,
    *,
    steps: int = 50,
    variant: str = "ddpm",
    spacing: str = "linear",
    prediction: str = "eps",
    clip_x0: bool = True,
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    progress: bool = False,
) -> torch.Tensor:
    """Analytic-DPM from ``x_T`` ``[B, C, H, W]`` (float32, N(0, I)) to the x0 estimate.

    ``steps`` model calls on :func:`timesteps` ``(schedule, steps, spacing)`` (default
    ``"linear"``: both ``T - 1`` and ``0``, the paper's even trajectory), each a Gaussian step
    with the analytic variance (``variant`` ``"ddpm"`` or ``"ddim"``, module docstring); the
    last one jumps to clean data without noise. ``moments``: ``[T]`` ``Gamma_t``, finite at
    every grid point. ``randn_like(x)`` is called once per step that adds noise.
    Returns ``[B, C, H, W]``, in [-1, 1] when ``clip_x0``.
    """
    check_prediction(prediction)
    if variant not in ANALYTIC_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {ANALYTIC_VARIANTS}")
    grid = timesteps(schedule, steps, spacing)
    gamma = check_moments(moments, schedule, grid)
    x = x_T
    batch = x.shape[0]
    for k, s in enumerate(tqdm(grid, desc=f"analytic-{variant}", disable=not progress)):
        r = grid[k + 1] if k + 1 < len(grid) else -1
        t_vec = torch.full((batch,), s, dtype=torch.int64, device=x.device)
        x0 = output_to_x0(model(x, t_vec), x, t_vec, schedule, prediction)
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
        if r == -1:
            x = x0
            break
        var, lam2 = analytic_step_variance(schedule, s, r, float(gamma[s]), variant)
        abar_s, abar_r = float(schedule.alphas_cumprod[s]), float(schedule.alphas_cumprod[r])
        eps = (x - math.sqrt(abar_s) * x0) / math.sqrt(1.0 - abar_s)
        mean = math.sqrt(abar_r) * x0 + math.sqrt(1.0 - abar_r - lam2) * eps
        x = mean + math.sqrt(var) * randn_like(x)
    return x


MOMENTS_KEY = "moments"


def save_moments(
    path: str | os.PathLike,
    moments: torch.Tensor,
    schedule: NoiseSchedule,
    info: Mapping[str, Any] | None = None,
) -> None:
    """Write ``moments`` (``[T]`` float64, NaN where not estimated) to a safetensors file,
    atomically, with the schedule and ``info`` (JSON-able: images, seed, ...) as metadata."""
    m = torch.as_tensor(moments).detach().to("cpu", torch.float64).flatten().contiguous()
    if m.numel() != schedule.T:
        raise ValueError(f"moments hold {m.numel()} values for a schedule of {schedule.T} steps")
    meta = {"format": "sddpm.eps_moments", "schedule": json.dumps(schedule.to_dict())}
    meta["info"] = json.dumps(dict(info or {}))
    with atomic_path(path) as tmp:
        save_file({MOMENTS_KEY: m}, str(tmp), metadata=meta)


def load_moments(path: str | os.PathLike, schedule: NoiseSchedule | None = None) -> torch.Tensor:
    """The ``[T]`` float64 moments written by :func:`save_moments` (``sddpm eps-moments``).

    With ``schedule``, the file must have been made for that schedule. Raises
    ``FileNotFoundError`` or ``ValueError`` naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such moments file (write one with estimate_eps_moments + save_moments; "
            "CLI: `sddpm eps-moments`)"
        )
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            m = f.get_tensor(MOMENTS_KEY) if MOMENTS_KEY in keys else None
    except Exception as err:  # safetensors raises its own error types for a foreign file
        raise ValueError(f"{path} is not a safetensors file ({err})") from None
    if m is None or meta.get("format") != "sddpm.eps_moments":
        raise ValueError(
            f"{path} is not an eps-moments file (it holds {keys[:5]}); make one with "
            "`sddpm eps-moments` or sddpm.diffusion.save_moments"
        )
    if m.dim() != 1:
        raise ValueError(f"{path}: moments must be a [T] vector, got shape {list(m.shape)}")
    if schedule is not None:
        made_for = json.loads(meta.get("schedule", "{}"))
        if m.numel() != schedule.T or made_for != schedule.to_dict():
            raise ValueError(
                f"{path} was estimated for the schedule {made_for}, not for this model's "
                f"{schedule.to_dict()}: estimate the moments again with this model"
            )
    return m.to(torch.float64)
