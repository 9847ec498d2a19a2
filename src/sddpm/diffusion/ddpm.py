"""Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2), as the published SDDPM code does it.

The published ``GaussianDiffusionSampler`` (``sample_type="ddpm"``, ``mean_type="epsilon"``),
itself pytorch-ddpm's sampler, makes one reverse step from ``t`` to ``t - 1`` as follows:

1. predict ``x_0 = x_t / sqrt(abar_t) - sqrt(1/abar_t - 1) eps`` and clip it to [-1, 1];
2. take the posterior mean ``coef1_t x_0 + coef2_t x_t`` of q(x_{t-1} | x_t, x_0);
3. add ``exp(log_var_t / 2) * noise`` with the ``fixedlarge`` (default: beta_t) or
   ``fixedsmall`` (posterior variance) log-variance;

and at the last step, ``t = 0``, returns the clipped ``x_0`` prediction without noise.

With ``steps < T`` the chain is respaced (Nichol & Dhariwal 2021): the same step on the schedule
of the chosen sub-sequence of steps (:meth:`NoiseSchedule.respace`), the model still receiving
the original step numbers. ``steps = T`` is exactly the published sampler.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from .loss import Model, check_prediction, extract, output_to_x0
from .schedule import NoiseSchedule, timesteps


def ddpm_step_mean_logvar(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    variance: str = "fixedlarge",
    prediction: str = "eps",
    clip_x0: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and log-variance of p(x_{t-1} | x_t): the published ``p_mean_variance``.

    Args:
        model_output: the model's ``eps`` (or ``v``) at ``(x_t, t)``, ``[B, C, H, W]``.
        x_t: the current sample ``[B, C, H, W]`` float32.
        t: step indices of ``schedule`` ``[B]`` int64, each in ``[0, T-1]``.
        variance: ``"fixedlarge"`` (published default) or ``"fixedsmall"``.
        clip_x0: clip the ``x_0`` prediction to [-1, 1] before the posterior mean (published).

    Returns:
        ``mean`` ``[B, C, H, W]`` and ``log_var`` ``[B, 1, 1, 1]``, both float32.
    """
    log_var = extract(schedule.log_variance(variance), t, x_t)
    x0 = output_to_x0(model_output, x_t, t, schedule, prediction)
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
    mean = (
        extract(schedule.posterior_mean_coef1, t, x_t) * x0
        + extract(schedule.posterior_mean_coef2, t, x_t) * x_t
    )
    return mean, log_var


def ddpm_sample(
    model: Model,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int | None = None,
    spacing: str = "linear",
    variance: str = "fixedlarge",
    prediction: str = "eps",
    clip_x0: bool = True,
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    progress: bool = False,
) -> torch.Tensor:
    """Run the reverse chain from ``x_T`` ``[B, C, H, W]`` (float32, N(0, I)) to ``x_0``.

    ``steps=None`` runs all ``T`` steps (the published sampler); fewer steps respace the chain
    on the grid :func:`timesteps` ``(schedule, steps, spacing)`` (``"linear"``: both ``T - 1``
    and ``0`` included). ``randn_like(x)`` supplies the noise of each step (one call per step
    with ``t > 0``). Returns ``x_0`` ``[B, C, H, W]``, in [-1, 1] when ``clip_x0``.
    """
    check_prediction(prediction)
    schedule.log_variance(variance)  # validates the name
    n = schedule.T if steps is None else steps
    grid = timesteps(schedule, n, spacing)
    sub = schedule.respace(grid)
    x = x_T
    batch = x.shape[0]
    for k, t in enumerate(tqdm(grid, desc="ddpm", disable=not progress)):
        j = len(grid) - 1 - k  # index of this step in the respaced schedule
        t_model = torch.full((batch,), t, dtype=torch.int64, device=x.device)
        t_sub = torch.full((batch,), j, dtype=torch.int64, device=x.device)
        out = model(x, t_model)
        if j > 0:
            mean, log_var = ddpm_step_mean_logvar(
                out, x, t_sub, sub, variance=variance, prediction=prediction, clip_x0=clip_x0
            )
            x = mean + torch.exp(0.5 * log_var) * randn_like(x)
        else:
            # Published: "no noise when t == 0"; the result is the clipped x_0 prediction.
            x = output_to_x0(out, x, t_sub, sub, prediction)
            if clip_x0:
                x = x.clamp(-1.0, 1.0)
    return x
