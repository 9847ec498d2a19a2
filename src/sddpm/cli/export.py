"""``sddpm export-nir``: the spiking body of a model for one diffusion step, as a NIR file."""

from __future__ import annotations

from pathlib import Path

import typer

from ._app import (
    CHECKPOINT_OPTION,
    RUN_OPTION,
    THRESHOLD_OPTION,
    WEIGHTS_OPTION,
    app,
    fail,
    resolve_source,
)


@app.command("export-nir")
def export_nir_command(
    out: Path = typer.Option(..., "--out", help="NIR file to write (.nir, HDF5)."),
    t: int = typer.Option(..., "--t", help="Diffusion step t (0 .. diffusion_steps - 1)."),
    run: Path | None = RUN_OPTION,
    checkpoint: Path | None = CHECKPOINT_OPTION,
    weights: str | None = WEIGHTS_OPTION,
    threshold: float | None = THRESHOLD_OPTION,
    dtype: str = typer.Option("float32", "--dtype", help="float32 or float64 arrays."),
    class_label: int | None = typer.Option(
        None,
        "--class",
        help="A class-conditional model: the class K to export (its embedding folds into the "
        "biases with the time embedding's); required for such a model.",
    ),
) -> None:
    """Write the spiking U-Net for diffusion step t as a NIR graph: input x_t [C, H, W] on
    every SNN step, output the head's input per step; the head's weights sit in the graph's
    metadata (sddpm.export.nir_head finishes a call). Read it with
    nir.read(FILE, type_check=False). A class-conditional model is exported for one class
    (--class K)."""
    from ..export import NIRExportError, export_nir, write_nir
    from ..models import load_pretrained
    from ..snn import override_threshold

    source = resolve_source(run, checkpoint)
    if out.suffix.lower() != ".nir":
        fail(f"--out must end in .nir, got {out}")
    if dtype not in ("float32", "float64"):
        fail(f"--dtype must be float32 or float64, got {dtype!r}")
    if threshold is not None and not threshold > 0:
        fail(f"--threshold must be > 0, got {threshold}")
    try:
        model = load_pretrained(source, weights=weights)
        if not 0 <= t < model.config.diffusion_steps:
            fail(f"--t must be in [0, {model.config.diffusion_steps - 1}], got {t}")
        n = model.config.num_classes
        if n > 0 and class_label is None:
            fail(f"{source} is class-conditional ({n} classes): give --class K (0..{n - 1})")
        if n == 0 and class_label is not None:
            fail(f"--class: {source} is unconditional (num_classes=0); drop --class")
        if class_label is not None and not 0 <= class_label <= n:
            fail(f"--class must be in [0, {n - 1}] (or {n}, the null class), got {class_label}")
        if threshold is None:
            graph = export_nir(model, t, dtype=dtype, y=class_label)
        else:
            with override_threshold(model, threshold):
                graph = export_nir(model, t, dtype=dtype, y=class_label)
    except NIRExportError as err:
        fail(f"{source}: {err}")
        return
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
        return
    write_nir(out, graph)
    counts: dict[str, int] = {}
    for node in graph.nodes.values():
        role = node.metadata.get("role", type(node).__name__.lower())
        counts[role] = counts.get(role, 0) + 1
    summary = ", ".join(f"{n} {role}" for role, n in sorted(counts.items()))
    which = "" if class_label is None else f", class {class_label}"
    steps = model.config.snn_timesteps
    typer.echo(f"wrote {out}: t={t}{which}, {steps} SNN steps; nodes: {summary}")
