"""Evaluation: the FID Inception network, FID / IS / KID, reference statistics, digits proxy.

- :mod:`.inception`: our implementation of the TF-ported FID InceptionV3 (pytorch-fid's weights
  ``pt_inception-2015-12-05-6726825d.pth``), pool features for FID and the IS softmax head.
- :mod:`.metrics`: streaming float64 feature statistics (DDP-mergeable), Frechet distance,
  Inception Score, KID.
- :mod:`.reference_stats`: ``mu`` / ``sigma`` ``.npz`` files (the published ``cifar10.train.npz``
  format), written atomically.
- :mod:`.digits_features`: a small classifier for the 8x8 digits giving a proxy FID (not
  comparable to published FIDs) and a confidence / class-coverage report.
"""

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
    InceptionMetrics,
    fid_from_features,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
)
from .reference_stats import (
    compute_fid_stats,
    fid_against_stats_file,
    load_fid_stats,
    save_fid_stats,
)

__all__ = [
    "INCEPTION_WEIGHTS_ENV",
    "INCEPTION_WEIGHTS_FILENAME",
    "INCEPTION_WEIGHTS_URL",
    "DigitsFeatureNet",
    "DigitsSplit",
    "DigitsTrainingRecipe",
    "FIDInceptionV3",
    "FeatureStats",
    "InceptionMetrics",
    "InceptionOutput",
    "check_state_dict",
    "compute_fid_stats",
    "default_cache_dir",
    "digits_proxy_fid",
    "digits_sample_report",
    "fid_against_stats_file",
    "fid_from_features",
    "frechet_distance",
    "inception_score",
    "kernel_inception_distance",
    "load_digits_feature_net",
    "load_digits_split",
    "load_fid_inception",
    "load_fid_stats",
    "resolve_inception_weights",
    "save_fid_stats",
    "train_digits_feature_net",
]

# Generation + scoring + threshold sweeps (DDP-aware): see :mod:`.evaluate`.
from .evaluate import (  # noqa: E402
    FEATURE_DIMS,
    FEATURE_NETWORKS,
    PROXY_NOTE,
    SWEEP_METRICS,
    EvaluationResult,
    FeatureNetwork,
    SampleScores,
    SweepResult,
    check_device,
    check_stats_file,
    check_threshold,
    compute_fid_stats_for_dataset,
    digits_report_from_probs,
    distributed_from_env,
    evaluate_model,
    generate_and_score,
    load_kid_reference,
    metrics_from_scores,
    parse_threshold_values,
    rank_and_world,
    score_dataset,
    shard_indices,
    sweep_threshold,
    write_stats_file,
)

__all__ += [
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
