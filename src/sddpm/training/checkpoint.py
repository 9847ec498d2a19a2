"""The run directory: resolved config, checkpoints (model directory + training state), pruning.

::

    RUN_DIR/
      config.json                 {"format": "sddpm.run", "config": RunConfig, "commands": [...]}
      metrics.csv                 step, loss, lr, grad_norm, steps/s, images/s, elapsed
      samples/step_XXXXXXXX.png   sample grids of the EMA model
      tensorboard/                when the tensorboard package is installed
      checkpoints/step_XXXXXXXX/  a model directory (config.json, model.safetensors,
                                  ema.safetensors) + training_state.pt

A checkpoint is written into a hidden temporary directory beside its final place and renamed
into place when complete, so a run killed at any moment leaves only whole checkpoints (the
temporary leftovers are ignored by :func:`sddpm.models.checkpoint.checkpoint_dirs` and removed
on resume). ``training_state.pt`` holds only tensors, numbers, strings and containers, so it is
read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import RUN_FORMAT, RUN_VERSION, RunConfig
from ..io import write_json
from ..models.checkpoint import CHECKPOINTS_DIR, CONFIG_NAME, STEP_PREFIX, checkpoint_dirs
from ..models.checkpoint import save_pretrained as _save_pretrained

TRAINING_STATE_NAME = "training_state.pt"
TRAINING_STATE_FORMAT = "sddpm.training_state"
METRICS_NAME = "metrics.csv"
SAMPLES_DIR = "samples"
TENSORBOARD_DIR = "tensorboard"


def step_name(step: int) -> str:
    """``step_00001500`` for step 1500."""
    return f"{STEP_PREFIX}{int(step):08d}"


# ---------------------------------------------------------------------- run config
def write_run_config(
    run_dir: str | os.PathLike, config: RunConfig, command: list[str] | None = None
) -> Path:
    """Write ``RUN_DIR/config.json`` (atomically), appending ``command`` to its history."""
    path = Path(run_dir) / CONFIG_NAME
    commands: list[dict[str, Any]] = []
    if path.is_file():
        try:
            commands = list(json.loads(path.read_text()).get("commands", []))
        except (json.JSONDecodeError, AttributeError):
            commands = []
    commands.append(
        {
            "argv": list(command) if command is not None else list(sys.argv),
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
    )
    from .. import __version__

    write_json(
        path,
        {
            "format": RUN_FORMAT,
            "version": RUN_VERSION,
            "config": config.to_dict(),
            "commands": commands,
            "versions": {"sddpm": __version__, "torch": torch.__version__},
        },
    )
    return path


def read_run_config(run_dir: str | os.PathLike) -> RunConfig:
    """The :class:`RunConfig` saved in ``RUN_DIR/config.json``."""
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir} is not a training run directory: {path.name} is missing "
            "(start a run with `sddpm train --preset NAME --out DIR`)"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if raw.get("format") != RUN_FORMAT:
        raise ValueError(
            f"{path} is not a run config (format {raw.get('format')!r}, expected {RUN_FORMAT!r})"
        )
    return RunConfig.from_dict(raw["config"])


# ---------------------------------------------------------------------- checkpoints
def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    training_state: dict[str, Any],
    *,
    ema_state: dict[str, torch.Tensor] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``RUN_DIR/checkpoints/step_XXXXXXXX/`` atomically; returns its path.

    The directory is a model directory (:func:`sddpm.models.save_pretrained` with ``extra``
    sections in its ``config.json``) plus ``training_state.pt``.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        torch.save(training_state, tmp / TRAINING_STATE_NAME)
        _save_pretrained(model, tmp, ema_state=ema_state, extra=extra)
        if final.exists():  # only when a step is saved twice (never in a normal run)
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def resumable_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints that also hold a training state, oldest first."""
    return [d for d in checkpoint_dirs(run_dir) if (d / TRAINING_STATE_NAME).is_file()]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint a run can resume from, or ``None``."""
    found = resumable_checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step number in a checkpoint directory's name."""
    return int(Path(path).name.removeprefix(STEP_PREFIX))


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints (0 keeps all); returns the deleted."""
    found = checkpoint_dirs(run_dir)
    doomed = found[:-keep_last] if keep_last > 0 else []
    for d in doomed:
        shutil.rmtree(d, ignore_errors=True)
    return doomed


def remove_partial_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Delete temporary directories left by a run killed while writing a checkpoint."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    stale = [d for d in root.iterdir() if d.name.startswith(f".{STEP_PREFIX}") and d.is_dir()]
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    return stale


def load_training_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """``training_state.pt`` of a checkpoint, read with ``weights_only=True`` onto the CPU."""
    path = Path(checkpoint) / TRAINING_STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {checkpoint} cannot be resumed from")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != TRAINING_STATE_FORMAT:
        raise ValueError(f"{path} is not an sddpm training state")
    return state


# ---------------------------------------------------------------------- RNG states
def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's global RNG states (torch, CUDA, numpy, python) as weights_only-safe data."""
    key, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": str(key),
            "state": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": [int(version), [int(x) for x in internal], gauss_next],
        "cuda": None,
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (
            n["key"],
            n["state"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if device is not None and device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
