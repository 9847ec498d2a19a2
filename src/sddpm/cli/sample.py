"""``sddpm sample``: images from a trained or converted model."""

from __future__ import annotations

from pathlib import Path

import typer

from ._app import (
    BATCH_SIZE_OPTION,
    BF16_OPTION,
    CHECKPOINT_OPTION,
    DEVICE_OPTION,
    ETA_OPTION,
    NEURON_KERNEL_OPTION,
    RUN_OPTION,
    SAMPLER_OPTION,
    SEED_OPTION,
    STEPS_OPTION,
    THRESHOLD_OPTION,
    WEIGHTS_OPTION,
    app,
    fail,
    resolve_source,
)


@app.command("sample")
def sample_command(
    out: Path = typer.Option(..., "--out", help="Output: .png (a grid) or .npz (uint8 images)."),
    run: Path | None = RUN_OPTION,
    checkpoint: Path | None = CHECKPOINT_OPTION,
    num: int = typer.Option(64, "--num", help="Number of images."),
    sampler: str = SAMPLER_OPTION,
    steps: int | None = STEPS_OPTION,
    eta: float = ETA_OPTION,
    threshold: float | None = THRESHOLD_OPTION,
    seed: int = SEED_OPTION,
    batch_size: int = BATCH_SIZE_OPTION,
    weights: str | None = WEIGHTS_OPTION,
    device: str = DEVICE_OPTION,
    neuron_kernel: str = NEURON_KERNEL_OPTION,
    bf16: bool = BF16_OPTION,
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the U-Net."),
) -> None:
    """Generate images and write a PNG grid or an .npz array ``images`` [N, H, W, C] uint8."""
    from ..generation import generate, load_for_sampling
    from ..images import save_images

    source = resolve_source(run, checkpoint)
    if out.suffix.lower() not in (".png", ".npz"):
        fail(f"--out must end in .png or .npz, got {out}")
    if num < 1:
        fail(f"--num must be >= 1, got {num}")
    try:
        setup = load_for_sampling(
            source, weights=weights, device=device, neuron_kernel=neuron_kernel
        )
        cfg = setup.model.config
        images = generate(
            setup.model,
            num,
            (cfg.image_channels, cfg.image_size, cfg.image_size),
            sampler=sampler,
            steps=steps,
            eta=eta,
            threshold=threshold,
            seed=seed,
            batch_size=batch_size,
            schedule=setup.schedule,
            prediction=setup.prediction,
            device=device,
            bf16=bf16,
            compile_model=compile_model,
        )
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
        return
    save_images(images, out)
    typer.echo(f"wrote {num} images to {out}")
