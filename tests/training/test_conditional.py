"""Class-conditional training: labels with the images, label dropout, exact resume."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sddpm.data import DatasetError, build_dataset
from sddpm.diffusion import label_dropout_generator
from sddpm.images import grid_cells
from sddpm.training import (
    Trainer,
    latest_checkpoint,
    load_training_state,
    read_run_config,
    train,
)
from sddpm.training import loop as loop_module

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
    a = load_training_state(latest_checkpoint(tmp_path / "a"))
    b = load_training_state(latest_checkpoint(tmp_path / "b"))
    assert len(a["label_dropout"]) == 1  # one stream per rank
    assert torch.equal(a["label_dropout"][0], b["label_dropout"][0])
    # the stream advanced by one uniform per label: 6 steps x 8 images
    gen = label_dropout_generator(3)
    torch.rand(6 * 8, generator=gen)
    assert torch.equal(a["label_dropout"][0], gen.get_state())
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
    # the model saw them with dropout: exactly the seeded stream's decisions, at rate ~p
    gen = label_dropout_generator(3)
    dropped = 0
    for (_, y), y_seen in zip(batches, seen, strict=True):
        drop = torch.rand(8, generator=gen) < p
        assert torch.equal(y_seen, torch.where(drop, 10, y))
        dropped += int(drop.sum())
    assert len(seen) == steps and dropped == int(torch.cat(seen).eq(10).sum())
    # 160 labels: a binomial(160, 0.25) count lies in [24, 56] with probability > 0.999
    assert 24 <= dropped <= 56, dropped


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
