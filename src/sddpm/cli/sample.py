"""``sddpm sample``: images from a trained or converted model."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from ._app import (
    CHECKPOINT_OPTION,
    RUN_OPTION,
    WEIGHTS_OPTION,
    app,
    fail,
    fail_with,
    resolve_source,
    with_sampling_options,
)

OUT_SUFFIXES = (".png", ".npz")


def check_output_file(out: Path, force: bool, suffixes: tuple[str, ...] = OUT_SUFFIXES) -> None:
    """Before any work: ``--out`` has a known extension, is not a folder, does not exist
    (unless ``force``) and lies in a folder that exists or can be made, and is writable."""
    if out.suffix.lower() not in suffixes:
        fail(f"--out must end in {' or '.join(suffixes)}, got {out}")
    if out.is_dir():
        fail(f"--out {out} is a folder; give a file name ending in {' or '.join(suffixes)}")
    if out.exists() and not force:
        fail(f"--out {out} exists; choose another name or pass --force to replace it")
    folder = out.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        fail(f"--out {out}: cannot write in {folder}")


@app.command(
    "sample",
    help="Generate images: a PNG grid, or an .npz array of uint8 images. A class-conditional "
    "model takes --class K or --labels K1,K2,... (cycled over the images; default: image i of "
    "class i mod num_classes) and --guidance W; the grid then has one class per row and the "
    ".npz also holds 'labels' [N].",
)
@with_sampling_options
def sample_command(
    out: Path = typer.Option(
        ...,
        "--out",
        help="Output: .png (a grid) or .npz (array 'images' [N, H, W, C] uint8, and 'labels' "
        "[N] int64 for a conditional model).",
    ),
    run: Path | None = RUN_OPTION,
    checkpoint: Path | None = CHECKPOINT_OPTION,
    num: int = typer.Option(64, "--num", help="Number of images."),
    weights: str | None = WEIGHTS_OPTION,
    force: bool = typer.Option(False, "--force", help="Replace an existing --out file."),
    *,
    options,
) -> None:
    from ..generation import class_options, generate, image_labels, load_for_sampling
    from ..images import save_images

    source = resolve_source(run, checkpoint)
    check_output_file(out, force)
    if num < 1:
        fail(f"--num must be >= 1, got {num}")
    try:
        setup = load_for_sampling(
            source, weights=weights, device=options.device, neuron_kernel=options.neuron_kernel
        )
        cfg = setup.model.config
        options = class_options(options, setup.model)  # checks the labels before any image
        images = generate(
            setup.model,
            num,
            (cfg.image_channels, cfg.image_size, cfg.image_size),
            options,
            schedule=setup.schedule,
            prediction=setup.prediction,
        )
    except (ValueError, FileNotFoundError) as err:
        fail_with(err)
        return
    labels = image_labels(num, options)
    save_images(images, out, labels=labels)
    classes = "" if labels is None else f" of classes {sorted(set(labels.tolist()))}"
    typer.echo(f"wrote {num} images{classes} to {out}")
