"""``sddpm models`` and ``sddpm convert``."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from ._app import app, fail, parse_ints, print_table


@app.command("models")
def models_command() -> None:
    """List the model presets: parameters, image shape and SNN time steps."""
    import torch

    from ..models import PRESETS, build_model, count_parameters

    rows = []
    for name, cfg in PRESETS.items():
        with torch.device("meta"):
            n = count_parameters(build_model(cfg))
        shape = f"{cfg.image_channels}x{cfg.image_size}x{cfg.image_size}" + (
            f", {cfg.num_classes} classes" if cfg.num_classes else ""
        )
        rows.append([name, f"{n:,}", shape, str(cfg.snn_timesteps)])
    print_table(["preset", "parameters", "image (CxHxW)", "SNN steps"], rows)


@app.command("convert")
def convert_command(
    checkpoint: Path = typer.Argument(..., help="A published SDDPM .pt checkpoint."),
    out: Path = typer.Option(..., "--out", help="Model directory to write."),
    preset_name: str = typer.Option("cifar10", "--preset", help="Architecture preset."),
    ch: int | None = typer.Option(None, "--ch", help="Override: base channels."),
    ch_mult: str | None = typer.Option(None, "--ch-mult", help="Override, e.g. 1,2,2,4."),
    num_res_blocks: int | None = typer.Option(None, "--num-res-blocks"),
    img_ch: int | None = typer.Option(None, "--img-ch"),
    img_size: int | None = typer.Option(None, "--img-size"),
    timestep: int | None = typer.Option(None, "--timestep", help="Override: SNN time steps."),
    entry: str = typer.Option("net_model", "--entry", help="net_model or ema_model."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
) -> None:
    """Turn a published SDDPM .pt checkpoint into an sddpm model directory (config.json and
    model.safetensors, plus ema.safetensors when the checkpoint has an EMA)."""
    from ..compat import from_published, load_published_file, published_state_dict
    from ..models import preset, save_pretrained

    if not checkpoint.is_file():
        fail(f"{checkpoint} does not exist")
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        fail(f"{out} exists and is not an empty folder; choose another --out or pass --force")
    try:
        cfg = preset(preset_name)
        overrides = {
            "channels": ch,
            "channel_mult": parse_ints(ch_mult, "--ch-mult"),
            "num_res_blocks": num_res_blocks,
            "image_channels": img_ch,
            "image_size": img_size,
            "snn_timesteps": timestep,
        }
        cfg = cfg.replace(**{k: v for k, v in overrides.items() if v is not None})
        ckpt = load_published_file(checkpoint)
        model = from_published(published_state_dict(ckpt, entry), cfg)
        ema_state = None
        other = "ema_model" if entry == "net_model" else None
        if other and other in ckpt:
            ema_state = from_published(published_state_dict(ckpt, other), cfg).state_dict()
    except ValueError as err:
        fail(str(err))
        return
    # save_pretrained writes each file atomically and the config last, so the directory is a
    # model (has a config.json) only once all its weights are there.
    if out.is_dir() and force:
        shutil.rmtree(out)
    elif out.exists() and force:
        out.unlink()
    save_pretrained(
        model,
        out,
        ema_state=ema_state,
        default_weights="model",
        extra={"source": {"published_checkpoint": str(checkpoint), "entry": entry}},
    )
    typer.echo(f"wrote {out} ({entry}{' + ema_model' if ema_state is not None else ''})")
