"""``sddpm train``: start a run from a preset, or resume one."""

from __future__ import annotations

import json
import shutil
import signal
import sys
from pathlib import Path

import typer

from ._app import app, fail

_SET_HELP = (
    "Override any setting, repeatable: KEY=VALUE with KEY a setting (lr, total_steps, "
    "batch_size, grad_accum, warmup_steps, grad_clip, ema_decay, checkpoint_every, keep_last, "
    "sample_every, num_samples, sampler, sample_steps, seed, bf16, sync_bn, compile, ...), "
    "SECTION.FIELD (optim.lr, train.total_steps, data.root, diffusion.T) or a U-Net field "
    "(channels, channel_mult, num_res_blocks, snn_timesteps, image_size, threshold). "
    "VALUE is JSON (1e-4, true, [1,2], null) or a string."
)


@app.command(
    "train",
    epilog=(
        "Examples: `sddpm train --preset digits --out runs/digits`; "
        "`sddpm train --resume runs/digits --set total_steps=3000`; multi-GPU: "
        "`torchrun --nproc_per_node=8 $(which sddpm) train --preset cifar10 --out runs/c10 "
        "--data-dir data`."
    ),
)
def train_command(
    preset: str | None = typer.Option(
        None,
        "--preset",
        help="Run preset: digits (CPU, ~10 min), mnist, fashion-mnist, cifar10, celeba64.",
    ),
    out: Path | None = typer.Option(None, "--out", help="Run directory of a new run."),
    resume: Path | None = typer.Option(
        None, "--resume", help="Continue the run in this directory from its newest checkpoint."
    ),
    config_file: Path | None = typer.Option(
        None, "--config", help="Start from a run config JSON (a run's config.json works too)."
    ),
    model: str | None = typer.Option(None, "--model", help="spiking (default) or ann (twin)."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Dataset folder (data.root)."),
    download: bool = typer.Option(False, "--download", help="Download the dataset if missing."),
    steps: int | None = typer.Option(None, "--steps", help="Total optimiser updates."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Global batch size."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate."),
    seed: int | None = typer.Option(None, "--seed"),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:1, ..."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads per process."),
    compile_model: bool | None = typer.Option(
        None, "--compile/--no-compile", help="torch.compile the model."
    ),
    neuron_kernel: str | None = typer.Option(
        None,
        "--neuron-kernel",
        help="auto (triton on CUDA when installed, else eager), eager, compiled or triton.",
    ),
    init_from: Path | None = typer.Option(
        None,
        "--init-from",
        help=(
            "Start a new run from a trained model's weights: a run directory (its newest good "
            "checkpoint) or a model directory. Its EMA weights are used when present. Entries "
            "the new config adds keep their init; any other mismatch is an error."
        ),
    ),
    overrides: list[str] | None = typer.Option(None, "--set", help=_SET_HELP),
    force: bool = typer.Option(
        False, "--force", help="Start afresh in an --out directory that already holds a run."
    ),
    print_config: bool = typer.Option(
        False, "--print-config", help="Print the resolved config as JSON and exit."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar."),
) -> None:
    """Train a spiking diffusion model (or its ANN twin); works under torchrun for DDP.

    Writes RUN_DIR/config.json (resolved config, format sddpm.run), metrics.csv,
    samples/step_XXXXXXXX.png and checkpoints/step_XXXXXXXX/ (a model directory loadable by
    `sddpm.models.load_pretrained`, plus training_state.pt and a checksum manifest). Resume with
    --resume RUN_DIR. SIGTERM or Ctrl-C finishes the current step, writes a checkpoint and exits
    (a second one exits at once).
    """
    from ..config import RunConfig, run_preset
    from ..training import (
        CheckpointWriteError,
        NonFiniteLossError,
        TrainingStopped,
        read_run_config,
        train,
    )

    if (out is None) == (resume is None):
        fail("give either --out DIR (a new run) or --resume DIR (continue a run)")
    if resume is not None and (preset or config_file):
        fail("--resume takes the run's own config; use --set to change settings, not --preset")
    if out is not None and preset and config_file:
        fail("give --preset or --config, not both")
    if init_from is not None and resume is not None:
        fail("--init-from starts a new run (--out DIR); a resumed run continues its own weights")

    explicit = {
        "model.kind": model,
        "data.root": str(data_dir) if data_dir is not None else None,
        "data.download": True if download else None,
        "train.total_steps": steps,
        "train.batch_size": batch_size,
        "optim.lr": lr,
        "train.seed": seed,
        "train.device": device,
        "train.threads": threads,
        "train.compile": compile_model,
        "train.neuron_kernel": neuron_kernel,
        "train.init_from": str(init_from) if init_from is not None else None,
    }
    try:
        if resume is not None:
            run_dir = resume
            config = read_run_config(run_dir)
        else:
            run_dir = out
            if config_file is not None:
                raw = json.loads(config_file.read_text())
                config = RunConfig.from_dict(raw["config"] if "format" in raw else raw)
            else:
                config = run_preset(preset or "digits")
        config = config.override({k: v for k, v in explicit.items() if v is not None})
        config = config.override(list(overrides or []))
        config.validate()
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as err:
        fail(str(err))
        return
    if print_config:
        typer.echo(config.to_json())
        return
    if out is not None:
        _prepare_new_run(out, force)

    try:
        result = train(
            config, run_dir, resume=resume is not None, command=list(sys.argv), progress=progress
        )
    except NonFiniteLossError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(3) from None
    except TrainingStopped as err:
        typer.echo(f"stopped: {err}", err=True)
        typer.echo(f"resume with: {err.resume_command}", err=True)
        raise typer.Exit(128 + int(getattr(signal, err.signal_name))) from None
    except CheckpointWriteError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
        return
    if result.checkpoint is not None:
        typer.echo(f"step {result.step}: {result.checkpoint}")


_RUN_ENTRIES = ("config.json", "metrics.csv", "checkpoints", "samples", "tensorboard")


def _prepare_new_run(out: Path, force: bool) -> None:
    """Refuse to start over an existing run unless ``force`` (which removes the run's files)."""
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return
    if not out.exists():
        return
    if not out.is_dir():
        fail(f"--out {out} exists and is not a directory")
    present = [name for name in _RUN_ENTRIES if (out / name).exists()]
    if present and not force:
        fail(
            f"{out} already holds a run ({', '.join(present)}); continue it with "
            f"`sddpm train --resume {out}`, or pass --force to start afresh"
        )
    for name in present:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
