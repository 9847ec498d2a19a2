"""Score a trained model: generate images, FID / IS / KID, threshold sweeps; DDP-aware.

The pieces, each usable alone:

- :class:`FeatureNetwork` wraps the network that turns images in [0, 1] into features (for FID
  and KID) and class probabilities (for IS): the FID Inception (:meth:`FeatureNetwork.inception`)
  or the digits proxy classifier (:meth:`FeatureNetwork.digits`), or any module shaped like one.
- :func:`generate_and_score` generates the images ``shard_indices(num, rank, world_size)`` of a
  model (image ``i`` depends only on ``(seed, i)``) batch by batch and accumulates their feature
  statistics and probabilities into :class:`SampleScores` without keeping the images.
  :meth:`SampleScores.merge` combines shards in one process, :meth:`SampleScores.gather` across
  DDP ranks; both order the rows by image index, so the result equals the single-process one.
- :func:`score_dataset` does the same for a dataset; :func:`compute_fid_stats_for_dataset` and
  :func:`write_stats_file` make the reference ``.npz`` (``mu``, ``sigma``; optionally
  ``features`` for KID).
- :func:`evaluate_model` runs a whole evaluation and returns an :class:`EvaluationResult`;
  :func:`sweep_threshold` repeats it for several threshold-guidance values with the same seeds
  (the paper's threshold table) and returns a :class:`SweepResult` that writes JSON, CSV and PNG.

Distributed (``torchrun``): when a default process group is initialised (see
:func:`distributed_from_env`), every rank generates its share ``rank::world_size`` of the
indices, the statistics are summed with :meth:`FeatureStats.all_reduce` and the probabilities
(and KID features) gathered, so every rank holds the same result; callers write on rank 0 only.

KID needs reference *features*, not just ``mu`` / ``sigma``. They come from an explicit
reference ``.npz`` with a ``features`` array (``kid_reference``), else from a dataset scored now
(``kid_dataset``), else from the ``--stats`` file itself when it carries ``features``
(``sddpm fid-stats --keep-features``). Without any of them KID is reported as ``None`` with the
reason. Threshold sweeps compute no KID.

The digits network gives a **proxy** FID / IS / KID: useful to compare digits runs with each
other, NOT comparable to published FIDs (which use the FID Inception); results say so.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..io import atomic_path, write_json
from .metrics import FeatureStats, _all_gather_rows, frechet_distance, inception_score
from .metrics import kernel_inception_distance as _kid
from .reference_stats import load_fid_stats, save_fid_stats

if TYPE_CHECKING:
    from ..generation import SamplingSetup

__all__ = [
    "FEATURE_DIMS",
    "FEATURE_NETWORKS",
    "PROXY_NOTE",
    "SWEEP_METRICS",
    "EvaluationResult",
    "FeatureNetwork",
    "SampleScores",
    "SweepResult",
    "check_device",
    "check_stats_file",
    "check_threshold",
    "compute_fid_stats_for_dataset",
    "digits_report_from_probs",
    "distributed_from_env",
    "evaluate_model",
    "generate_and_score",
    "load_kid_reference",
    "metrics_from_scores",
    "parse_threshold_values",
    "rank_and_world",
    "score_dataset",
    "shard_indices",
    "sweep_threshold",
    "write_stats_file",
]

FEATURE_NETWORKS = ("inception", "digits")
# Feature sizes, known without loading a network, so a wrong stats file fails fast.
FEATURE_DIMS = {"inception": 2048, "digits": 128}
SWEEP_METRICS = ("fid", "proxy-fid")
PROXY_NOTE = (
    "proxy metrics from the digits classifier: NOT comparable to published FIDs / IS (which use "
    "the FID Inception); compare them only with other runs scored by the same network"
)
MAX_SWEEP_VALUES = 1000


# --------------------------------------------------------------------------- feature networks


@dataclass(frozen=True)
class FeatureNetwork:
    """A network mapping ``[N, C, H, W]`` images in [0, 1] to ``([N, dim] features,
    [N, num_classes] probabilities)``.

    ``module`` returns either an object with ``pool`` and ``prob`` (the FID Inception's
    :class:`~sddpm.evaluation.inception.InceptionOutput`) or one with ``features`` and ``logits``
    (:class:`~sddpm.evaluation.digits_features.DigitsFeatureNet`). ``proxy`` marks networks whose
    numbers are not comparable to published ones.
    """

    name: str
    module: nn.Module
    dim: int
    num_classes: int
    proxy: bool = False

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        out = self.module(images.to(self.device))
        if hasattr(out, "pool"):
            return out.pool, out.prob
        return out.features, out.logits.softmax(dim=1)

    @classmethod
    def inception(
        cls,
        model: nn.Module | None = None,
        *,
        weights: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        download: bool = True,
    ) -> FeatureNetwork:
        """The FID Inception (``model`` as given, e.g. a test double, else
        :func:`~sddpm.evaluation.inception.load_fid_inception` with ``weights``)."""
        if model is None:
            from .inception import load_fid_inception

            model = load_fid_inception(weights, device=device, download=download)
        fc = getattr(model, "fc", None)
        if not isinstance(fc, nn.Linear):
            raise ValueError("an Inception-like feature network needs an `fc` Linear layer")
        return cls("inception", model.eval(), fc.in_features, fc.out_features, proxy=False)

    @classmethod
    def digits(
        cls,
        net: nn.Module | None = None,
        *,
        device: str | torch.device = "cpu",
        cache_dir: str | os.PathLike | None = None,
    ) -> FeatureNetwork:
        """The digits proxy classifier (``net`` as given, else
        :func:`~sddpm.evaluation.digits_features.load_digits_feature_net`)."""
        if net is None:
            from .digits_features import load_digits_feature_net

            net = load_digits_feature_net(cache_dir)
        net = net.to(device).eval()
        return cls("digits", net, net.feature.out_features, net.classifier.out_features, True)

    @classmethod
    def load(
        cls,
        name: str,
        *,
        inception_weights: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
    ) -> FeatureNetwork:
        """``"inception"`` or ``"digits"``."""
        if name == "inception":
            return cls.inception(weights=inception_weights, device=device)
        if name == "digits":
            return cls.digits(device=device)
        raise ValueError(f"unknown feature network {name!r}; choose one of {FEATURE_NETWORKS}")

    def check_images(self, channels: int) -> None:
        """Refuse images this network cannot take (the digits net reads grey images only)."""
        if self.name == "digits" and channels != 1:
            raise ValueError(
                f"the digits feature network takes 1-channel images; these have {channels} "
                "channels: use --features inception"
            )


# --------------------------------------------------------------------------- sharding, DDP


def shard_indices(num: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """The image indices rank ``rank`` of ``world_size`` handles: ``range(num)[rank::world]``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(range(num))[rank::world_size]


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device`; a ``ValueError`` for a bad name or missing CUDA."""
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"--device {device!r} is not a device name ({err})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for, but CUDA is not available here")
    return dev


@contextmanager
def distributed_from_env(device: str = "cpu") -> Iterator[tuple[int, int, torch.device]]:
    """Join the ``torchrun`` process group if ``WORLD_SIZE`` > 1; yields ``(rank, world, dev)``.

    ``device`` ``"cuda"`` becomes ``cuda:LOCAL_RANK`` (NCCL); anything else uses Gloo. A group
    that already exists is used as is; one created here is destroyed on exit.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = check_device(device)
    if dev.type == "cuda" and dev.index is None and world > 1:
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    created = False
    if world > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        created = True
    try:
        rank, world = rank_and_world()
        yield rank, world, dev
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------- scores


@dataclass
class SampleScores:
    """Features of a set of images (a shard, or the whole set after :meth:`gather`).

    ``stats``: streaming ``mu`` / ``sigma`` statistics; ``indices`` ``[n]`` the global image
    indices, ascending; ``probs`` ``[n, K]`` float32 class probabilities in index order (IS);
    ``features`` ``[n, D]`` float32 in index order, kept only when asked (KID).
    """

    stats: FeatureStats
    indices: Tensor
    probs: Tensor
    features: Tensor | None = None

    @property
    def count(self) -> int:
        return self.stats.count

    def _sorted(self) -> SampleScores:
        order = torch.argsort(self.indices)
        return SampleScores(
            self.stats,
            self.indices[order],
            self.probs[order],
            None if self.features is None else self.features[order],
        )

    def merge(self, *others: SampleScores) -> SampleScores:
        """These scores and those of disjoint shards, as one set (a new object)."""
        stats = FeatureStats(self.stats.dim, device=self.stats.device)
        for s in (self, *others):
            stats.merge(s.stats)
        keep = all(s.features is not None for s in (self, *others))
        merged = SampleScores(
            stats,
            torch.cat([s.indices for s in (self, *others)]),
            torch.cat([s.probs for s in (self, *others)]),
            torch.cat([s.features for s in (self, *others)]) if keep else None,
        )
        return merged._sorted()

    def gather(self) -> SampleScores:
        """Every rank's scores on every rank (a collective); ``self`` when not distributed."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        device = self.stats.device
        stats = FeatureStats(self.stats.dim, device=device).merge(self.stats).all_reduce()
        gathered = SampleScores(
            stats,
            _all_gather_rows(self.indices, device),
            _all_gather_rows(self.probs, device),
            None if self.features is None else _all_gather_rows(self.features, device),
        )
        return gathered._sorted()


def _empty_scores(net: FeatureNetwork, keep_features: bool) -> SampleScores:
    return SampleScores(
        FeatureStats(net.dim, device=net.device),
        torch.empty(0, dtype=torch.int64),
        torch.empty(0, net.num_classes),
        torch.empty(0, net.dim) if keep_features else None,
    )


def _accumulate(
    net: FeatureNetwork, images01: Tensor, index: Sequence[int], parts: dict[str, list]
) -> None:
    feats, probs = net(images01)
    parts["stats"].update(feats)
    parts["indices"].append(torch.as_tensor(list(index), dtype=torch.int64))
    parts["probs"].append(probs.detach().float().cpu())
    if parts["features"] is not None:
        parts["features"].append(feats.detach().float().cpu())


def _finish(net: FeatureNetwork, parts: dict[str, list], keep_features: bool) -> SampleScores:
    if not parts["indices"]:
        return _empty_scores(net, keep_features)
    return SampleScores(
        parts["stats"],
        torch.cat(parts["indices"]),
        torch.cat(parts["probs"]),
        torch.cat(parts["features"]) if keep_features else None,
    )._sorted()


def _to_unit(images: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1], clamped (what both feature networks take)."""
    return ((images.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def generate_and_score(
    setup: SamplingSetup,
    num: int,
    net: FeatureNetwork,
    *,
    sampler: str = "ddim",
    steps: int | None = None,
    eta: float = 0.0,
    threshold: float | None = None,
    seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    keep_features: bool = False,
    progress: bool = True,
    desc: str | None = None,
    bf16: bool = False,
) -> SampleScores:
    """Generate this rank's images of ``range(num)`` and score them (not gathered).

    ``setup`` is a :class:`~sddpm.generation.SamplingSetup` (``load_for_sampling``). Images are
    generated ``batch_size`` at a time, mapped from [-1, 1] to [0, 1] and fed to ``net``; only
    features and probabilities are kept. A tqdm bar (images/s, ETA) runs on rank 0. ``bf16``
    runs the U-Net (never the feature network) under bfloat16 autocast.
    """
    from ..generation import generate_batches

    cfg = setup.model.config
    shape = (cfg.image_channels, cfg.image_size, cfg.image_size)
    net.check_images(cfg.image_channels)
    parts: dict[str, Any] = {
        "stats": FeatureStats(net.dim, device=net.device),
        "indices": [],
        "probs": [],
        "features": [] if keep_features else None,
    }
    batches = generate_batches(
        setup.model,
        shard_indices(num, rank, world_size),
        shape,
        sampler=sampler,
        steps=steps,
        eta=eta,
        threshold=threshold,
        seed=seed,
        batch_size=batch_size,
        schedule=setup.schedule,
        prediction=setup.prediction,
        device=device,
        progress=progress and rank == 0,
        desc=desc or f"{sampler} {steps or ''}".strip(),
        bf16=bf16,
    )
    for chunk, images in batches:
        _accumulate(net, _to_unit(images), chunk, parts)
    return _finish(net, parts, keep_features)


@torch.no_grad()
def score_dataset(
    dataset: torch.utils.data.Dataset,
    net: FeatureNetwork,
    *,
    num: int | None = None,
    batch_size: int = 256,
    rank: int = 0,
    world_size: int = 1,
    keep_features: bool = False,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "dataset features",
) -> SampleScores:
    """Score this rank's share of the first ``num`` items (default all) of a dataset of
    ``[C, H, W]`` images in [-1, 1] (not gathered)."""
    from tqdm.auto import tqdm

    total = len(dataset) if num is None else int(num)
    if total > len(dataset):
        raise ValueError(f"--num {total} exceeds the dataset's {len(dataset)} images")
    if total < 1:
        raise ValueError(f"need at least 1 image, got num={total}")
    idx = shard_indices(total, rank, world_size)
    subset = torch.utils.data.Subset(dataset, idx)
    loader = torch.utils.data.DataLoader(
        subset, batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    parts: dict[str, Any] = {
        "stats": FeatureStats(net.dim, device=net.device),
        "indices": [],
        "probs": [],
        "features": [] if keep_features else None,
    }
    pos = 0
    with tqdm(total=len(idx), unit="img", desc=desc, disable=not progress or rank != 0) as bar:
        for batch in loader:
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
            if pos == 0:
                net.check_images(images.shape[1])
            n = images.shape[0]
            _accumulate(net, _to_unit(images), idx[pos : pos + n], parts)
            pos += n
            bar.update(n)
    return _finish(net, parts, keep_features)


# --------------------------------------------------------------------------- reference files


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
        raise ValueError(f"FID statistics need at least 2 images, got --num {num}")
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
    mu, sigma = scores.stats.mu_sigma()
    path = Path(path)
    if scores.features is None:
        return save_fid_stats(path, mu, sigma)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, features=scores.features.numpy().astype(np.float32))
    return path


def check_stats_file(path: str | os.PathLike, features: str) -> None:
    """Refuse a statistics file that is missing, malformed, or of another feature network's
    size, before any network is loaded or image generated."""
    if features not in FEATURE_DIMS:
        raise ValueError(f"unknown feature network {features!r}; choose one of {FEATURE_NETWORKS}")
    try:
        load_fid_stats(path, dim=FEATURE_DIMS[features])
    except ValueError as err:
        if "feature dimension mismatch" in str(err):
            hint = f"; make matching ones with `sddpm fid-stats --features {features}`"
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
    return feats


# --------------------------------------------------------------------------- evaluation


@dataclass
class EvaluationResult:
    """What :func:`evaluate_model` measured, with the settings that produced it.

    ``fid`` is the proxy FID when ``proxy`` (digits features). ``inception_score`` and ``kid``
    are ``(mean, std)`` or ``None`` with the reason in ``is_note`` / ``kid_note``.
    """

    feature_network: str
    feature_dim: int
    proxy: bool
    num_images: int
    fid: float
    inception_score: tuple[float, float] | None
    is_splits: int
    kid: tuple[float, float] | None
    settings: dict[str, Any] = field(default_factory=dict)
    is_note: str | None = None
    kid_note: str | None = None
    kid_reference: dict[str, Any] | None = None
    digits_report: dict[str, Any] | None = None
    elapsed_s: float | None = None

    @property
    def metric_prefix(self) -> str:
        return "proxy_" if self.proxy else ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready. Keys ``fid``, ``inception_score``, ``kid`` for the FID Inception;
        ``proxy_fid``, ``proxy_inception_score``, ``proxy_kid`` for the digits network, so a
        proxy number is never read as a published-scale one."""
        p = self.metric_prefix
        d: dict[str, Any] = {
            f"{p}fid": self.fid,
            f"{p}inception_score": None
            if self.inception_score is None
            else {
                "mean": self.inception_score[0],
                "std": self.inception_score[1],
                "splits": self.is_splits,
            },
            f"{p}kid": None
            if self.kid is None
            else {"mean": self.kid[0], "std": self.kid[1], **(self.kid_reference or {})},
        }
        if self.is_note:
            d[f"{p}inception_score_note"] = self.is_note
        if self.kid_note:
            d[f"{p}kid_note"] = self.kid_note
        d.update(
            {
                "feature_network": self.feature_network,
                "feature_dim": self.feature_dim,
                "comparable_to_published": not self.proxy,
            }
        )
        if self.proxy:
            d["note"] = PROXY_NOTE
        if self.digits_report is not None:
            d["digits_report"] = self.digits_report
        d["num_images"] = self.num_images
        d.update(self.settings)
        if self.elapsed_s is not None:
            d["elapsed_s"] = round(self.elapsed_s, 3)
        return d

    def table_rows(self) -> list[list[str]]:
        """``[metric, value]`` rows for a terminal table."""
        p = "proxy " if self.proxy else ""
        rows = [[f"{p}FID", f"{self.fid:.4f}"]]
        if self.inception_score is None:
            rows.append([f"{p}IS", f"n/a ({self.is_note})"])
        else:
            m, s = self.inception_score
            rows.append([f"{p}IS", f"{m:.4f} +- {s:.4f}"])
        if self.kid is None:
            rows.append([f"{p}KID", f"n/a ({self.kid_note})"])
        else:
            rows.append([f"{p}KID", f"{self.kid[0]:.6f} +- {self.kid[1]:.6f}"])
        if self.digits_report is not None:
            r = self.digits_report
            rows.append(["confident fraction", f"{r['confident_fraction']:.4f}"])
            rows.append(["classes present", f"{r['classes_present']}/10"])
        rows.append(["images", str(self.num_images)])
        return rows


def digits_report_from_probs(
    probs: Tensor, test_accuracy: float | None, confidence: float = 0.9
) -> dict[str, Any]:
    """:func:`~sddpm.evaluation.digits_features.digits_sample_report` from ``[N, 10]``
    probabilities (gathered over ranks), plus ``classes_present`` (a count of classes)."""
    top, cls = probs.max(dim=1)
    confident = top > confidence
    counts = torch.bincount(cls[confident], minlength=probs.shape[1])
    return {
        "num_images": int(probs.shape[0]),
        "confidence": confidence,
        "confident_fraction": float(confident.float().mean()),
        "class_coverage": float((counts > 0).float().mean()),
        "classes_present": int((counts > 0).sum()),
        "class_counts": [int(c) for c in counts],
        "mean_max_prob": float(top.mean()),
        "classifier_test_accuracy": test_accuracy,
    }


def check_threshold(threshold: float | None) -> None:
    if threshold is None:
        return
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold)) or threshold <= 0:
        raise ValueError(f"threshold must be a finite number > 0, got {threshold!r}")


def _check_num(num: int) -> None:
    if num < 2:
        raise ValueError(f"FID needs at least 2 images (a covariance), got --num {num}")


def _resolve_steps(setup: SamplingSetup, sampler: str, steps: int | None) -> int:
    """The number of model calls ``sample`` will make (checked against the schedule)."""
    from ..diffusion.sample import DEFAULT_STEPS, SAMPLERS

    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    T = setup.schedule.T
    if steps is None:
        return T if sampler == "ddpm" else min(DEFAULT_STEPS[sampler], T)
    if not 1 <= steps <= T:
        raise ValueError(f"--steps must be in [1, {T}] (the model's schedule), got {steps}")
    return int(steps)


def metrics_from_scores(
    scores: SampleScores,
    net: FeatureNetwork,
    ref_mu: np.ndarray,
    ref_sigma: np.ndarray,
    *,
    is_splits: int = 10,
    kid_features: np.ndarray | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
) -> dict[str, Any]:
    """FID, IS and KID (and the digits report) of complete (gathered) scores.

    Returns a dict with ``fid``, ``inception_score`` (or None), ``is_note``, ``kid`` (or None),
    ``kid_note``, ``digits_report`` (digits only).
    """
    if scores.count < 2:
        raise ValueError(f"FID needs at least 2 images (a covariance), got {scores.count}")
    mu, sigma = scores.stats.mu_sigma()
    out: dict[str, Any] = {"fid": frechet_distance(mu, sigma, ref_mu, ref_sigma)}
    if scores.count >= is_splits:
        out["inception_score"] = inception_score(scores.probs, splits=is_splits)
        out["is_note"] = None
    else:
        out["inception_score"] = None
        out["is_note"] = f"IS with {is_splits} splits needs at least {is_splits} images"
    out["kid"], out["kid_note"] = None, None
    if kid_features is None:
        out["kid_note"] = (
            "no reference features: pass a stats file made with `fid-stats --keep-features`, "
            "--kid-reference FILE.npz or --kid-dataset NAME"
        )
    elif scores.features is None:
        out["kid_note"] = "the generated images' features were not kept"
    elif min(scores.count, kid_features.shape[0]) < 2:
        out["kid_note"] = "KID needs at least 2 images in each set"
    else:
        out["kid"] = _kid(
            scores.features.numpy(),
            kid_features,
            num_subsets=kid_subsets,
            subset_size=kid_subset_size,
        )
    out["digits_report"] = (
        digits_report_from_probs(scores.probs, getattr(net.module, "test_accuracy", None))
        if net.name == "digits"
        else None
    )
    return out


@dataclass
class _Prepared:
    setup: SamplingSetup
    ref_mu: np.ndarray
    ref_sigma: np.ndarray
    kid_features: np.ndarray | None
    kid_reference: dict[str, Any] | None


def _prepare(
    setup: SamplingSetup,
    net: FeatureNetwork,
    stats: str | os.PathLike,
    *,
    num: int,
    sampler: str,
    steps: int | None,
    thresholds: Sequence[float | None],
    kid_reference: str | os.PathLike | None,
    kid_dataset: str | None,
    kid_data_dir: str | os.PathLike | None,
    kid_num: int | None,
    progress: bool,
    kid: bool = True,
) -> _Prepared:
    """Every check that can fail, before any image is generated."""
    _check_num(num)
    for t in thresholds:
        check_threshold(t)
    _resolve_steps(setup, sampler, steps)
    net.check_images(setup.model.config.image_channels)
    ref_mu, ref_sigma = load_fid_stats(stats, dim=net.dim)
    kid_features, kid_info = None, None
    if kid_reference is not None:
        kid_features = load_kid_reference(kid_reference, net.dim)
        if kid_features is None:
            raise ValueError(
                f"{kid_reference} holds no 'features' array for KID; make one with "
                "`sddpm fid-stats --keep-features`"
            )
        kid_info = {"reference": str(kid_reference)}
    elif kid and kid_dataset is None:
        kid_features = load_kid_reference(stats, net.dim)
        if kid_features is not None:
            kid_info = {"reference": str(stats)}
    if kid and kid_features is None and kid_dataset is not None:
        scores = compute_fid_stats_for_dataset(
            kid_dataset,
            net,
            data_dir=kid_data_dir,
            num=kid_num,
            keep_features=True,
            progress=progress,
        )
        kid_features = scores.features.numpy()
        kid_info = {"reference": f"dataset:{kid_dataset}"}
    if kid_info is not None:
        kid_info["num_reference"] = int(kid_features.shape[0])
    return _Prepared(setup, ref_mu, ref_sigma, kid_features, kid_info)


def evaluate_model(
    setup: SamplingSetup,
    net: FeatureNetwork,
    stats: str | os.PathLike,
    num: int,
    *,
    sampler: str = "ddim",
    steps: int | None = None,
    eta: float = 0.0,
    threshold: float | None = None,
    seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    is_splits: int = 10,
    kid_reference: str | os.PathLike | None = None,
    kid_dataset: str | None = None,
    kid_data_dir: str | os.PathLike | None = None,
    kid_num: int | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
    bf16: bool = False,
) -> EvaluationResult:
    """Generate ``num`` images and score them against the reference ``stats`` file.

    Every input is checked before the first image is generated (``num >= 2``, ``threshold > 0``,
    sampler and steps, the stats file's feature size, the KID reference). Under DDP each rank
    generates ``range(num)[rank::world]`` and every rank returns the same merged result.
    ``checkpoint`` is only recorded in the result. ``bf16`` generates under bfloat16 autocast
    (recorded in the result's settings: such scores are not float32 scores).
    """
    prep = _prepare(
        setup,
        net,
        stats,
        num=num,
        sampler=sampler,
        steps=steps,
        thresholds=[threshold],
        kid_reference=kid_reference,
        kid_dataset=kid_dataset,
        kid_data_dir=kid_data_dir,
        kid_num=kid_num,
        progress=progress,
    )
    return _evaluate_prepared(
        prep,
        net,
        num,
        sampler=sampler,
        steps=steps,
        eta=eta,
        threshold=threshold,
        seed=seed,
        batch_size=batch_size,
        device=device,
        is_splits=is_splits,
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
        settings={
            "checkpoint": None if checkpoint is None else str(checkpoint),
            "stats": str(stats),
            "bf16": bf16,
        },
        progress=progress,
        bf16=bf16,
    )


def _evaluate_prepared(
    prep: _Prepared,
    net: FeatureNetwork,
    num: int,
    *,
    sampler: str,
    steps: int | None,
    eta: float,
    threshold: float | None,
    seed: int,
    batch_size: int,
    device: str | torch.device,
    is_splits: int,
    kid_subsets: int,
    kid_subset_size: int,
    settings: dict[str, Any],
    progress: bool,
    desc: str | None = None,
    bf16: bool = False,
) -> EvaluationResult:
    start = time.perf_counter()
    rank, world = rank_and_world()
    shard = generate_and_score(
        prep.setup,
        num,
        net,
        sampler=sampler,
        steps=steps,
        eta=eta,
        threshold=threshold,
        seed=seed,
        batch_size=batch_size,
        device=device,
        rank=rank,
        world_size=world,
        keep_features=prep.kid_features is not None,
        progress=progress,
        desc=desc,
        bf16=bf16,
    )
    scores = shard.gather()
    m = metrics_from_scores(
        scores,
        net,
        prep.ref_mu,
        prep.ref_sigma,
        is_splits=is_splits,
        kid_features=prep.kid_features,
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
    )
    kid_ref = None
    if m["kid"] is not None and prep.kid_reference is not None:
        kid_ref = {
            **prep.kid_reference,
            "subsets": kid_subsets,
            "subset_size": min(kid_subset_size, scores.count, prep.kid_features.shape[0]),
        }
    return EvaluationResult(
        feature_network=net.name,
        feature_dim=net.dim,
        proxy=net.proxy,
        num_images=scores.count,
        fid=m["fid"],
        inception_score=m["inception_score"],
        is_splits=is_splits,
        kid=m["kid"],
        is_note=m["is_note"],
        kid_note=m["kid_note"],
        kid_reference=kid_ref,
        digits_report=m["digits_report"],
        settings={
            **settings,
            "sampler": sampler,
            "steps": _resolve_steps(prep.setup, sampler, steps),
            "eta": eta,
            "threshold": threshold,
            "seed": seed,
            "batch_size": batch_size,
            "world_size": world,
        },
        elapsed_s=time.perf_counter() - start,
    )


# --------------------------------------------------------------------------- threshold sweep


def parse_threshold_values(text: str) -> list[float]:
    """``"a:b:step"`` (inclusive of ``b``) or ``"v1,v2,..."`` -> thresholds, all > 0.

    Ranges are computed in decimal, so ``"0.995:1.005:0.001"`` gives exactly the 11 values
    0.995, 0.996, ..., 1.005 (no float drift dropping the end point or giving 0.9970000001).
    """
    text = (text or "").strip()
    bad = f"--values must be 'start:stop:step' or a comma list of numbers, got {text!r}"
    try:
        if ":" in text:
            parts = [p.strip() for p in text.split(":")]
            if len(parts) != 3:
                raise ValueError(bad)
            a, b, step = (Decimal(p) for p in parts)
            if not all(x.is_finite() for x in (a, b, step)):
                raise ValueError(bad)
            if step <= 0:
                raise ValueError(f"--values: the step must be > 0, got {parts[2]}")
            if b < a:
                raise ValueError(f"--values: stop {parts[1]} is below start {parts[0]}")
            n = int(((b - a) / step).to_integral_value(rounding=ROUND_FLOOR)) + 1
            if n > MAX_SWEEP_VALUES:
                raise ValueError(f"--values {text!r} gives {n} values (at most {MAX_SWEEP_VALUES})")
            decimals = [a + i * step for i in range(n)]
        else:
            items = [p.strip() for p in text.split(",")]
            if not text or any(not p for p in items):
                raise ValueError(bad)
            decimals = [Decimal(p) for p in items]
            if not all(x.is_finite() for x in decimals):
                raise ValueError(bad)
    except InvalidOperation:
        raise ValueError(bad) from None
    values = [float(x) for x in decimals]
    for v in values:
        if v <= 0:
            raise ValueError(f"--values: every threshold must be > 0, got {v:g}")
    if len(set(values)) != len(values):
        raise ValueError(f"--values {text!r} repeats a value")
    return values


@dataclass
class SweepResult:
    """One :class:`EvaluationResult` per threshold; ``best`` is the index of the lowest metric."""

    metric: str
    thresholds: list[float]
    results: list[EvaluationResult]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def values(self) -> list[float]:
        return [r.fid for r in self.results]

    @property
    def best(self) -> int:
        return int(np.argmin(self.values))

    @property
    def proxy(self) -> bool:
        return self.results[0].proxy

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per threshold (the CSV / JSON table)."""
        key = self.metric.replace("-", "_")
        out = []
        for i, (t, r) in enumerate(zip(self.thresholds, self.results, strict=True)):
            row: dict[str, Any] = {"threshold": t, key: r.fid}
            row["is_mean"] = None if r.inception_score is None else r.inception_score[0]
            row["is_std"] = None if r.inception_score is None else r.inception_score[1]
            if r.digits_report is not None:
                row["confident_fraction"] = r.digits_report["confident_fraction"]
                row["classes_present"] = r.digits_report["classes_present"]
            row["best"] = i == self.best
            out.append(row)
        return out

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "metric": self.metric,
            "best": {"threshold": self.thresholds[self.best], "value": self.values[self.best]},
            "rows": self.rows(),
            "feature_network": self.results[0].feature_network,
            "comparable_to_published": not self.proxy,
        }
        if self.proxy:
            d["note"] = PROXY_NOTE
        d["num_images"] = self.results[0].num_images
        d.update(self.settings)
        return d

    def table(self) -> tuple[list[str], list[list[str]]]:
        """Headers and string rows for a terminal table; the best row is marked ``*``."""
        rows = self.rows()
        headers = list(rows[0].keys())
        body = []
        for row in rows:
            cells = []
            for k in headers:
                v = row[k]
                if k == "best":
                    cells.append("*" if v else "")
                elif isinstance(v, float):
                    cells.append(f"{v:g}" if k == "threshold" else f"{v:.4f}")
                else:
                    cells.append("" if v is None else str(v))
            body.append(cells)
        return headers, body

    def write(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """``sweep.json``, ``sweep.csv`` and ``sweep.png`` in ``out_dir``, each atomically."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {k: out_dir / f"sweep.{k}" for k in ("json", "csv", "png")}
        write_json(paths["json"], self.to_dict())
        rows = self.rows()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        with atomic_path(paths["csv"]) as tmp:
            tmp.write_text(buf.getvalue())
        self.plot(paths["png"])
        return paths

    def plot(self, path: str | os.PathLike) -> None:
        """A PNG: the metric against the threshold, the best value marked. Written atomically."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.4, 4.2), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        ax.plot(self.thresholds, self.values, "o-", color="tab:blue")
        b = self.best
        ax.plot(
            [self.thresholds[b]],
            [self.values[b]],
            marker="*",
            markersize=16,
            color="tab:red",
            linestyle="none",
            label=f"best: {self.thresholds[b]:g} ({self.values[b]:.3f})",
        )
        ax.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
        ax.ticklabel_format(useOffset=False)
        label = "proxy FID (digits; not comparable to published)" if self.proxy else "FID"
        ax.set_xlabel("neuron threshold while sampling")
        ax.set_ylabel(label)
        s = self.settings
        ax.set_title(
            f"Threshold guidance: {s.get('sampler')} {s.get('steps') or ''} steps, "
            f"{self.results[0].num_images} images"
        )
        ax.legend()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)


def sweep_threshold(
    setup: SamplingSetup,
    net: FeatureNetwork,
    stats: str | os.PathLike,
    values: Sequence[float],
    num: int,
    *,
    metric: str = "fid",
    sampler: str = "ddim",
    steps: int | None = None,
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    is_splits: int = 10,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
    bf16: bool = False,
) -> SweepResult:
    """Evaluate every threshold in ``values`` with the same seeds (image ``i`` starts from the
    same noise for every value). ``metric`` ``"fid"`` needs the FID Inception, ``"proxy-fid"``
    the digits network. KID is not computed in sweeps."""
    if metric not in SWEEP_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {SWEEP_METRICS}")
    if (metric == "proxy-fid") != net.proxy:
        want = "digits" if metric == "proxy-fid" else "inception"
        raise ValueError(f"--metric {metric} is measured with the {want} feature network")
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no threshold values to sweep")
    prep = _prepare(
        setup,
        net,
        stats,
        num=num,
        sampler=sampler,
        steps=steps,
        thresholds=values,
        kid_reference=None,
        kid_dataset=None,
        kid_data_dir=None,
        kid_num=None,
        progress=progress,
        kid=False,  # sweeps rank by FID only
    )
    settings = {
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "stats": str(stats),
        "bf16": bf16,
    }
    results = [
        _evaluate_prepared(
            prep,
            net,
            num,
            sampler=sampler,
            steps=steps,
            eta=eta,
            threshold=v,
            seed=seed,
            batch_size=batch_size,
            device=device,
            is_splits=is_splits,
            kid_subsets=0,
            kid_subset_size=0,
            settings=settings,
            progress=progress,
            desc=f"threshold {v:g}",
            bf16=bf16,
        )
        for v in values
    ]
    for r in results:
        r.kid_note = "not computed in threshold sweeps"
    rank, world = rank_and_world()
    return SweepResult(
        metric=metric,
        thresholds=values,
        results=results,
        settings={
            **settings,
            "sampler": sampler,
            "steps": _resolve_steps(setup, sampler, steps),
            "eta": eta,
            "seed": seed,
            "batch_size": batch_size,
            "world_size": world,
        },
    )
