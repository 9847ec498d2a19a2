import json

import pytest
from typer.testing import CliRunner

from sddpm.cli import app
from sddpm.config import RUN_PRESETS, RunConfig, run_preset


@pytest.mark.parametrize("name", sorted(RUN_PRESETS))
def test_json_round_trip(name):
    config = run_preset(name)
    config.validate()
    again = RunConfig.from_json(config.to_json())
    assert again == config
    assert json.loads(again.to_json()) == config.to_dict()


@pytest.mark.parametrize("name", ["cifar10", "mnist", "fashion-mnist", "celeba64"])
def test_paper_presets(name):
    c = run_preset(name)
    assert (c.train.batch_size, c.optim.lr, c.optim.warmup_steps) == (128, 2e-4, 5000)
    assert (c.optim.grad_clip, c.train.total_steps, c.optim.ema_decay) == (1.0, 500_000, 0.9999)
    assert c.model.preset == name and c.data.dataset == name
    assert c.unet_config().channels == 128


def test_overrides_resolve_every_form():
    c = run_preset("digits").override(
        [
            "lr=1e-4",
            "train.total_steps=200",
            "betas=[0.5, 0.9]",
            "grad_clip=null",
            "bf16=false",
            "channels=16",
            "channel_mult=1,2",
            "threshold=0.9",
            "model.kind=ann",
            "data.root=/data/x",
        ]
    )
    assert c.optim.lr == 1e-4 and isinstance(c.optim.lr, float)
    assert c.train.total_steps == 200 and c.optim.betas == (0.5, 0.9)
    assert c.optim.grad_clip is None and c.train.bf16 is False and c.data.root == "/data/x"
    unet = c.unet_config()
    assert (unet.channels, unet.channel_mult, unet.kind) == (16, (1, 2), "ann")
    assert unet.neuron.threshold == 0.9 and unet.diffusion_steps == c.diffusion.T
    assert RunConfig.from_json(c.to_json()) == c


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("nonsense=1", "unknown setting"),
        ("lr=fast", "optim.lr must be a number"),
        ("total_steps=1.5", "must be an integer"),
        ("diffusion_steps=10", "set kind with model.kind, diffusion_steps with T"),
        ("lr", "expected key=value"),
    ],
)
def test_bad_overrides_name_the_problem(assignment, message):
    with pytest.raises(ValueError, match=message):
        run_preset("digits").override([assignment])


def test_validate_lists_problems():
    c = run_preset("digits").override(
        ["batch_size=10", "grad_accum=3", "image_channels=3", "neuron_kernel=fast"]
        + ["sampler=analytic-ddpm"]
    )
    with pytest.raises(ValueError) as err:
        c.validate()
    assert "not divisible by train.grad_accum" in str(err.value)
    kernels = "('auto', 'eager', 'compiled', 'triton')"
    assert f"train.neuron_kernel must be one of {kernels}" in str(err.value)
    assert "1 channel(s) but the model takes 3" in str(err.value)
    # sample grids during training have no eps moments: the analytic samplers are refused
    assert "train.sampler must be one of ('ddpm', 'ddim', 'dpm-solver++', 'dpm-solver++3m')" in str(
        err.value
    )


def test_cli_print_config_applies_options_and_sets():
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--preset",
            "digits",
            "--out",
            "unused",
            "--model",
            "ann",
            "--steps",
            "123",
            "--lr",
            "0.01",
            "--set",
            "ema_decay=0.5",
            "--set",
            "channels=16",
            "--print-config",
        ],
    )
    assert result.exit_code == 0, result.output
    c = RunConfig.from_json(result.output)
    assert (c.model.kind, c.train.total_steps, c.optim.lr, c.optim.ema_decay) == (
        "ann",
        123,
        0.01,
        0.5,
    )
    assert c.model.overrides == {"channels": 16}


def test_cli_rejects_unknown_setting():
    result = CliRunner().invoke(
        app, ["train", "--preset", "digits", "--out", "x", "--set", "lrr=1", "--print-config"]
    )
    assert result.exit_code == 2
    assert "unknown setting 'lrr'" in result.output


def test_cli_refuses_to_overwrite_a_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    result = CliRunner().invoke(app, ["train", "--preset", "digits", "--out", str(run)])
    assert result.exit_code == 2
    assert "already holds a run" in result.output and "--resume" in result.output


def test_cli_needs_out_or_resume():
    result = CliRunner().invoke(app, ["train", "--preset", "digits"])
    assert result.exit_code == 2 and "--out DIR" in result.output
