"""The run directory: its layout, the checkpoint schema and the checkpoints' integrity.

This module is the one owner of what training writes and what sampling, evaluation and resume
read back::

    RUN_DIR/
      config.json                 {"format": "sddpm.run", "config": RunConfig, "commands": [...]}
      metrics.csv                 step, loss, lr, grad_norm, steps/s, images/s, elapsed
      samples/step_XXXXXXXX.png   sample grids of the EMA model
      tensorboard/                when the tensorboard package is installed
      checkpoints/step_XXXXXXXX/  one checkpoint:
        config.json               a model config (format "sddpm.model") with a "diffusion"
                                  section {"schedule": {...}, "prediction": "eps" | "v"} and a
                                  "run" section (step, images seen, world size, run config)
        model.safetensors         the trained weights
        ema.safetensors           their exponential moving average (the default for sampling)
        training_state.pt         optimiser, scheduler, data position, RNG states (tensors,
                                  numbers, strings and containers: read with weights_only=True)
        manifest.json             SHA-256 and size of every other file, written last

**Integrity.** A checkpoint is written into a hidden temporary directory beside its final
place; every file is fsynced, the manifest is written last, and the directory is renamed into
place (and its parent fsynced), so a run killed at any moment leaves only whole checkpoints.
On load the manifest is verified; a checkpoint of a run that fails verification or cannot be
read is skipped with a :class:`CheckpointSkipped` warning naming it, and the previous good one
is used (:func:`find_model_dir`, :func:`load_model`, :func:`latest_resumable`). A model
directory named explicitly that is corrupt raises :class:`CorruptCheckpointError` naming the
file. A model directory written by :func:`sddpm.models.save_pretrained` or ``sddpm convert``
has no manifest (its safetensors headers are still checked) and no ``diffusion`` section: it
samples with the published linear schedule over the model's ``diffusion_steps``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .config import RUN_FORMAT, RUN_VERSION, RunConfig
from .diffusion.schedule import NoiseSchedule
from .io import (
    UnreadableFileError,
    atomic_dir,
    fsync_path,
    load_torch_file,
    sha256_file,
    write_json,
)
from .models.checkpoint import (
    CONFIG_NAME,
    WEIGHT_FILES,
    load_state_into,
    read_config,
    save_pretrained,
)
from .models.checkpoint import (
    FORMAT as MODEL_FORMAT,
)
from .models.config import UNetConfig
from .models.unet import UNet, build_model

__all__ = [
    "CHECKPOINTS_DIR",
    "MANIFEST_NAME",
    "METRICS_NAME",
    "SAMPLES_DIR",
    "STEP_PREFIX",
    "TENSORBOARD_DIR",
    "TRAINING_STATE_FORMAT",
    "TRAINING_STATE_NAME",
    "Checkpoint",
    "CheckpointSkipped",
    "CorruptCheckpointError",
    "LoadedModel",
    "checkpoint_dirs",
    "checkpoint_step",
    "diffusion_section",
    "find_model_dir",
    "latest_checkpoint",
    "latest_resumable",
    "load_model",
    "load_training_state",
    "load_weights",
    "parse_diffusion",
    "prune_checkpoints",
    "read_checkpoint",
    "read_run_config",
    "remove_partial_checkpoints",
    "resumable_checkpoints",
    "save_checkpoint",
    "step_name",
    "verify_checkpoint",
    "write_run_config",
]

CHECKPOINTS_DIR = "checkpoints"
STEP_PREFIX = "step_"
TRAINING_STATE_NAME = "training_state.pt"
TRAINING_STATE_FORMAT = "sddpm.training_state"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "sddpm.manifest"
METRICS_NAME = "metrics.csv"
SAMPLES_DIR = "samples"
TENSORBOARD_DIR = "tensorboard"


class CorruptCheckpointError(ValueError):
    """A checkpoint's file is missing, truncated, altered or unreadable.

    ``checkpoint`` is the checkpoint (model) directory, ``file`` the bad file in it."""

    def __init__(self, checkpoint: Path, file: Path, reason: str) -> None:
        self.checkpoint, self.file, self.reason = Path(checkpoint), Path(file), reason
        super().__init__(f"{file} is corrupt: {reason} (checkpoint {checkpoint})")


class CheckpointSkipped(UserWarning):
    """A run's checkpoint failed verification or loading and an older one is used instead."""


def step_name(step: int) -> str:
    """``step_00001500`` for step 1500."""
    return f"{STEP_PREFIX}{int(step):08d}"


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step number in a checkpoint directory's name."""
    return int(Path(path).name.removeprefix(STEP_PREFIX))


# ---------------------------------------------------------------------- run config
def write_run_config(
    run_dir: str | os.PathLike,
    config: RunConfig,
    command: list[str] | None = None,
    *,
    classes: list[str] | None = None,
) -> Path:
    """Write ``RUN_DIR/config.json`` (atomically), appending ``command`` to its history.

    ``classes``: a class-conditional run's class names (label ``k`` is ``classes[k]``; for an
    image folder, its sorted subfolder names), written as ``"classes"``."""
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
    from . import __version__

    write_json(
        path,
        {
            "format": RUN_FORMAT,
            "version": RUN_VERSION,
            "config": config.to_dict(),
            "commands": commands,
            "versions": {"sddpm": __version__, "torch": torch.__version__},
            **({"classes": list(classes)} if classes is not None else {}),
        },
    )
    return path


def read_run_config(run_dir: str | os.PathLike) -> RunConfig:
    """The :class:`RunConfig` saved in ``RUN_DIR/config.json``."""
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir} is not a training run directory: {path.name} is missing (start a run "
            "with train(run_preset(NAME), DIR); CLI: `sddpm train --preset NAME --out DIR`)"
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


# ---------------------------------------------------------------------- the diffusion section
def diffusion_section(schedule: NoiseSchedule, prediction: str) -> dict[str, Any]:
    """The ``diffusion`` section of a checkpoint's ``config.json``: what sampling needs."""
    return {"schedule": schedule.to_dict(), "prediction": prediction}


def parse_diffusion(
    config: dict[str, Any], diffusion_steps: int, source: str | os.PathLike = "checkpoint"
) -> tuple[NoiseSchedule, str]:
    """``(schedule, prediction)`` from a model config's ``diffusion`` section.

    Without one (a converted published model, or one written by ``save_pretrained``): the
    published linear schedule over ``diffusion_steps`` and eps prediction. Raises
    ``ValueError`` when the schedule's length differs from the model's ``diffusion_steps``."""
    diffusion = config.get("diffusion") or {}
    if "schedule" in diffusion:
        schedule = NoiseSchedule.from_dict(diffusion["schedule"])
    else:
        schedule = NoiseSchedule.linear(T=diffusion_steps)
    if schedule.T != diffusion_steps:
        raise ValueError(
            f"{source}: schedule has {schedule.T} steps but the model embeds {diffusion_steps}"
        )
    prediction = diffusion.get("prediction", "eps")
    if prediction not in ("eps", "v"):
        raise ValueError(f"{source}: unknown prediction {prediction!r} in its diffusion section")
    return schedule, prediction


# ---------------------------------------------------------------------- writing
def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    training_state: dict[str, Any],
    *,
    ema_state: dict[str, torch.Tensor] | None = None,
    schedule: NoiseSchedule | None = None,
    prediction: str = "eps",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``RUN_DIR/checkpoints/step_XXXXXXXX/`` atomically and durably; returns its path.

    The directory is a model directory (:func:`sddpm.models.save_pretrained`, with the
    ``diffusion`` section of ``schedule`` and ``prediction`` and any ``extra`` sections in its
    ``config.json``) plus ``training_state.pt`` and, last, ``manifest.json``.
    """
    final = Path(run_dir) / CHECKPOINTS_DIR / step_name(step)
    sections = dict(extra or {})
    if schedule is not None:
        sections["diffusion"] = diffusion_section(schedule, prediction)
    # (a step is saved twice only by a run resumed from an older checkpoint than its newest)
    with atomic_dir(final) as tmp:
        torch.save(training_state, tmp / TRAINING_STATE_NAME)
        fsync_path(tmp / TRAINING_STATE_NAME)
        save_pretrained(model, tmp, ema_state=ema_state, extra=sections)
        _write_manifest(tmp)
    return final


def _write_manifest(directory: Path) -> None:
    files = {
        f.name: {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        for f in sorted(directory.iterdir())
        if f.is_file() and not f.name.startswith(".") and f.name != MANIFEST_NAME
    }
    write_json(
        directory / MANIFEST_NAME,
        {"format": MANIFEST_FORMAT, "version": 1, "algorithm": "sha256", "files": files},
    )


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


# ---------------------------------------------------------------------- listing
def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run (those with a ``config.json``), oldest step first.

    Complete means renamed into place; whether its files are intact is
    :func:`verify_checkpoint`'s question."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        suffix = d.name.removeprefix(STEP_PREFIX)
        if d.name.startswith(STEP_PREFIX) and suffix.isdigit() and (d / CONFIG_NAME).is_file():
            found.append((int(suffix), d))
    return [d for _, d in sorted(found)]


def resumable_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints that also hold a training state, oldest first (not verified)."""
    return [d for d in checkpoint_dirs(run_dir) if (d / TRAINING_STATE_NAME).is_file()]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint with a training state, or ``None`` (not verified: see
    :func:`latest_resumable` for the newest one that also loads)."""
    found = resumable_checkpoints(run_dir)
    return found[-1] if found else None


# ---------------------------------------------------------------------- verification
def verify_checkpoint(directory: str | os.PathLike) -> None:
    """Check a model or checkpoint directory's files; raise :class:`CorruptCheckpointError`
    naming the first bad one.

    With a ``manifest.json``: every listed file exists with its recorded size and SHA-256.
    Without (a ``save_pretrained`` or ``convert`` directory): ``config.json`` parses and every
    safetensors header is whole. (Every call hashes the files again: SHA-256 ran at about
    360 MB/s on this project's CPU, so about 2 s for the model and EMA of 100 M parameters.)"""
    directory = Path(directory)
    manifest = directory / MANIFEST_NAME
    if manifest.is_file():
        try:
            raw = json.loads(manifest.read_text())
            files = dict(raw["files"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            reason = f"unreadable manifest ({err})"
            raise CorruptCheckpointError(directory, manifest, reason) from None
        for name, entry in files.items():
            path = directory / name
            if not path.is_file():
                raise CorruptCheckpointError(directory, path, "the file is missing")
            size = path.stat().st_size
            if size != int(entry["bytes"]):
                raise CorruptCheckpointError(
                    directory, path, f"{size} bytes, the manifest records {entry['bytes']}"
                )
            if sha256_file(path) != entry["sha256"]:
                raise CorruptCheckpointError(
                    directory, path, "its SHA-256 differs from the one in the manifest"
                )
    else:
        try:
            read_config(directory)
        except json.JSONDecodeError as err:
            raise CorruptCheckpointError(directory, directory / CONFIG_NAME, str(err)) from None
        for name in WEIGHT_FILES.values():
            path = directory / name
            if path.is_file():
                _check_safetensors_header(directory, path)


def _check_safetensors_header(directory: Path, path: Path) -> None:
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as err:
        raise CorruptCheckpointError(directory, path, f"unreadable safetensors ({err})") from None


def load_weights(
    directory: str | os.PathLike, which: str, map_location: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """The ``"model"`` or ``"ema"`` state_dict of a model directory; a corrupt file raises
    :class:`CorruptCheckpointError` naming it."""
    directory = Path(directory)
    path = directory / WEIGHT_FILES[which]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        return load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError) as err:
        raise CorruptCheckpointError(directory, path, f"unreadable safetensors ({err})") from None


def load_training_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """``training_state.pt`` of a checkpoint, read with ``weights_only=True`` onto the CPU."""
    checkpoint = Path(checkpoint)
    path = checkpoint / TRAINING_STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {checkpoint} cannot be resumed from")
    try:
        state = load_torch_file(path)
    except (UnreadableFileError, ValueError) as err:
        raise CorruptCheckpointError(checkpoint, path, str(err)) from None
    if not isinstance(state, dict) or state.get("format") != TRAINING_STATE_FORMAT:
        raise CorruptCheckpointError(checkpoint, path, "it holds no sddpm training state")
    return state


# ---------------------------------------------------------------------- reading with fallback
def _newest_good(candidates: list[Path], read):
    """``read(path)`` of the newest candidate that reads without a corruption error, or None;
    each skipped one gives a :class:`CheckpointSkipped` warning naming it and the reason."""
    for i in range(len(candidates) - 1, -1, -1):
        path = candidates[i]
        try:
            return read(path)
        except CorruptCheckpointError as err:
            older = f"using {candidates[i - 1].name} if it is good" if i else "no older one is left"
            warnings.warn(
                f"skipping checkpoint {path}: {err.file.name} is corrupt ({err.reason}); {older}",
                CheckpointSkipped,
                stacklevel=3,
            )
    return None


def _is_model_dir(path: Path) -> bool:
    config = path / CONFIG_NAME
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == MODEL_FORMAT
    except json.JSONDecodeError as err:
        raise ValueError(f"{config} is not valid JSON: {err}") from None


def _verified_dir(path: Path) -> Path:
    verify_checkpoint(path)
    return path


def find_model_dir(path: str | os.PathLike) -> Path:
    """A model directory as is (verified: a corrupt one raises :class:`CorruptCheckpointError`),
    or the newest checkpoint of a run directory that passes verification (older ones are used,
    with a :class:`CheckpointSkipped` warning, when newer ones are corrupt)."""
    path = Path(path)
    if _is_model_dir(path):
        return _verified_dir(path)
    ckpts = checkpoint_dirs(path)
    if not ckpts:
        raise FileNotFoundError(
            f"{path} holds no checkpoint: expected a model directory (config.json + "
            f"model.safetensors) or a run directory with {CHECKPOINTS_DIR}/{STEP_PREFIX}*/ "
            "(train one with train(config, DIR), or convert a published one with from_published + "
            "save_pretrained; CLI: `sddpm train`, `sddpm convert`)"
        )
    found = _newest_good(ckpts, _verified_dir)
    if found is not None:
        return found
    raise ValueError(f"{path}: every checkpoint is corrupt ({', '.join(c.name for c in ckpts)})")


@dataclass
class LoadedModel:
    """A model read from a model directory, with what sampling it needs."""

    model: UNet  # in eval mode, on the requested device
    schedule: NoiseSchedule
    prediction: str  # "eps" or "v"
    directory: Path  # the model directory it was read from
    weights: str  # "model" or "ema"


def load_model(
    path: str | os.PathLike,
    weights: str | None = None,
    map_location: str | torch.device = "cpu",
) -> LoadedModel:
    """Build and load the model of a model directory or of a run's newest good checkpoint,
    with its schedule and prediction (:func:`parse_diffusion`). ``weights``: ``"model"`` or
    ``"ema"`` (default: the directory's ``default_weights``)."""
    if weights is not None and weights not in WEIGHT_FILES:
        raise ValueError(f"weights must be one of {sorted(WEIGHT_FILES)}, got {weights!r}")
    directory = find_model_dir(path)
    config = read_config(directory)
    which = weights or config.get("default_weights", "model")
    if which not in WEIGHT_FILES:
        raise ValueError(f"{directory}: default_weights must be one of {sorted(WEIGHT_FILES)}")
    file = directory / WEIGHT_FILES[which]
    if not file.is_file():
        available = [k for k, f in WEIGHT_FILES.items() if (directory / f).is_file()]
        raise FileNotFoundError(f"{file} is missing; available: {available}")
    model = build_model(UNetConfig.from_dict(config["model"]))
    load_state_into(model, load_weights(directory, which, map_location), str(file))
    schedule, prediction = parse_diffusion(config, model.config.diffusion_steps, directory)
    return LoadedModel(model.to(map_location).eval(), schedule, prediction, directory, which)


@dataclass
class Checkpoint:
    """Everything a resume reads from one checkpoint, loaded onto the CPU and verified."""

    path: Path
    step: int
    model_state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor] | None
    training_state: dict[str, Any]


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Verify and read a resumable checkpoint; a bad file raises
    :class:`CorruptCheckpointError` naming it."""
    path = Path(path)
    verify_checkpoint(path)
    state = load_training_state(path)
    model_state = load_weights(path, "model")
    ema_state = load_weights(path, "ema") if (path / WEIGHT_FILES["ema"]).is_file() else None
    step = int(state["step"])
    if checkpoint_step(path) != step:
        raise ValueError(f"{path} holds the state of step {step}, not its name's")
    return Checkpoint(path, step, model_state, ema_state, state)


def latest_resumable(run_dir: str | os.PathLike) -> Checkpoint | None:
    """The newest checkpoint of a run that verifies and reads (older ones are used, with a
    :class:`CheckpointSkipped` warning, when newer ones are corrupt), or ``None`` when the run
    has no checkpoint yet. Raises ``ValueError`` when checkpoints exist but none is good."""
    found = resumable_checkpoints(run_dir)
    if not found:
        return None
    ckpt = _newest_good(found, read_checkpoint)
    if ckpt is not None:
        return ckpt
    raise ValueError(
        f"{run_dir}: every checkpoint is corrupt ({', '.join(c.name for c in found)}); "
        "start afresh with train(config, NEW_DIR) (CLI: `sddpm train --out DIR --force`)"
    )
