"""Training scalars: always a CSV file, and TensorBoard event files when it is installed."""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path
from typing import Any

from ..io import atomic_path

COLUMNS = ("step", "loss", "lr", "grad_norm", "steps_per_s", "images_per_s", "elapsed_s")


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except Exception:
        return False
    return True


class MetricsLogger:
    """Appends rows of :data:`COLUMNS` to ``csv_path`` (flushed per row) and mirrors them to
    TensorBoard under ``tensorboard_dir`` when possible (``tensorboard_dir=None``: CSV only).

    ``resume_step``: rows with ``step > resume_step`` (logged after the checkpoint a run resumes
    from, and about to be redone) are dropped first, so the CSV reads as one run.
    """

    def __init__(
        self,
        csv_path: str | os.PathLike,
        tensorboard_dir: str | os.PathLike | None = None,
        resume_step: int | None = None,
    ) -> None:
        self.path = Path(csv_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            self._truncate_after(resume_step)
        new = not self.path.is_file() or self.path.stat().st_size == 0
        self._file = open(self.path, "a", newline="")  # noqa: SIM115 (closed in close())
        self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            self._writer.writeheader()
            self._file.flush()
        self._tb = None
        if tensorboard_dir is not None and tensorboard_available():
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(tensorboard_dir), purge_step=resume_step)
            except Exception as err:  # TensorBoard is a convenience: never stop training for it
                warnings.warn(f"TensorBoard logging disabled: {err}", stacklevel=2)

    def _truncate_after(self, step: int) -> None:
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        kept = [r for r in rows if r.get("step", "").isdigit() and int(r["step"]) <= step]
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)

    def log(self, row: dict[str, Any]) -> None:
        """Write one row (missing columns stay empty)."""
        self._writer.writerow({k: _fmt(row.get(k)) for k in COLUMNS})
        self._file.flush()
        if self._tb is not None:
            step = int(row["step"])
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def read_metrics(csv_path: str | os.PathLike) -> list[dict[str, float]]:
    """The rows of a metrics CSV as numbers (empty cells are left out)."""
    with open(csv_path, newline="") as f:
        return [
            {k: (int(v) if k == "step" else float(v)) for k, v in r.items() if v not in ("", None)}
            for r in csv.DictReader(f)
        ]
