"""``sddpm fid-stats | evaluate | sweep-threshold | sweep-guidance``: FID / IS / KID, sweeps.

All three run alone or under ``torchrun --nproc_per_node=N`` (each rank takes its share of the
images; rank 0 writes and prints).
"""

from __future__ import annotations

from pathlib import Path

import typer

from ._app import (
    CHECKPOINT_OPTION,
    DEVICE_OPTION,
    RUN_OPTION,
    WEIGHTS_OPTION,
    app,
    fail,
    fail_with,
    print_table,
    resolve_source,
    with_sampling_options,
)

_ERRORS = (ValueError, FileNotFoundError)

FEATURES_HELP = (
    "inception (the FID Inception; published-scale numbers) or digits (the small digits "
    "classifier: proxy numbers, offline, seconds, NOT comparable to published FIDs)."
)


def _check_features(features: str) -> None:
    from ..evaluation import FEATURE_NETWORKS

    if features not in FEATURE_NETWORKS:
        fail(f"--features must be one of {', '.join(FEATURE_NETWORKS)}, got {features!r}")


def _check_device(device: str) -> None:
    from ..evaluation import check_device

    try:
        check_device(device)
    except ValueError as err:
        fail(f"--device: {err}")


def _proxy_warning() -> None:
    from ..evaluation import PROXY_NOTE

    typer.echo(f"note: {PROXY_NOTE}")


@app.command("fid-stats")
def fid_stats_command(
    dataset: str = typer.Option(..., "--dataset", help="digits, mnist, cifar10, ..."),
    out: Path = typer.Option(..., "--out", help="Output .npz with mu [D] and sigma [D, D]."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="The dataset's folder."),
    num: int | None = typer.Option(None, "--num", help="First N images (default: all)."),
    batch_size: int = typer.Option(256, "--batch-size"),
    features: str = typer.Option("inception", "--features", help=FEATURES_HELP),
    inception_weights: Path | None = typer.Option(
        None, "--inception-weights", help="pt_inception-2015-12-05-6726825d.pth"
    ),
    keep_features: bool = typer.Option(
        False, "--keep-features", help="Also store the features [N, D] (float32) for KID."
    ),
    split: str = typer.Option("train", "--split", help="train or test."),
    download: bool = typer.Option(False, "--download", help="Fetch the dataset if missing."),
    workers: int = typer.Option(0, "--workers", help="DataLoader worker processes."),
    device: str = DEVICE_OPTION,
) -> None:
    """Reference statistics of a dataset's images (no flips) in the published .npz format."""
    from ..evaluation import (
        FeatureNetwork,
        compute_fid_stats_for_dataset,
        distributed_from_env,
        write_stats_file,
    )

    _check_features(features)
    if split not in ("train", "test"):
        fail(f"--split must be train or test, got {split!r}")
    if num is not None and num < 2:
        fail(f"FID statistics need at least 2 images, got --num {num}")
    _check_device(device)
    with distributed_from_env(device) as (rank, _world, dev):
        try:
            net = FeatureNetwork.load(features, inception_weights=inception_weights, device=dev)
            scores = compute_fid_stats_for_dataset(
                dataset,
                net,
                data_dir=data_dir,
                num=num,
                batch_size=batch_size,
                train=split == "train",
                download=download,
                keep_features=keep_features,
                num_workers=workers,
                progress=rank == 0,
            )
        except _ERRORS as err:
            fail(str(err))
            return
        if rank != 0:
            return
        write_stats_file(out, scores)
        d = net.dim
        extra = f", features [{scores.count}, {d}]" if keep_features else ""
        typer.echo(
            f"wrote {out}: mu [{d}], sigma [{d}, {d}]{extra} of {scores.count} {dataset} "
            f"images ({features} features)"
        )
        if net.proxy:
            _proxy_warning()


@app.command(
    "evaluate", help="Generate N images and write FID, IS and KID with the settings to JSON."
)
@with_sampling_options
def evaluate_command(
    stats: Path = typer.Option(..., "--stats", help="Reference .npz (sddpm fid-stats)."),
    out: Path = typer.Option(..., "--out", help="Output metrics .json."),
    run: Path | None = RUN_OPTION,
    checkpoint: Path | None = CHECKPOINT_OPTION,
    num: int = typer.Option(50000, "--num", help="Number of images to generate."),
    weights: str | None = WEIGHTS_OPTION,
    features: str = typer.Option("inception", "--features", help=FEATURES_HELP),
    inception_weights: Path | None = typer.Option(None, "--inception-weights"),
    kid_reference: Path | None = typer.Option(
        None,
        "--kid-reference",
        help="An .npz with 'features' [M, D] for KID (default: the --stats file's, if any).",
    ),
    kid_dataset: str | None = typer.Option(
        None, "--kid-dataset", help="Compute KID reference features from this dataset now."
    ),
    kid_data_dir: Path | None = typer.Option(None, "--kid-data-dir"),
    kid_num: int | None = typer.Option(None, "--kid-num", help="Images of --kid-dataset."),
    is_splits: int = typer.Option(10, "--is-splits", help="Inception Score splits."),
    *,
    options,
) -> None:
    from ..evaluation import (
        FeatureNetwork,
        check_stats_file,
        distributed_from_env,
        evaluate_model,
    )
    from ..generation import load_for_sampling
    from ..io import write_json

    source = resolve_source(run, checkpoint)
    _check_features(features)
    if num < 2:
        fail(f"FID needs at least 2 images (a covariance), got --num {num}")
    with distributed_from_env(options.device) as (rank, _world, dev):
        options = options.replace(device=str(dev))
        try:
            check_stats_file(stats, features)
            setup = _load(load_for_sampling, source, weights, options)
            model_dir = setup.directory  # the checkpoint resolved (and verified) once
            net = FeatureNetwork.load(features, inception_weights=inception_weights, device=dev)
            result = evaluate_model(
                setup,
                net,
                stats,
                num,
                options,
                is_splits=is_splits,
                kid_reference=kid_reference,
                kid_dataset=kid_dataset,
                kid_data_dir=kid_data_dir,
                kid_num=kid_num,
                checkpoint=model_dir.resolve(),
                progress=rank == 0,
            )
            if rank == 0:
                data = result.to_dict()
                data["weights"] = weights
                write_json(out, data)
        except _ERRORS as err:
            fail_with(err)
            return
        if rank != 0:
            return
        print_table(["metric", "value"], result.table_rows())
        typer.echo(f"wrote {out}")
        if result.proxy:
            _proxy_warning()


def _load(load_for_sampling, source: Path, weights: str | None, options):
    return load_for_sampling(
        source, weights=weights, device=options.device, neuron_kernel=options.neuron_kernel
    )


_SWEEP_VALUES_HELP = "start:stop:step (stop included) or a comma list, e.g. "
_SWEEP_METRIC_HELP = "fid (FID Inception) or proxy-fid (digits network)."


@app.command(
    "sweep-threshold",
    help="Evaluate several threshold-guidance values with the same seeds and mark the best. "
    "Each value is written to --out as soon as it is done; a rerun into the same --out skips "
    "the values already there.",
)
@with_sampling_options(exclude=("threshold",))
def sweep_threshold_command(
    values: str = typer.Option(..., "--values", help=_SWEEP_VALUES_HELP + "0.99,1,1.01"),
    stats: Path = typer.Option(..., "--stats", help="Reference .npz (sddpm fid-stats)."),
    out: Path = typer.Option(..., "--out", help="Output folder: sweep.json, .csv and .png."),
    run: Path | None = RUN_OPTION,
    checkpoint: Path | None = CHECKPOINT_OPTION,
    metric: str = typer.Option("fid", "--metric", help=_SWEEP_METRIC_HELP),
    num: int = typer.Option(10000, "--num", help="Images per threshold value."),
    weights: str | None = WEIGHTS_OPTION,
    inception_weights: Path | None = typer.Option(None, "--inception-weights"),
    is_splits: int = typer.Option(10, "--is-splits", help="Inception Score splits."),
    *,
    options,
) -> None:
    _sweep_command("threshold", **locals())


@app.command(
    "sweep-guidance",
    help="Evaluate several classifier-free guidance weights w of a class-conditional model with "
    "the same seeds (image i of class i mod num_classes unless --class / --labels) and mark "
    "the best. Resumable like sweep-threshold.",
)
@with_sampling_options(exclude=("guidance",))
def sweep_guidance_command(
    values: str = typer.Option(..., "--values", help=_SWEEP_VALUES_HELP + "1,1.5,2,3"),
    stats: Path = typer.Option(..., "--stats", help="Reference .npz (sddpm fid-stats)."),
    out: Path = typer.Option(..., "--out", help="Output folder: sweep.json, .csv and .png."),
    run: Path | None = RUN_OPTION,
    checkpoint: Path | None = CHECKPOINT_OPTION,
    metric: str = typer.Option("fid", "--metric", help=_SWEEP_METRIC_HELP),
    num: int = typer.Option(10000, "--num", help="Images per guidance value."),
    weights: str | None = WEIGHTS_OPTION,
    inception_weights: Path | None = typer.Option(None, "--inception-weights"),
    is_splits: int = typer.Option(10, "--is-splits", help="Inception Score splits."),
    *,
    options,
) -> None:
    _sweep_command("guidance", **locals())


def _sweep_command(
    param, *, values, stats, out, run, checkpoint, metric, num, weights, inception_weights,
    is_splits, options,
) -> None:  # fmt: skip
    from ..evaluation import (
        SWEEP_METRICS,
        FeatureNetwork,
        check_stats_file,
        distributed_from_env,
        parse_sweep_values,
        sweep,
        sweep_paths,
    )
    from ..generation import load_for_sampling

    source = resolve_source(run, checkpoint)
    if metric not in SWEEP_METRICS:
        fail(f"--metric must be one of {', '.join(SWEEP_METRICS)}, got {metric!r}")
    if num < 2:
        fail(f"FID needs at least 2 images (a covariance), got --num {num}")
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; give a folder for sweep.json, .csv and .png")
    try:
        parsed = parse_sweep_values(values, param)
    except ValueError as err:
        fail(str(err).replace("sweep values", "--values", 1))  # the flag that gave them
        return
    features = "digits" if metric == "proxy-fid" else "inception"
    had = sweep_paths(out)["json"].is_file()
    with distributed_from_env(options.device) as (rank, _world, dev):
        options = options.replace(device=str(dev))
        try:
            check_stats_file(stats, features)
            setup = _load(load_for_sampling, source, weights, options)
            model_dir = setup.directory  # the checkpoint resolved (and verified) once
            if param == "guidance" and not setup.model.config.num_classes:
                fail(f"sweep-guidance needs a class-conditional model; {source} is unconditional")
            net = FeatureNetwork.load(features, inception_weights=inception_weights, device=dev)
            result = sweep(
                setup,
                net,
                stats,
                param,
                parsed,
                num,
                options,
                metric=metric,
                is_splits=is_splits,
                checkpoint=model_dir.resolve(),
                progress=rank == 0,
                out_dir=out,
                record={"weights": weights},
            )
        except _ERRORS as err:
            fail_with(err)
            return
        if rank != 0:
            return
        paths = result.write(out)
        print_table(*result.table())
        best = result.best
        typer.echo(f"best {param} {result.thresholds[best]:g}: {metric} {result.values[best]:.4f}")
        if had:
            typer.echo(f"resumed from {paths['json']}")
        typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))
        if result.proxy:
            _proxy_warning()
