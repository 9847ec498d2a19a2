"""Training: the loop, EMA, checkpoints and resume, distributed helpers, sample grids.

- :func:`train` runs a :class:`sddpm.config.RunConfig` into a run directory (alone or under
  ``torchrun``) through a :class:`Trainer`; :class:`NonFiniteLossError` stops it when the loss
  blows up, :class:`TrainingStopped` after SIGTERM/SIGINT (with a checkpoint of that step).
- :class:`EMA` averages weights and BatchNorm statistics.
- :mod:`sddpm.rundir` (re-exported by :mod:`.checkpoint`) defines the run directory:
  ``config.json`` (format ``sddpm.run``), ``checkpoints/step_XXXXXXXX/`` (model directory +
  ``training_state.pt`` + ``manifest.json``), ``metrics.csv``, ``samples/``.
- :func:`save_grid` writes ``[N, C, H, W]`` images in [-1, 1] as a PNG grid.
"""

from ..images import make_grid, save_grid
from .checkpoint import (
    METRICS_NAME,
    SAMPLES_DIR,
    TRAINING_STATE_NAME,
    latest_checkpoint,
    load_training_state,
    prune_checkpoints,
    read_run_config,
    resumable_checkpoints,
    save_checkpoint,
    step_name,
    write_run_config,
)
from .distributed import DistContext, cleanup_distributed, setup_distributed
from .ema import EMA
from .loop import (
    CheckpointWriteError,
    NonFiniteLossError,
    Trainer,
    TrainingStopped,
    TrainResult,
    micro_batch_positions,
    step_seed,
    train,
)
from .metrics import MetricsLogger, read_metrics
from .optim import build_optimizer, lr_factor, trainable_parameters, warmup_factor

__all__ = [
    "EMA",
    "CheckpointWriteError",
    "Trainer",
    "TrainingStopped",
    "METRICS_NAME",
    "SAMPLES_DIR",
    "TRAINING_STATE_NAME",
    "DistContext",
    "MetricsLogger",
    "NonFiniteLossError",
    "TrainResult",
    "build_optimizer",
    "cleanup_distributed",
    "latest_checkpoint",
    "lr_factor",
    "load_training_state",
    "make_grid",
    "micro_batch_positions",
    "prune_checkpoints",
    "read_metrics",
    "read_run_config",
    "resumable_checkpoints",
    "save_checkpoint",
    "save_grid",
    "setup_distributed",
    "step_name",
    "step_seed",
    "train",
    "trainable_parameters",
    "warmup_factor",
    "write_run_config",
]
