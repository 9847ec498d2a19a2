"""Reference statistics: ``.npz`` files with ``mu`` ``[D]`` and ``sigma`` ``[D, D]`` (and,
for KID, optionally ``features`` ``[N, D]``), and making them from a dataset.

This is the format of the published statistics files (pytorch-ddpm / SDDPM ``cifar10.train.npz``,
pytorch-fid's ``--save-stats``), so those files load here and files written here load there.
Writes are atomic (:func:`sddpm.io.atomic_path`).

KID needs reference *features*, not just ``mu`` / ``sigma``: :func:`load_kid_reference` reads
them from an ``.npz`` that has them (``sddpm fid-stats --keep-features``).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from ..distributed import rank_and_world
from ..io import atomic_path
from .features import FEATURE_DIMS, FEATURE_NETWORKS, FeatureNetwork
from .scores import SampleScores, score_dataset

__all__ = [
    "check_stats_file",
    "compute_fid_stats_for_dataset",
    "load_fid_stats",
    "load_kid_reference",
    "save_fid_stats",
    "write_stats_file",
]


def save_fid_stats(
    path: str | os.PathLike,
    mu: np.ndarray,
    sigma: np.ndarray,
    features: np.ndarray | None = None,
) -> Path:
    """Write ``mu`` ``[D]`` and ``sigma`` ``[D, D]`` (as float64) and, if given, ``features``
    ``[N, D]`` (as float32) to ``path`` atomically.

    ``path`` is used as given (no ``.npz`` is appended). Parent directories are created.
    Returns the path.
    """
    path = Path(path)
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    _validate(mu, sigma, source="the statistics to save")
    arrays = {"mu": mu, "sigma": sigma}
    if features is not None:
        arrays["features"] = np.asarray(features, dtype=np.float32)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
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
            f"FID statistics file not found: {path}. Compute one with `sddpm fid-stats` "
            "(sddpm.evaluation.compute_fid_stats_for_dataset + write_stats_file) or use a "
            "published .npz with keys 'mu' and 'sigma'"
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


def compute_fid_stats_for_dataset(
    dataset_name: str,
    net: FeatureNetwork,
    *,
    data_dir: str | os.PathLike | None = None,
    num: int | None = None,
    batch_size: int = 256,
    train: bool = True,
    download: bool = False,
    keep_features: bool = False,
    num_workers: int = 0,
    progress: bool = True,
) -> SampleScores:
    """Scores of a registered dataset's images (no flips), gathered over DDP ranks.

    Call :func:`write_stats_file` with the result (on rank 0) for a reference ``.npz``.
    """
    from ..data import build_dataset

    if num is not None and num < 2:
        raise ValueError(f"FID statistics need at least 2 images, got {num}")
    dataset = build_dataset(dataset_name, data_dir, train=train, hflip=False, download=download)
    rank, world = rank_and_world()
    scores = score_dataset(
        dataset,
        net,
        num=num,
        batch_size=batch_size,
        rank=rank,
        world_size=world,
        keep_features=keep_features,
        num_workers=num_workers,
        progress=progress,
        desc=f"{dataset_name} features",
    )
    return scores.gather()


def write_stats_file(path: str | os.PathLike, scores: SampleScores) -> Path:
    """Write ``mu`` ``[D]``, ``sigma`` ``[D, D]`` (float64; the published format) and, when the
    scores kept them, ``features`` ``[N, D]`` float32 (KID reference) to ``path``, atomically."""
    features = None if scores.features is None else scores.features.numpy()
    return save_fid_stats(path, *scores.stats.mu_sigma(), features=features)


def check_stats_file(path: str | os.PathLike, features: str) -> None:
    """Refuse a statistics file that is missing, malformed, or of another feature network's
    size, before any network is loaded or image generated."""
    if features not in FEATURE_DIMS:
        raise ValueError(f"unknown feature network {features!r}; choose one of {FEATURE_NETWORKS}")
    try:
        load_fid_stats(path, dim=FEATURE_DIMS[features])
    except ValueError as err:
        if "feature dimension mismatch" in str(err):
            hint = (
                f"; make matching ones with compute_fid_stats_for_dataset(name, "
                f"FeatureNetwork.load({features!r})) (CLI: `sddpm fid-stats --features {features}`)"
            )
            for name, d in FEATURE_DIMS.items():
                if name != features and f"D={d} features" in str(err):
                    hint = f" ({name} statistics: score with the {name} network){hint}"
            raise ValueError(f"{err}{hint}") from None
        raise


def load_kid_reference(path: str | os.PathLike, dim: int) -> np.ndarray | None:
    """The ``features`` ``[M, D]`` array of an ``.npz``, or ``None`` if it has none."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"KID reference file not found: {path}")
    with np.load(path, allow_pickle=False) as data:
        if "features" not in data.files:
            return None
        feats = np.asarray(data["features"])
    if feats.ndim != 2 or feats.shape[1] != dim:
        raise ValueError(
            f"feature dimension mismatch: {path} holds KID reference features of shape "
            f"{list(feats.shape)}, but the feature network has D={dim}; the reference was "
            "computed with another feature network"
        )
    if not np.isfinite(feats).all():
        raise ValueError(f"{path}: the KID reference 'features' hold NaN or infinite values")
    return feats
