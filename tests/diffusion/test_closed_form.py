"""Samplers driven by the exact noise predictor of known data reproduce that data.

For x0 ~ N(mu, s^2) per pixel (or a Gaussian mixture) the optimal eps predictor is known in
closed form (closed_form.py), so any gap between a sampler's output distribution and the data
is the sampler's own: its discretisation, its variance choice and x0 clipping.

Tolerances (n i.i.d. pixels): the mean within 5 standard errors, 5 s / sqrt(n); the standard
deviation within 5 s / sqrt(2 n) (its standard error for Gaussian data). With n = 65536 that is
0.0059 on the mean and 1.38 % on s (for s = 0.3). Known biases, all well inside: for
N(0.1, 0.3^2) on the linear 1000-step schedule, exact moment propagation gives
DDPM `fixedlarge` +0.31 % in s, DDPM `fixedsmall` (= DDIM eta 1) -1.25 %, DDIM eta 0 -0.49 %
(computed below from its linear map); clipping x0 to [-1, 1] cuts the data's 3.0 sigma upper
tail (0.13 % of pixels) and moves s by < 0.02 %. The prior mismatch (x_T ~ N(0, 1) instead of
N(sqrt(abar_999) mu, ...)) moves the mean by -s sqrt(abar_999) mu ~ -2e-4.

The deterministic samplers (DDIM eta 0, DPM-Solver++) map x_T to x0 affinely for Gaussian
data when x0 is not clipped, so their exact output mean and s come from two pixels,
x_T = 0 and x_T = 1: that is how their few-step errors are measured, free of sampling noise.
"""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from sddpm.diffusion import (
    NoiseSchedule,
    PerImageRandn,
    ddim_sample,
    ddpm_sample,
    dpm_solver_sample,
    initial_noise,
    sample,
)
from sddpm.diffusion.seeding import SAMPLER_NOISE_STREAM

from .closed_form import GaussianEps, MixtureEps

SCHEDULE = NoiseSchedule.linear()
MU, S = 0.1, 0.3
SHAPE = (1, 128, 128)  # per image; 4 images: n = 65536 pixels
X_T = initial_noise(4, SHAPE, seed=0)
N = X_T.numel()


def assert_moments(y: torch.Tensor, mu: float, s: float) -> tuple[float, float]:
    y = y.double()
    mean_err, s_err = y.mean().item() - mu, y.std().item() / s - 1
    assert abs(mean_err) < 5 * s / math.sqrt(y.numel()), f"mean off by {mean_err:.3g}"
    assert abs(s_err) < 5 / math.sqrt(2 * y.numel()), f"s off by {100 * s_err:.3g} %"
    return mean_err, s_err


def exact_affine(sampler, model) -> tuple[float, float]:
    """(mean, s) of a deterministic sampler's output for x_T ~ N(0, 1), x0 unclipped."""
    y = sampler(model, torch.tensor([[[[0.0, 1.0]]]])).flatten().double()
    return y[0].item(), (y[1] - y[0]).item()


def test_ddpm_1000_steps_reproduces_a_gaussian():
    """The published sampler (fixedlarge, x0 clipped); measured: mean +3.7e-4, s +0.50 %."""
    model = GaussianEps(SCHEDULE, MU, S)
    y = sample(model, X_T, "ddpm", seed=0)
    assert model.calls == 1000
    assert y.abs().max() <= 1.0
    assert_moments(y, MU, S)


def test_ddim_1000_steps_reproduces_a_gaussian():
    """Deterministic DDIM on every step, x0 clipped; measured: mean +2.9e-4, s -0.51 %."""
    model = GaussianEps(SCHEDULE, MU, S)
    y = sample(model, X_T, "ddim", steps=1000)
    assert model.calls == 1000
    assert_moments(y, MU, S)
    # its exact bias: the affine map, unclipped
    mean, s = exact_affine(
        lambda m, x: ddim_sample(m, x, SCHEDULE, steps=1000, clip_x0=False), model
    )
    assert abs(mean - MU) < 3e-4 and abs(s / S - 1) < 0.006  # exact: -2e-4, -0.49 %


def test_ddpm_reproduces_a_gaussian_mixture():
    """0.3 N(-0.5, 0.1^2) + 0.7 N(0.4, 0.15^2), x0 clipped. Checks the mean and s (as above;
    the Gaussian standard error of s is conservative for this bimodal mixture), the mass below
    0 (binomial standard error) and the whole distribution (Kolmogorov-Smirnov, p > 0.001).
    Measured: mean -5e-6, s +0.23 %, P(x < 0) -8e-6, KS p = 0.61."""
    model = MixtureEps(SCHEDULE, [-0.5, 0.4], [0.1, 0.15], [0.3, 0.7])
    y = sample(model, X_T, "ddpm", seed=0).flatten().double()
    mean, std = model.mean_std()
    assert_moments(y, mean, std)
    p = float(model.cdf(0.0))
    below = (y < 0).double().mean().item()
    assert abs(below - p) < 5 * math.sqrt(p * (1 - p) / N)
    assert stats.kstest(y.numpy(), model.cdf).pvalue > 1e-3


def test_ddim_eta_1_is_ddpm():
    """DDIM with eta = 1 on all T steps adds the posterior variance: it is DDPM with the
    `fixedsmall` variance, image for image given the same noise stream; and both it and the
    published DDPM (`fixedlarge`) reproduce N(0.5, 1) (unclipped: the data leave [-1, 1];
    exact biases in s there: fixedsmall -0.45 %, fixedlarge -0.005 %). Measured: largest
    difference to DDPM fixedsmall 1.5e-6; s -1.06 % (eta 1), +0.21 % (DDPM); KS p = 0.031."""
    small = initial_noise(2, (1, 8, 8), seed=3)
    model = GaussianEps(SCHEDULE, MU, S)
    ddim = sample(model, small, "ddim", steps=1000, eta=1.0, seed=5, clip_x0=False)
    noise = PerImageRandn([0, 1], seed=5, stream=SAMPLER_NOISE_STREAM)
    ddpm = ddpm_sample(
        model, small, SCHEDULE, variance="fixedsmall", clip_x0=False, randn_like=noise.randn_like
    )
    torch.testing.assert_close(ddim, ddpm, atol=1e-5, rtol=0)

    model = GaussianEps(SCHEDULE, 0.5, 1.0)
    ddim = sample(model, X_T, "ddim", steps=1000, eta=1.0, seed=1, clip_x0=False)
    ddpm = sample(model, X_T, "ddpm", seed=2, clip_x0=False)
    assert_moments(ddim, 0.5, 1.0)
    assert_moments(ddpm, 0.5, 1.0)
    assert stats.ks_2samp(ddim.flatten().numpy(), ddpm.flatten().numpy()).pvalue > 1e-3


STEP_COUNTS = (10, 20, 50, 100)


def test_few_step_errors_shrink_faster_for_dpm_solver():
    """Exact relative error in s (unclipped, x_T ~ N(0, 1)) for N(0.1, 0.3^2), measured:

    =====  ========================  =====================  ========================
    steps  DDIM uniform / quadratic  DPM-Solver++ (logsnr)  DPM-Solver++ (uniform t)
    =====  ========================  =====================  ========================
    10     -38.5 % / -17.4 %         +2.62 %                +23.2 %
    20     -20.9 % / -9.13 %         +1.45 %                +29.7 %
    50     -8.90 % / -3.77 %         +0.18 %                +10.7 %
    100    -4.58 % / -1.91 %         +0.003 %               +3.06 %
    =====  ========================  =====================  ========================

    DDIM converges at first order, DPM-Solver++(2M) at second order on the log-SNR grid; on a
    grid uniform in t its steps in log-SNR are very uneven (the last one, to t = 0, is huge)
    and the multistep extrapolation overshoots, hence log-SNR as its default.
    """
    model = GaussianEps(SCHEDULE, MU, S)

    def errors(sampler):
        out = []
        for n in STEP_COUNTS:
            mean, s = exact_affine(lambda m, x, n=n: sampler(m, x, n), model)
            assert abs(mean - MU) < 1e-3  # the mean is right at every step count
            out.append(abs(s / S - 1))
        return np.array(out)

    ddim = errors(lambda m, x, n: ddim_sample(m, x, SCHEDULE, steps=n, clip_x0=False))
    dpm = errors(lambda m, x, n: dpm_solver_sample(m, x, SCHEDULE, steps=n, clip_x0=False))
    dpm_t = errors(
        lambda m, x, n: dpm_solver_sample(m, x, SCHEDULE, steps=n, spacing="linear", clip_x0=False)
    )
    assert np.all(np.diff(ddim) < 0) and np.all(np.diff(dpm) < 0)  # both shrink
    assert np.all(dpm < ddim / 10)
    assert dpm[1] < 0.03  # 20 steps: s within 3 %
    # empirical order between 20 and 50 steps: DDIM ~1 (measured 0.93), DPM-Solver++ ~2 (2.3)
    order = lambda e: math.log(e[1] / e[2]) / math.log(50 / 20)  # noqa: E731
    assert 0.7 < order(ddim) < 1.3 and order(dpm) > 1.8
    assert np.all(dpm < dpm_t)  # log-SNR spacing beats uniform-in-t at every step count
    # DPM-Solver++ of order 1 is DDIM on the same grid
    first = exact_affine(
        lambda m, x: dpm_solver_sample(m, x, SCHEDULE, steps=20, order=1, clip_x0=False), model
    )
    ddim20 = exact_affine(
        lambda m, x: ddim_sample(m, x, SCHEDULE, steps=20, spacing="logsnr", clip_x0=False), model
    )
    assert first == pytest.approx(ddim20, abs=1e-6)


def test_dpm_solver_20_steps_sampled():
    """The default sampler call (20 steps, x0 clipped) on real noise: s within 3 % and the
    mean within 5 standard errors. Measured: s +1.4 %."""
    model = GaussianEps(SCHEDULE, MU, S)
    y = sample(model, X_T, "dpm-solver++").double()
    assert model.calls == 20
    assert abs(y.std().item() / S - 1) < 0.03
    assert abs(y.mean().item() - MU) < 5 * S / math.sqrt(N)


@pytest.mark.parametrize(
    "sampler, kwargs",
    [("ddpm", {"steps": 50}), ("ddim", {"steps": 20, "eta": 0.5}), ("dpm-solver++", {})],
)
def test_v_prediction_gives_the_same_samples(sampler, kwargs):
    x_T = initial_noise(2, (1, 8, 8), seed=1)
    eps = sample(GaussianEps(SCHEDULE, MU, S), x_T, sampler, seed=4, **kwargs)
    v = sample(GaussianEps(SCHEDULE, MU, S, "v"), x_T, sampler, seed=4, prediction="v", **kwargs)
    torch.testing.assert_close(v, eps, atol=1e-4, rtol=0)


def test_dpm_solver_3m_step_is_exact_for_data_quadratic_in_log_snr():
    """A (3M) step integrates sigma e^lambda x0(lambda) exactly when x0 is quadratic in lambda
    (here a 'model' whose data estimate is c0 + c1 lambda + c2 lambda^2, whatever x is): the
    exact step is (sigma_n / sigma_t) x + sigma_n int_{lambda_t}^{lambda_n} e^l x0(l) dl."""
    from scipy.integrate import quad

    from sddpm.diffusion import dpm_solver_pp_step

    lam = lambda t: 0.5 * float(SCHEDULE.log_snr[t])  # noqa: E731
    x0 = lambda u: 0.3 - 0.2 * u + 0.05 * u * u  # noqa: E731
    t_prev2, t_prev, t, t_next = 700, 560, 430, 250  # uneven steps in lambda
    d = {s: torch.tensor([x0(lam(s))], dtype=torch.float64) for s in (t_prev2, t_prev, t)}
    x = torch.tensor([0.7], dtype=torch.float64)
    sig = lambda s: math.sqrt(1 - float(SCHEDULE.alphas_cumprod[s]))  # noqa: E731
    integral = quad(lambda u: math.exp(u) * x0(u), lam(t), lam(t_next), epsabs=1e-14)[0]
    exact = sig(t_next) / sig(t) * 0.7 + sig(t_next) * integral
    step3 = dpm_solver_pp_step(
        x, d[t], d[t_prev], t, t_next, t_prev, SCHEDULE, d_prev2=d[t_prev2], t_prev2=t_prev2
    )
    assert step3.item() == pytest.approx(exact, abs=1e-12)
    step2 = dpm_solver_pp_step(x, d[t], d[t_prev], t, t_next, t_prev, SCHEDULE)
    assert abs(step2.item() - exact) > 1e-4  # the second-order step is not exact here


def test_dpm_solver_3m_converges_faster_than_2m():
    """Exact relative error in s (unclipped, x_T ~ N(0, 1)) for N(0.1, 0.3^2), measured:

    =====  ==================  ==================
    steps  DPM-Solver++(2M)    DPM-Solver++(3M)
    =====  ==================  ==================
    5      -23.3 %             +18.1 %
    10     +2.62 %             +11.5 %
    15     +2.22 %             +0.86 %
    20     +1.45 %             +0.081 %
    30     +0.63 %             +0.011 %
    50     +0.18 %             -0.044 %
    100    +0.003 %            -0.058 %
    =====  ==================  ==================

    3M is of higher order (error 15 -> 30 steps: / 78 against / 3.5 for 2M) and far more
    accurate from 15 to 30 steps; at 10 steps or fewer (steps of ~1 in lambda) its quadratic
    extrapolation overshoots and 2M is better on this case; from ~50 steps both are within
    0.2 % (3M levels off at ~0.05 %, the integer grid's uneven last steps near t = 0)."""
    model = GaussianEps(SCHEDULE, MU, S)

    def err(order, n):
        mean, s = exact_affine(
            lambda m, x: dpm_solver_sample(m, x, SCHEDULE, steps=n, order=order, clip_x0=False),
            model,
        )
        assert abs(mean - MU) < 1e-3
        return abs(s / S - 1)

    e2 = {n: err(2, n) for n in (15, 20, 30)}
    e3 = {n: err(3, n) for n in (15, 20, 30)}
    assert e3[15] < e2[15] and e3[20] < e2[20] / 10 and e3[30] < e2[30] / 30
    assert e3[20] < 0.002
    order = lambda e: math.log(e[15] / e[30]) / math.log(2)  # noqa: E731
    assert order(e2) < 2.2 and order(e3) > 4  # measured 1.8 and 6.3
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        dpm_solver_sample(model, X_T[:1], SCHEDULE, steps=5, order=4)


def test_dpm_solver_3m_sampler_20_steps_sampled():
    """sample(..., "dpm-solver++3m"): 20 model calls, x0 clipped, on real noise; s and the mean
    within 5 standard errors. Measured: s +0.05 %, mean +3e-4."""
    model = GaussianEps(SCHEDULE, MU, S)
    y = sample(model, X_T, "dpm-solver++3m").double()
    assert model.calls == 20
    assert_moments(y, MU, S)
