"""DPM-Solver++(2M): the multistep second-order solver of the diffusion ODE in data prediction
(Lu et al. 2022, "DPM-Solver++", Algorithm 2), on the discrete steps of a schedule.

With ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)`` and
``lambda_t = log(alpha_t / sigma_t)`` (half the log-SNR), each model call gives a data estimate
``D_i = x0(x_{t_i}, t_i)`` (optionally clipped to [-1, 1]) and the step ``t_i -> t_{i+1}`` with
``h = lambda_{t_{i+1}} - lambda_{t_i}`` is

    x_{t_{i+1}} = (sigma_{t_{i+1}} / sigma_{t_i}) x_{t_i} + alpha_{t_{i+1}} (1 - e^{-h}) D

where ``D = D_i`` on the first step (DPM-Solver++ 1, i.e. DDIM) and afterwards the
second-order multistep combination ``D = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}`` with
``r = h_{i-1} / h``. After the last grid point the solver jumps to clean data (sigma = 0,
h = infinity), where the first-order update is exactly ``D`` (the "lower order final" step).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .loss import Model, check_prediction, output_to_x0
from .schedule import NoiseSchedule, timesteps


def _alpha_sigma_lambda(schedule: NoiseSchedule, t: int) -> tuple[float, float, float]:
    abar = float(schedule.alphas_cumprod[t])
    return math.sqrt(abar), math.sqrt(1.0 - abar), 0.5 * float(schedule.log_snr[t])


def dpm_solver_pp_step(
    x_t: torch.Tensor,
    d: torch.Tensor,
    d_prev: torch.Tensor | None,
    t: int,
    t_next: int,
    t_prev: int | None,
    schedule: NoiseSchedule,
) -> torch.Tensor:
    """One DPM-Solver++(2M) step ``x_t -> x_{t_next}``, ``[B, C, H, W]`` float32.

    Args:
        x_t: the current sample.
        d: the data estimate at ``(x_t, t)``; ``d_prev`` the one at the previous grid point
            ``t_prev`` (``None``, or ``t_prev=None``: first-order step).
        t, t_next, t_prev: steps of ``schedule`` with ``t_prev > t > t_next >= -1``;
            ``t_next = -1`` means clean data, for which the result is ``d``.
    """
    if t_next == -1:
        return d
    if not -1 < t_next < t:
        raise ValueError(f"need 0 <= t_next < t, got t={t}, t_next={t_next}")
    _, sigma_t, lam_t = _alpha_sigma_lambda(schedule, t)
    alpha_n, sigma_n, lam_n = _alpha_sigma_lambda(schedule, t_next)
    h = lam_n - lam_t
    if d_prev is None or t_prev is None:
        d_eff = d
    else:
        _, _, lam_p = _alpha_sigma_lambda(schedule, t_prev)
        r = (lam_t - lam_p) / h
        d_eff = (1.0 + 0.5 / r) * d - (0.5 / r) * d_prev
    # -expm1(-h) = 1 - e^{-h}, accurate for small h.
    return (sigma_n / sigma_t) * x_t + (alpha_n * -math.expm1(-h)) * d_eff


def dpm_solver_sample(
    model: Model,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int = 20,
    spacing: str = "logsnr",
    order: int = 2,
    prediction: str = "eps",
    clip_x0: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Deterministic DPM-Solver++ from ``x_T`` ``[B, C, H, W]`` (float32, N(0, I)) to x0.

    ``steps`` model calls on :func:`timesteps` ``(schedule, steps, spacing)``; the default
    ``"logsnr"`` grid (uniform in log-SNR from ``T - 1`` to ``0``) is the one the solver's
    error analysis assumes, and in the closed-form Gaussian test it is far more accurate than a
    grid uniform in t (see tests/diffusion/test_closed_form.py). ``order=1`` is DDIM on the
    same grid. Returns ``[B, C, H, W]``, in [-1, 1] when ``clip_x0``.
    """
    check_prediction(prediction)
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    grid = timesteps(schedule, steps, spacing)
    x = x_T
    batch = x.shape[0]
    d_prev: torch.Tensor | None = None
    t_prev: int | None = None
    for k, t in enumerate(tqdm(grid, desc="dpm-solver++", disable=not progress)):
        t_next = grid[k + 1] if k + 1 < len(grid) else -1
        t_vec = torch.full((batch,), t, dtype=torch.int64, device=x.device)
        d = output_to_x0(model(x, t_vec), x, t_vec, schedule, prediction)
        if clip_x0:
            d = d.clamp(-1.0, 1.0)
        x = dpm_solver_pp_step(x, d, d_prev if order == 2 else None, t, t_next, t_prev, schedule)
        d_prev, t_prev = d, t
    return x
