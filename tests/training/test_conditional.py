"""Class-conditional training: labels with the images, label dropout, exact resume.

The dropout decisions are a function of (seed, step, global position): no state to save."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sddpm.data import DatasetError, build_dataset
from sddpm.diffusion import image_seed, label_dropout_uniforms
from sddpm.images import grid_cells
from sddpm.training import (
    Trainer,
    latest_checkpoint,
    load_training_state,
    read_run_config,
    train,
)
from sddpm.training import loop as loop_module
from sddpm.training.loop import micro_batch_positions, rank_batch_positions

from .test_train import _states_equal

COND = ("num_classes=10", "cond_drop=0.5")


def test_resume_is_bit_identical_with_labels(tmp_path, tiny):
    cond = (*COND, "grad_accum=2")
    straight = train(tiny(*cond, "total_steps=6"), tmp_path / "a", progress=False)
    first = train(tiny(*cond, "total_steps=3"), tmp_path / "b", progress=False)
    assert first.losses == straight.losses[:3]
    config = read_run_config(tmp_path / "b").override(["total_steps=6"])
    resumed = train(config, tmp_path / "b", resume=True, progress=False)
    assert resumed.start_step == 3 and resumed.losses == straight.losses[3:]
    _states_equal(resumed.model.state_dict(), straight.model.state_dict())
    _states_equal(resumed.ema.state_dict(), straight.ema.state_dict())
    # the dropout decisions need no state: the training state holds none
    for run in ("a", "b"):
        assert "label_dropout" not in load_training_state(latest_checkpoint(tmp_path / run))
    # the class embedding trained (the null row too: cond_drop=0.5)
    assert "class_embed.weight" in straight.model.state_dict()


def test_labels_travel_with_their_images_and_drop_at_the_configured_rate(
    tmp_path, tiny, monkeypatch
):
    p, steps = 0.25, 20
    config = tiny("num_classes=10", f"cond_drop={p}", f"total_steps={steps}", "checkpoint_every=0")
    batches, seen = [], []
    real_step, real_loss = Trainer.train_step, loop_module.training_loss

    def step(self, batch):
        batches.append((batch[0].clone(), batch[1].clone()))
        return real_step(self, batch)

    def loss(*args, **kwargs):
        seen.append(kwargs["y"].clone())
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", step)
    monkeypatch.setattr(loop_module, "training_loss", loss)
    train(config, tmp_path / "run", progress=False)

    # every batch's labels are its images' classes in the dataset
    data = build_dataset("digits", hflip=False)
    images = torch.stack([data[i] for i in range(len(data))]).flatten(1)
    for x, y in batches:
        index = [int(torch.nonzero((images == row).all(1))[0]) for row in x.flatten(1)]
        assert torch.equal(y, data.labels[index])
    # the model saw them with dropout: exactly each step's (seed, step) decisions, at rate ~p
    dropped = 0
    for step, ((_, y), y_seen) in enumerate(zip(batches, seen, strict=True)):
        drop = label_dropout_uniforms(3, step, 8) < p
        assert torch.equal(y_seen, torch.where(drop, 10, y))
        dropped += int(drop.sum())
    assert len(seen) == steps and dropped == int(torch.cat(seen).eq(10).sum())
    # 160 labels: a binomial(160, 0.25) count lies in [24, 56] with probability > 0.999
    assert 24 <= dropped <= 56, dropped


@pytest.mark.parametrize(
    ("world", "accum", "micro"), [(1, 1, 8), (1, 2, 4), (2, 1, 4), (2, 2, 2), (4, 2, 1)]
)
def test_a_ranks_label_rows_sit_at_their_images_global_positions(world, accum, micro):
    """Rank r's labels y [A m] are laid out like its images (micro-batch k is y[k::A]): row
    j A + k is at global position micro_batch_positions(k)[j], where the step's t and noise
    come from. Over the ranks the rows cover the global batch once."""
    rows = []
    for rank in range(world):
        pos = rank_batch_positions(micro, accum, world, rank)
        assert pos.dtype == torch.int64 and pos.shape == (accum * micro,)
        for k in range(accum):
            assert torch.equal(pos[k::accum], micro_batch_positions(k, micro, accum, world, rank))
        assert torch.equal(pos, torch.arange(accum * micro) * world + rank)  # rank::world
        rows.append(pos)
    assert sorted(torch.cat(rows).tolist()) == list(range(world * accum * micro))


def test_an_old_training_state_with_dropout_streams_still_resumes(tmp_path, tiny, monkeypatch):
    """Checkpoints from before the (seed, step) decisions carry per-rank dropout generator
    states ("label_dropout"): they resume without error, the old state is ignored, and the
    decisions after the resume are the (seed, step) ones of an uninterrupted run."""
    cond = (*COND, "grad_accum=2")
    straight = train(tiny(*cond, "total_steps=6"), tmp_path / "a", progress=False)
    real_save = loop_module.save_checkpoint

    def old_format(run_dir, step, model, training_state, **kwargs):
        # what the old trainer saved: its one rank's stream, seeded from (seed 3, rank 0) and
        # advanced by one uniform per label of every step
        gen = torch.Generator().manual_seed(image_seed(3, 0, 2))
        torch.rand(step * 8, generator=gen)
        old = {**training_state, "label_dropout": [gen.get_state()]}
        return real_save(run_dir, step, model, old, **kwargs)

    monkeypatch.setattr(loop_module, "save_checkpoint", old_format)
    train(tiny(*cond, "total_steps=3"), tmp_path / "b", progress=False)
    monkeypatch.undo()
    old = load_training_state(latest_checkpoint(tmp_path / "b"))
    assert old["step"] == 3 and len(old["label_dropout"]) == 1

    config = read_run_config(tmp_path / "b").override(["total_steps=6"])
    resumed = train(config, tmp_path / "b", resume=True, progress=False)
    assert resumed.start_step == 3 and resumed.losses == straight.losses[3:]
    _states_equal(resumed.model.state_dict(), straight.model.state_dict())
    _states_equal(resumed.ema.state_dict(), straight.ema.state_dict())
    assert "label_dropout" not in load_training_state(latest_checkpoint(tmp_path / "b"))


def test_class_count_is_checked_before_training(tmp_path, tiny):
    with pytest.raises(DatasetError, match="num_classes=5 does not match the 10 classes"):
        train(tiny("num_classes=5"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # nothing written


def test_image_folder_classes_are_saved_and_the_grid_has_one_class_per_row(tmp_path, tiny):
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for name in ("dog", "cat", "emu"):  # label k: the k-th sorted name
        (root / name).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, (8, 8), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(root / name / f"{i}.png")
    config = tiny(
        "dataset=folder", f"root={root}", "num_classes=3", "total_steps=2", "batch_size=4",
        "num_samples=7", "sample_steps=2",
    )  # fmt: skip
    train(config, tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["classes"] == ["cat", "dog", "emu"]
    # 7 samples, image i of class i mod 3: rows of 3, 2 and 2 images
    grid = Image.open(tmp_path / "run" / "samples" / "step_00000002.png")
    cells, rows, cols = grid_cells(7, labels=[i % 3 for i in range(7)])
    assert (rows, cols) == (3, 3)
    scale = 4  # 8-pixel images are magnified to 32
    assert grid.size == ((cols * 10 + 2) * scale, (rows * 10 + 2) * scale)
