"""Noise schedules: the published buffers, cosine, serialisation, respacing, step grids."""

import json
import math

import numpy as np
import pytest
import torch

from sddpm.diffusion import NoiseSchedule, timesteps


def test_linear_matches_published_buffers():
    s = NoiseSchedule.linear()
    assert s.T == len(s) == 1000 and s.betas.dtype == torch.float64
    assert torch.equal(s.betas, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    # Independent float64 recomputation with numpy, the published formulas.
    b = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - b)
    prev = np.concatenate([[1.0], abar[:-1]])
    post = b * (1 - prev) / (1 - abar)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), abar, rtol=1e-12)
    assert s.alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-4)
    np.testing.assert_allclose(s.posterior_variance.numpy(), post, rtol=1e-12, atol=1e-300)
    assert s.posterior_variance[0].item() == 0.0
    large = np.log(np.concatenate([post[1:2], b[1:]]))
    small = np.log(np.concatenate([post[1:2], post[1:]]))
    np.testing.assert_allclose(s.fixedlarge_log_variance.numpy(), large, rtol=1e-12)
    np.testing.assert_allclose(s.fixedsmall_log_variance.numpy(), small, rtol=1e-12)
    assert torch.equal(s.log_variance("fixedlarge"), s.fixedlarge_log_variance)
    np.testing.assert_allclose(
        s.posterior_mean_coef1.numpy(), np.sqrt(prev) * b / (1 - abar), rtol=1e-12
    )
    np.testing.assert_allclose(
        s.posterior_mean_coef2.numpy(), np.sqrt(1 - b) * (1 - prev) / (1 - abar), rtol=1e-12
    )
    np.testing.assert_allclose(s.sqrt_recipm1_alphas_cumprod.numpy(), np.sqrt(1 / abar - 1))
    np.testing.assert_allclose(s.log_snr.numpy(), np.log(abar / (1 - abar)), rtol=1e-10)
    assert bool((s.log_snr[1:] < s.log_snr[:-1]).all())
    # The published float32-linspace-then-double betas differ by < 2e-9 (1.4e-9 measured),
    # abar by < 3e-7 relative (2.3e-7 measured): about one float32 rounding.
    published = NoiseSchedule(torch.linspace(1e-4, 0.02, 1000).double())
    assert (published.betas - s.betas).abs().max().item() < 2e-9
    ratio = published.alphas_cumprod / s.alphas_cumprod
    assert (ratio - 1).abs().max().item() < 3e-7


def test_cosine_schedule():
    s = NoiseSchedule.cosine(T=1000)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):
        assert s.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-10)
    assert s.betas.max().item() == pytest.approx(0.999)  # the last beta is clipped
    assert s.betas[0].item() == pytest.approx(1 - f(1) / f(0), rel=1e-12)


def test_dict_round_trip():
    for s in (
        NoiseSchedule.linear(),
        NoiseSchedule.linear(50, 1e-3, 0.05),
        NoiseSchedule.cosine(20),
    ):
        d = json.loads(json.dumps(s.to_dict()))
        back = NoiseSchedule.from_dict(d)
        assert back.kind == s.kind and back.to_dict() == d
        assert torch.equal(back.betas, s.betas)
    assert NoiseSchedule.linear().to_dict() == {
        "kind": "linear",
        "T": 1000,
        "beta_1": 1e-4,
        "beta_T": 0.02,
    }
    custom = NoiseSchedule(torch.tensor([0.1, 0.2, 0.3]))
    back = NoiseSchedule.from_dict(json.loads(json.dumps(custom.to_dict())))
    assert torch.equal(back.betas, custom.betas)
    with pytest.raises(ValueError, match="unknown schedule kind"):
        NoiseSchedule.from_dict({"kind": "sigmoid", "T": 10})
    with pytest.raises(ValueError, match="unexpected keys"):
        NoiseSchedule.from_dict({"kind": "linear", "T": 10, "beta_max": 0.1})
    with pytest.raises(ValueError, match="betas must lie in"):
        NoiseSchedule(torch.tensor([0.1, 1.5]))
    with pytest.raises(ValueError, match="T"):
        NoiseSchedule.linear(T=1)


def test_respace():
    s = NoiseSchedule.linear()
    assert s.respace(range(1000)) is s
    sub = s.respace([999, 500, 100, 0])
    assert sub.T == 4
    torch.testing.assert_close(
        sub.alphas_cumprod, s.alphas_cumprod[[0, 100, 500, 999]], rtol=1e-12, atol=0
    )
    with pytest.raises(ValueError, match="distinct"):
        s.respace([5, 5])


def test_timesteps_grids():
    s = NoiseSchedule.linear()
    # The published SDDPM DDIM grid: int(T - 1 - i * T / N) for i < N.
    assert timesteps(s, 10, "uniform") == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert timesteps(s, 1000, "uniform") == list(range(999, -1, -1))
    assert timesteps(s, 4, "linear") == [999, 666, 333, 0]
    assert timesteps(s, 1, "uniform") == [999]
    for spacing in ("uniform", "quadratic", "linear", "logsnr"):
        for n in (1, 2, 10, 100, 999, 1000):
            grid = timesteps(s, n, spacing)
            assert len(grid) == n and grid[0] == 999 and min(grid) >= 0
            assert all(a > b for a, b in zip(grid, grid[1:], strict=False))
    grid = timesteps(s, 20, "logsnr")
    assert grid[-1] == 0
    lam = 0.5 * s.log_snr[grid]
    steps = lam[1:] - lam[:-1]
    # Uniform in log-SNR up to rounding to integer steps (largest deviation at t = 0, 1).
    assert steps[:-3].std().item() / steps[:-3].mean().item() < 0.05
    with pytest.raises(ValueError, match=r"steps must be an integer in \[1, 1000\]"):
        timesteps(s, 0)
    with pytest.raises(ValueError, match="unknown spacing"):
        timesteps(s, 10, "cubic")


def test_tables_move_to_a_device_once():
    s = NoiseSchedule.cosine(T=50)
    assert s.to("cpu") is s
    moved = s.to("meta")  # a device without data: enough to see where every table lives
    assert moved is s.to("meta")  # made once, then cached
    assert moved.T == 50 and moved.kind == "cosine" and moved.params == s.params
    for name in ("betas", "alphas_cumprod", "sqrt_alphas_cumprod", "fixedlarge_log_variance"):
        assert getattr(moved, name).device.type == "meta", name
        assert getattr(s, name).device.type == "cpu", name
