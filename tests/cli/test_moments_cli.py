"""``sddpm eps-moments`` on a tiny saved model and a tiny image folder."""

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sddpm.cli import app
from sddpm.data import build_dataset
from sddpm.diffusion import (
    NoiseSchedule,
    estimate_eps_moments,
    initial_noise,
    load_moments,
    sample,
    timesteps,
)
from sddpm.generation import load_for_sampling
from sddpm.models import build_model, fold_batchnorm, save_pretrained

from unet_configs import tiny_unet_config

SCHEDULE = {"kind": "linear", "T": 20, "beta_1": 1e-3, "beta_T": 0.2}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(root / f"{i}.png")
    return root


def save_model(path, data=None):
    cfg = tiny_unet_config(diffusion_steps=20, snn_timesteps=2)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()(torch.randn(8, 1, 8, 8), torch.randint(0, 20, (8,)))  # BN running stats
    extra = {"diffusion": {"schedule": SCHEDULE, "prediction": "eps"}}
    if data is not None:  # as training writes it: the run's config, its data settings inside
        extra["run"] = {"step": 1, "config": {"data": data}}
    save_pretrained(model.eval(), path, extra=extra)
    return path


def invoke(*args):
    return CliRunner().invoke(app, ["eps-moments", *map(str, args)])


def test_eps_moments_of_a_run_checkpoint(tmp_path, folder):
    model_dir = save_model(tmp_path / "model", {"dataset": "folder", "root": str(folder)})
    out = tmp_path / "m.safetensors"
    result = invoke("--checkpoint", model_dir, "--num", 3, "--batch-size", 3, "--out", out)
    assert result.exit_code == 0, result.output
    assert "20 of 20 steps, 3 images" in result.output
    schedule = NoiseSchedule.from_dict(SCHEDULE)
    moments = load_moments(out, schedule)
    # the same numbers as the library call on the same images and model
    setup = load_for_sampling(model_dir)
    data = build_dataset("folder", root=folder, image_size=8, hflip=False, channels=1)
    images = torch.stack([data[i] for i in range(3)])
    expected = estimate_eps_moments(fold_batchnorm(setup.model), images, schedule, batch_size=3)
    torch.testing.assert_close(moments, expected, rtol=1e-6, atol=0)
    assert torch.all(moments > 0)
    # and the analytic samplers take it
    x_T = initial_noise(2, (1, 8, 8), seed=0)
    x0 = sample(setup.model, x_T, "analytic-ddpm", steps=5, moments=moments, schedule=schedule)
    assert x0.shape == (2, 1, 8, 8) and torch.isfinite(x0).all()


def test_only_the_grid_steps_and_a_dataset_flag(tmp_path, folder):
    """A converted model records no dataset: --dataset names it; --steps K estimates only the
    grid of a K-step analytic sampler, which then samples with it."""
    model_dir = save_model(tmp_path / "model")
    out = tmp_path / "m.safetensors"
    result = invoke("--checkpoint", model_dir, "--num", 3, "--steps", 4, "--out", out)
    assert result.exit_code != 0
    assert "--dataset NAME" in result.output and not out.exists()
    args = ["--checkpoint", model_dir, "--num", 3, "--steps", 4, "--dataset", "folder"]
    result = invoke(*args, "--data-dir", folder, "--out", out)
    assert result.exit_code == 0, result.output
    schedule = NoiseSchedule.from_dict(SCHEDULE)
    moments = load_moments(out)
    grid = timesteps(schedule, 4, "linear")
    assert sorted(torch.nonzero(~moments.isnan()).flatten().tolist()) == sorted(grid)
    model = load_for_sampling(model_dir).model
    x_T = initial_noise(1, (1, 8, 8), seed=0)
    sample(model, x_T, "analytic-ddim", steps=4, moments=moments, schedule=schedule)
    with pytest.raises(ValueError, match="NaN at step"):
        sample(model, x_T, "analytic-ddim", steps=5, moments=moments, schedule=schedule)


def test_the_data_folder_flag_is_data_dir_and_data_root_still_works(tmp_path, folder):
    """--data-dir, as in train and fid-stats; --data-root, its older name, gives the same."""
    model_dir = save_model(tmp_path / "model")
    args = ["--checkpoint", model_dir, "--num", 3, "--steps", 2, "--dataset", "folder"]
    outs = {}
    for flag in ("--data-dir", "--data-root"):
        outs[flag] = tmp_path / f"{flag.strip('-')}.safetensors"
        result = invoke(*args, flag, folder, "--out", outs[flag])
        assert result.exit_code == 0, (flag, result.output)
    a, b = (load_moments(outs[flag]) for flag in ("--data-dir", "--data-root"))
    torch.testing.assert_close(a, b, equal_nan=True)  # NaN off the 2-step grid
    result = invoke("--checkpoint", model_dir, "--out", tmp_path / "m.safetensors")
    assert result.exit_code != 0 and "(and --data-dir DIR)" in result.output


def test_bad_flags_are_named(tmp_path, folder):
    model_dir = save_model(tmp_path / "model", {"dataset": "folder", "root": str(folder)})
    result = invoke("--checkpoint", model_dir, "--num", 50, "--out", tmp_path / "m.safetensors")
    assert result.exit_code != 0 and "--num 50 exceeds the 6 images" in result.output
    result = invoke("--checkpoint", model_dir, "--out", tmp_path / "m.npz")
    assert result.exit_code != 0 and "--out must end in .safetensors" in result.output
    result = invoke("--out", tmp_path / "m.safetensors")
    assert result.exit_code != 0 and "exactly one of --run" in result.output
    assert not (tmp_path / "m.safetensors").exists()


def test_a_tsm_run_trains_its_scales_and_gives_moments(tmp_path):
    """A tiny TSM training run (--set tsm=true): the scales are trained (they leave 1), the
    checkpoint loads as a TSM model, and `eps-moments --run` reads the run's own dataset."""
    from sddpm.config import run_preset
    from sddpm.models.tsm import tsm_scale_layers
    from sddpm.training import train

    tiny = ["channels=8", "channel_mult=[1,2]", "num_res_blocks=1", "batch_size=4",
            "total_steps=2", "warmup_steps=1", "lr=1e-2", "checkpoint_every=2",
            "num_samples=0", "device=cpu", "threads=1", "seed=3", "tsm=true"]  # fmt: skip
    config = run_preset("digits").override(tiny)
    run = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        train(config, run, command=["sddpm", "train"], progress=False)
    finally:
        torch.set_num_threads(threads)  # train sets its own (threads=1)
    model = load_for_sampling(run, weights="model").model
    assert model.config.tsm
    scales = torch.cat([m.step_scale for _, m in tsm_scale_layers(model)])
    assert scales.numel() == 26 * 4 and (scales - 1).abs().max() > 1e-4
    out = tmp_path / "m.safetensors"
    result = invoke("--run", run, "--num", 4, "--steps", 3, "--out", out)
    assert result.exit_code == 0, result.output
    assert "3 of 1000 steps, 4 images" in result.output
