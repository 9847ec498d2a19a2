"""``sddpm sample``: images from a trained or converted model."""

from __future__ import annotations

from pathlib import Path

import typer

from ._app import app, fail


def resolve_source(run: Path | None, checkpoint: Path | None) -> Path:
    """Exactly one of ``--run`` / ``--checkpoint``."""
    if (run is None) == (checkpoint is None):
        fail("give exactly one of --run RUN_DIR or --checkpoint MODEL_DIR")
    return run if run is not None else checkpoint


@app.command("sample")
def sample_command(
    out: Path = typer.Option(..., "--out", help="Output: .png (a grid) or .npz (uint8 images)."),
    run: Path | None = typer.Option(None, "--run", help="Run directory (latest checkpoint)."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="A model directory."),
    num: int = typer.Option(64, "--num", help="Number of images."),
    sampler: str = typer.Option("ddim", "--sampler", help="ddpm, ddim or dpm-solver++."),
    steps: int | None = typer.Option(
        None, "--steps", help="Model calls (default: 1000 ddpm, 100 ddim, 20 dpm-solver++)."
    ),
    eta: float = typer.Option(0.0, "--eta", help="DDIM noise: 0 deterministic, 1 DDPM-like."),
    threshold: float | None = typer.Option(
        None, "--threshold", help="Threshold guidance: every neuron's threshold while sampling."
    ),
    seed: int = typer.Option(0, "--seed", help="Image i depends on (seed, i) only."),
    batch_size: int = typer.Option(64, "--batch-size"),
    weights: str | None = typer.Option(None, "--weights", help="model or ema (default: saved)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
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
        setup = load_for_sampling(source, weights=weights, device=device)
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
        )
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
        return
    save_images(images, out)
    typer.echo(f"wrote {num} images to {out}")
