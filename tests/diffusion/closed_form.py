"""Exact noise predictors for data whose distribution is known in closed form.

For x0 ~ N(mu, s^2) per pixel, x_t = a x0 + sigma eps (a = sqrt(abar_t), sigma^2 = 1 - abar_t)
is N(a mu, a^2 s^2 + sigma^2) and the optimal (MMSE) predictor of eps is linear:

    eps*(x_t, t) = E[eps | x_t] = sigma (x_t - a mu) / (a^2 s^2 + sigma^2).

For a mixture sum_k w_k N(mu_k, s_k^2) it is the posterior-weighted sum of the components'
predictors, with weights gamma_k(x_t) proportional to w_k N(x_t; a mu_k, a^2 s_k^2 + sigma^2).
A sampler driven by these predictors solves the reverse process exactly up to its own
discretisation, so its output distribution must reproduce the data distribution.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.special import ndtr

from sddpm.diffusion import NoiseSchedule


class MixtureEps:
    """``model(x_t, t) -> eps*`` for i.i.d. pixels from a 1-D Gaussian mixture.

    Per-step tables (float64, then float32): ``a_t mu_k``, the marginal variances
    ``v_tk = a_t^2 s_k^2 + sigma_t^2`` and the log-normalisers; the posterior weights are a
    softmax over components, computed in float32.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        means: list[float],
        stds: list[float],
        weights: list[float] | None = None,
    ) -> None:
        mu = torch.tensor(means, dtype=torch.float64)
        s = torch.tensor(stds, dtype=torch.float64)
        w = torch.ones_like(mu) if weights is None else torch.tensor(weights, dtype=torch.float64)
        self.means, self.stds, self.weights = mu, s, w / w.sum()
        abar = schedule.alphas_cumprod[:, None]  # [T, 1] against K components
        a, sigma = abar.sqrt(), (1 - abar).sqrt()
        var = a**2 * s**2 + sigma**2
        self.center = (a * mu).float()  # [T, K]
        self.inv_var = (1 / var).float()
        self.log_norm = (torch.log(self.weights) - 0.5 * torch.log(2 * math.pi * var)).float()
        self.gain = (sigma / var).float()
        self.calls = 0

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert x_t.dtype == torch.float32 and t.dtype == torch.int64 and t.shape == x_t.shape[:1]
        self.calls += 1
        shape = (-1, *[1] * (x_t.dim() - 1))
        resid = [x_t - self.center[t, k].view(shape) for k in range(len(self.means))]
        logits = torch.stack(
            [
                self.log_norm[t, k].view(shape) - 0.5 * r.square() * self.inv_var[t, k].view(shape)
                for k, r in enumerate(resid)
            ]
        )
        gamma = torch.softmax(logits, dim=0)
        return sum(gamma[k] * self.gain[t, k].view(shape) * r for k, r in enumerate(resid))

    def cdf(self, x: np.ndarray | float) -> np.ndarray:
        """P(x0 <= x) under the mixture, elementwise."""
        z = (np.asarray(x, dtype=np.float64)[..., None] - self.means.numpy()) / self.stds.numpy()
        return (self.weights.numpy() * ndtr(z)).sum(-1)

    def mean_std(self) -> tuple[float, float]:
        """Mean and standard deviation of the mixture."""
        mean = (self.weights * self.means).sum()
        second = (self.weights * (self.stds**2 + self.means**2)).sum()
        return float(mean), float((second - mean**2).sqrt())


class GaussianEps:
    """``model(x_t, t) -> eps*`` for i.i.d. pixels x0 ~ N(mu, s^2): a per-step affine map.

    ``eps* = k_t (x_t - a_t mu)`` with ``k_t = sigma_t / (a_t^2 s^2 + sigma_t^2)``; the
    coefficients are computed in float64, the map is applied in float32 (fast).
    """

    def __init__(
        self, schedule: NoiseSchedule, mu: float, s: float, prediction: str = "eps"
    ) -> None:
        abar = schedule.alphas_cumprod
        a, sigma = abar.sqrt(), (1 - abar).sqrt()
        k = sigma / (a**2 * s**2 + sigma**2)
        if prediction == "eps":  # out = k x - k a mu
            slope, offset = k, -k * a * mu
        else:  # v = a eps - sigma x0 with x0 = (x - sigma eps) / a, i.e. v = (eps - sigma x) / a
            slope, offset = (k - sigma) / a, -k * mu
        self.slope, self.offset = slope.float(), offset.float()
        self.mu, self.s, self.prediction = mu, s, prediction
        self.calls = 0

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert x_t.dtype == torch.float32 and t.dtype == torch.int64 and t.shape == x_t.shape[:1]
        self.calls += 1
        shape = (-1, *[1] * (x_t.dim() - 1))
        return self.slope[t].view(shape) * x_t + self.offset[t].view(shape)
