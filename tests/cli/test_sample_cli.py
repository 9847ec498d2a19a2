"""``sddpm sample`` end to end on a tiny saved model, and the generation helper."""

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sddpm.cli import app
from sddpm.generation import generate, load_for_sampling
from sddpm.models import build_model, save_pretrained

from unet_configs import tiny_unet_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = tiny_unet_config(diffusion_steps=100)
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
    """--neuron-kernel compiled gives the same images, --memory-format channels_last the same up
    to rounding; --bf16 nearly the same (the U-Net in bfloat16, membranes and sampler in
    float32); a bad kernel or layout name is refused."""
    runner = CliRunner()
    base = ["sample", "--checkpoint", str(model_dir), "--num", "4", "--steps", "3"]
    outputs = {}
    for name, extra in {
        "eager": [],
        "compiled": ["--neuron-kernel", "compiled"],
        "bf16": ["--bf16"],
        "nhwc": ["--memory-format", "channels_last"],
    }.items():
        out = tmp_path / f"{name}.npz"
        result = runner.invoke(app, [*base, *extra, "--out", str(out)])
        assert result.exit_code == 0, result.output
        outputs[name] = np.load(out)["images"].astype(np.int16)
    assert np.array_equal(outputs["compiled"], outputs["eager"])
    # NHWC: another conv summation order, the same uint8 images up to a spike flip's rounding
    assert np.abs(outputs["nhwc"] - outputs["eager"]).max() <= 1
    diff = np.abs(outputs["bf16"] - outputs["eager"])
    assert diff.max() <= 4 and not np.array_equal(outputs["bf16"], outputs["eager"])
    bad = runner.invoke(app, [*base, "--neuron-kernel", "cuda", "--out", str(tmp_path / "x.npz")])
    assert bad.exit_code != 0 and "kernel" in bad.output
    bad = runner.invoke(app, [*base, "--memory-format", "nhwc", "--out", str(tmp_path / "y.npz")])
    assert bad.exit_code == 2 and "--memory-format: unknown memory format 'nhwc'" in bad.output


def test_load_for_sampling_sets_the_neuron_kernel_and_folding_keeps_it(model_dir):
    from sddpm.models import fold_batchnorm
    from sddpm.snn import SpikingNeuron

    setup = load_for_sampling(model_dir, neuron_kernel="compiled")
    folded = fold_batchnorm(setup.model)  # the copy generate_batches samples with
    kernels = {m.kernel for m in folded.modules() if isinstance(m, SpikingNeuron)}
    assert kernels == {"compiled"}
    with pytest.raises(ValueError, match="neuron kernel"):
        load_for_sampling(model_dir, neuron_kernel="cuda")


def test_nan_weights_are_refused_and_nothing_is_written(model_dir, tmp_path):
    from sddpm.models import load_pretrained

    model = load_pretrained(model_dir)
    with torch.no_grad():
        model.head.conv.weight.fill_(float("nan"))  # one damaged tensor is enough
    bad = tmp_path / "nan-model"
    save_pretrained(model, bad, extra={"diffusion": {"prediction": "eps"}})
    out = tmp_path / "s.png"
    result = CliRunner().invoke(app, ["sample", "--checkpoint", str(bad), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "weights hold NaN or infinite values (head.conv.weight)" in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_non_finite_images_stop_generation():
    from sddpm.finite import NonFiniteError

    class Diverging(torch.nn.Module):  # finite weights, NaN output
        def forward(self, x, t):
            return x * float("nan")

    with pytest.raises(NonFiniteError, match="generated images 0..2: 12 of 12 values"):
        generate(Diverging(), 3, (1, 2, 2), steps=2, progress=False)


def test_output_path_is_checked_before_generating(model_dir, tmp_path, monkeypatch):
    import sddpm.generation

    calls = []
    monkeypatch.setattr(sddpm.generation, "generate", lambda *a, **k: calls.append(1))
    base = ["sample", "--checkpoint", str(model_dir), "--num", "2", "--steps", "2"]
    existing = tmp_path / "old.png"
    existing.write_bytes(b"keep me")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "file").write_text("")
    for out, message in [
        (existing, "exists; choose another name or pass --force"),
        (tmp_path / "folder.png", "is a folder"),
        (tmp_path / "file" / "x.png", "cannot write in"),  # the parent is a file
        (tmp_path / "x.jpeg", "must end in .png or .npz"),
    ]:
        result = CliRunner().invoke(app, [*base, "--out", str(out)])
        assert result.exit_code == 2 and message in result.output, (out, result.output)
    assert calls == [] and existing.read_bytes() == b"keep me"
    monkeypatch.undo()
    result = CliRunner().invoke(app, [*base, "--out", str(existing), "--force"])
    assert result.exit_code == 0, result.output
    assert Image.open(existing).size[0] > 0
    nested = tmp_path / "new" / "dir" / "s.npz"  # missing folders are made
    assert CliRunner().invoke(app, [*base, "--out", str(nested)]).exit_code == 0
    assert np.load(nested)["images"].shape == (2, 8, 8, 1)


def test_commands_that_sample_share_the_sampling_flags():
    from sddpm.cli._app import SAMPLING_FLAGS

    flags = {flag for flag, _, _ in SAMPLING_FLAGS.values()}
    assert {"--bf16", "--compile", "--neuron-kernel", "--device", "--spacing"} <= flags
    for command, own in [
        ("sample", flags),
        ("evaluate", flags),
        ("sweep-threshold", flags - {"--threshold"}),  # the swept values come from --values
    ]:
        result = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
        assert result.exit_code == 0
        given = {w for w in result.output.split() if w.startswith("--")}
        assert own | {"--run", "--checkpoint", "--weights"} <= given, command
    result = CliRunner().invoke(app, ["sweep-threshold", "--help"], terminal_width=200)
    assert "--threshold" not in result.output


def test_a_bad_sampling_flag_is_named(model_dir, tmp_path):
    args = ["sample", "--checkpoint", str(model_dir), "--out", str(tmp_path / "x.png")]
    for extra, message in [
        (["--batch-size", "0"], "--batch-size: batch_size must be an integer >= 1, got 0"),
        (["--spacing", "cubic"], "--spacing: unknown spacing 'cubic'"),
        (["--eta", "0.5", "--sampler", "ddpm"], "--eta: eta applies to the ddim sampler only"),
        (["--device", "bogus"], "--device: 'bogus' is not a device name; use 'cpu'"),
        (["--steps", "101"], "--steps: steps must be an integer in [1, 100]"),
    ]:
        result = CliRunner().invoke(app, [*args, *extra])
        assert result.exit_code == 2 and message in result.output, (extra, result.output)
    assert list(tmp_path.iterdir()) == []


def test_help_is_plain_text():
    """No reStructuredText markup and no line break inside a paragraph, for every command."""
    from sddpm.cli._app import plain_text

    assert plain_text("Write an ``.npz`` of\n    :func:`~sddpm.x.y` images.\n\n  Next.") == (
        "Write an .npz of sddpm.x.y images.\n\nNext."
    )
    runner = CliRunner()
    commands = [info.name for info in app.registered_commands]
    assert len(commands) >= 8
    for info in app.registered_commands:
        for paragraph in info.help.split("\n\n"):
            assert paragraph and "\n" not in paragraph, (info.name, info.help)
    for args in [[], *([name] for name in commands)]:
        result = runner.invoke(app, [*args, "--help"], terminal_width=100)
        assert result.exit_code == 0, args
        for markup in ("``", "`", ":func:", ":class:", ":mod:", ":meth:"):
            assert markup not in result.output, (args, markup)
