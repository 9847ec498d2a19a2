"""``sddpm eps-moments``: the eps moments Gamma_t that the Analytic-DPM samplers need."""

from __future__ import annotations

from pathlib import Path

import typer

from ._app import (
    BATCH_SIZE_OPTION,
    CHECKPOINT_OPTION,
    DEVICE_OPTION,
    NEURON_KERNEL_OPTION,
    RUN_OPTION,
    SEED_OPTION,
    WEIGHTS_OPTION,
    app,
    fail,
    resolve_source,
)


def _data_settings(model_dir: Path, dataset: str | None, data_dir: str | None) -> dict:
    """The training data of the checkpoint's run (``run.config.data``), overridden by flags."""
    from ..models import read_config

    run = read_config(model_dir).get("run") or {}
    data = dict((run.get("config") or {}).get("data") or {})
    if dataset is not None:
        data = {"dataset": dataset, "root": data_dir}
    elif data_dir is not None:
        data["root"] = data_dir
    if not data.get("dataset"):
        fail(
            f"{model_dir} records no training dataset (a converted model?): pass --dataset NAME "
            "(and --data-dir DIR) with the images it was trained on"
        )
    return data


@app.command("eps-moments")
def eps_moments_command(
    out: Path = typer.Option(..., "--out", help="Moments file to write (.safetensors)."),
    run: Path | None = RUN_OPTION,
    checkpoint: Path | None = CHECKPOINT_OPTION,
    num: int = typer.Option(1000, "--num", help="Training images to average over."),
    steps: int | None = typer.Option(
        None,
        "--steps",
        help="Only the K grid steps an analytic sampler with --steps K uses (default: all T).",
    ),
    spacing: str = typer.Option(
        "linear", "--spacing", help="The grid of --steps (as the sampler's; analytic: linear)."
    ),
    dataset: str | None = typer.Option(
        None, "--dataset", help="Dataset name (default: the run's training dataset)."
    ),
    data_dir: str | None = typer.Option(
        None, "--data-dir", "--data-root", help="Its data folder (--data-root: the older name)."
    ),
    repeats: int = typer.Option(1, "--repeats", help="Noise draws per image and step."),
    seed: int = SEED_OPTION,
    batch_size: int = BATCH_SIZE_OPTION,
    weights: str | None = WEIGHTS_OPTION,
    device: str = DEVICE_OPTION,
    neuron_kernel: str = NEURON_KERNEL_OPTION,
) -> None:
    """Estimate Gamma_t = E||eps(x_t, t)||^2 / d from training images (Analytic-DPM, Bao et al.
    2022) and write it for `sample(..., sampler="analytic-ddpm" | "analytic-ddim", moments=)`."""
    import torch

    from ..data import DatasetError, build_dataset
    from ..diffusion import SPACINGS, estimate_eps_moments, save_moments, timesteps
    from ..generation import load_for_sampling
    from ..models import fold_batchnorm

    source = resolve_source(run, checkpoint)
    if out.suffix != ".safetensors":
        fail(f"--out must end in .safetensors, got {out}")
    if num < 1:
        fail(f"--num must be >= 1, got {num}")
    if spacing not in SPACINGS:
        fail(f"--spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")
    try:
        setup = load_for_sampling(
            source, weights=weights, device=device, neuron_kernel=neuron_kernel
        )
        model_dir = setup.directory  # resolved (and verified) once, by load_for_sampling
        cfg, schedule = setup.model.config, setup.schedule
        grid = None if steps is None else timesteps(schedule, steps, spacing)
        data = _data_settings(model_dir, dataset, data_dir)
        images_set = build_dataset(
            data["dataset"],
            root=data.get("root"),
            image_size=cfg.image_size,
            hflip=False,
            channels=cfg.image_channels if data["dataset"] == "folder" else None,
        )
        if num > len(images_set):
            fail(f"--num {num} exceeds the {len(images_set)} images of {data['dataset']}")
        images = torch.stack([images_set[i] for i in range(num)]).to(device)
        if tuple(images.shape[1:]) != (cfg.image_channels, cfg.image_size, cfg.image_size):
            fail(
                f"{data['dataset']} gives images of shape {list(images.shape[1:])}, the model "
                f"takes {[cfg.image_channels, cfg.image_size, cfg.image_size]}"
            )
        model = fold_batchnorm(setup.model.eval())  # the same function, faster
        moments = estimate_eps_moments(
            model,
            images,
            schedule,
            timesteps=grid,
            batch_size=batch_size,
            repeats=repeats,
            seed=seed,
            prediction=setup.prediction,
            progress=True,
        )
        info = {
            "source": str(model_dir),
            "dataset": data["dataset"],
            "images": num,
            "repeats": repeats,
            "seed": seed,
            "steps": steps,
            "spacing": spacing if steps is not None else None,
            "weights": weights,
        }
        save_moments(out, moments, schedule, info)
    except (ValueError, FileNotFoundError, DatasetError) as err:
        fail(str(err))
        return
    done = int((~moments.isnan()).sum())
    typer.echo(f"wrote {out} (Gamma_t at {done} of {schedule.T} steps, {num} images)")
