"""How a training run stops early: a non-finite loss, a signal, a failed write."""

from __future__ import annotations

from pathlib import Path

__all__ = ["CheckpointWriteError", "NonFiniteLossError", "TrainingStopped"]


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN or infinite; the run stopped without writing a
    checkpoint after it."""

    def __init__(self, step: int, loss: float, grad_norm: float, checkpoint: Path | None) -> None:
        self.step, self.loss, self.grad_norm, self.checkpoint = step, loss, grad_norm, checkpoint
        where = (
            f"the last good checkpoint is {checkpoint}"
            if checkpoint is not None
            else "no checkpoint was written before it"
        )
        super().__init__(
            f"non-finite training loss at step {step} (loss {loss}, gradient norm {grad_norm}); "
            f"stopped without writing a checkpoint after it: {where}. Lower optim.lr (CLI: "
            "--set lr=...) or check the data, then resume with train(..., resume=True) (CLI: "
            "`sddpm train --resume RUN_DIR`)."
        )


class TrainingStopped(RuntimeError):
    """SIGTERM or SIGINT stopped the run after a whole step; a checkpoint of that step was
    written (``checkpoint``) and ``resume_command`` continues it."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path | None, run_dir: Path) -> None:
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        self.resume_command = f"sddpm train --resume {run_dir}"
        super().__init__(
            f"{signal_name} received: stopped after step {step} and wrote {checkpoint}; "
            f"train(..., resume=True) on {run_dir} continues the run"
        )


class CheckpointWriteError(RuntimeError):
    """Rank 0 could not write a checkpoint or sample grid (e.g. the disk is full); every rank
    stops with this error instead of waiting for rank 0 in the next collective."""
