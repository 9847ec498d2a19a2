"""``sddpm energy``: SOPs, MACs, firing rates and energy of a model while it samples."""

from __future__ import annotations

from pathlib import Path

import typer

from ._app import (
    BATCH_SIZE_OPTION,
    DEVICE_OPTION,
    ETA_OPTION,
    SAMPLER_OPTION,
    SEED_OPTION,
    STEPS_OPTION,
    THRESHOLD_OPTION,
    WEIGHTS_OPTION,
    app,
    fail,
)


@app.command("energy")
def energy_command(
    run: Path = typer.Option(..., "--run", help="Run directory (latest checkpoint) or model dir."),
    json_out: Path = typer.Option(..., "--json", help="Report to write (JSON)."),
    plot: Path | None = typer.Option(None, "--plot", help="Also draw firing rates and energy."),
    sampler: str = SAMPLER_OPTION,
    steps: int | None = STEPS_OPTION,
    num: int = typer.Option(16, "--num", help="Images to generate while measuring."),
    eta: float = ETA_OPTION,
    threshold: float | None = THRESHOLD_OPTION,
    seed: int = SEED_OPTION,
    batch_size: int = BATCH_SIZE_OPTION,
    weights: str | None = WEIGHTS_OPTION,
    device: str = DEVICE_OPTION,
    e_ac: float = typer.Option(0.9, "--e-ac", help="pJ per synaptic operation (accumulate)."),
    e_mac: float = typer.Option(4.6, "--e-mac", help="pJ per multiply-accumulate."),
) -> None:
    """Sample with forward hooks attached and report, per layer, SOPs of spike-fed layers,
    MACs of real-fed layers and firing rates; energy per U-Net call and per image (the paper's
    and the full accounting) against the ANN twin. Prints a table, writes JSON (and a PNG)."""
    from ..evaluation.energy import measure_sampling_energy
    from ..generation import load_for_sampling

    if num < 1:
        fail(f"--num must be >= 1, got {num}")
    if plot is not None and plot.suffix.lower() != ".png":
        fail(f"--plot must end in .png, got {plot}")
    if e_ac < 0 or e_mac < 0:
        fail(f"--e-ac and --e-mac must be >= 0, got {e_ac} and {e_mac}")
    try:
        setup = load_for_sampling(run, weights=weights, device=device)
        report = measure_sampling_energy(
            setup.model,
            num,
            sampler=sampler,
            steps=steps,
            eta=eta,
            threshold=threshold,
            seed=seed,
            batch_size=batch_size,
            schedule=setup.schedule,
            prediction=setup.prediction,
            e_ac=e_ac,
            e_mac=e_mac,
            source=run,
        )
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
        return
    typer.echo(report.table())
    report.save_json(json_out)
    if plot is not None:
        report.plot(plot)
    typer.echo(f"wrote {json_out}" + (f" and {plot}" if plot is not None else ""))
