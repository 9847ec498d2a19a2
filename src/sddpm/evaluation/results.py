"""What an evaluation measured: FID / IS / KID of gathered scores, and the result record.

:func:`metrics_from_scores` turns complete :class:`~.scores.SampleScores` into FID, IS and KID
(and the digits report); a non-finite metric stops the run
(:class:`~sddpm.finite.NonFiniteError`), so no NaN is ever written or ranked.
:class:`EvaluationResult` holds them with the settings that produced them and is written as
JSON (:meth:`EvaluationResult.to_dict`, read back by :meth:`EvaluationResult.from_dict`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..finite import check_finite
from .features import PROXY_NOTE, FeatureNetwork
from .metrics import frechet_distance, inception_score, kernel_inception_distance
from .scores import SampleScores

__all__ = ["EvaluationResult", "digits_report_from_probs", "metrics_from_scores"]


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
        if self.inception_score is None:
            d["is_splits"] = self.is_splits
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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvaluationResult:
        """The result whose :meth:`to_dict` is ``d`` (e.g. a row of a saved sweep)."""
        d = dict(d)
        proxy = not d.pop("comparable_to_published")
        p = "proxy_" if proxy else ""
        d.pop("note", None)
        fid = d.pop(f"{p}fid")
        is_ = d.pop(f"{p}inception_score")
        kid = d.pop(f"{p}kid")
        kid_reference = None
        if kid is not None:
            kid = dict(kid)
            kid_value = (kid.pop("mean"), kid.pop("std"))
            kid_reference = kid or None
            kid = kid_value
        return cls(
            feature_network=d.pop("feature_network"),
            feature_dim=d.pop("feature_dim"),
            proxy=proxy,
            num_images=d.pop("num_images"),
            fid=fid,
            inception_score=None if is_ is None else (is_["mean"], is_["std"]),
            is_splits=d.pop("is_splits", None) if is_ is None else is_["splits"],
            kid=kid,
            is_note=d.pop(f"{p}inception_score_note", None),
            kid_note=d.pop(f"{p}kid_note", None),
            kid_reference=kid_reference,
            digits_report=d.pop("digits_report", None),
            elapsed_s=d.pop("elapsed_s", None),
            settings=d,
        )

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
    p = "proxy " if net.proxy else ""
    mu, sigma = scores.stats.mu_sigma()
    out: dict[str, Any] = {"fid": frechet_distance(mu, sigma, ref_mu, ref_sigma)}
    check_finite(out["fid"], f"the {p}FID")
    if scores.count >= is_splits:
        out["inception_score"] = inception_score(scores.probs, splits=is_splits)
        check_finite(out["inception_score"], f"the {p}Inception Score")
        out["is_note"] = None
    else:
        out["inception_score"] = None
        out["is_note"] = f"IS with {is_splits} splits needs at least {is_splits} images"
    out["kid"], out["kid_note"] = None, None
    if kid_features is None:
        out["kid_note"] = (
            "no reference features: KID needs the features of real images: a KID reference "
            "file or dataset, or a stats file made with keep_features=True (CLI: "
            "`sddpm fid-stats --keep-features`)"
        )
    elif scores.features is None:
        out["kid_note"] = "the generated images' features were not kept"
    elif min(scores.count, kid_features.shape[0]) < 2:
        out["kid_note"] = "KID needs at least 2 images in each set"
    else:
        out["kid"] = kernel_inception_distance(
            scores.features.numpy(),
            kid_features,
            num_subsets=kid_subsets,
            subset_size=kid_subset_size,
        )
        check_finite(out["kid"], f"the {p}KID")
    out["digits_report"] = (
        digits_report_from_probs(scores.probs, getattr(net.module, "test_accuracy", None))
        if net.name == "digits"
        else None
    )
    return out
