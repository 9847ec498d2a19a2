"""DDIM sampling (Song et al. 2021, Eq. 12) with any eta and any number of steps.

One step from ``t`` to an earlier step ``s`` (``s = -1`` means clean data, ``abar = 1``), as
the published SDDPM ``sample_type="ddim"`` branch computes it:

    x0    = clip((x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), -1, 1)
    c1    = eta * sqrt((1 - abar_t / abar_s) (1 - abar_s) / (1 - abar_t))
    c2    = sqrt(1 - abar_s - c1^2)
    x_s   = sqrt(abar_s) x0 + c2 eps + c1 noise

(the direction term uses the model's raw ``eps``, not one recomputed from the clipped x0).

Grid: the published sampler walks ``int(T - 1 - i T / N)`` for ``i < N`` and then to ``t = 0``,
returning ``x`` at ``t = 0`` (residual noise sqrt(1 - abar_0) = 0.01, and only N - 1 model
calls when N = T). Here the last step goes from the last grid point to clean data instead, so N
steps are N model calls and the result is the (clipped) x0 estimate; the other steps are the
published ones. With eta = 1 on all T steps this is ancestral DDPM with ``fixedsmall`` variance.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from .loss import Model, check_prediction, output_to_eps
from .schedule import NoiseSchedule, timesteps


def _abar(schedule: NoiseSchedule, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """float64 ``abar_t`` ``[B, 1, 1, 1]`` on x's device, with ``abar_{-1} = 1`` (clean)."""
    table = torch.cat([schedule.alphas_cumprod.new_ones(1), schedule.alphas_cumprod])
    out = table.to(t.device)[t + 1].to(x.device)
    return out.view([t.shape[0]] + [1] * (x.dim() - 1))


def ddim_step(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    prediction: str = "eps",
    clip_x0: bool = True,
) -> torch.Tensor:
    """One DDIM step ``x_t -> x_{t_prev}``; returns ``x_{t_prev}`` ``[B, C, H, W]`` float32.

    Args:
        model_output: the model's ``eps`` (or ``v``) at ``(x_t, t)``, ``[B, C, H, W]``.
        t, t_prev: ``[B]`` int64 steps with ``0 <= t_prev < t``, or ``t_prev = -1`` for clean
            data (then the result is the x0 estimate).
        eta: 0 is deterministic DDIM; 1 gives the DDPM posterior variance.
        noise: ``N(0, I)`` like ``x_t``; needed when ``eta > 0``.
    """
    check_prediction(prediction)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if bool((t_prev >= t).any()) or bool((t_prev < -1).any()):
        raise ValueError("need -1 <= t_prev < t for every sample")
    abar_t = _abar(schedule, t, x_t)
    abar_s = _abar(schedule, t_prev, x_t)
    eps = output_to_eps(model_output, x_t, t, schedule, prediction)
    f32 = torch.float32
    x0 = (x_t - torch.sqrt(1 - abar_t).to(f32) * eps) / torch.sqrt(abar_t).to(f32)
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
    c1 = eta * torch.sqrt((1 - abar_t / abar_s) * (1 - abar_s) / (1 - abar_t))
    c2 = torch.sqrt((1 - abar_s - c1**2).clamp(min=0))
    x_prev = torch.sqrt(abar_s).to(f32) * x0 + c2.to(f32) * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        x_prev = x_prev + c1.to(f32) * noise
    return x_prev


def ddim_sample(
    model: Model,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int = 100,
    eta: float = 0.0,
    spacing: str = "uniform",
    prediction: str = "eps",
    clip_x0: bool = True,
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM from ``x_T`` ``[B, C, H, W]`` (float32, N(0, I)) to the x0 estimate.

    ``steps`` model calls on :func:`timesteps` ``(schedule, steps, spacing)`` (``"uniform"``,
    the published grid, or ``"quadratic"``), then a last jump to clean data. ``randn_like`` is
    called once per step that adds noise (``eta > 0`` and not the last step).
    Returns ``[B, C, H, W]``, in [-1, 1] when ``clip_x0``.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    grid = timesteps(schedule, steps, spacing)
    x = x_T
    batch = x.shape[0]
    for k, t in enumerate(tqdm(grid, desc="ddim", disable=not progress)):
        s = grid[k + 1] if k + 1 < len(grid) else -1
        t_vec = torch.full((batch,), t, dtype=torch.int64, device=x.device)
        s_vec = torch.full((batch,), s, dtype=torch.int64, device=x.device)
        out = model(x, t_vec)
        noise = randn_like(x) if eta > 0 and s >= 0 else None
        x = ddim_step(
            out,
            x,
            t_vec,
            s_vec,
            schedule,
            eta=eta if s >= 0 else 0.0,
            noise=noise,
            prediction=prediction,
            clip_x0=clip_x0,
        )
    return x
