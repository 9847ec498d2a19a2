"""Analytic-DPM (Bao et al. 2022) on data known in closed form, and its moments.

For x0 ~ N(mu, s^2) per pixel every reverse kernel q(x_r | x_s) is exactly Gaussian with a
variance that does not depend on x_s, so Analytic-DPM driven by the exact eps and the exact
Gamma_t = sigma_t^2 / (abar_t s^2 + sigma_t^2) reproduces the data at any step count. Its only
bias is the last step (t = 0 to clean data, no noise, as DDPM), which drops the variance
bbar_0 / abar_0 (1 - Gamma_0) ~ 1e-4: s - 0.056 %.

The sampler is affine in (x_T, noise) when x0 is not clipped, so its exact output mean and s come
from a few runs on two pixels (x_T = 0 and 1; the noise switched on at one step at a time), free
of sampling noise. Measured (exact), against DDIM on the same step count:

=====  =====================  =====================  ==================
steps  analytic-ddpm           analytic-ddim          DDIM (uniform)
=====  =====================  =====================  ==================
10     -0.056 %               -0.055 %               -38.5 %
20     -0.056 %               -0.054 %               -20.9 %
=====  =====================  =====================  ==================

Sampled (65536 pixels, x0 clipped, seed 0): analytic-ddpm -0.44 % / -0.50 % at 10 / 20 steps,
analytic-ddim -0.36 % / -0.33 % (standard error of s: 0.28 %).
"""

import math

import pytest
import torch

from sddpm.diffusion import (
    NoiseSchedule,
    analytic_sample,
    ddim_sample,
    estimate_eps_moments,
    initial_noise,
    load_moments,
    sample,
    save_moments,
)
from sddpm.diffusion.analytic import analytic_step_variance

from .closed_form import GaussianEps

SCHEDULE = NoiseSchedule.linear()
MU, S = 0.2, 0.3
ABAR = SCHEDULE.alphas_cumprod
GAMMA = (1 - ABAR) / (ABAR * S**2 + 1 - ABAR)  # E||eps*||^2 / d for N(MU, S^2) data
X_T = initial_noise(4, (1, 128, 128), seed=0)
N = X_T.numel()


def exact_mean_std(model, steps: int, variant: str, moments=GAMMA) -> tuple[float, float]:
    """Exact output (mean, s) of unclipped Analytic-DPM for x_T ~ N(0, 1)."""
    x = torch.tensor([[[[0.0, 1.0]]]])

    def run(randn_like):
        out = analytic_sample(
            model, x, SCHEDULE, moments, steps=steps, variant=variant, clip_x0=False,
            randn_like=randn_like,
        )  # fmt: skip
        return out.flatten().double()

    base = run(torch.zeros_like)
    var = (base[1] - base[0]).item() ** 2  # x_T's share
    for j in range(steps - 1):  # each step's noise (the last step adds none)

        def unit_at_j(x, j=j, calls=[]):  # noqa: B006 (a fresh counter per step j)
            calls.append(1)
            return torch.ones_like(x) if len(calls) == j + 1 else torch.zeros_like(x)

        var += (run(unit_at_j) - base)[0].item() ** 2
    return base[0].item(), math.sqrt(var)


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("variant", ["ddpm", "ddim"])
def test_analytic_dpm_is_exact_on_gaussian_data(steps, variant):
    model = GaussianEps(SCHEDULE, MU, S)
    mean, s = exact_mean_std(model, steps, variant)
    assert abs(mean - MU) < 5e-4  # measured: -8e-7 (ddpm), -3e-4 (ddim)
    assert -0.0007 < s / S - 1 < -0.0004  # measured -0.056 %: the last step's missing noise
    y = ddim_sample(model, torch.tensor([[[[0.0, 1.0]]]]), SCHEDULE, steps=steps, clip_x0=False)
    ddim_err = (y.flatten()[1] - y.flatten()[0]).item() / S - 1
    assert ddim_err < -0.2  # DDIM-10: -38.5 %, DDIM-20: -20.9 %
    assert abs(s / S - 1) < abs(ddim_err) / 100


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("sampler", ["analytic-ddpm", "analytic-ddim"])
def test_analytic_dpm_sampled(steps, sampler):
    """Through sample(): x0 clipped, per-image noise; s and the mean within 5 standard errors."""
    model = GaussianEps(SCHEDULE, MU, S)
    y = sample(model, X_T, sampler, steps=steps, moments=GAMMA, seed=0).double()
    assert model.calls == steps
    assert abs(y.mean().item() - MU) < 5 * S / math.sqrt(N)
    assert abs(y.std().item() / S - 1) < 5 / math.sqrt(2 * N)  # 1.38 %; measured <= 0.50 %


def test_the_variance_is_the_papers_and_clipped_to_its_bounds():
    s, r = 500, 400
    abar_s, abar_r = float(ABAR[s]), float(ABAR[r])
    a_sr = abar_s / abar_r
    lam2 = (1 - abar_r) / (1 - abar_s) * (1 - a_sr)  # DDPM's posterior variance
    g = float(GAMMA[s])
    var, base = analytic_step_variance(SCHEDULE, s, r, g, "ddpm")
    expected = lam2 + (math.sqrt((1 - abar_s) / a_sr) - math.sqrt(1 - abar_r - lam2)) ** 2 * (1 - g)
    assert base == pytest.approx(lam2, rel=1e-12)
    assert var == pytest.approx(expected, rel=1e-12)
    assert var > lam2
    # Gamma >= 1 (a model whose eps is too large): the lower bound lambda^2
    assert analytic_step_variance(SCHEDULE, s, r, 1.5, "ddpm")[0] == pytest.approx(lam2)
    assert analytic_step_variance(SCHEDULE, s, r, 1.5, "ddim")[0] == 0.0
    # Gamma far below 1: the upper bound from data in [-1, 1] (Theorem 2)
    for variant, l2 in (("ddpm", lam2), ("ddim", 0.0)):
        c = math.sqrt(1 - abar_r - l2)
        upper = l2 + (math.sqrt(abar_r) - c * math.sqrt(abar_s / (1 - abar_s))) ** 2
        assert analytic_step_variance(SCHEDULE, s, r, -50.0, variant)[0] == pytest.approx(upper)
        assert analytic_step_variance(SCHEDULE, s, r, g, variant)[0] < upper


def test_estimated_moments_match_the_closed_form():
    """Gamma_t from 256 images of 16x16 (65536 terms: standard error sqrt(2 / 65536) = 0.55 %
    of Gamma_t for Gaussian eps*). Measured: within 1.1 % at every tested step."""
    model = GaussianEps(SCHEDULE, MU, S)
    images = MU + S * torch.randn(256, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    steps = [0, 10, 100, 300, 600, 999]
    est = estimate_eps_moments(model, images, SCHEDULE, timesteps=steps, batch_size=100)
    assert est.dtype == torch.float64 and est.shape == (1000,)
    assert int(torch.isnan(est).sum()) == 1000 - len(steps)
    rel = est[steps] / GAMMA[steps] - 1
    assert rel.abs().max() < 5 * math.sqrt(2 / images.numel()), rel
    # seeded: the same call again gives the same numbers, another batch size too
    again = estimate_eps_moments(model, images, SCHEDULE, timesteps=steps[:2], batch_size=7)
    torch.testing.assert_close(again[steps[:2]], est[steps[:2]], rtol=1e-9, atol=0)
    other = estimate_eps_moments(model, images, SCHEDULE, timesteps=[0], seed=1)
    assert other[0] != est[0]
    # all steps by default (a model without parameters: any callable)
    calls = []
    full = estimate_eps_moments(
        lambda x, t: calls.append(1) or torch.ones_like(x) * 2, images[:4], SCHEDULE
    )
    assert not torch.isnan(full).any() and torch.all(full == 4.0) and len(calls) == 1000


def test_missing_or_nan_moments_are_named_errors():
    model = GaussianEps(SCHEDULE, MU, S)
    x = initial_noise(1, (1, 4, 4), seed=0)
    with pytest.raises(ValueError, match="need moments"):
        sample(model, x, "analytic-ddpm", steps=10)
    holes = GAMMA.clone()
    holes[0] = float("nan")  # the 10-step linear grid ends at t = 0
    with pytest.raises(ValueError, match=r"NaN at step\(s\) 0 "):
        sample(model, x, "analytic-ddim", steps=10, moments=holes)
    with pytest.raises(ValueError, match="one value per diffusion step"):
        sample(model, x, "analytic-ddpm", steps=10, moments=GAMMA[:10])
    with pytest.raises(ValueError, match="moments apply to"):
        sample(model, x, "ddim", steps=10, moments=GAMMA)
    assert model.calls == 0  # all before any model call
    # moments estimated only where the grid needs them are enough
    grid_only = torch.full((1000,), float("nan"), dtype=torch.float64)
    from sddpm.diffusion import timesteps

    grid = timesteps(SCHEDULE, 10, "linear")
    grid_only[grid] = GAMMA[grid]
    a = sample(model, x, "analytic-ddpm", steps=10, moments=grid_only, seed=3)
    b = sample(model, x, "analytic-ddpm", steps=10, moments=GAMMA, seed=3)
    assert torch.equal(a, b)


def test_moments_file_round_trip_and_errors(tmp_path):
    path = tmp_path / "m.safetensors"
    save_moments(path, GAMMA, SCHEDULE, {"images": 10})
    assert torch.equal(load_moments(path, SCHEDULE), GAMMA.double())
    with pytest.raises(ValueError, match="estimated for the schedule"):
        load_moments(path, NoiseSchedule.cosine())
    with pytest.raises(FileNotFoundError, match="no such moments file"):
        load_moments(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_moments(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="not an eps-moments file"):
        load_moments(tmp_path / "model.safetensors")
