"""The model directory format: ``config.json`` + ``model.safetensors`` (+ ``ema.safetensors``).

A training run directory holds model directories as checkpoints:
``RUN_DIR/config.json`` (the run's resolved config, format ``sddpm.run``) and
``RUN_DIR/checkpoints/step_XXXXXXXX/`` (each a model directory plus the training state).
:func:`find_model_dir` resolves either kind of path to the model directory to load.

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
from safetensors.torch import load_file, save_file
from torch import nn

from ..io import atomic_path, state_dict_mismatch, write_json
from .config import UNetConfig
from .unet import UNet, build_model

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
            "(make one with `sddpm convert` or `sddpm train`)"
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

    ``directory`` may also be a run directory: its latest checkpoint is loaded."""
    directory = find_model_dir(directory)
    config = read_config(directory)
    which = weights or config.get("default_weights", "model")
    if which not in WEIGHT_FILES:
        raise ValueError(f"weights must be one of {sorted(WEIGHT_FILES)}, got {which!r}")
    path = directory / WEIGHT_FILES[which]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; available: {_available(directory)}")
    model = build_model(UNetConfig.from_dict(config["model"]))
    load_state_into(model, load_file(str(path), device=map_location), str(path))
    return model.eval()


CHECKPOINTS_DIR = "checkpoints"
STEP_PREFIX = "step_"


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run (those with a ``config.json``), oldest step first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        suffix = d.name.removeprefix(STEP_PREFIX)
        if d.name.startswith(STEP_PREFIX) and suffix.isdigit() and (d / CONFIG_NAME).is_file():
            found.append((int(suffix), d))
    return [d for _, d in sorted(found)]


def find_model_dir(path: str | os.PathLike) -> Path:
    """A model directory as is, or the latest complete checkpoint of a run directory."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        try:
            if json.loads((path / CONFIG_NAME).read_text()).get("format") == FORMAT:
                return path
        except json.JSONDecodeError as err:
            raise ValueError(f"{path / CONFIG_NAME} is not valid JSON: {err}") from None
    ckpts = checkpoint_dirs(path)
    if not ckpts:
        raise FileNotFoundError(
            f"{path} holds no checkpoint: expected a model directory (config.json + "
            f"model.safetensors) or a run directory with {CHECKPOINTS_DIR}/{STEP_PREFIX}*/ "
            "(train one with `sddpm train`, or convert a published one with `sddpm convert`)"
        )
    return ckpts[-1]


def _available(directory: Path) -> list[str]:
    return [k for k, f in WEIGHT_FILES.items() if (directory / f).is_file()]
