"""The training loop on a tiny model: run directory, bit-identical resume, non-finite loss."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sddpm.models import find_model_dir, load_pretrained
from sddpm.training import (
    NonFiniteLossError,
    latest_checkpoint,
    load_training_state,
    read_metrics,
    read_run_config,
    resumable_checkpoints,
    train,
)
from sddpm.training.loop import Trainer

from .conftest import poison_loss, small_folder


def test_run_directory_layout(tmp_path, tiny):
    config = tiny("num_samples=4", "sample_steps=2", "sample_every=4", "total_steps=5")
    result = train(config, tmp_path / "run", command=["sddpm", "train", "test"], progress=False)
    run = tmp_path / "run"
    assert result.step == 5 and len(result.losses) == 5
    saved = json.loads((run / "config.json").read_text())
    assert saved["format"] == "sddpm.run" and saved["commands"][0]["argv"][-1] == "test"
    assert read_run_config(run) == config
    # checkpoints at 2 and 4 and at the end (5); keep_last=2 keeps 4 and 5
    assert [p.name for p in resumable_checkpoints(run)] == ["step_00000004", "step_00000005"]
    ckpt = latest_checkpoint(run)
    assert find_model_dir(run) == ckpt == result.checkpoint
    state = load_training_state(ckpt)  # weights_only=True
    assert state["step"] == 5 and state["data"]["position"] == 5 * 8
    assert {"optimizer", "scheduler", "rng"} <= set(state)
    model_cfg = json.loads((ckpt / "config.json").read_text())
    assert model_cfg["diffusion"] == {
        "schedule": {"kind": "linear", "T": 1000, "beta_1": 1e-4, "beta_T": 0.02},
        "prediction": "eps",
    }
    assert model_cfg["run"]["step"] == 5 and model_cfg["default_weights"] == "ema"
    ema_model = load_pretrained(run)
    for k, v in ema_model.state_dict().items():
        assert torch.equal(v, result.ema.state_dict()[k])
    raw = load_pretrained(run, weights="model")
    for k, v in raw.state_dict().items():
        assert torch.equal(v, result.model.state_dict()[k])
    rows = read_metrics(run / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["loss"] == pytest.approx(result.losses[0], rel=1e-5)
    assert rows[0]["lr"] == pytest.approx(1e-3 / 3) and rows[-1]["lr"] == pytest.approx(1e-3)
    assert all(r["images_per_s"] > 0 for r in rows)
    grids = sorted(p.name for p in (run / "samples").iterdir())
    assert grids == ["step_00000004.png", "step_00000005.png"]
    assert Image.open(run / "samples" / grids[0]).format == "PNG"


def _states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_is_bit_identical(tmp_path, tiny):
    straight = train(tiny("total_steps=6"), tmp_path / "a", progress=False)
    first = train(tiny("total_steps=3"), tmp_path / "b", progress=False)
    assert first.losses == straight.losses[:3]
    # extend the interrupted run to 6 steps from its step-3 checkpoint
    config = read_run_config(tmp_path / "b").override(["total_steps=6"])
    resumed = train(config, tmp_path / "b", resume=True, progress=False)
    assert resumed.start_step == 3 and resumed.step == 6
    assert resumed.losses == straight.losses[3:]
    _states_equal(resumed.model.state_dict(), straight.model.state_dict())
    _states_equal(resumed.ema.state_dict(), straight.ema.state_dict())
    a = load_training_state(latest_checkpoint(tmp_path / "a"))
    b = load_training_state(latest_checkpoint(tmp_path / "b"))
    for i, s in a["optimizer"]["state"].items():
        _states_equal(s, b["optimizer"]["state"][i])
    assert a["scheduler"] == b["scheduler"] and a["data"] == b["data"]
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.csv")] == list(range(1, 7))


def test_a_checkpoint_with_a_version_1_data_position_resumes(tmp_path, tiny, monkeypatch):
    """Checkpoints written before the global data stream hold the sampler's per-rank
    (epoch, offset, world_size) position; one process resumes it exactly (13 images, batch 8:
    the saved position, entry 24, is in epoch 1, and the resumed steps cross two more epoch
    ends)."""
    from sddpm.data import ShardedInfiniteSampler

    config = tiny(*small_folder(tmp_path / "images"), "total_steps=6")
    straight = train(config, tmp_path / "a", progress=False)

    def version_1(self):  # what the sampler saved before (one process: no padding)
        epoch, offset = divmod(self.position, self.num_items)
        return {"epoch": epoch, "offset": offset, "seed": self.seed, "world_size": 1,
                "num_items": self.num_items, "shuffle": True, "drop_last": False}  # fmt: skip

    with monkeypatch.context() as m:
        m.setattr(ShardedInfiniteSampler, "state_dict", version_1)
        first = train(config.override(["total_steps=3"]), tmp_path / "b", progress=False)
    saved = load_training_state(latest_checkpoint(tmp_path / "b"))["data"]
    assert (saved["epoch"], saved["offset"]) == (1, 11) and "position" not in saved
    assert first.losses == straight.losses[:3]
    resumed = train(config, tmp_path / "b", resume=True, progress=False)
    assert resumed.losses == straight.losses[3:]
    _states_equal(resumed.model.state_dict(), straight.model.state_dict())
    _states_equal(resumed.ema.state_dict(), straight.ema.state_dict())
    assert load_training_state(latest_checkpoint(tmp_path / "b"))["data"]["position"] == 6 * 8


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny, monkeypatch):
    poison_loss(monkeypatch, 5, float("nan"))  # the 5th update
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="at step 5") as err:
        train(tiny("total_steps=8"), run, progress=False)
    assert err.value.step == 5 and err.value.checkpoint == run / "checkpoints" / "step_00000004"
    assert "step_00000004" in str(err.value)
    assert "Lower optim.lr (CLI: --set lr=...)" in str(err.value)
    assert "train(..., resume=True) (CLI: `sddpm train --resume RUN_DIR`)" in str(err.value)
    assert [p.name for p in resumable_checkpoints(run)] == ["step_00000002", "step_00000004"]
    weights = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_resume_follows_changed_settings(tmp_path, tiny):
    run = tmp_path / "run"
    train(tiny("total_steps=2"), run, progress=False)
    config = read_run_config(run).override(["total_steps=4", "lr=5e-4", "warmup_steps=8"])
    resumed = train(config, run, resume=True, progress=False)
    assert resumed.start_step == 2 and resumed.step == 4
    lrs = [r["lr"] for r in read_metrics(run / "metrics.csv")]
    assert lrs == pytest.approx([1e-3 / 3, 2e-3 / 3, 5e-4 * 3 / 8, 5e-4 * 4 / 8])
    assert read_run_config(run).optim.lr == 5e-4
    assert len(json.loads((run / "config.json").read_text())["commands"]) == 2


def test_sampling_reads_back_the_schedule_and_prediction_training_wrote(tmp_path, tiny):
    from sddpm.generation import load_for_sampling

    config = tiny("prediction=v", "total_steps=2", "T=200")
    train(config, tmp_path / "run", progress=False)
    setup = load_for_sampling(tmp_path / "run")
    assert setup.prediction == "v"
    assert setup.schedule.T == 200 and setup.model.config.diffusion_steps == 200


def test_channels_last_training_follows_the_contiguous_run(tmp_path, tiny):
    """train.memory_format=channels_last: NHWC weights while training, the same losses up to
    conv summation order, and a checkpoint written contiguous that loads."""
    nchw = train(tiny("total_steps=3"), tmp_path / "a", progress=False)
    nhwc = train(
        tiny("total_steps=3", "memory_format=channels_last"), tmp_path / "b", progress=False
    )
    conv_weights = [p for p in nhwc.model.parameters() if p.dim() == 4]
    assert conv_weights and all(p.stride(1) == 1 for p in conv_weights)
    assert nhwc.losses == pytest.approx(nchw.losses, rel=1e-3)
    assert read_run_config(tmp_path / "b").train.memory_format == "channels_last"
    saved = load_file(latest_checkpoint(tmp_path / "b") / "ema.safetensors")
    assert all(t.is_contiguous() for t in saved.values())
    _states_equal(saved, {k: v.cpu() for k, v in nhwc.ema.state_dict().items()})


def test_a_trainer_without_data_trains_on_given_images(tiny):
    """Trainer.without_data: the update sddpm train makes, fed by the caller (the benchmarks);
    no data set is read (the configured folder does not exist)."""
    config = tiny("dataset=folder", "data.root=/nonexistent/images")
    trainer = Trainer.without_data(config, "cpu")
    assert trainer.last_loss is None
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    x = torch.rand(8, *trainer.shape) * 2 - 1
    trainer.train_step(x)
    trainer.train_step(x)
    assert trainer.step == 2 and trainer.last_loss.shape == () and 0 < trainer.last_loss < 10
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > len(before) // 2
