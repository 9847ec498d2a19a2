"""Run configuration: one dataclass per concern, presets per dataset, JSON round trip.

A :class:`RunConfig` holds every setting of a training run. It is written, resolved, to
``RUN_DIR/config.json`` (format ``"sddpm.run"``) so a run can be resumed, and inspected, from its
directory alone. Sections:

- :class:`ModelSettings`: a model preset (:data:`sddpm.models.PRESETS`), ``kind`` (``"spiking"``
  or its ANN twin ``"ann"``) and overrides of any :class:`~sddpm.models.UNetConfig` field;
- :class:`DataSettings`: the dataset (:func:`sddpm.data.build_dataset`); images are the model's
  ``image_size``;
- :class:`DiffusionSettings`: the noise schedule and what the model predicts;
- :class:`OptimSettings`: Adam, linear warm-up, gradient clipping, EMA decay;
- :class:`TrainSettings`: batch, steps, checkpoints, samples, seed, device, compile, neuron
  kernel, bf16, SyncBN.

Any setting can be changed with :meth:`RunConfig.override` from ``"key=value"`` strings: ``key``
is ``section.field`` (``optim.lr``), a field name unique across sections (``lr``,
``total_steps``), or a U-Net field that goes to ``model.overrides`` (``channels``,
``image_size``, ``snn_timesteps``, ``neuron.threshold``). Values are parsed as JSON when they
can be (``1e-4``, ``true``, ``[1,2]``, ``null``), else taken as strings.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .models.config import NeuronConfig, UNetConfig

RUN_FORMAT = "sddpm.run"
LR_DECAYS = ("none", "linear", "cosine")
RUN_VERSION = 1

__all__ = [
    "LR_DECAYS",
    "RUN_FORMAT",
    "RUN_PRESETS",
    "RUN_VERSION",
    "DataSettings",
    "DiffusionSettings",
    "ModelSettings",
    "OptimSettings",
    "RunConfig",
    "TrainSettings",
    "run_preset",
]


@dataclass
class ModelSettings:
    """Which network to train.

    ``overrides`` maps :class:`~sddpm.models.UNetConfig` field names to values (``neuron`` may
    be a partial dict of :class:`~sddpm.models.NeuronConfig` fields); ``diffusion_steps`` always
    follows ``diffusion.T`` and ``kind`` is set here, not in ``overrides``.
    """

    preset: str = "digits"
    kind: str = "spiking"  # "spiking" or "ann" (the ANN twin)
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSettings:
    """The training images (see :func:`sddpm.data.build_dataset`)."""

    dataset: str = "digits"
    root: str | None = None  # data folder; None: $SDDPM_DATA_ROOT or ./data
    download: bool = False  # fetch MNIST / Fashion-MNIST / CIFAR-10 if missing
    hflip: bool | None = None  # random horizontal flips; None: the dataset's default
    num_workers: int = 0  # DataLoader worker processes (0: read in the training process)


@dataclass
class DiffusionSettings:
    """The forward process (Ho et al. 2020: linear betas 1e-4 .. 0.02 over T = 1000)."""

    schedule: str = "linear"  # "linear" or "cosine"
    T: int = 1000
    beta_1: float = 1e-4  # linear only
    beta_T: float = 0.02  # linear only
    prediction: str = "eps"  # "eps" or "v"

    def build(self):
        """The :class:`sddpm.diffusion.NoiseSchedule` these settings describe."""
        from .diffusion import NoiseSchedule

        if self.schedule == "linear":
            return NoiseSchedule.linear(self.T, self.beta_1, self.beta_T)
        if self.schedule == "cosine":
            return NoiseSchedule.cosine(self.T)
        raise ValueError(f"diffusion.schedule must be 'linear' or 'cosine', got {self.schedule!r}")


@dataclass
class OptimSettings:
    """Adam with linear warm-up, gradient-norm clipping and an EMA of the weights."""

    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 5000  # update i (1-based) uses lr * min(1, i / warmup_steps)
    decay: str = "none"  # after warm-up: "none" (published), "linear" or "cosine" to 0 at the end
    grad_clip: float | None = 1.0  # max global gradient norm; None or 0: no clipping
    ema_decay: float = 0.9999  # ema = decay * ema + (1 - decay) * weights, every update


@dataclass
class TrainSettings:
    """Steps, batches, checkpoints, samples and the machine.

    ``batch_size`` is the *global* batch of one optimiser update: it is split over the
    ``world_size`` processes and ``grad_accum`` micro-batches, so each forward pass sees
    ``batch_size / (world_size * grad_accum)`` images (that must divide exactly).
    """

    batch_size: int = 128
    grad_accum: int = 1
    total_steps: int = 500_000  # optimiser updates
    checkpoint_every: int = 5000  # and at the end; 0: only at the end
    keep_last: int = 3  # checkpoints kept (older ones are deleted); 0: keep all
    sample_every: int = 5000  # sample grid PNG (and at the end); 0: only at the end
    num_samples: int = 64  # images in each sample grid; 0: no samples
    sampler: str = "ddim"  # "ddim", "dpm-solver++" or "ddpm" (see sddpm.diffusion.sample)
    sample_steps: int = 50  # model calls per sample grid
    log_every: int = 50  # CSV / TensorBoard rows (mean loss over the interval)
    seed: int = 0
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    threads: int | None = None  # torch CPU threads per process; None: torch's default
    compile: bool = False  # torch.compile the model
    neuron_kernel: str = "auto"  # neuron step loops: "auto", "eager", "compiled" or "triton"
    # the layout the model computes in: "contiguous" (NCHW) or "channels_last" (NHWC; see
    # sddpm.models.set_memory_format). Within a few % on CPUs; on GPUs gpu_check.py measures it
    memory_format: str = "contiguous"
    retain_cpu_memory: bool = True  # CPU: malloc keeps freed memory (sddpm.runtime)
    bf16: bool = True  # bfloat16 autocast, on CUDA only (ignored on the CPU)
    sync_bn: bool = False  # SyncBatchNorm under DDP (CUDA only): BN statistics over all ranks
    init_from: str | None = None  # a run or model directory whose weights (EMA) start the run
    # class-conditional models (num_classes > 0): the probability that a training label is
    # replaced by the null class (classifier-free guidance's label dropout)
    cond_drop: float = 0.1


_SECTIONS = ("model", "data", "diffusion", "optim", "train")


@dataclass
class RunConfig:
    """Every setting of a training run (see the module docstring)."""

    preset: str | None = None  # the run preset this config started from, for the record
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    diffusion: DiffusionSettings = field(default_factory=DiffusionSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    train: TrainSettings = field(default_factory=TrainSettings)

    # ------------------------------------------------------------------ derived
    def unet_config(self) -> UNetConfig:
        """The resolved :class:`~sddpm.models.UNetConfig` (preset + overrides + kind + T)."""
        from .models import preset

        over = dict(self.model.overrides)
        for key in ("kind", "diffusion_steps"):
            if key in over:
                raise ValueError(
                    f"model.overrides.{key} is not allowed: set "
                    f"{'model.kind' if key == 'kind' else 'diffusion.T'} instead"
                )
        base = preset(self.model.preset, self.model.kind)
        known = {f.name for f in dataclasses.fields(UNetConfig)}
        unknown = sorted(set(over) - known)
        if unknown:
            raise ValueError(
                f"unknown model override(s) {unknown}; U-Net fields are {sorted(known)}"
            )
        if isinstance(over.get("neuron"), dict):
            nknown = {f.name for f in dataclasses.fields(NeuronConfig)}
            bad = sorted(set(over["neuron"]) - nknown)
            if bad:
                raise ValueError(f"unknown neuron override(s) {bad}; fields are {sorted(nknown)}")
            over["neuron"] = dataclasses.replace(base.neuron, **over["neuron"])
        return base.replace(**over, diffusion_steps=self.diffusion.T)

    def validate(self) -> None:
        """Raise ``ValueError`` listing every inconsistent setting."""
        from .data import dataset_info
        from .diffusion import PREDICTIONS, SAMPLERS
        from .diffusion.options import MOMENT_SAMPLERS
        from .models.memory_format import MEMORY_FORMATS
        from .snn import KERNELS

        problems: list[str] = []
        try:
            unet = self.unet_config()
        except ValueError as err:
            problems.append(str(err))
            unet = None
        try:
            info = dataset_info(self.data.dataset)
            if unet is not None and info.name != "folder" and info.channels != unet.image_channels:
                problems.append(
                    f"dataset {info.name} has {info.channels} channel(s) but the model takes "
                    f"{unet.image_channels} (set image_channels={info.channels} or another preset)"
                )
        except ValueError as err:
            problems.append(str(err))
        d, o, t = self.diffusion, self.optim, self.train
        if d.schedule not in ("linear", "cosine"):
            problems.append(f"diffusion.schedule must be 'linear' or 'cosine', got {d.schedule!r}")
        if d.prediction not in PREDICTIONS:
            problems.append(f"diffusion.prediction must be one of {PREDICTIONS}")
        if self.model.kind not in ("spiking", "ann"):
            problems.append(f"model.kind must be 'spiking' or 'ann', got {self.model.kind!r}")
        if not o.lr > 0:
            problems.append(f"optim.lr must be > 0, got {o.lr}")
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            problems.append(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
        if o.warmup_steps < 0:
            problems.append(f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
        if o.decay not in LR_DECAYS:
            problems.append(f"optim.decay must be one of {LR_DECAYS}, got {o.decay!r}")
        if o.grad_clip is not None and o.grad_clip < 0:
            problems.append(f"optim.grad_clip must be >= 0 or null, got {o.grad_clip}")
        if not 0 <= o.ema_decay <= 1:
            problems.append(f"optim.ema_decay must be in [0, 1], got {o.ema_decay}")
        for name in ("batch_size", "grad_accum", "total_steps", "sample_steps", "log_every"):
            if getattr(t, name) < 1:
                problems.append(f"train.{name} must be >= 1, got {getattr(t, name)}")
        for name in ("checkpoint_every", "keep_last", "sample_every", "num_samples", "seed"):
            if getattr(t, name) < 0:
                problems.append(f"train.{name} must be >= 0, got {getattr(t, name)}")
        if not 0 <= t.cond_drop <= 1:
            problems.append(f"train.cond_drop must be in [0, 1], got {t.cond_drop}")
        if t.threads is not None and t.threads < 1:
            problems.append(f"train.threads must be >= 1 or null, got {t.threads}")
        if t.neuron_kernel not in KERNELS:
            problems.append(
                f"train.neuron_kernel must be one of {KERNELS}, got {t.neuron_kernel!r}"
            )
        if t.memory_format not in MEMORY_FORMATS:
            problems.append(
                f"train.memory_format must be one of {sorted(MEMORY_FORMATS)}, got "
                f"{t.memory_format!r}"
            )
        preview_samplers = tuple(s for s in SAMPLERS if s not in MOMENT_SAMPLERS)
        if t.sampler not in preview_samplers:
            problems.append(
                f"train.sampler must be one of {preview_samplers} (the analytic samplers need "
                f"eps moments of a trained model), got {t.sampler!r}"
            )
        if t.batch_size % max(1, t.grad_accum):
            problems.append(
                f"train.batch_size {t.batch_size} is not divisible by train.grad_accum "
                f"{t.grad_accum}"
            )
        if problems:
            raise ValueError("invalid run config: " + "; ".join(problems))

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        d = dict(d)
        _check_keys(cls, d, "run config")
        kwargs: dict[str, Any] = {}
        if "preset" in d:
            kwargs["preset"] = d["preset"]
        for name in _SECTIONS:
            if name in d:
                section_cls = _section_class(name)
                values = dict(d[name])
                _check_keys(section_cls, values, name)
                kwargs[name] = section_cls(
                    **{
                        k: _coerce(v, _hints(section_cls)[k], f"{name}.{k}")
                        for k, v in values.items()
                    }
                )
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return cls.from_dict(json.loads(text))

    # ------------------------------------------------------------------ overrides
    def override(self, assignments: list[str] | dict[str, Any]) -> RunConfig:
        """A copy with ``"key=value"`` assignments (or a ``{key: value}`` dict) applied.

        See the module docstring for the keys. Raises ``ValueError`` for an unknown or
        ambiguous key or a value of the wrong type.
        """
        items = (
            list(assignments.items())
            if isinstance(assignments, dict)
            else [_split_assignment(a) for a in assignments]
        )
        d = self.to_dict()
        for key, value in items:
            path = resolve_key(key)
            if isinstance(value, str) and not isinstance(assignments, dict):
                value = _parse_value(value)
            target = d
            for part in path[:-1]:
                target = target.setdefault(part, {})
            target[path[-1]] = _coerce(value, _hint_of(path), ".".join(path))
        return RunConfig.from_dict(d)

    def get(self, key: str) -> Any:
        """The value of ``key`` (any form :meth:`override` accepts)."""
        value: Any = self.to_dict()
        for part in resolve_key(key):
            value = value.get(part) if isinstance(value, dict) else None
        return value


# ---------------------------------------------------------------------- key resolution
def _section_class(name: str) -> type:
    return {
        "model": ModelSettings,
        "data": DataSettings,
        "diffusion": DiffusionSettings,
        "optim": OptimSettings,
        "train": TrainSettings,
    }[name]


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _hint_of(path: tuple[str, ...]) -> Any:
    if path[:2] == ("model", "overrides"):
        if path[2] == "neuron":
            return _hints(NeuronConfig)[path[3]]
        return _hints(UNetConfig)[path[2]]
    return _hints(_section_class(path[0]))[path[1]]


def _check_keys(cls: type, d: dict[str, Any], what: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {what} key(s) {unknown}; known: {sorted(known)}")


def setting_names() -> dict[str, tuple[str, ...]]:
    """Every plain setting name -> its full path, e.g. ``"lr" -> ("optim", "lr")``."""
    out: dict[str, tuple[str, ...]] = {}
    for section in _SECTIONS:
        for f in dataclasses.fields(_section_class(section)):
            out[f.name] = (section, f.name)
    return out


def resolve_key(key: str) -> tuple[str, ...]:
    """``"lr"`` / ``"optim.lr"`` -> ``("optim", "lr")``; U-Net fields -> model overrides."""
    parts = tuple(p for p in key.strip().replace("-", "_").split(".") if p)
    if not parts:
        raise ValueError("empty setting name")
    unet_fields = {f.name for f in dataclasses.fields(UNetConfig)}
    neuron_fields = {f.name for f in dataclasses.fields(NeuronConfig)}
    if parts == ("preset",):
        return ("model", "preset")
    if parts[0] in _SECTIONS:
        section = parts[0]
        if section == "model" and len(parts) >= 2 and parts[1] == "overrides":
            return _unet_path(parts[2:], unet_fields, neuron_fields, key)
        fields = {f.name for f in dataclasses.fields(_section_class(section))}
        if len(parts) == 2 and parts[1] in fields:
            return parts
        if section == "model":
            return _unet_path(parts[1:], unet_fields, neuron_fields, key)
        raise ValueError(f"unknown setting {key!r}: {section} has {sorted(fields)}")
    names = setting_names()
    if len(parts) == 1 and parts[0] in names:
        return names[parts[0]]
    if parts[0] in unet_fields or parts[0] in neuron_fields:
        return _unet_path(parts, unet_fields, neuron_fields, key)
    raise ValueError(
        f"unknown setting {key!r}; settings are {sorted(names)}, U-Net fields "
        f"{sorted(unet_fields - {'kind', 'diffusion_steps'})} (model overrides) and "
        "section.field forms such as optim.lr"
    )


def _unet_path(
    parts: tuple[str, ...], unet_fields: set[str], neuron_fields: set[str], key: str
) -> tuple[str, ...]:
    if parts and parts[0] in neuron_fields and parts[0] not in unet_fields:
        parts = ("neuron", *parts)
    ok = (len(parts) == 1 and parts[0] in unet_fields and parts[0] != "neuron") or (
        len(parts) == 2 and parts[0] == "neuron" and parts[1] in neuron_fields
    )
    if not ok or parts[0] in ("kind", "diffusion_steps"):
        raise ValueError(
            f"unknown model override {key!r}; U-Net fields are "
            f"{sorted(unet_fields - {'kind', 'diffusion_steps'})}, neuron fields "
            f"{sorted(neuron_fields)} (set kind with model.kind, diffusion_steps with T)"
        )
    return ("model", "overrides", *parts)


def _split_assignment(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ValueError(f"expected key=value, got {text!r} (e.g. lr=1e-4 or total_steps=200)")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        low = text.lower()
        if low in ("true", "yes", "on"):
            return True
        if low in ("false", "no", "off"):
            return False
        if low in ("none", "null"):
            return None
        return text


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """``value`` converted to the annotated type ``hint`` (or ``ValueError`` naming ``name``)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, name)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if errors else f"{name}: bad value {value!r}")
    if hint is Any:
        return value
    if origin is tuple:
        if isinstance(value, str):  # "1,2,2,4"
            value = [_parse_value(v) for v in value.strip("()[] ").split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if len(args) == 2 and args[1] is Ellipsis:
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{name} must be a list, got {value!r}")
            return tuple(_coerce(v, args[0], name) for v in value)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{name} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, name) for v, a in zip(value, args, strict=True))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a JSON object, got {value!r}")
        return json.loads(json.dumps(value))  # tuples -> lists, so equal configs compare equal
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return value
    return value


# ---------------------------------------------------------------------- presets
def _paper(model_preset: str, dataset: str) -> RunConfig:
    # The paper's recipe for every dataset (after Ho et al. 2020 / pytorch-ddpm): Adam 2e-4 with
    # 5,000 warm-up steps, gradient norm clipped at 1, batch 128, 500k updates, EMA 0.9999,
    # linear betas 1e-4..0.02 over T = 1000.
    return RunConfig(
        preset=model_preset,
        model=ModelSettings(preset=model_preset),
        data=DataSettings(dataset=dataset),
        diffusion=DiffusionSettings(),
        optim=OptimSettings(lr=2e-4, warmup_steps=5000, grad_clip=1.0, ema_decay=0.9999),
        train=TrainSettings(batch_size=128, total_steps=500_000),
    )


def _digits() -> RunConfig:
    # Trains on a 2-core CPU in under ten minutes and gives recognisable digits. Measured on a
    # shared 2-core CPU (torch 2.13, 2 threads): 7.4 min for the spiking U-Net (2.6 min for the
    # ANN twin); of 512 EMA samples (DDIM, 50 steps) scored by the classifier of
    # sddpm.evaluation.digits_features, 78% spiking / 90% ANN are classified with p > 0.9, all
    # 10 classes present (real digits: 99%, uniform noise: 29%). 16 channels: 32 gave no
    # better samples for 2.3x the time; 2,000 updates gave ~70-75%. A larger lr with a short
    # warm-up, and an EMA whose window (~500 updates) suits a few thousand updates.
    return RunConfig(
        preset="digits",
        model=ModelSettings(preset="digits"),
        data=DataSettings(dataset="digits"),
        diffusion=DiffusionSettings(),
        optim=OptimSettings(lr=2e-3, warmup_steps=100, grad_clip=1.0, ema_decay=0.998),
        train=TrainSettings(
            batch_size=64,
            total_steps=4000,
            checkpoint_every=1000,
            keep_last=2,
            sample_every=1000,
            num_samples=100,
            sampler="ddim",
            sample_steps=50,
            log_every=25,
        ),
    )


RUN_PRESETS: dict[str, typing.Callable[[], RunConfig]] = {
    "cifar10": lambda: _paper("cifar10", "cifar10"),
    "celeba64": lambda: _paper("celeba64", "celeba64"),
    "mnist": lambda: _paper("mnist", "mnist"),
    "fashion-mnist": lambda: _paper("fashion-mnist", "fashion-mnist"),
    "digits": _digits,
}


def run_preset(name: str, kind: str | None = None) -> RunConfig:
    """A fresh :class:`RunConfig` of preset ``name`` (``kind="ann"`` for the ANN twin)."""
    key = name.strip().lower().replace("_", "-")
    if key not in RUN_PRESETS:
        raise ValueError(f"unknown run preset {name!r}; choose one of {sorted(RUN_PRESETS)}")
    config = RUN_PRESETS[key]()
    if kind is not None:
        config.model.kind = kind
    return config
