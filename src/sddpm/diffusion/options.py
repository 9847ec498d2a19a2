"""The sampling settings as one object: validated once, written into every JSON record.

:class:`SamplingOptions` is what every layer that samples passes down: :func:`sample`,
:func:`sddpm.generation.generate_batches`, the evaluation entry points, the threshold sweep and
the energy meter. Its fields fall in two groups:

- what the images are: ``sampler``, ``steps``, ``spacing``, ``eta``, ``threshold``, ``seed``,
  ``labels``, ``guidance`` and ``bf16`` (bfloat16 autocast changes the numbers a little). Two
  runs whose options agree on these give the same images.
- how the work runs: ``batch_size``, ``compile``, ``neuron_kernel``, ``device`` and
  ``memory_format``
  (:data:`EXECUTION_FIELDS`); they change speed, not images (per-image seeds; the compiled
  neuron kernel is bit-identical to the eager one).

A new option (class labels, guidance, Analytic-DPM moments, ...) is one more field here, one
more check in :meth:`SamplingOptions._check` and one more line where it is used; every record
and the CLI builder carry it from then on. :func:`sample` uses the first group; batching,
autocast, compilation and the device belong to :func:`sddpm.generation.generate_batches`, and
the neuron kernel to ``load_for_sampling(neuron_kernel=...)``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch

from ..distributed import check_device
from ..models.memory_format import check_memory_format
from .guidance import check_guidance
from .schedule import SPACINGS

__all__ = [
    "DEFAULT_GUIDANCE",
    "DEFAULT_SPACING",
    "DEFAULT_STEPS",
    "EXECUTION_FIELDS",
    "MOMENT_SAMPLERS",
    "SAMPLERS",
    "OptionError",
    "SamplingOptions",
]

SAMPLERS = ("ddpm", "ddim", "dpm-solver++", "dpm-solver++3m", "analytic-ddpm", "analytic-ddim")
# The number of model calls when steps=None (DDPM: every step of the schedule).
DEFAULT_STEPS = {
    "ddim": 100, "dpm-solver++": 20, "dpm-solver++3m": 20, "analytic-ddpm": 50,
    "analytic-ddim": 50,
}  # fmt: skip
DEFAULT_SPACING = {
    "ddpm": "linear", "ddim": "uniform", "dpm-solver++": "logsnr", "dpm-solver++3m": "logsnr",
    "analytic-ddpm": "linear", "analytic-ddim": "linear",
}  # fmt: skip
# Samplers that need the eps moments Gamma_t (``moments``).
MOMENT_SAMPLERS = ("analytic-ddpm", "analytic-ddim")
# Classifier-free guidance weight when none is given: the best of w in {0, 1, 1.5, 2, 3} on the
# digits preset (README, "Class-conditional generation"; benchmarks/digits_conditional.py):
# spiking, the lowest proxy FID (0.64x the unconditional model's) at 98.5 % class accuracy;
# ANN twin, 99.3 % accuracy at 0.99x the unconditional proxy FID.
DEFAULT_GUIDANCE = 1.5
# Fields that change how fast images are made, not which images.
EXECUTION_FIELDS = frozenset({"batch_size", "compile", "neuron_kernel", "device", "memory_format"})


class OptionError(ValueError):
    """A sampling option with a bad value; ``field`` names it (the CLI maps it to a flag)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample: one validated, immutable record (see the module docstring).

    Attributes:
        sampler: ``"ddpm"`` (ancestral, published), ``"ddim"``, ``"dpm-solver++"`` (2M),
            ``"dpm-solver++3m"`` (3M) or ``"analytic-ddpm"`` / ``"analytic-ddim"``
            (Analytic-DPM, which needs ``moments``).
        steps: model calls per image; ``None``: the sampler's default (every step of the
            schedule for DDPM, 100 for DDIM, 20 for DPM-Solver++, capped at ``T``).
        spacing: the step grid (:func:`sddpm.diffusion.timesteps`); ``None``: the sampler's
            default (:data:`DEFAULT_SPACING`).
        eta: DDIM only: 0 deterministic, 1 the DDPM posterior variance.
        threshold: threshold guidance, every spiking neuron's threshold while sampling
            (``> 0``); ``None``: the model's own thresholds.
        seed: image ``i`` depends only on ``(seed, i)``.
        batch_size: images per U-Net call.
        bf16: bfloat16 autocast of the U-Net (membranes and the sampler stay float32).
        compile: ``torch.compile`` the U-Net.
        neuron_kernel: how the spiking neurons run (:data:`sddpm.snn.KERNELS`).
        device: where the images are made, a ``torch.device`` name.
        memory_format: the layout the U-Net computes in, ``"contiguous"`` (NCHW) or
            ``"channels_last"`` (NHWC; :func:`sddpm.models.set_memory_format`); the same images
            up to the convolutions' summation order.
        moments: Analytic-DPM only: ``[T]`` ``Gamma_t = E||eps(x_t, t)||^2 / d``
            (:func:`sddpm.diffusion.estimate_eps_moments`); records carry its fingerprint.
        labels: class-conditional models only: the classes, cycled over the image indices
            (image ``i`` gets ``labels[i % len(labels)]``, :func:`sddpm.diffusion.cycle_labels`,
            so its label, like its noise, depends on ``i`` only). A sequence (or 1-D tensor)
            of ints >= 0, stored as a tuple; ``None``: no labels (the generation entry points
            spread a conditional model's images over its classes, image ``i`` getting
            ``i mod num_classes``). The range is checked against the model where it is used.
        guidance: classifier-free guidance weight w >= 0 (:class:`sddpm.diffusion.GuidedModel`):
            ``eps_uncond + w (eps_cond - eps_uncond)``; 1: the conditional model alone (one
            U-Net evaluation per image and step), otherwise two (in one batched call).
            ``None``: :data:`DEFAULT_GUIDANCE` when there are labels (:attr:`resolved_guidance`);
            a number needs labels where it is used.

    Raises:
        OptionError: (a ``ValueError``) on construction, naming the field, for any bad value.
            ``steps`` is checked against the schedule's length by :meth:`steps_for`.
    """

    sampler: str = "ddim"
    steps: int | None = None
    spacing: str | None = None
    eta: float = 0.0
    threshold: float | None = None
    seed: int = 0
    batch_size: int = 64
    bf16: bool = False
    compile: bool = False
    neuron_kernel: str = "auto"
    device: str = "cpu"
    memory_format: str = "contiguous"
    moments: torch.Tensor | None = dataclasses.field(default=None, compare=False, repr=False)
    labels: tuple[int, ...] | None = None
    guidance: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.device, torch.device):
            object.__setattr__(self, "device", str(self.device))
        if self.labels is not None:
            object.__setattr__(self, "labels", _as_label_tuple(self.labels))
        self._check()

    def _check(self) -> None:
        if self.sampler not in SAMPLERS:
            raise OptionError(
                "sampler", f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}"
            )
        if self.steps is not None and not (_is_int(self.steps) and self.steps >= 1):
            raise OptionError(
                "steps", f"steps must be an integer >= 1 (or None), got {self.steps!r}"
            )
        if self.spacing is not None and self.spacing not in SPACINGS:
            raise OptionError(
                "spacing", f"unknown spacing {self.spacing!r}; choose one of {SPACINGS}"
            )
        if not (_is_finite(self.eta) and self.eta >= 0):
            raise OptionError("eta", f"eta must be a finite number >= 0, got {self.eta!r}")
        if self.eta != 0 and self.sampler != "ddim":
            raise OptionError(
                "eta",
                f"eta applies to the ddim sampler only, got eta={self.eta} with {self.sampler!r}",
            )
        if self.threshold is not None:
            if not _is_finite(self.threshold):
                raise OptionError(
                    "threshold", f"threshold must be a finite number > 0, got {self.threshold!r}"
                )
            if self.threshold <= 0:
                raise OptionError("threshold", f"threshold must be > 0, got {self.threshold}")
        if not (_is_int(self.seed) and self.seed >= 0):
            raise OptionError("seed", f"seed must be an integer >= 0, got {self.seed!r}")
        if not (_is_int(self.batch_size) and self.batch_size >= 1):
            raise OptionError(
                "batch_size", f"batch_size must be an integer >= 1, got {self.batch_size!r}"
            )
        for name in ("bf16", "compile"):
            if not isinstance(getattr(self, name), bool):
                value = getattr(self, name)
                raise OptionError(name, f"{name} must be True or False, got {value!r}")
        if self.moments is not None:
            if self.sampler not in MOMENT_SAMPLERS:
                raise OptionError(
                    "moments",
                    f"moments apply to {' and '.join(MOMENT_SAMPLERS)} only, not {self.sampler!r}",
                )
            if not isinstance(self.moments, torch.Tensor) or self.moments.dim() != 1:
                raise OptionError(
                    "moments", "moments must be a 1-D tensor [T] (estimate_eps_moments' result)"
                )
        if self.labels is not None and not self.labels:
            raise OptionError("labels", "labels must name at least one class (or be None)")
        if self.labels is not None and min(self.labels) < 0:
            raise OptionError(
                "labels", f"labels must be class indices >= 0, got {min(self.labels)}"
            )
        if self.guidance is not None:
            try:
                check_guidance(self.guidance)
            except ValueError as err:
                raise OptionError("guidance", str(err)) from None
        from ..snn.fused import check_kernel  # the neurons own their kernel names

        try:
            check_kernel(self.neuron_kernel)
        except ValueError as err:
            raise OptionError("neuron_kernel", str(err)) from None
        try:
            check_device(self.device)
        except ValueError as err:
            raise OptionError("device", str(err)) from None
        try:
            check_memory_format(self.memory_format)
        except ValueError as err:
            raise OptionError("memory_format", str(err)) from None

    # ---------------------------------------------------------------- what the sampler runs

    def steps_for(self, T: int) -> int:
        """The model calls per image for a schedule of ``T`` steps (``steps`` must be <= T)."""
        if self.steps is None:
            return T if self.sampler == "ddpm" else min(DEFAULT_STEPS[self.sampler], T)
        if self.steps > T:
            raise OptionError(
                "steps",
                f"steps must be an integer in [1, {T}] (the schedule length), got {self.steps}",
            )
        return int(self.steps)

    @property
    def resolved_guidance(self) -> float:
        """``guidance``, or :data:`DEFAULT_GUIDANCE`."""
        return DEFAULT_GUIDANCE if self.guidance is None else float(self.guidance)

    @property
    def resolved_spacing(self) -> str:
        """``spacing``, or the sampler's default grid."""
        return DEFAULT_SPACING[self.sampler] if self.spacing is None else self.spacing

    def replace(self, **changes: Any) -> SamplingOptions:
        """A copy with ``changes`` (field names), validated again."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            names = ", ".join(f.name for f in dataclasses.fields(self))
            raise TypeError(f"unknown sampling option(s) {unknown}; the options are {names}")
        return dataclasses.replace(self, **changes) if changes else self

    @classmethod
    def build(cls, options: SamplingOptions | None = None, **changes: Any) -> SamplingOptions:
        """``options`` (default: the defaults) with ``changes`` applied: what the library's
        entry points do with their ``options=`` and keyword arguments."""
        if options is not None and not isinstance(options, SamplingOptions):
            raise TypeError(f"options must be a SamplingOptions, got {type(options).__name__}")
        return (cls() if options is None else options).replace(**changes)

    # ---------------------------------------------------------------- records

    def to_dict(self, *, T: int | None = None) -> dict[str, Any]:
        """Every field, JSON-ready. With the schedule length ``T``, ``steps`` and ``spacing``
        are the resolved values (what ran), not ``None``."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["moments"] = None if self.moments is None else moments_fingerprint(self.moments)
        d["labels"] = None if self.labels is None else list(self.labels)
        if self.labels is not None:
            d["guidance"] = self.resolved_guidance  # what ran
        if T is not None:
            d["steps"] = self.steps_for(T)
            d["spacing"] = self.resolved_spacing
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingOptions:
        """The options recorded by :meth:`to_dict` (other keys of a larger record are
        ignored; missing fields take their defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        if not isinstance(values.get("moments"), torch.Tensor):
            values.pop("moments", None)  # a record holds only the fingerprint
        return cls(**values)

    def image_settings(self, *, T: int | None = None) -> dict[str, Any]:
        """The fields that define the images (all but :data:`EXECUTION_FIELDS`), as
        :meth:`to_dict` writes them."""
        return {k: v for k, v in self.to_dict(T=T).items() if k not in EXECUTION_FIELDS}


def _as_label_tuple(labels: Any) -> tuple[int, ...]:
    """``labels`` (a sequence, array or 1-D tensor of ints) as a tuple of ints, else
    :class:`OptionError`."""
    if isinstance(labels, torch.Tensor):
        if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise OptionError(
                "labels", f"labels must be a 1-D integer tensor, got {labels.dtype} "
                f"{tuple(labels.shape)}"
            )  # fmt: skip
        return tuple(int(v) for v in labels.tolist())
    if isinstance(labels, (str, bytes)) or not hasattr(labels, "__iter__"):
        raise OptionError("labels", f"labels must be a sequence of class indices, got {labels!r}")
    values = list(labels)
    if not all(_is_int(v) or (hasattr(v, "dtype") and v.dtype.kind in "iu") for v in values):
        raise OptionError("labels", f"labels must be integer class indices, got {values!r}")
    return tuple(int(v) for v in values)


def moments_fingerprint(moments: torch.Tensor) -> str:
    """A short, stable name of a moments tensor for records: ``sha256:`` and 16 hex digits of
    its float64 bytes."""
    import hashlib

    data = moments.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()
    return "sha256:" + hashlib.sha256(data).hexdigest()[:16]
