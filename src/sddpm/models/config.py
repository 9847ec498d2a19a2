"""The U-Net configuration: one dataclass, saved as JSON beside every checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

MODEL_KINDS = ("spiking", "ann")
ANN_ACTIVATIONS = ("silu", "relu")


@dataclass(frozen=True)
class NeuronConfig:
    """Settings of every spiking neuron in the model (published: IF, threshold 1, hard reset 0,
    reset not detached, ATan surrogate alpha 2)."""

    threshold: float = 1.0
    tau: float | None = None  # None: integrate-and-fire; a number > 1: leaky (LIF)
    reset: str = "hard"  # "hard" (to v_reset) or "soft" (subtract threshold)
    v_reset: float = 0.0
    detach_reset: bool = False
    surrogate: str = "atan"  # "atan", "sigmoid" or "rectangular"
    surrogate_width: float | None = None  # alpha for atan/sigmoid, box width for rectangular


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the spiking U-Net and of its ANN twin.

    ``snn_timesteps`` is the number of SNN steps S the image is repeated over (the paper's T=4);
    ``diffusion_steps`` is the number of rows of the sinusoidal time-embedding table (the
    diffusion schedule length, 1000). ``kind="ann"`` builds the ANN twin: every spiking neuron
    becomes ``ann_activation`` and there is no SNN time axis.
    """

    image_channels: int = 3
    image_size: int = 32
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 2
    snn_timesteps: int = 4
    diffusion_steps: int = 1000
    kind: str = "spiking"
    ann_activation: str = "silu"
    output_decay: float = 0.8  # output = sum_i output_decay^(S-1-i) * h_i
    neuron: NeuronConfig = field(default_factory=NeuronConfig)
    tsm: bool = False  # SDM's temporal-wise spiking mechanism (per-step conv output scales)
    num_classes: int = 0  # 0: unconditional; N: labels 0..N-1 plus the null class N

    def __post_init__(self) -> None:
        if isinstance(self.channel_mult, list):
            object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        if isinstance(self.neuron, dict):
            object.__setattr__(self, "neuron", NeuronConfig(**self.neuron))
        problems = []
        if self.kind not in MODEL_KINDS:
            problems.append(f"kind must be one of {MODEL_KINDS}, got {self.kind!r}")
        if self.ann_activation not in ANN_ACTIVATIONS:
            problems.append(f"ann_activation must be one of {ANN_ACTIVATIONS}")
        for name in ("image_channels", "channels", "num_res_blocks", "snn_timesteps"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not isinstance(self.num_classes, int) or isinstance(self.num_classes, bool):
            problems.append(f"num_classes must be an integer >= 0, got {self.num_classes!r}")
        elif self.num_classes < 0:
            problems.append(f"num_classes must be >= 0 (0: unconditional), got {self.num_classes}")
        if self.channels % 2:
            problems.append(f"channels must be even (sinusoidal embedding), got {self.channels}")
        if not self.channel_mult or any(int(m) < 1 for m in self.channel_mult):
            problems.append(f"channel_mult must be positive integers, got {self.channel_mult}")
        if self.diffusion_steps < 1:
            problems.append(f"diffusion_steps must be >= 1, got {self.diffusion_steps}")
        elif self.image_size % self.size_multiple or self.image_size < self.size_multiple:
            problems.append(
                f"image_size {self.image_size} must be a multiple of {self.size_multiple} "
                f"(the U-Net halves it {len(self.channel_mult) - 1} times)"
            )
        if not isinstance(self.tsm, bool):
            problems.append(f"tsm must be true or false, got {self.tsm!r}")
        elif self.tsm and self.kind != "spiking":
            problems.append(
                "tsm=True needs kind='spiking': TSM scales each SNN step, and the ANN twin has a "
                "single step (set tsm=False for the ANN twin)"
            )
        if problems:
            raise ValueError("invalid UNetConfig: " + "; ".join(problems))

    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this (2 ** number of downsamplings)."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.channels

    @property
    def null_class(self) -> int | None:
        """The label of the "null" (unconditional) class, ``num_classes``; ``None`` for an
        unconditional model."""
        return self.num_classes if self.num_classes > 0 else None

    @property
    def effective_timesteps(self) -> int:
        """SNN steps the network actually runs: ``snn_timesteps`` for spiking, 1 for the ANN."""
        return self.snn_timesteps if self.kind == "spiking" else 1

    def ann_twin(self) -> UNetConfig:
        """The config of this network's ANN twin: ``kind="ann"`` and, since TSM scales SNN
        steps and the twin has one, ``tsm=False`` (a TSM model's twin is the plain ANN)."""
        return self.replace(kind="ann", tsm=False)

    def replace(self, **changes: Any) -> UNetConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown UNetConfig fields {unknown}; known fields: {sorted(known)}")
        d = dict(d)
        if isinstance(d.get("neuron"), dict):
            nknown = {f.name for f in dataclasses.fields(NeuronConfig)}
            nunknown = sorted(set(d["neuron"]) - nknown)
            if nunknown:
                raise ValueError(f"unknown NeuronConfig fields {nunknown}; known: {sorted(nknown)}")
            d["neuron"] = NeuronConfig(**d["neuron"])
        return cls(**d)
