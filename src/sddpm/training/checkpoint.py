"""Training's view of the run directory: the layout, schema and integrity live in
:mod:`sddpm.rundir` (re-exported here for the names training has always offered); this module
adds the RNG states a checkpoint's ``training_state.pt`` carries."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from ..rundir import (
    METRICS_NAME,
    SAMPLES_DIR,
    TENSORBOARD_DIR,
    TRAINING_STATE_FORMAT,
    TRAINING_STATE_NAME,
    checkpoint_step,
    latest_checkpoint,
    load_training_state,
    prune_checkpoints,
    read_run_config,
    remove_partial_checkpoints,
    resumable_checkpoints,
    save_checkpoint,
    step_name,
    write_run_config,
)

__all__ = [
    "METRICS_NAME",
    "SAMPLES_DIR",
    "TENSORBOARD_DIR",
    "TRAINING_STATE_FORMAT",
    "TRAINING_STATE_NAME",
    "checkpoint_step",
    "latest_checkpoint",
    "load_training_state",
    "prune_checkpoints",
    "read_run_config",
    "remove_partial_checkpoints",
    "resumable_checkpoints",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "step_name",
    "write_run_config",
]


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
