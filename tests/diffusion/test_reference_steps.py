"""One DDPM step, one DDIM step and the training loss reproduce the published SDDPM code.

Vectors: tests/data/sddpm-small-gray.safetensors (see tests/data/REFERENCE.md), made with
github.com/AndyCao1125/SDDPM @ 91632f6. The model is our U-Net loaded from the published
state_dict (fixture ``published_model``, tests/conftest.py); the diffusion arithmetic is ours.
Measured: DDPM mean 1.2e-10, log-variance 0, DDIM 4.8e-7, loss map 1.9e-5 on values up to 12
(within rtol 2e-6). Tolerance 1e-5 absolute (REFERENCE.md); the loss map, squared errors of
size up to ~12, is checked at 1e-5 absolute plus 1e-5 relative.
"""

import torch

from sddpm.diffusion import NoiseSchedule, ddim_step, ddpm_step_mean_logvar, loss_map

SCHEDULE = NoiseSchedule.linear(1000, 1e-4, 0.02)


def test_ddpm_step(published_model, reference):
    r, _ = reference
    x, t = r["input.x"], r["input.ddpm_t"]
    with torch.no_grad():
        eps = published_model(x, t)
    mean, log_var = ddpm_step_mean_logvar(eps, x, t, SCHEDULE, variance="fixedlarge")
    assert log_var.shape == r["output.ddpm_step_log_var"].shape == (3, 1, 1, 1)
    torch.testing.assert_close(mean, r["output.ddpm_step_mean"], atol=1e-5, rtol=0)
    torch.testing.assert_close(log_var, r["output.ddpm_step_log_var"], atol=1e-6, rtol=0)
    # the step goes from t to t - 1, which the file also records
    assert torch.equal(r["input.ddpm_prev_t"], t - 1)


def test_ddim_step(published_model, reference):
    r, _ = reference
    x, t, t_prev = r["input.x"], r["input.ddim_t"], r["input.ddim_prev_t"]
    with torch.no_grad():
        eps = published_model(x, t)
    out = ddim_step(eps, x, t, t_prev, SCHEDULE, eta=0.0, clip_x0=True)
    torch.testing.assert_close(out, r["output.ddim_step_mean"], atol=1e-5, rtol=0)


def test_loss_map(published_model, reference):
    r, _ = reference
    published_model.train()
    with torch.no_grad():
        per_pixel = loss_map(
            published_model,
            r["input.x0"],
            SCHEDULE,
            t=r["input.loss_t"],
            noise=r["input.loss_noise"],
        )
    torch.testing.assert_close(per_pixel, r["output.loss_map"], atol=1e-5, rtol=1e-5)
