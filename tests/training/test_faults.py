"""Runs that survive faults: SIGTERM/SIGINT between checkpoints, corrupt checkpoints,
initialising a run from a trained model."""

import json
import os
import signal
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from sddpm.cli import app
from sddpm.generation import load_for_sampling
from sddpm.models import build_model, save_pretrained
from sddpm.rundir import (
    CheckpointSkipped,
    CorruptCheckpointError,
    find_model_dir,
    latest_resumable,
    load_training_state,
)
from sddpm.training import (
    Trainer,
    TrainingStopped,
    read_run_config,
    resumable_checkpoints,
    train,
)
from sddpm.training import loop as loop_module
from sddpm.training import signals as signals_module
from sddpm.training.signals import StopRequest

from .conftest import poison_loss


def _states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _signal_during_step(monkeypatch, at_step: int, signum: int) -> None:
    """Deliver ``signum`` to this process in the middle of update ``at_step`` (1-based)."""
    real = Trainer.train_step

    def step(self, x):
        if self.step + 1 == at_step:
            os.kill(os.getpid(), signum)  # the handler runs now; the step must still finish
        return real(self, x)

    monkeypatch.setattr(Trainer, "train_step", step)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_between_checkpoints_then_resume_is_bit_identical(
    tmp_path, tiny, monkeypatch, signum
):
    config = tiny("total_steps=8", "checkpoint_every=4", "keep_last=0")
    straight = train(config, tmp_path / "a", progress=False)
    run = tmp_path / "b"
    _signal_during_step(monkeypatch, 6, signum)
    with pytest.raises(TrainingStopped) as stopped:
        train(config, run, progress=False)
    monkeypatch.undo()
    assert stopped.value.step == 6 and stopped.value.signal_name == signal.Signals(signum).name
    assert stopped.value.checkpoint == run / "checkpoints" / "step_00000006"
    assert stopped.value.resume_command == f"sddpm train --resume {run}"
    assert "resume=True" in str(stopped.value)  # the library says how, in library terms
    assert [p.name for p in resumable_checkpoints(run)] == ["step_00000004", "step_00000006"]
    assert load_training_state(stopped.value.checkpoint)["step"] == 6
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    resumed = train(read_run_config(run), run, resume=True, progress=False)
    assert resumed.start_step == 6 and resumed.step == 8
    assert resumed.losses == straight.losses[6:]
    _states_equal(resumed.model.state_dict(), straight.model.state_dict())
    _states_equal(resumed.ema.state_dict(), straight.ema.state_dict())


def test_a_second_signal_exits_at_once(monkeypatch):
    kills = []
    monkeypatch.setattr(signals_module.os, "kill", lambda pid, sig: kills.append(sig))
    previous = signal.getsignal(signal.SIGTERM)
    with StopRequest(announce=False) as stop:
        assert signal.getsignal(signal.SIGTERM) == stop.handle
        stop.handle(signal.SIGTERM, None)
        assert stop.requested and stop.name == "SIGTERM" and kills == []  # first: after step
        stop.handle(signal.SIGTERM, None)
        # second: the default action (termination) is re-raised at once
        assert kills == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) == previous


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture()
def run_with_checkpoints(tmp_path, tiny):
    """A run with checkpoints at steps 2, 4 and 6."""
    run = tmp_path / "run"
    train(tiny("total_steps=6", "keep_last=0"), run, progress=False)
    return run


def test_corrupt_latest_checkpoint_sampling_falls_back_with_a_warning(run_with_checkpoints):
    run = run_with_checkpoints
    ckpts = run / "checkpoints"
    manifest = json.loads((ckpts / "step_00000006" / "manifest.json").read_text())
    assert set(manifest["files"]) == {
        "config.json",
        "model.safetensors",
        "ema.safetensors",
        "training_state.pt",
    }
    _truncate(ckpts / "step_00000006" / "ema.safetensors")
    with pytest.warns(CheckpointSkipped, match="step_00000006.*ema.safetensors"):
        setup = load_for_sampling(run)
    good = load_for_sampling(ckpts / "step_00000004")
    _states_equal(setup.model.state_dict(), good.model.state_dict())
    # a byte flipped in place (same size) is caught by the checksum too
    weights = ckpts / "step_00000004" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.warns(CheckpointSkipped) as caught:
        assert find_model_dir(run) == ckpts / "step_00000002"
    assert any("SHA-256" in str(w.message) for w in caught)


def test_corrupt_latest_training_state_resume_falls_back(tmp_path, tiny, run_with_checkpoints):
    run = run_with_checkpoints
    straight = train(tiny("total_steps=8", "keep_last=0"), tmp_path / "straight", progress=False)
    state = run / "checkpoints" / "step_00000006" / "training_state.pt"
    state.write_bytes(b"not a zip archive" * 10)  # garbage, even the same name
    (run / "checkpoints" / "step_00000006" / "manifest.json").unlink()  # no checksum to help
    with pytest.warns(CheckpointSkipped, match="training_state.pt") as caught:
        resumed = train(
            read_run_config(run).override(["total_steps=8"]), run, resume=True, progress=False
        )
    assert "is corrupt" in str(caught[0].message) and "pickled" not in str(caught[0].message)
    assert resumed.start_step == 4 and resumed.step == 8
    _states_equal(resumed.model.state_dict(), straight.model.state_dict())
    _states_equal(resumed.ema.state_dict(), straight.ema.state_dict())


def test_every_checkpoint_corrupt_is_one_clear_error(run_with_checkpoints):
    for ckpt in (run_with_checkpoints / "checkpoints").iterdir():
        _truncate(ckpt / "training_state.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointSkipped)
        with pytest.raises(ValueError, match="every checkpoint is corrupt"):
            latest_resumable(run_with_checkpoints)


def test_a_named_corrupt_checkpoint_is_one_clear_error(tmp_path, run_with_checkpoints):
    named = run_with_checkpoints / "checkpoints" / "step_00000006"
    _truncate(named / "model.safetensors")
    with pytest.raises(CorruptCheckpointError, match="model.safetensors") as err:
        load_for_sampling(named, weights="model")
    assert err.value.file == named / "model.safetensors"
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(
        app, ["sample", "--checkpoint", str(named), "--out", str(out), "--num", "1"]
    )
    assert result.exit_code == 2
    assert "model.safetensors is corrupt" in result.output and str(named) in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_a_save_pretrained_directory_is_checked_without_a_manifest(tmp_path, tiny):
    model = build_model(tiny().unet_config())
    directory = save_pretrained(model, tmp_path / "m")
    setup = load_for_sampling(directory)  # no manifest, no diffusion section
    assert setup.schedule.to_dict() == {"kind": "linear", "T": 1000, "beta_1": 1e-4, "beta_T": 0.02}
    _truncate(directory / "model.safetensors")
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        load_for_sampling(directory)


def test_init_from_starts_from_the_source_ema_and_refuses_other_architectures(tmp_path, tiny):
    source = train(tiny("total_steps=2"), tmp_path / "src", progress=False)
    config = tiny("total_steps=1", f"init_from={tmp_path / 'src'}")
    trainer = Trainer(config, tmp_path / "new", loop_module.DistContext(), progress=False)
    trainer.setup()
    trainer.restore(resume=False)
    reference = build_model(source.config.unet_config())
    reference.load_state_dict(source.ema.state_dict())
    x = torch.randn(2, *trainer.shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([3, 500])
    reference.eval(), trainer.model.eval()
    assert torch.equal(trainer.model(x, t), reference(x, t))  # the EMA, not the raw weights
    _states_equal(trainer.ema.state_dict(), source.ema.state_dict())
    assert trainer.step == 0

    wider = tiny("channels=16", f"init_from={tmp_path / 'src'}")
    other = Trainer(wider, tmp_path / "w", loop_module.DistContext(), progress=False)
    other.setup()
    with pytest.raises(ValueError, match="mis-shaped keys"):
        other.restore(resume=False)


def test_tsm_fine_tuning_starts_from_the_source_model_function(tmp_path, tiny):
    """SDM's recipe: --init-from a trained plain model with tsm=true adds the TSM scales at 1
    and starts from exactly the source model's function; then the scales train."""
    source = train(tiny("total_steps=2"), tmp_path / "src", progress=False)
    config = tiny("total_steps=2", "tsm=true", f"init_from={tmp_path / 'src'}")
    trainer = Trainer(config, tmp_path / "tsm", loop_module.DistContext(), progress=False)
    trainer.setup()
    added = trainer.init_from(tmp_path / "src")
    assert added and all(k.endswith("step_scale") for k in added)
    reference = build_model(source.config.unet_config())
    reference.load_state_dict(source.ema.state_dict())
    x = torch.randn(2, *trainer.shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([3, 500])
    reference.eval(), trainer.model.eval()
    assert torch.equal(trainer.model(x, t), reference(x, t))
    tuned = train(config, tmp_path / "tsm2", progress=False)
    scales = [p for n, p in tuned.model.named_parameters() if n.endswith("step_scale")]
    assert scales and any(not torch.equal(p, torch.ones_like(p)) for p in scales)  # they train


def test_cli_says_how_to_resume_after_sigterm(tmp_path, tiny, monkeypatch):
    (tmp_path / "tiny.json").write_text(tiny("total_steps=5", "checkpoint_every=0").to_json())
    run = tmp_path / "run"
    _signal_during_step(monkeypatch, 2, signal.SIGTERM)
    result = CliRunner().invoke(
        app, ["train", "--config", str(tmp_path / "tiny.json"), "--out", str(run), "--no-progress"]
    )
    assert result.exit_code == 128 + signal.SIGTERM, result.output
    assert f"resume with: sddpm train --resume {run}" in result.output
    assert [p.name for p in resumable_checkpoints(run)] == ["step_00000002"]


def test_init_from_keeps_the_init_of_entries_the_new_config_adds_only(tmp_path, tiny, monkeypatch):
    train(tiny("total_steps=2"), tmp_path / "src", progress=False)
    ckpt = find_model_dir(tmp_path / "src")
    ema = load_file(str(ckpt / "ema.safetensors"))
    real_build = loop_module.build_model
    adds = {"on": True}

    def build(config):  # stands in for a config field that adds parameters (e.g. TSM scales)
        model = real_build(config)
        if adds["on"]:
            model.register_parameter("new_scale", torch.nn.Parameter(torch.full((3,), 0.5)))
        return model

    monkeypatch.setattr(loop_module, "build_model", build)
    config = tiny("total_steps=1", f"init_from={tmp_path / 'src'}")
    trainer = Trainer(config, tmp_path / "new", loop_module.DistContext(), progress=False)
    trainer.setup()
    adds["on"] = False  # the source's own config builds no new_scale
    assert trainer.init_from(tmp_path / "src") == ["new_scale"]
    state = trainer.model.state_dict()
    assert torch.equal(state["new_scale"], torch.full((3,), 0.5))  # kept its init
    for k, v in ema.items():
        assert torch.equal(state[k], v), k

    # an entry the source's config does have, missing from its weights, is an error
    adds["on"] = True
    del ema["head.conv.weight"]
    save_file(ema, str(ckpt / "ema.safetensors"))
    (ckpt / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"missing keys: .*head\.conv\.weight"):
        trainer.init_from(tmp_path / "src")


def test_a_non_finite_loss_between_syncs_is_reported_at_its_own_step(tmp_path, tiny, monkeypatch):
    poison_loss(monkeypatch, 5, float("inf"))  # the 5th update
    run = tmp_path / "run"
    config = tiny("total_steps=12", "log_every=4", "checkpoint_every=3", "keep_last=0")
    with pytest.raises(loop_module.NonFiniteLossError, match="at step 5") as err:
        train(config, run, progress=False)
    # found at the checkpoint step 6 (the first read-back after it), before writing it
    assert err.value.step == 5 and err.value.loss == float("inf")
    assert err.value.checkpoint == run / "checkpoints" / "step_00000003"
    assert [p.name for p in resumable_checkpoints(run)] == ["step_00000003"]
