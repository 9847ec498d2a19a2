"""Energy of a spiking network, measured by forward hooks during real forward passes.

The model carries no measurement code: :class:`EnergyMeter` attaches forward hooks for the
duration of a ``with`` block, keeps its data-dependent counters on the model's device (read
once, when the report is made) and returns an :class:`~.energy_report.EnergyReport`.

What is counted, per layer (a ``Conv1d/2d/3d`` or ``Linear`` module):

- **spike-fed layers** (input = a :class:`~sddpm.snn.SpikingNeuron`'s output, possibly
  nearest-upsampled first): synaptic operations (SOPs), the exact number of (input spike,
  weight) pairs the layer uses, i.e. the sum over output elements of the spikes in their
  receptive fields. Zero padding contributes nothing; stride, dilation and groups are honoured.
  It is computed by summing the spikes over each group's input channels and convolving with an
  all-ones kernel of the layer's shape (same stride, padding, dilation), times the output
  channels per group. For the up-sampling block the layer is hooked, so the count is made on
  the up-sampled tensor the conv actually sees.
- **real-fed layers**: dense multiply-accumulates (MACs), output elements x fan-in
  (``in_channels / groups x prod(kernel)`` for convs, ``in_features`` for linears).
- **neuron layers**: firing rate, spikes / elements.

Which layers are spike-fed is read from the module tree: a conv or linear registered directly
after a ``SpikingNeuron`` sibling (``neuron1``/``conv1``, ``neuron``/``conv``, ...) is fed by it.
That is how the SDDPM U-Net is written, and how a ``nn.Sequential(neuron, conv)`` reads; pass
``spike_fed={layer: neuron}`` for other models. The report checks the assumption: a layer taken
as spike-fed that saw any input value other than 0 or 1 is an error.

Energy (pJ): ``E_AC`` per SOP and ``E_MAC`` per MAC, 0.9 pJ and 4.6 pJ by default (32-bit
float add and multiply-add at 45 nm, Horowitz, ISSCC 2014, as used by SDDPM and most SNN
papers). The report gives the paper's accounting (SOPs + MACs of the first conv only) and the
full one (SOPs + MACs of every real-fed layer), per U-Net call and per generated image, and the
ANN twin's dense MACs for the same architecture.

A third accounting, memory-aware (:mod:`.energy_memory`, after Lemaire et al. with Horowitz's
constants), adds what the first two leave out: neuron updates, addressing, weight, bias,
membrane and spike memory traffic, and the real-valued paths (residual sums and skip tensors are
measured by hooks on the U-Net's blocks). The ANN twin is measured the same way
(:func:`ann_twin_report`). The data-dependent counters are kept per call, so the report also
gives every diffusion step t of a sampling trajectory its own firing rate and energy.

Every layer is counted as executed: the U-Net's stem conv runs once per call (its output is
broadcast over the S SNN steps), the time-embedding linears and time projections once per
call, every other layer once per SNN step. The head's temporal conv is applied functionally
(not by calling its module), so it is counted from the head's tensors.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion import SamplingOptions
from ..snn import SpikingNeuron
from .energy_memory import MemoryEnergyModel
from .energy_report import EnergyReport, LayerEnergy, NeuronFiring, RealPath, StepCounts

__all__ = [
    "E_AC_PJ",
    "E_MAC_PJ",
    "EnergyMeter",
    "EnergyReport",
    "MemoryEnergyModel",
    "ann_twin_macs",
    "ann_twin_report",
    "dense_ops",
    "measure_sampling_energy",
    "spike_fed_layers",
    "synaptic_ops",
]

E_AC_PJ = 0.9  # pJ per accumulate (SOP), 32-bit float, 45 nm (Horowitz 2014)
E_MAC_PJ = 4.6  # pJ per multiply-accumulate, 32-bit float, 45 nm

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LAYERS = (*_CONVS, nn.Linear)
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def spike_fed_layers(model: nn.Module) -> dict[str, str]:
    """``{layer name: neuron name}`` for every conv/linear registered directly after a
    :class:`SpikingNeuron` among its siblings (names as in ``model.named_modules()``)."""
    pairs: dict[str, str] = {}
    for parent_name, parent in model.named_modules():
        previous: str | None = None
        for child_name, child in parent.named_children():
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if previous is not None and isinstance(child, _LAYERS):
                pairs[full] = previous
            previous = full if isinstance(child, SpikingNeuron) else None
    return pairs


def synaptic_ops(layer: nn.Module, spikes: torch.Tensor) -> torch.Tensor:
    """Exact SOPs of ``layer`` (a ``Conv1d/2d/3d`` or ``Linear``) applied to ``spikes``, the
    tensor the layer receives (0/1 values; batched or not): the number of (input spike, weight)
    pairs used, i.e. the sum over output elements of the spikes in their receptive fields.
    Zero padding adds nothing; other padding modes count the padded copies of spikes, which the
    layer does multiply. Returns a 0-dim int64 tensor on the input's device (no sync)."""
    with torch.no_grad():
        x = spikes.detach()
        x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        if isinstance(layer, nn.Linear):
            # Every input spike meets every output: in_features -> out_features weights each.
            return x.to(torch.int64).sum() * layer.out_features
        if not isinstance(layer, _CONVS):
            raise TypeError(f"synaptic_ops needs a Conv1d/2d/3d or Linear, got {type(layer)}")
        nd = len(layer.kernel_size)
        if x.dim() == nd + 1:  # unbatched input
            x = x.unsqueeze(0)
        g = layer.groups
        # Spikes per group and position: every output channel of a group sees the same ones.
        x = x.unflatten(1, (g, x.shape[1] // g)).sum(2)
        padding: Any = layer.padding
        if layer.padding_mode != "zeros":
            x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
            padding = 0
        ones = x.new_ones((g, 1, *layer.kernel_size))
        # Integer-valued sums below 2**24 (fan-in), exact in float32.
        in_field = _CONV_FN[nd](x, ones, None, layer.stride, padding, layer.dilation, g)
        return in_field.to(torch.int64).sum() * (layer.out_channels // g)


def dense_ops(layer: nn.Module, output: torch.Tensor) -> int:
    """MACs of ``layer`` run densely to produce ``output``: output elements x fan-in."""
    if isinstance(layer, nn.Linear):
        return output.numel() * layer.in_features
    if isinstance(layer, _CONVS):
        return output.numel() * math.prod(layer.weight.shape[1:])
    raise TypeError(f"dense_ops needs a Conv1d/2d/3d or Linear, got {type(layer)}")


@dataclass
class _Stats:
    """One hooked layer's static counts (plain ints, summed over all calls); its
    data-dependent counts (SOPs, spikes) are kept per call on the device by the meter."""

    name: str
    kind: str  # "sop" | "mac" | "neuron"
    module: str
    neuron: str | None = None
    is_conv: bool = False
    ops: int = 0  # MACs (mac layers)
    dense: int = 0
    elements: int = 0  # input elements (sop), neuron elements (neuron)
    inputs: int = 0  # input elements (mac)
    outputs: int = 0  # output elements
    executions: int = 0  # per-sample executions (batch and SNN steps counted)
    in_map: int = 0  # elements of one sample's input map
    out_map: int = 0  # elements of one sample's output map
    weights: int = 0
    biases: int = 0
    leaky: bool = False


def _add(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    # Out of place: counters made under inference_mode stay usable outside it.
    return value if total is None else total + value


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
    return None


def _step_of(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The diffusion step of a ``model(x, t)`` call (its first element), kept on the device."""
    t = kwargs.get("t", args[1] if len(args) > 1 else None)
    if isinstance(t, torch.Tensor) and t.numel() and not t.dtype.is_floating_point:
        return t.detach().reshape(-1)[:1].to(torch.int64)
    return None


def _sample_size(layer: nn.Module, t: torch.Tensor) -> int:
    """Elements of one sample's map as ``layer`` sees it (C x spatial, or features)."""
    if isinstance(layer, nn.Linear):
        return int(t.shape[-1])
    nd = len(layer.kernel_size)
    return math.prod(t.shape[-(nd + 1) :])


def _params(layer: nn.Module) -> tuple[int, int]:
    bias = getattr(layer, "bias", None)
    return layer.weight.numel(), 0 if bias is None else bias.numel()


_ACTIVATIONS = (nn.SiLU, nn.ReLU)


class EnergyMeter:
    """Count SOPs, MACs, spikes and memory traffic of ``model`` over every forward pass inside
    ``with``.

    Example::

        with EnergyMeter(model, e_ac=0.9, e_mac=4.6) as meter:
            x0 = sample(model, x_T, sampler="ddim", steps=50)
        report = meter.report(num_images=len(x_T))
        print(report.table()); report.save_json("energy.json"); report.plot("energy.png")

    Args:
        model: any module; its forward calls define "calls" (the batch size of the first
            tensor argument counts the images evaluated; an integer second argument ``t`` is
            the diffusion step the per-step report groups by).
        e_ac, e_mac: pJ per SOP and per MAC.
        spike_fed: ``{layer name: neuron name}``; default :func:`spike_fed_layers`.
        paper_layers: names of the real-fed layers the paper's accounting counts as MACs;
            default the first conv to run (the stem conv on the image).
        ann_macs: the ANN twin's MACs per call: a number, ``None`` (not reported) or
            ``"auto"`` (the twin measured with :func:`ann_twin_report` when ``model.config``
            is a spiking ``UNetConfig``, memory-aware terms included).
        memory: the constants of the memory-aware accounting (default
            :class:`~.energy_memory.MemoryEnergyModel`: Horowitz 45 nm, Lemaire's linear fit).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        e_ac: float = E_AC_PJ,
        e_mac: float = E_MAC_PJ,
        spike_fed: Mapping[str, str] | None = None,
        paper_layers: list[str] | None = None,
        ann_macs: float | str | None = "auto",
        memory: MemoryEnergyModel | None = None,
    ) -> None:
        if not (e_ac >= 0 and e_mac >= 0):
            raise ValueError(f"energies must be >= 0 pJ, got e_ac={e_ac}, e_mac={e_mac}")
        self.model = model
        self.e_ac = float(e_ac)
        self.e_mac = float(e_mac)
        self.memory = memory if memory is not None else MemoryEnergyModel()
        self.spike_fed = dict(spike_fed_layers(model) if spike_fed is None else spike_fed)
        modules = dict(model.named_modules())
        unknown = [n for n in (*self.spike_fed, *self.spike_fed.values()) if n not in modules]
        if unknown:
            raise ValueError(f"spike_fed names modules the model does not have: {unknown}")
        self.paper_layers = None if paper_layers is None else list(paper_layers)
        self.ann_macs = ann_macs
        self._handles: list[Any] = []
        self.reset()

    # ---- lifecycle
    def reset(self) -> None:
        """Zero every counter (e.g. to leave a warm-up pass out)."""
        self._stats: dict[str, _Stats] = {}
        self._paths: dict[str, dict[str, Any]] = {}
        self._calls: list[tuple[torch.Tensor | None, int, list[tuple[str, str]], Any]] = []
        self._current: dict[tuple[str, str], torch.Tensor] = {}
        self._current_call: tuple[torch.Tensor | None, int] | None = None
        self.model_calls = 0
        self.evaluations = 0

    def __enter__(self) -> EnergyMeter:
        if self._handles:
            raise RuntimeError("this EnergyMeter is already attached")
        self._attach()
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _attach(self) -> None:
        # the U-Net's head applies its temporal conv functionally; its blocks hold the
        # residual sums and the skip tensors
        from ..models.tsm import TSM_CONVS
        from ..models.unet import Head, ResBlock, UNet

        skip_producers: set[str] = set()
        if isinstance(self.model, UNet):
            skip_producers = {"stem", *(f"encoder.{i}" for i in range(len(self.model.encoder)))}
        self._handles.append(
            self.model.register_forward_pre_hook(self._count_call, with_kwargs=True)
        )
        self._handles.append(self.model.register_forward_hook(self._end_call))
        for name, m in self.model.named_modules():
            hooks: list[Callable] = []
            if isinstance(m, SpikingNeuron):
                hooks.append(self._neuron_hook(name))
            elif isinstance(m, _LAYERS):
                if name in self.spike_fed:
                    hooks.append(self._sop_hook(name, self.spike_fed[name]))
                else:
                    hooks.append(self._mac_hook(name))
                if isinstance(m, TSM_CONVS):  # after the conv's own hook: its stats come first
                    hooks.append(self._step_scale_hook(name))
            elif isinstance(m, Head):
                hooks.append(self._head_hook(f"{name}.temporal_conv" if name else "temporal_conv"))
            elif isinstance(m, _ACTIVATIONS):
                hooks.append(self._path_hook(name, "activation"))
            if isinstance(m, ResBlock):
                hooks.append(self._path_hook(f"{name}.residual", "residual"))
            if name in skip_producers:
                hooks.append(self._path_hook(f"{name}.skip_tensor", "skip"))
            for hook in hooks:
                self._handles.append(m.register_forward_hook(hook))

    def _get(self, name: str, kind: str, module: nn.Module, neuron: str | None = None) -> _Stats:
        st = self._stats.get(name)
        if st is None:  # first use: the report lists layers in the order they first ran
            st = _Stats(name, kind, type(module).__name__, neuron, isinstance(module, _CONVS))
            if isinstance(module, _LAYERS):
                st.weights, st.biases = _params(module)
            if isinstance(module, SpikingNeuron):
                st.leaky = module.tau is not None
            self._stats[name] = st
        return st

    def _count(self, name: str, field: str, value: torch.Tensor) -> None:
        key = (name, field)
        self._current[key] = _add(self._current.get(key), value)

    # ---- hooks
    def _count_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = _first_tensor(args, kwargs)
        batch = int(x.shape[0]) if x is not None and x.dim() > 0 else 1
        self.model_calls += 1
        self.evaluations += batch
        self._current = {}
        self._current_call = (_step_of(args, kwargs), batch)

    def _end_call(self, module: nn.Module, args: tuple, out: Any) -> None:
        if self._current_call is None:
            return
        t, batch = self._current_call
        keys = list(self._current)
        values = torch.stack([self._current[k] for k in keys]) if keys else None
        self._calls.append((t, batch, keys, values))
        self._current, self._current_call = {}, None

    def _neuron_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            with torch.no_grad():
                st = self._get(name, "neuron", module)
                self._count(name, "spikes", out.detach().to(torch.int64).sum())
                st.elements += out.numel()
                st.out_map = math.prod(out.shape[2:])  # [S, B, ...]

        return hook

    def _sop_hook(self, name: str, neuron: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            with torch.no_grad():
                st = self._get(name, "sop", module, neuron)
                x = args[0].detach()
                self._count(name, "ops", synaptic_ops(module, x))
                self._count(name, "spikes", (x == 1).sum())
                self._count(name, "nonbinary", ((x != 0) & (x != 1)).sum())
                st.dense += dense_ops(module, out)
                st.elements += x.numel()
                st.outputs += out.numel()
                st.in_map, st.out_map = _sample_size(module, x), _sample_size(module, out)
                st.executions += out.numel() // st.out_map

        return hook

    def _mac_hook(self, name: str):
        from ..models.tsm import TSMRepeatedConv2d

        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            st = self._get(name, "mac", module)
            n = dense_ops(module, out)
            if isinstance(module, TSMRepeatedConv2d):
                # the stem's TSM conv runs on the B images once; only its scaling is per step
                n //= module.step_scale.shape[0]
            st.ops += n
            st.dense += n
            x = args[0]
            st.inputs += x.numel()
            st.outputs += out.numel()
            st.in_map, st.out_map = _sample_size(module, x), _sample_size(module, out)
            st.executions += out.numel() // st.out_map

        return hook

    def _step_scale_hook(self, name: str):
        """SDM's TSM scales: one real multiply per output element per SNN step (in a
        BatchNorm-folded model fused with the add of ``step_shift``), counted as MACs in the
        full accounting; its parameters are the S scales (and the C shifts)."""
        scale_name = f"{name}.step_scale"

        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            new = scale_name not in self._stats
            st = self._get(scale_name, "mac", module)
            if new:  # its own parameters, not the conv's; not a conv (never the paper's one)
                st.module, st.is_conv = "TSM step scale", False
                st.weights = module.step_scale.numel()
                st.biases = 0 if module.step_shift is None else module.step_shift.numel()
            n = out.numel()
            st.ops += n
            st.dense += n
            st.inputs += n
            st.outputs += n
            st.in_map = st.out_map = _sample_size(module, out)
            st.executions += n // st.out_map

        return hook

    def _head_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            conv = module.temporal_conv
            st = self._get(name, "mac", conv)
            # Applied per SNN step to [S*B, C, H, W] and summed over steps into `out`.
            steps = args[0].shape[0]
            n = steps * out.numel() * math.prod(conv.weight.shape[1:])
            st.ops += n
            st.dense += n
            st.inputs += steps * out.numel()  # its input: the head conv's output per step
            st.outputs += steps * out.numel()
            st.in_map = st.out_map = math.prod(out.shape[1:])
            st.executions += steps * out.shape[0]

        return hook

    def _path_hook(self, name: str, kind: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            path = self._paths.setdefault(name, {"kind": kind, "elements": 0, "map": 0})
            path["elements"] += out.numel()
            # per sample and step: [S, B, C, H, W] blocks, [N, C, H, W] activations
            path["map"] = math.prod(out.shape[2:] if out.dim() == 5 else out.shape[1:])

        return hook

    # ---- result
    def _read_calls(self) -> list[tuple[int | None, int, dict[tuple[str, str], int]]]:
        """Every call's counters, read from the device in one transfer."""
        tensors = [v for _, _, _, v in self._calls if v is not None]
        steps = [t for t, _, _, _ in self._calls if t is not None]
        flat = torch.cat([v.to("cpu") for v in tensors]).tolist() if tensors else []
        ts = torch.cat([t.to("cpu") for t in steps]).tolist() if steps else []
        out, i, j = [], 0, 0
        for t, batch, keys, values in self._calls:
            counts = {}
            if values is not None:
                counts = dict(zip(keys, flat[i : i + len(keys)], strict=True))
                i += len(keys)
            step = None
            if t is not None:
                step, j = int(ts[j]), j + 1
            out.append((step, batch, counts))
        return out

    def report(
        self,
        num_images: int | None = None,
        calls_per_image: float | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> EnergyReport:
        """The measured counts as an :class:`EnergyReport` (reads the device counters).

        ``calls_per_image``: U-Net calls per generated image (the sampler's steps); default
        ``evaluations / num_images`` when ``num_images`` is given, else 1. ``settings`` (e.g.
        the sampler's) are copied into the JSON.
        """
        if self.evaluations == 0:
            raise ValueError("nothing was measured: run the model inside `with EnergyMeter(...)`")
        calls = self._read_calls()
        totals: dict[tuple[str, str], int] = {}
        groups: dict[int | None, dict[str, Any]] = {}  # diffusion step -> counts, in order
        for step, batch, counts in calls:
            g = groups.setdefault(step, {"evaluations": 0, "counts": {}})
            g["evaluations"] += batch
            for k, v in counts.items():
                totals[k] = totals.get(k, 0) + v
                g["counts"][k] = g["counts"].get(k, 0) + v
        bad = [
            f"{st.name} ({totals[(st.name, 'nonbinary')]} values, fed by {st.neuron})"
            for st in self._stats.values()
            if st.kind == "sop" and totals.get((st.name, "nonbinary"), 0)
        ]
        if bad:
            raise ValueError(
                "layers taken as spike-fed received values other than 0 and 1: "
                + ", ".join(bad)
                + "; pass spike_fed={layer: neuron} naming only layers fed by spikes"
            )
        if calls_per_image is None:
            calls_per_image = self.evaluations / num_images if num_images else 1.0
        n = self.evaluations
        paper = self.paper_layers
        if paper is None:
            convs = [s.name for s in self._stats.values() if s.kind == "mac" and s.is_conv]
            paper = convs[:1]
        layers, neurons = [], []
        for st in self._stats.values():
            if st.kind == "neuron":
                spikes = totals.get((st.name, "spikes"), 0)
                neurons.append(NeuronFiring(st.name, spikes, st.elements, st.leaky, st.out_map, n))
                continue
            if st.kind == "sop":
                ops = totals.get((st.name, "ops"), 0)
                spikes = totals.get((st.name, "spikes"), 0)
                rate = spikes / st.elements if st.elements else 0.0
                e, inputs = self.e_ac, st.elements
            else:
                ops, rate, e, spikes, inputs = st.ops, None, self.e_mac, 0, st.inputs
            layers.append(
                LayerEnergy(
                    name=st.name,
                    kind=st.kind,
                    module=st.module,
                    ops=ops / n,
                    dense_ops=st.dense / n,
                    energy_pj=ops / n * e,
                    paper=st.kind == "sop" or st.name in paper,
                    firing_rate=rate,
                    neuron=st.neuron,
                    input_spikes=spikes / n,
                    inputs=inputs / n,
                    outputs=st.outputs / n,
                    executions=st.executions / n,
                    in_map=st.in_map,
                    out_map=st.out_map,
                    weights=st.weights,
                    biases=st.biases,
                )
            )
        paths = [
            RealPath(name, p["kind"], p["elements"] / n, p["map"])
            for name, p in self._paths.items()
        ]
        steps = []
        for step, g in groups.items():
            m, c = g["evaluations"], g["counts"]
            steps.append(
                StepCounts(
                    t=step,
                    evaluations=m,
                    ops={k: v / m for (k, f), v in c.items() if f == "ops"},
                    spikes={k: v / m for (k, f), v in c.items() if f == "spikes"},
                )
            )
        return EnergyReport(
            layers=layers,
            neurons=neurons,
            e_ac=self.e_ac,
            e_mac=self.e_mac,
            evaluations=n,
            model_calls=self.model_calls,
            calls_per_image=float(calls_per_image),
            num_images=num_images,
            ann_macs=self._ann_macs(),
            settings=dict(settings or {}),
            memory=self.memory,
            paths=paths,
            steps=steps,
            ann_report=self._ann_report(),
        )

    def _ann_config(self):
        from ..models import UNetConfig

        config = getattr(self.model, "config", None)
        if self.ann_macs == "auto" and isinstance(config, UNetConfig):
            if config.kind == "spiking":
                return config
        return None

    def _ann_macs(self) -> float | None:
        if self.ann_macs != "auto":
            return None if self.ann_macs is None else float(self.ann_macs)
        config = self._ann_config()
        return None if config is None else float(ann_twin_macs(config))

    def _ann_report(self) -> EnergyReport | None:
        config = self._ann_config()
        return None if config is None else ann_twin_report(config)


@lru_cache(maxsize=16)
def ann_twin_report(config: Any) -> EnergyReport:
    """The :class:`EnergyReport` of one call of the ANN twin of ``config`` (a ``UNetConfig``)
    on one image: the same layers with S = 1, every conv and linear dense, activations,
    residual sums and skip tensors counted for the memory-aware accounting (by hooks on a
    forward pass of a freshly built twin on the CPU; none of it depends on the data)."""
    from ..models import build_model

    cfg = config.ann_twin()  # a TSM model's twin is the plain ANN
    model = build_model(cfg).eval()
    x = torch.zeros(1, cfg.image_channels, cfg.image_size, cfg.image_size)
    t = torch.zeros(1, dtype=torch.long)
    with EnergyMeter(model, ann_macs=None) as meter, torch.inference_mode():
        model(x, t)
    report = meter.report()
    assert report.sops_per_call == 0, "the ANN twin has no spiking neurons"
    return report


def ann_twin_macs(config: Any) -> int:
    """Dense MACs of one call of the ANN twin of ``config`` on one image
    (:func:`ann_twin_report`'s MACs)."""
    return int(ann_twin_report(config).macs_per_call)


def measure_sampling_energy(
    model: nn.Module,
    num_images: int,
    options: SamplingOptions | None = None,
    *,
    schedule: Any = None,
    prediction: str = "eps",
    e_ac: float = E_AC_PJ,
    e_mac: float = E_MAC_PJ,
    progress: bool = True,
    source: str | os.PathLike | None = None,
    fold_bn: bool = True,
    memory: MemoryEnergyModel | None = None,
    **changes: Any,
) -> EnergyReport:
    """Generate ``num_images`` images with :func:`sddpm.diffusion.sample` (per-image seeds,
    in batches, on the model's device) and measure them with an :class:`EnergyMeter`.

    ``model`` is a U-Net in eval mode; ``options`` (:class:`~sddpm.diffusion.SamplingOptions`,
    keyword ``changes`` such as ``steps=4`` applied on top) says how to sample. The images are
    discarded; per-image energy uses the model calls actually made per image. With ``fold_bn``
    the measured network is the copy with BatchNorm folded into its convs that
    :func:`sddpm.generation.generate` samples with (the same layers and counts; BatchNorm is
    not counted either way). ``memory`` sets the constants of the
    memory-aware accounting (default :class:`MemoryEnergyModel`)."""
    from ..generation import class_options, generate_batches
    from ..models import UNet, fold_batchnorm

    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    opts = class_options(SamplingOptions.build(options, **changes), model)
    opts = opts.replace(device=str(next(model.parameters()).device))
    if fold_bn and isinstance(model, UNet):
        model = fold_batchnorm(model.eval())
    cfg = model.config
    with EnergyMeter(model, e_ac=e_ac, e_mac=e_mac, memory=memory) as meter:
        # the meter's hooks sit on this (already folded) model: generate must not copy it
        for _ in generate_batches(
            model,
            num_images,
            (cfg.image_channels, cfg.image_size, cfg.image_size),
            opts,
            schedule=schedule,
            prediction=prediction,
            progress=progress,
            desc=f"energy {opts.sampler}",
            fold_bn=False,
        ):
            pass
    branches = guided_branches(opts)
    calls = meter.evaluations / num_images
    settings = {"source": None if source is None else str(source), **opts.to_dict()}
    settings["steps"] = opts.steps if opts.steps is not None else round(calls / branches)
    if branches == 2:
        settings["guidance_note"] = GUIDANCE_NOTE.format(w=opts.resolved_guidance)
    return meter.report(num_images=num_images, settings=settings)


GUIDANCE_NOTE = (
    "classifier-free guidance w={w:g}: every image costs two U-Net evaluations per step "
    "(conditional and unconditional, one batched call of 2B images); evaluations, calls per "
    "image and energy per image count both"
)


def guided_branches(options: SamplingOptions) -> int:
    """U-Net evaluations per image and step: 2 under classifier-free guidance with w not in
    {0, 1} (:class:`sddpm.diffusion.GuidedModel` runs both branches), else 1."""
    if options.labels is None or options.resolved_guidance in (0.0, 1.0):
        return 1
    return 2
