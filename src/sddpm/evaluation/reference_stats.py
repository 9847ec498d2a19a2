"""Reference FID statistics: ``.npz`` files with ``mu`` ``[D]`` and ``sigma`` ``[D, D]``.

This is the format of the published statistics files (pytorch-ddpm / SDDPM ``cifar10.train.npz``,
pytorch-fid's ``--save-stats``), so those files load here and files written here load there.
Writes are atomic: a temporary file in the same directory, then ``os.replace``.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .metrics import FeatureStats, frechet_distance

__all__ = [
    "compute_fid_stats",
    "fid_against_stats_file",
    "load_fid_stats",
    "save_fid_stats",
]


def save_fid_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> Path:
    """Write ``mu`` ``[D]`` and ``sigma`` ``[D, D]`` (as float64) to ``path`` atomically.

    ``path`` is used as given (no ``.npz`` is appended). Parent directories are created.
    Returns the path.
    """
    path = Path(path)
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    _validate(mu, sigma, source="the statistics to save")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def load_fid_stats(
    path: str | os.PathLike, *, dim: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(mu, sigma)`` as float64 from a statistics ``.npz`` file, validated.

    ``dim``, if given, is the feature dimension the caller's features have (2048 for the FID
    Inception); a file of another dimension is refused with both sizes in the message.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"FID statistics file not found: {path}. Compute one with "
            "sddpm.evaluation.compute_fid_stats + save_fid_stats (or use a published .npz "
            "with keys 'mu' and 'sigma')"
        )
    try:
        data = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise ValueError(f"{path} is not a readable .npz statistics file ({err})") from err
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{path} holds a single array, not an .npz with 'mu' [D] and 'sigma' [D, D]"
        )
    with data:
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise ValueError(
                f"{path} is not a FID statistics file: missing key(s) {missing}; "
                f"found {sorted(data.files)}; expected 'mu' [D] and 'sigma' [D, D]"
            )
        try:
            mu = np.asarray(data["mu"], dtype=np.float64)
            sigma = np.asarray(data["sigma"], dtype=np.float64)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, TypeError) as err:
            raise ValueError(f"{path}: cannot read 'mu' / 'sigma' as numbers ({err})") from err
    _validate(mu, sigma, source=str(path))
    if dim is not None and mu.shape[0] != dim:
        raise ValueError(
            f"feature dimension mismatch: {path} holds statistics of D={mu.shape[0]} features, "
            f"but the features have D={dim}; the statistics were computed with another "
            "feature network"
        )
    return mu, sigma


def _validate(mu: np.ndarray, sigma: np.ndarray, *, source: str) -> None:
    if mu.ndim != 1 or mu.shape[0] < 1:
        raise ValueError(f"{source}: 'mu' must be a vector [D], got shape {list(mu.shape)}")
    d = mu.shape[0]
    if sigma.shape != (d, d):
        raise ValueError(
            f"{source}: 'sigma' must be [{d}, {d}] to match 'mu' [{d}], "
            f"got shape {list(sigma.shape)}"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{source}: 'mu' or 'sigma' holds NaN or infinite values")


@torch.no_grad()
def compute_fid_stats(
    batches: Iterable[Tensor],
    model: torch.nn.Module,
    *,
    progress: bool = True,
    total: int | None = None,
    desc: str = "FID statistics",
) -> FeatureStats:
    """Feature statistics of images, e.g. a training set, for a reference ``.npz``.

    ``batches`` yields ``[N, C, H, W]`` float images in [0, 1]; ``model`` returns an object with
    a ``pool`` attribute (:class:`~sddpm.evaluation.inception.FIDInceptionV3`) or a plain
    ``[N, D]`` tensor. ``total`` (number of images) sizes the progress bar. Call
    ``.all_reduce()`` on the result when running under DDP, then
    ``save_fid_stats(path, *stats.mu_sigma())``.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    stats: FeatureStats | None = None
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for images in batches:
            out = model(images.to(device))
            feats = out.pool if hasattr(out, "pool") else out
            if stats is None:
                stats = FeatureStats(feats.shape[1], device=device)
            stats.update(feats)
            bar.update(images.shape[0])
    if stats is None:
        raise ValueError("compute_fid_stats got no images")
    return stats


def fid_against_stats_file(stats: FeatureStats, path: str | os.PathLike) -> float:
    """FID of accumulated feature statistics against a reference ``.npz`` file."""
    ref_mu, ref_sigma = load_fid_stats(path, dim=stats.dim)
    mu, sigma = stats.mu_sigma()
    return frechet_distance(mu, sigma, ref_mu, ref_sigma)
