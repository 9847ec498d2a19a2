"""``sddpm sample`` end to end on a tiny saved model, and the generation helper."""

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sddpm.cli import app
from sddpm.generation import generate, load_for_sampling
from sddpm.models import UNetConfig, build_model, save_pretrained


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = UNetConfig(
        image_channels=1,
        image_size=8,
        channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        diffusion_steps=100,
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()(torch.randn(8, 1, 8, 8), torch.randint(0, 100, (8,)))  # BN running stats
    path = tmp_path_factory.mktemp("m") / "model"
    extra = {
        "diffusion": {
            "schedule": {"kind": "linear", "T": 100, "beta_1": 1e-4, "beta_T": 0.02},
            "prediction": "eps",
        }
    }
    save_pretrained(model.eval(), path, extra=extra)
    return path


def test_npz_and_png_outputs(model_dir, tmp_path):
    runner = CliRunner()
    npz = tmp_path / "s.npz"
    args = [
        "sample",
        "--checkpoint",
        str(model_dir),
        "--num",
        "5",
        "--sampler",
        "ddim",
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--out",
        str(npz),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    images = np.load(npz)["images"]
    assert images.dtype == np.uint8 and images.shape == (5, 8, 8, 1)

    png = tmp_path / "s.png"
    result = runner.invoke(app, [*args[:-1], str(png)])
    assert result.exit_code == 0, result.output
    # 5 images -> a 3x2 grid of 8x8 tiles with 2-pixel padding, enlarged 4x
    assert Image.open(png).size == ((3 * 10 + 2) * 4, (2 * 10 + 2) * 4)

    # the same seed through the CLI gives the same images
    again = tmp_path / "again.npz"
    result = runner.invoke(app, [*args[:-3], "5", "--out", str(again)])
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.load(again)["images"], images)


def test_images_do_not_depend_on_batch_size(model_dir):
    setup = load_for_sampling(model_dir)
    assert setup.schedule.T == 100
    kw = dict(sampler="ddpm", steps=6, seed=3, schedule=setup.schedule, progress=False)
    one = generate(setup.model, 5, (1, 8, 8), batch_size=1, **kw)
    three = generate(setup.model, 5, (1, 8, 8), batch_size=3, **kw)
    torch.testing.assert_close(one, three, rtol=0, atol=1e-6)
    part = generate(setup.model, [3, 4], (1, 8, 8), batch_size=8, **kw)
    torch.testing.assert_close(part, one[3:], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--out", "x.jpg"], "must end in .png or .npz"),
        (["--out", "x.png", "--sampler", "euler"], "unknown sampler"),
        (["--out", "x.png", "--steps", "0"], "steps must be"),
        (["--out", "x.png", "--threshold", "-1"], "threshold must be > 0"),
    ],
)
def test_bad_options_fail_clearly(model_dir, tmp_path, extra, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["sample", "--checkpoint", str(model_dir), *extra])
    assert result.exit_code == 2
    assert message in result.output
    assert not list(tmp_path.iterdir())


def test_run_directory_without_checkpoint(tmp_path):
    result = CliRunner().invoke(
        app, ["sample", "--run", str(tmp_path), "--out", str(tmp_path / "x.png")]
    )
    assert result.exit_code == 2 and "holds no checkpoint" in result.output


def test_speed_options_keep_the_images(model_dir, tmp_path):
    """--neuron-kernel compiled gives the same images; --bf16 nearly the same (the U-Net in
    bfloat16, membranes and sampler in float32); a bad kernel name is refused."""
    runner = CliRunner()
    base = ["sample", "--checkpoint", str(model_dir), "--num", "4", "--steps", "3"]
    outputs = {}
    for name, extra in {
        "eager": [],
        "compiled": ["--neuron-kernel", "compiled"],
        "bf16": ["--bf16"],
    }.items():
        out = tmp_path / f"{name}.npz"
        result = runner.invoke(app, [*base, *extra, "--out", str(out)])
        assert result.exit_code == 0, result.output
        outputs[name] = np.load(out)["images"].astype(np.int16)
    assert np.array_equal(outputs["compiled"], outputs["eager"])
    diff = np.abs(outputs["bf16"] - outputs["eager"])
    assert diff.max() <= 4 and not np.array_equal(outputs["bf16"], outputs["eager"])
    bad = runner.invoke(app, [*base, "--neuron-kernel", "cuda", "--out", str(tmp_path / "x.npz")])
    assert bad.exit_code != 0 and "kernel" in bad.output


def test_load_for_sampling_sets_the_neuron_kernel_and_folding_keeps_it(model_dir):
    from sddpm.models import fold_batchnorm
    from sddpm.snn import SpikingNeuron

    setup = load_for_sampling(model_dir, neuron_kernel="compiled")
    folded = fold_batchnorm(setup.model)  # the copy generate_batches samples with
    kernels = {m.kernel for m in folded.modules() if isinstance(m, SpikingNeuron)}
    assert kernels == {"compiled"}
    with pytest.raises(ValueError, match="neuron kernel"):
        load_for_sampling(model_dir, neuron_kernel="cuda")
