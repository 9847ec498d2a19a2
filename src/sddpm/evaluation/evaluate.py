"""Score a trained model: generate images and compute FID / IS / KID against a reference.

:func:`evaluate_model` checks every input, generates ``num`` images with the given
:class:`~sddpm.diffusion.SamplingOptions` and returns an :class:`~.results.EvaluationResult`.
The pieces live in their own modules: :mod:`.features` (the feature networks), :mod:`.scores`
(generation and scoring, shards), :mod:`.reference_stats` (the ``.npz`` files, KID references),
:mod:`.results` (metrics and the result record) and :mod:`.sweeps` (threshold sweeps).

Distributed (``torchrun``): when a default process group is initialised (see
:func:`sddpm.distributed.distributed_from_env`), every rank generates its share
``rank::world_size`` of the indices, the statistics are summed and the probabilities (and KID
features) gathered, so every rank holds the same result; callers write on rank 0 only.

KID needs reference *features*, not just ``mu`` / ``sigma``. They come from an explicit
reference ``.npz`` with a ``features`` array (``kid_reference``), else from a dataset scored now
(``kid_dataset``), else from the ``--stats`` file itself when it carries ``features``
(``sddpm fid-stats --keep-features``). Without any of them KID is reported as ``None`` with the
reason. Threshold sweeps compute no KID.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..diffusion import SamplingOptions
from ..distributed import rank_and_world
from .features import FEATURE_PRECISION, FeatureNetwork
from .reference_stats import compute_fid_stats_for_dataset, load_fid_stats, load_kid_reference
from .results import EvaluationResult, metrics_from_scores
from .scores import generate_and_score

if TYPE_CHECKING:
    from ..generation import SamplingSetup

__all__ = ["evaluate_model"]


@dataclass
class _Prepared:
    """Everything checked and loaded before the first image: the reference statistics, the
    KID reference and the record fields every result of this run shares."""

    setup: SamplingSetup
    ref_mu: np.ndarray
    ref_sigma: np.ndarray
    kid_features: np.ndarray | None
    kid_reference: dict[str, Any] | None
    settings: dict[str, Any]


def _prepare(
    setup: SamplingSetup,
    net: FeatureNetwork,
    stats: str | os.PathLike,
    num: int,
    options: SamplingOptions,
    *,
    checkpoint: str | os.PathLike | None = None,
    kid_reference: str | os.PathLike | None = None,
    kid_dataset: str | None = None,
    kid_data_dir: str | os.PathLike | None = None,
    kid_num: int | None = None,
    progress: bool = True,
    kid: bool = True,
) -> _Prepared:
    """Every check that can fail, before any image is generated."""
    if num < 2:
        raise ValueError(f"FID needs at least 2 images (a covariance), got num={num}")
    options.steps_for(setup.schedule.T)
    net.check_images(setup.model.config.image_channels)
    ref_mu, ref_sigma = load_fid_stats(stats, dim=net.dim)
    kid_features, kid_info = None, None
    if kid_reference is not None:
        kid_features = load_kid_reference(kid_reference, net.dim)
        if kid_features is None:
            raise ValueError(
                f"{kid_reference} holds no 'features' array for KID; make one with "
                "compute_fid_stats_for_dataset(..., keep_features=True) (CLI: "
                "`sddpm fid-stats --keep-features`)"
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
    settings = {
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "stats": str(stats),
        **FEATURE_PRECISION,
    }
    return _Prepared(setup, ref_mu, ref_sigma, kid_features, kid_info, settings)


def evaluate_model(
    setup: SamplingSetup,
    net: FeatureNetwork,
    stats: str | os.PathLike,
    num: int,
    options: SamplingOptions | None = None,
    *,
    is_splits: int = 10,
    kid_reference: str | os.PathLike | None = None,
    kid_dataset: str | None = None,
    kid_data_dir: str | os.PathLike | None = None,
    kid_num: int | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
    **changes: Any,
) -> EvaluationResult:
    """Generate ``num`` images and score them against the reference ``stats`` file.

    ``options`` (:class:`~sddpm.diffusion.SamplingOptions`, keyword ``changes`` such as
    ``steps=4`` applied on top) says how to sample; it is recorded in the result (``bf16``
    scores are not float32 scores). Every input is checked before the first image is
    generated (``num >= 2``, the options and steps against the schedule, the stats file's
    feature size, the KID reference). Under DDP each rank generates ``range(num)[rank::world]``
    and every rank returns the same merged result. ``checkpoint`` is only recorded.

    Raises:
        ValueError: bad input, before any image; :class:`~sddpm.finite.NonFiniteError` (a
            ``ValueError``) when images, features or a metric are not finite.
    A class-conditional model without ``options.labels`` makes image ``i`` of class
    ``i mod num_classes`` (:func:`sddpm.generation.class_options`; recorded as ``labels``).
    """
    from ..generation import class_options

    opts = class_options(SamplingOptions.build(options, **changes), setup.model)
    prep = _prepare(
        setup,
        net,
        stats,
        num,
        opts,
        checkpoint=checkpoint,
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
        opts,
        is_splits=is_splits,
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
        progress=progress,
    )


@torch.no_grad()
def _evaluate_prepared(
    prep: _Prepared,
    net: FeatureNetwork,
    num: int,
    options: SamplingOptions,
    *,
    is_splits: int,
    kid_subsets: int = 0,
    kid_subset_size: int = 0,
    progress: bool = True,
    desc: str | None = None,
) -> EvaluationResult:
    start = time.perf_counter()
    rank, world = rank_and_world()
    shard = generate_and_score(
        prep.setup,
        num,
        net,
        options,
        rank=rank,
        world_size=world,
        keep_features=prep.kid_features is not None,
        progress=progress,
        desc=desc,
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
            **prep.settings,
            **options.to_dict(T=prep.setup.schedule.T),
            "world_size": world,
        },
        elapsed_s=time.perf_counter() - start,
    )
