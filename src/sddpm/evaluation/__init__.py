"""Evaluation: the FID Inception network, FID / IS / KID, reference statistics, digits proxy,
scoring generated images, threshold sweeps and the energy meter.

- :mod:`.inception`: our implementation of the TF-ported FID InceptionV3 (pytorch-fid's weights
  ``pt_inception-2015-12-05-6726825d.pth``), pool features for FID and the IS softmax head.
- :mod:`.digits_features`: a small classifier for the 8x8 digits giving a proxy FID (not
  comparable to published FIDs) and a confidence / class-coverage report.
- :mod:`.features`: :class:`FeatureNetwork`, either of them (or any network shaped like one).
- :mod:`.metrics`: streaming float64 feature statistics (DDP-mergeable), Frechet distance,
  Inception Score, KID.
- :mod:`.scores`: generate (or read) images batch by batch and keep only their features.
- :mod:`.reference_stats`: ``mu`` / ``sigma`` (``features``) ``.npz`` files (the published
  ``cifar10.train.npz`` format), written atomically; KID references.
- :mod:`.results`: FID / IS / KID of scores and :class:`EvaluationResult`.
- :mod:`.evaluate`: :func:`evaluate_model`, the whole evaluation.
- :mod:`.sweeps`: :func:`sweep_threshold`, :func:`sweep_guidance`, resumable sweeps.
- ranks, devices and shards under ``torchrun`` come from :mod:`sddpm.distributed`, the one
  process-group module of training and evaluation.
- :mod:`.energy`: SOPs, MACs, firing rates and energy while sampling.
"""

from ..distributed import check_device, distributed_from_env, rank_and_world, shard_indices
from .digits_features import (
    DigitsFeatureNet,
    DigitsSplit,
    DigitsTrainingRecipe,
    default_cache_dir,
    digits_proxy_fid,
    digits_sample_report,
    load_digits_feature_net,
    load_digits_split,
    train_digits_feature_net,
)
from .evaluate import evaluate_model
from .features import (
    FEATURE_DIMS,
    FEATURE_NETWORKS,
    FEATURE_PRECISION,
    PROXY_NOTE,
    FeatureNetwork,
    no_tf32,
)
from .inception import (
    INCEPTION_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_FILENAME,
    INCEPTION_WEIGHTS_URL,
    FIDInceptionV3,
    InceptionOutput,
    check_state_dict,
    load_fid_inception,
    resolve_inception_weights,
)
from .metrics import (
    FeatureStats,
    fid_from_features,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
)
from .reference_stats import (
    check_stats_file,
    compute_fid_stats_for_dataset,
    load_fid_stats,
    load_kid_reference,
    save_fid_stats,
    write_stats_file,
)
from .results import EvaluationResult, digits_report_from_probs, metrics_from_scores
from .scores import SampleScores, generate_and_score, score_dataset
from .sweeps import (
    SWEEP_METRICS,
    SWEEP_PARAMS,
    SweepResult,
    parse_sweep_values,
    parse_threshold_values,
    sweep,
    sweep_guidance,
    sweep_paths,
    sweep_threshold,
)

__all__ = [
    "FEATURE_DIMS",
    "FEATURE_NETWORKS",
    "FEATURE_PRECISION",
    "INCEPTION_WEIGHTS_ENV",
    "INCEPTION_WEIGHTS_FILENAME",
    "INCEPTION_WEIGHTS_URL",
    "PROXY_NOTE",
    "SWEEP_METRICS",
    "DigitsFeatureNet",
    "DigitsSplit",
    "DigitsTrainingRecipe",
    "EvaluationResult",
    "FIDInceptionV3",
    "FeatureNetwork",
    "FeatureStats",
    "InceptionOutput",
    "SampleScores",
    "SWEEP_PARAMS",
    "SweepResult",
    "check_device",
    "check_state_dict",
    "check_stats_file",
    "compute_fid_stats_for_dataset",
    "default_cache_dir",
    "digits_proxy_fid",
    "digits_report_from_probs",
    "digits_sample_report",
    "distributed_from_env",
    "evaluate_model",
    "fid_from_features",
    "frechet_distance",
    "generate_and_score",
    "inception_score",
    "kernel_inception_distance",
    "load_digits_feature_net",
    "load_digits_split",
    "load_fid_inception",
    "load_fid_stats",
    "load_kid_reference",
    "metrics_from_scores",
    "no_tf32",
    "parse_sweep_values",
    "parse_threshold_values",
    "rank_and_world",
    "resolve_inception_weights",
    "save_fid_stats",
    "score_dataset",
    "shard_indices",
    "sweep_paths",
    "sweep",
    "sweep_guidance",
    "sweep_threshold",
    "train_digits_feature_net",
    "write_stats_file",
]
