"""``sddpm energy``: SOPs, MACs, firing rates and energy of a model while it samples."""

from __future__ import annotations

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


@app.command("energy")
@with_sampling_options
def energy_command(
    json_out: Path = typer.Option(..., "--json", help="Report to write (JSON)."),
    run: Path | None = RUN_OPTION,
    checkpoint: Path | None = CHECKPOINT_OPTION,
    plot: Path | None = typer.Option(None, "--plot", help="Also draw firing rates and energy."),
    plot_steps: Path | None = typer.Option(
        None, "--plot-steps", help="Also draw firing rate and energy against t (PNG)."
    ),
    num: int = typer.Option(16, "--num", help="Images to generate while measuring."),
    weights: str | None = WEIGHTS_OPTION,
    e_ac: float = typer.Option(0.9, "--e-ac", help="pJ per synaptic operation (accumulate)."),
    e_mac: float = typer.Option(4.6, "--e-mac", help="pJ per multiply-accumulate."),
    memory_model: str = typer.Option(
        "linear",
        "--memory-model",
        help="Memory-aware accounting's SRAM cost vs size: linear (Lemaire et al.'s fit), "
        "flat (10 pJ per 64 bits) or piecewise (spikingjelly's).",
    ),
    *,
    options,
) -> None:
    """Sample with forward hooks attached and report, per layer, SOPs of spike-fed layers,
    MACs of real-fed layers and firing rates; energy per U-Net call and per image by three
    accountings (the paper's, the full one, the memory-aware one after Lemaire et al.) against
    the ANN twin, and per diffusion step. Prints a table, writes JSON (and PNGs)."""
    from ..evaluation.energy import measure_sampling_energy
    from ..evaluation.energy_memory import MEMORY_MODELS, MemoryEnergyModel
    from ..generation import load_for_sampling

    source = resolve_source(run, checkpoint)
    if num < 1:
        fail(f"--num must be >= 1, got {num}")
    for flag, path in (("--plot", plot), ("--plot-steps", plot_steps)):
        if path is not None and path.suffix.lower() != ".png":
            fail(f"{flag} must end in .png, got {path}")
    if e_ac < 0 or e_mac < 0:
        fail(f"--e-ac and --e-mac must be >= 0, got {e_ac} and {e_mac}")
    if memory_model not in MEMORY_MODELS:
        fail(f"--memory-model must be one of {', '.join(MEMORY_MODELS)}, got {memory_model!r}")
    try:
        setup = load_for_sampling(
            source, weights=weights, device=options.device, neuron_kernel=options.neuron_kernel
        )
        report = measure_sampling_energy(
            setup.model,
            num,
            options,
            schedule=setup.schedule,
            prediction=setup.prediction,
            e_ac=e_ac,
            e_mac=e_mac,
            source=source,
            memory=MemoryEnergyModel(memory_model=memory_model),
        )
    except (ValueError, FileNotFoundError) as err:
        fail_with(err)
        return
    typer.echo(report.table())
    report.save_json(json_out)
    written = [str(json_out)]
    if plot is not None:
        report.plot(plot)
        written.append(str(plot))
    if plot_steps is not None:
        report.plot_steps(plot_steps)
        written.append(str(plot_steps))
    typer.echo("wrote " + ", ".join(written))
