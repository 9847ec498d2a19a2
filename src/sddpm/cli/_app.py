"""The Typer application and the small helpers every command uses."""

from __future__ import annotations

import functools
import inspect
import re
import typing
from collections.abc import Callable
from pathlib import Path

import typer

_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")


def plain_text(doc: str) -> str:
    """Help text as plain text: reStructuredText roles and backquotes removed, and each
    paragraph on one line (the terminal wraps it), so no sentence breaks where the source did.
    """
    text = _ROLE.sub(r"\1", inspect.cleandoc(doc)).replace("``", "").replace("`", "")
    paragraphs = (
        " ".join(line.strip() for line in p.splitlines()) for p in re.split(r"\n\s*\n", text)
    )
    return "\n\n".join(p for p in paragraphs if p)


class _PlainHelpTyper(typer.Typer):
    """A Typer whose commands' help (``help=`` or the docstring) and epilog are
    :func:`plain_text`."""

    def command(self, name: str | None = None, **kwargs):
        register = super().command

        def decorator(f):
            text = kwargs.pop("help", None) or inspect.getdoc(f) or ""
            if kwargs.get("epilog"):
                kwargs["epilog"] = plain_text(kwargs["epilog"])
            return register(name, help=plain_text(text), **kwargs)(f)

        return decorator


app = _PlainHelpTyper(
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
# The sampling settings among them become one SamplingOptions: see `with_sampling_options`.
RUN_OPTION = typer.Option(None, "--run", help="Run directory (latest checkpoint).")
CHECKPOINT_OPTION = typer.Option(None, "--checkpoint", help="A model directory.")
SAMPLER_OPTION = typer.Option(
    "ddim",
    "--sampler",
    help="ddpm, ddim, dpm-solver++ (2M), dpm-solver++3m, analytic-ddpm or analytic-ddim "
    "(the analytic ones need --moments).",
)
STEPS_OPTION = typer.Option(
    None, "--steps", help="Model calls (default: 1000 ddpm, 100 ddim, 20 dpm-solver++)."
)
SPACING_OPTION = typer.Option(
    None,
    "--spacing",
    help="Step grid: linear, uniform, quadratic or logsnr (default: linear for a respaced "
    "ddpm, uniform for ddim, logsnr for dpm-solver++).",
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
COMPILE_OPTION = typer.Option(False, "--compile", help="torch.compile the U-Net.")
NEURON_KERNEL_OPTION = typer.Option(
    "auto",
    "--neuron-kernel",
    help="auto (triton on CUDA when installed, else eager), eager, compiled or triton.",
)

MEMORY_FORMAT_OPTION = typer.Option(
    "contiguous",
    "--memory-format",
    help="The U-Net's layout: contiguous (NCHW) or channels_last (NHWC, for GPUs' bf16 convs).",
)

MOMENTS_OPTION = typer.Option(
    None,
    "--moments",
    help="Analytic-DPM's eps moments: a file written by sddpm eps-moments.",
)

LABELS_OPTION = typer.Option(
    None,
    "--labels",
    help="A class-conditional model's classes, cycled over the images (image i gets the "
    "(i mod n)-th), e.g. 0,3,7 (default: image i of class i mod num_classes).",
)
CLASS_OPTION = typer.Option(
    None, "--class", help="A class-conditional model: every image of class K (--labels K)."
)
GUIDANCE_OPTION = typer.Option(
    None,
    "--guidance",
    help="Classifier-free guidance weight w >= 0 (conditional models): eps_uncond + "
    "w (eps_cond - eps_uncond); 1 the conditional model alone, w != 1 costs two U-Net "
    "evaluations per image and step (default: sddpm.diffusion.DEFAULT_GUIDANCE = 1.5, the best "
    "measured on digits; see README).",
)

# SamplingOptions field -> (CLI flag, its option, its type).
SAMPLING_FLAGS = {
    "sampler": ("--sampler", SAMPLER_OPTION, str),
    "steps": ("--steps", STEPS_OPTION, int | None),
    "spacing": ("--spacing", SPACING_OPTION, str | None),
    "eta": ("--eta", ETA_OPTION, float),
    "threshold": ("--threshold", THRESHOLD_OPTION, float | None),
    "seed": ("--seed", SEED_OPTION, int),
    "batch_size": ("--batch-size", BATCH_SIZE_OPTION, int),
    "bf16": ("--bf16", BF16_OPTION, bool),
    "compile": ("--compile", COMPILE_OPTION, bool),
    "neuron_kernel": ("--neuron-kernel", NEURON_KERNEL_OPTION, str),
    "device": ("--device", DEVICE_OPTION, str),
    "memory_format": ("--memory-format", MEMORY_FORMAT_OPTION, str),
    "moments": ("--moments", MOMENTS_OPTION, Path | None),
    "labels": ("--labels", LABELS_OPTION, str | None),
    "guidance": ("--guidance", GUIDANCE_OPTION, float | None),
}
# Flags that set a SamplingOptions field another way: name -> (flag, option, type, field).
SAMPLING_ALIASES = {"class_label": ("--class", CLASS_OPTION, int | None, "labels")}


def fail_with(err: Exception) -> None:
    """``fail`` with a library error's message; a bad sampling option also names its flag."""
    from ..diffusion import OptionError

    if isinstance(err, OptionError) and err.field in SAMPLING_FLAGS:
        flag = "--class/--labels" if err.field == "labels" else SAMPLING_FLAGS[err.field][0]
        fail(f"{flag}: {err}")
    fail(str(err))


def sampling_options(**values):
    """The :class:`~sddpm.diffusion.SamplingOptions` of the flags' ``values`` (field names);
    a bad value fails with its flag."""
    from ..diffusion import OptionError, SamplingOptions, load_moments

    class_label = values.pop("class_label", None)
    if isinstance(values.get("labels"), str):
        values["labels"] = parse_ints(values["labels"], "--labels")
    if class_label is not None:
        if values.get("labels") is not None:
            fail("give --class K or --labels K1,K2,..., not both")
        values["labels"] = (class_label,)
    if values.get("moments") is not None:  # a file name on the command line
        try:
            values["moments"] = load_moments(values["moments"])
        except (FileNotFoundError, ValueError) as err:
            fail(f"--moments: {err}")
    try:
        return SamplingOptions(**values)
    except OptionError as err:
        if err.field == "labels" and class_label is not None:
            fail(f"--class: {err}")
        fail_with(err)
        raise


def with_sampling_options(
    command: Callable[..., None] | None = None, *, exclude: tuple[str, ...] = ()
):
    """Give a command every sampling flag of :data:`SAMPLING_FLAGS` (but ``exclude``), after
    its own parameters; it receives them as one validated ``options`` argument, a
    :class:`~sddpm.diffusion.SamplingOptions` (excluded fields at their defaults)::

        @app.command("sample")
        @with_sampling_options
        def sample_command(out: Path = OUT_OPTION, *, options) -> None: ...
    """
    if command is None:
        return lambda c: with_sampling_options(c, exclude=exclude)
    hints = typing.get_type_hints(command)
    own = [
        p.replace(annotation=hints.get(p.name, p.annotation))
        for p in inspect.signature(command).parameters.values()
        if p.name != "options"
    ]
    fields = [name for name in SAMPLING_FLAGS if name not in exclude]
    fields += [a for a, (*_, field) in SAMPLING_ALIASES.items() if field in fields]
    clash = sorted({p.name for p in own} & set(fields))
    if clash:
        raise TypeError(f"{command.__name__} declares shared sampling flags itself: {clash}")
    flags = {**SAMPLING_FLAGS, **{a: v[:3] for a, v in SAMPLING_ALIASES.items()}}
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=kind)
        for name, (_, opt, kind) in flags.items()
        if name in fields
    ]

    @functools.wraps(command)
    def wrapper(**kwargs):
        values = {name: kwargs.pop(name) for name in fields}
        return command(**kwargs, options=sampling_options(**values))

    wrapper.__signature__ = inspect.Signature([*own, *added])
    wrapper.__annotations__ = {p.name: p.annotation for p in (*own, *added)}
    return wrapper


def resolve_source(run, checkpoint):
    """Exactly one of ``--run`` / ``--checkpoint``."""
    if (run is None) == (checkpoint is None):
        fail("give exactly one of --run RUN_DIR or --checkpoint MODEL_DIR")
    return run if run is not None else checkpoint
