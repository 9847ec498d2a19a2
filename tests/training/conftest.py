from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sddpm.config import RunConfig, run_preset


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread: these models are tiny, and on shared cores more threads only contend
    (and would make float summation order depend on the machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = [
    "channels=8",
    "channel_mult=[1,2]",
    "num_res_blocks=1",
    "batch_size=8",
    "total_steps=6",
    "warmup_steps=3",
    "lr=1e-3",
    "ema_decay=0.9",
    "checkpoint_every=2",
    "keep_last=2",
    "num_samples=0",
    "log_every=1",
    "device=cpu",
    "threads=1",
    "seed=3",
]


def tiny_config(*overrides: str) -> RunConfig:
    """The digits preset shrunk to a few-millisecond step (8 channels, batch 8, 6 steps)."""
    return run_preset("digits").override([*TINY, *overrides])


@pytest.fixture()
def tiny():
    return tiny_config


def small_folder(root: Path, n: int = 13) -> list[str]:
    """``n`` random 8x8 grayscale PNGs in ``root``; returns the overrides that train the tiny
    config on them with random flips. 13 images: not a multiple of 2 or of the batch of 8, so
    epochs end inside batches and a per-rank padded order would differ from the global one."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / f"{i:02d}.png")
    return ["data.dataset=folder", f"data.root={root}", "data.hflip=true"]


def poison_loss(monkeypatch, call: int, factor: float) -> None:
    """Multiply the training loss of the ``call``-th micro-batch (1-based) by ``factor``
    (NaN or inf): a non-finite loss at a known update."""
    from sddpm.training import loop

    real = loop.training_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * factor if calls["n"] == call else loss

    monkeypatch.setattr(loop, "training_loss", poisoned)
