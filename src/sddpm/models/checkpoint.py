"""The model directory format: ``config.json`` + ``model.safetensors`` (+ ``ema.safetensors``).

A training run's checkpoints are model directories too; their layout, schema and integrity
belong to :mod:`sddpm.rundir`, whose :func:`~sddpm.rundir.find_model_dir` resolves a model
directory or a run directory to the (verified) model directory to load.

A directory is loadable on its own: the config says how to build the network, the weights
fill it. ``config.json`` holds ``{"format": "sddpm.model", "version": 1, "model": {...},
"default_weights": "model" | "ema", ...}``; other sections (training, diffusion) may sit beside
``model``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..io import atomic_path, state_dict_mismatch, write_json
from .unet import UNet

FORMAT = "sddpm.model"
VERSION = 1
CONFIG_NAME = "config.json"
WEIGHT_FILES = {"model": "model.safetensors", "ema": "ema.safetensors"}


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_state(path: str | os.PathLike, state: dict[str, torch.Tensor]) -> None:
    """Write a state_dict as safetensors, atomically."""
    with atomic_path(path) as tmp:
        save_file(_tensors(state), str(tmp), metadata={"format": FORMAT})


def save_pretrained(
    model: UNet,
    directory: str | os.PathLike,
    *,
    ema_state: dict[str, torch.Tensor] | None = None,
    default_weights: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save ``model`` (and optionally an EMA state_dict) to ``directory``; returns it.

    Each file is written atomically; the config goes last, so a directory with a
    ``config.json`` always has its weights.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_state(directory / WEIGHT_FILES["model"], model.state_dict())
    if ema_state is not None:
        save_state(directory / WEIGHT_FILES["ema"], ema_state)
    default = default_weights or ("ema" if ema_state is not None else "model")
    config = {
        "format": FORMAT,
        "version": VERSION,
        "model": model.config.to_dict(),
        "default_weights": default,
        **(extra or {}),
    }
    write_json(directory / CONFIG_NAME, config)
    return directory


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of a model directory, with a clear error if absent."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} is not an sddpm model directory: {path.name} is missing "
            "(make one with save_pretrained; CLI: `sddpm convert` or `sddpm train`)"
        )
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{path} is not an sddpm model config (format {config.get('format')!r})")
    return config


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` with a readable error listing missing/unexpected/mis-shaped keys."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    problem = state_dict_mismatch(expected, state)
    if problem:
        raise ValueError(f"{source} does not fit the model: {problem}")
    model.load_state_dict(state)


def load_pretrained(
    directory: str | os.PathLike, weights: str | None = None, map_location: str = "cpu"
) -> UNet:
    """Build the model a directory describes and load its weights (``"model"`` or ``"ema"``;
    default: the directory's ``default_weights``). Returned in eval mode.

    ``directory`` may also be a run directory: its newest good checkpoint is loaded
    (:func:`sddpm.rundir.load_model`, which also verifies the files)."""
    from ..rundir import load_model  # the run layout sits above the model format

    return load_model(directory, weights=weights, map_location=map_location).model


def find_model_dir(path: str | os.PathLike) -> Path:
    """A (verified) model directory as is, or a run directory's newest good checkpoint: see
    :func:`sddpm.rundir.find_model_dir`."""
    from ..rundir import find_model_dir as _find

    return _find(path)
