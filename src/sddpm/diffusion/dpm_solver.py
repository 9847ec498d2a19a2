"""DPM-Solver++(2M) and (3M): the multistep second- and third-order solvers of the diffusion ODE
in data prediction (Lu et al. 2022, "DPM-Solver++", Algorithm 2 and its third-order multistep
form), on the discrete steps of a schedule.

With ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)`` and
``lambda_t = log(alpha_t / sigma_t)`` (half the log-SNR), each model call gives a data estimate
``D_i = x0(x_{t_i}, t_i)`` (optionally clipped to [-1, 1]) and the step ``t_i -> t_{i+1}`` with
``h = lambda_{t_{i+1}} - lambda_{t_i}`` is

    x_{t_{i+1}} = (sigma_{t_{i+1}} / sigma_{t_i}) x_{t_i} + alpha_{t_{i+1}} (1 - e^{-h}) D

where ``D = D_i`` on the first step (DPM-Solver++ 1, i.e. DDIM) and afterwards the
second-order multistep combination ``D = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}`` with
``r = h_{i-1} / h``. After the last grid point the solver jumps to clean data (sigma = 0,
h = infinity), where the first-order update is exactly ``D`` (the "lower order final" step).

Third order (3M, from the third model call on): the exact solution of a step is
``(sigma_{t_{i+1}} / sigma_{t_i}) x + sigma_{t_{i+1}} int e^lambda x0(lambda) d lambda``; with
``x0(lambda_i + u) ~ D_i + (u / h) D1 + (u / h)^2 D2``, the quadratic through the last three data
estimates (``r0 = h_{i-1} / h``, ``r1 = h_{i-2} / h``, ``D1_0 = (D_i - D_{i-1}) / r0``,
``D1_1 = (D_{i-1} - D_{i-2}) / r1``, ``D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1)``,
``D2 = (D1_0 - D1_1) / (r0 + r1)``), the integral is exact:

    x_{t_{i+1}} = (sigma_{i+1} / sigma_i) x + alpha_{i+1} (phi1 D_i + (1 - phi1 / h) D1
                  + (1 - 2 (h - phi1) / h^2) D2),       phi1 = 1 - e^{-h}.

So a step is exact whenever x0 is quadratic in lambda (tested). In the closed-form Gaussian test
3M is far more accurate than 2M from 15 steps on, but worse at 10 or fewer (large h: the
quadratic extrapolation overshoots): see tests/diffusion/test_closed_form.py.
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
    *,
    d_prev2: torch.Tensor | None = None,
    t_prev2: int | None = None,
) -> torch.Tensor:
    """One DPM-Solver++(2M) step ``x_t -> x_{t_next}``, ``[B, C, H, W]`` float32, or with
    ``d_prev2`` a (3M) step.

    Args:
        x_t: the current sample.
        d: the data estimate at ``(x_t, t)``; ``d_prev`` the one at the previous grid point
            ``t_prev`` (``None``, or ``t_prev=None``: first-order step); ``d_prev2`` the one
            before, at ``t_prev2`` (given with ``d_prev``: third-order step).
        t, t_next, t_prev, t_prev2: steps of ``schedule`` with
            ``t_prev2 > t_prev > t > t_next >= -1``; ``t_next = -1`` means clean data, for
            which the result is ``d``.
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
    elif d_prev2 is not None and t_prev2 is not None:
        lam_p = _alpha_sigma_lambda(schedule, t_prev)[2]
        lam_p2 = _alpha_sigma_lambda(schedule, t_prev2)[2]
        r0, r1 = (lam_t - lam_p) / h, (lam_p - lam_p2) / h
        d1_0, d1_1 = (d - d_prev) / r0, (d_prev - d_prev2) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi1 = -math.expm1(-h)
        return (sigma_n / sigma_t) * x_t + alpha_n * (
            phi1 * d + (1.0 - phi1 / h) * d1 + (1.0 - 2.0 * (h - phi1) / h**2) * d2
        )
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
    same grid; ``order=3`` is DPM-Solver++(3M) (orders 1 and 2 on its first two steps).
    Returns ``[B, C, H, W]``, in [-1, 1] when ``clip_x0``.
    """
    check_prediction(prediction)
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    grid = timesteps(schedule, steps, spacing)
    x = x_T
    batch = x.shape[0]
    d_prev: torch.Tensor | None = None
    t_prev: int | None = None
    d_prev2: torch.Tensor | None = None
    t_prev2: int | None = None
    for k, t in enumerate(tqdm(grid, desc="dpm-solver++", disable=not progress)):
        t_next = grid[k + 1] if k + 1 < len(grid) else -1
        t_vec = torch.full((batch,), t, dtype=torch.int64, device=x.device)
        d = output_to_x0(model(x, t_vec), x, t_vec, schedule, prediction)
        if clip_x0:
            d = d.clamp(-1.0, 1.0)
        x = dpm_solver_pp_step(
            x, d, d_prev if order >= 2 else None, t, t_next, t_prev, schedule,
            d_prev2=d_prev2 if order == 3 else None, t_prev2=t_prev2,
        )  # fmt: skip
        d_prev2, t_prev2 = d_prev, t_prev
        d_prev, t_prev = d, t
    return x
