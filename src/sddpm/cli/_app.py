"""The Typer application and the small helpers every command uses."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Spiking denoising diffusion models: train, sample, evaluate, measure energy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(message: str) -> None:
    """Print an error the user can act on and exit with status 2."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A plain right-aligned table on stdout."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    for line in [headers, ["-" * w for w in widths], *rows]:
        typer.echo("  ".join(str(x).rjust(w) for x, w in zip(line, widths, strict=True)))


def parse_ints(text: str | None, what: str) -> tuple[int, ...] | None:
    """``"1,2,2,4"`` (or ``"[1, 2]"``) -> ``(1, 2, 2, 4)``; None stays None."""
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.replace("[", "").replace("]", "").split(","))
    except ValueError:
        fail(f"{what} must be comma-separated integers like 1,2,2,4, got {text!r}")
        raise


# Options shared by the commands that sample (sample, evaluate, sweep-threshold, energy).
RUN_OPTION = typer.Option(None, "--run", help="Run directory (latest checkpoint).")
CHECKPOINT_OPTION = typer.Option(None, "--checkpoint", help="A model directory.")
SAMPLER_OPTION = typer.Option("ddim", "--sampler", help="ddpm, ddim or dpm-solver++.")
STEPS_OPTION = typer.Option(
    None, "--steps", help="Model calls (default: 1000 ddpm, 100 ddim, 20 dpm-solver++)."
)
ETA_OPTION = typer.Option(0.0, "--eta", help="DDIM noise: 0 deterministic, 1 DDPM-like.")
THRESHOLD_OPTION = typer.Option(
    None, "--threshold", help="Threshold guidance: every neuron's threshold while sampling."
)
SEED_OPTION = typer.Option(0, "--seed", help="Image i depends on (seed, i) only.")
BATCH_SIZE_OPTION = typer.Option(64, "--batch-size", help="Images per U-Net call.")
WEIGHTS_OPTION = typer.Option(None, "--weights", help="model or ema (default: as saved).")
DEVICE_OPTION = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ...")
BF16_OPTION = typer.Option(
    False, "--bf16", help="bfloat16 autocast of the U-Net (GPUs; membranes stay float32)."
)
NEURON_KERNEL_OPTION = typer.Option(
    "auto",
    "--neuron-kernel",
    help="auto (triton on CUDA when installed, else eager), eager, compiled or triton.",
)


def resolve_source(run, checkpoint):
    """Exactly one of ``--run`` / ``--checkpoint``."""
    if (run is None) == (checkpoint is None):
        fail("give exactly one of --run RUN_DIR or --checkpoint MODEL_DIR")
    return run if run is not None else checkpoint
