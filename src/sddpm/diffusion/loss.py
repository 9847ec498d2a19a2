"""The training objective and the model-output parameterisations.

Ho et al. (2020), Algorithm 1, as the published ``GaussianDiffusionTrainer`` computes it: draw
``t ~ U{0..T-1}`` and ``eps ~ N(0, I)``, form ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``
and regress the model output on ``eps`` with a per-pixel squared error.

With ``prediction="v"`` the target is ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0``
(Salimans & Ho 2022). The conversions below turn either output into eps or x_0, so every sampler
accepts both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .schedule import NoiseSchedule

PREDICTIONS = ("eps", "v")

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_prediction(prediction: str) -> str:
    """Return ``prediction`` if it is ``"eps"`` or ``"v"``, else raise ``ValueError``."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
    return prediction


def extract(table: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``table[t]`` as float32 ``[B, 1, 1, 1]`` (one value per sample) on ``x``'s device.

    ``table`` is a float64 ``[T]`` schedule table; the cast to float32 after the gather is the
    published ``extract(...).float()``.
    """
    # A table already on t's device (NoiseSchedule.to) is gathered without a host copy.
    out = table.to(t.device)[t].to(device=x.device, dtype=torch.float32)
    return out.view([t.shape[0]] + [1] * (x.dim() - 1))


def q_sample(
    x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: NoiseSchedule
) -> torch.Tensor:
    """``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise``.

    ``x0`` and ``noise`` are ``[B, ...]``, ``t`` is ``[B]`` int64; returns ``[B, ...]`` float32.
    """
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x0) * x0
        + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise
    )


def v_target(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule
) -> torch.Tensor:
    """``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0`` (Salimans & Ho 2022, Sec. 4)."""
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x0) * noise
        - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0
    )


def output_to_eps(
    output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    prediction: str = "eps",
) -> torch.Tensor:
    """The noise estimate from a model output ``[B, ...]``.

    ``eps``: as is; ``v``: ``sqrt(1 - abar) x_t + sqrt(abar) v``.
    """
    if check_prediction(prediction) == "eps":
        return output
    return (
        extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
        + extract(schedule.sqrt_alphas_cumprod, t, x_t) * output
    )


def output_to_x0(
    output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    prediction: str = "eps",
) -> torch.Tensor:
    """The clean-data estimate from a model output, unclipped.

    ``eps``: ``x_t / sqrt(abar) - sqrt(1/abar - 1) eps`` (the published
    ``predict_xstart_from_eps``); ``v``: ``sqrt(abar) x_t - sqrt(1 - abar) v``.
    """
    if check_prediction(prediction) == "eps":
        return (
            extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t) * output
        )
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x_t) * x_t
        - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * output
    )


def draw_t_and_noise(
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``t ~ U{0..T-1}`` ``[B]`` int64 and ``noise ~ N(0, I)`` shaped like ``x0``.

    Drawn in the published order (t first, then noise) from ``generator`` (or torch's global
    generator when it is ``None``); ``generator`` must live on ``x0``'s device.
    """
    t = torch.randint(
        schedule.T, (x0.shape[0],), generator=generator, device=x0.device, dtype=torch.int64
    )
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return t, noise


def loss_map(
    model: Model,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    prediction: str = "eps",
    check_t: bool = True,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pixel training loss ``[B, C, H, W]`` (published ``F.mse_loss(..., reduction='none')``).

    Args:
        model: ``model(x_t [B,C,H,W] float32, t [B] int64) -> eps`` (or ``v``).
        x0: clean images ``[B, C, H, W]`` in [-1, 1].
        schedule: the noise schedule.
        t, noise: the diffusion steps ``[B]`` and the noise ``[B, C, H, W]``; each one not given
            is drawn from ``generator`` (see :func:`draw_t_and_noise`).
        prediction: ``"eps"`` (target ``noise``) or ``"v"`` (target :func:`v_target`).
        check_t: check a given ``t`` lies in ``[0, T)``. The check reads ``t`` back, so it
            runs for CPU tensors only (an accelerator's step never waits on a host read); a
            caller that validated ``t`` on the host where it drew it passes ``False``. A drawn
            ``t`` is in range by construction.
        y: class labels ``[B]`` int64 for a class-conditional model (``model(x_t, t, y)``),
            checked by the caller on the host; ``None``: ``model(x_t, t)``.
    """
    check_prediction(prediction)
    if x0.dim() < 2:
        raise ValueError(f"x0 must be a batch [B, ...], got shape {tuple(x0.shape)}")
    if t is None:
        check_t = False  # drawn below, in range by construction
    if t is None or noise is None:
        t_drawn, noise_drawn = draw_t_and_noise(x0, schedule, generator)
        t = t_drawn if t is None else t
        noise = noise_drawn if noise is None else noise
    if t.shape != (x0.shape[0],):
        raise ValueError(f"t must have shape [{x0.shape[0]}], got {tuple(t.shape)}")
    if noise.shape != x0.shape:
        raise ValueError(
            f"noise shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}"
        )
    if check_t and t.device.type == "cpu" and (int(t.min()) < 0 or int(t.max()) >= schedule.T):
        raise ValueError(f"t must be in [0, {schedule.T - 1}], got {int(t.min())}..{int(t.max())}")
    x_t = q_sample(x0, t, noise, schedule)
    target = noise if prediction == "eps" else v_target(x0, noise, t, schedule)
    out = model(x_t, t) if y is None else model(x_t, t, y)
    return (out - target).square()


def training_loss(
    model: Model,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    prediction: str = "eps",
    check_t: bool = True,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample loss ``[B]``: :func:`loss_map` averaged over every non-batch axis.

    Its mean over the batch equals the published ``loss.mean()``.
    """
    per_pixel = loss_map(
        model,
        x0,
        schedule,
        t=t,
        noise=noise,
        generator=generator,
        prediction=prediction,
        check_t=check_t,
        y=y,
    )
    return per_pixel.flatten(1).mean(dim=1)
