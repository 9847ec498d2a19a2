"""The energy report: per-layer counts, totals per U-Net call and per image, table, JSON, plot.

:class:`EnergyReport` is what :meth:`sddpm.evaluation.energy.EnergyMeter.report` returns. Every
number in it is a plain Python number (the counters were read from the device once), so it can
be printed, serialised and plotted without touching the model again.

Units: ``ops`` are synaptic operations (SOPs, one accumulate per (input spike, weight) pair) for
layers of kind ``"sop"`` and multiply-accumulates (MACs) for kind ``"mac"``; energies are in
picojoules. "Per call" means per image per U-Net evaluation (a batch of B images in one forward
pass counts as B calls), so the numbers do not depend on the batch size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..io import atomic_path, write_json
from .energy_memory import MemoryEnergyModel

__all__ = ["EnergyReport", "LayerEnergy", "NeuronFiring", "RealPath", "StepCounts"]


@dataclass(frozen=True)
class LayerEnergy:
    """One layer's operations, per call (one image, one U-Net evaluation).

    ``kind`` is ``"sop"`` (fed with spikes: ``ops`` counts (input spike, weight) pairs,
    exactly, padding included) or ``"mac"`` (fed with real values: ``ops`` is the dense MAC
    count). ``dense_ops`` is the MAC count of the same layer run densely (output elements x
    fan-in), the SOPs it would do if every input were a spike. ``firing_rate`` (sop layers) is
    the fraction of ones in the input tensor the layer saw, ``neuron`` the neuron feeding it.
    ``paper`` says whether the paper's accounting counts the layer.

    For the memory-aware accounting, per call: ``input_spikes`` (sop), ``inputs`` and
    ``outputs`` (elements over all executions), ``executions`` (per-sample runs: SNN steps);
    per layer: ``in_map``/``out_map`` (elements of one sample's map), ``weights``/``biases``.
    """

    name: str
    kind: str
    module: str
    ops: float
    dense_ops: float
    energy_pj: float
    paper: bool
    firing_rate: float | None = None
    neuron: str | None = None
    input_spikes: float = 0.0
    inputs: float = 0.0
    outputs: float = 0.0
    executions: float = 0.0
    in_map: int = 0
    out_map: int = 0
    weights: int = 0
    biases: int = 0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "module": self.module,
            "ops": self.ops,
            "dense_ops": self.dense_ops,
            "energy_pj": self.energy_pj,
            "paper": self.paper,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "executions": self.executions,
            "weights": self.weights,
            "biases": self.biases,
        }
        if self.kind == "sop":
            d["firing_rate"] = self.firing_rate
            d["neuron"] = self.neuron
            d["input_spikes"] = self.input_spikes
        return d

    def memory_terms(
        self, model: MemoryEnergyModel, ops: float | None = None, spikes: float | None = None
    ) -> dict[str, float]:
        """This layer's memory-aware terms per call (pJ); ``ops``/``spikes`` replace the
        measured SOPs and input spikes (e.g. one diffusion step's)."""
        if self.kind == "sop":
            return model.synaptic_layer(
                syn=self.ops if ops is None else ops,
                input_spikes=self.input_spikes if spikes is None else spikes,
                outputs=self.outputs,
                out_map=self.out_map,
                in_map=self.in_map,
                weights=self.weights,
                biases=self.biases,
            )
        return model.dense_layer(
            macs=self.ops,
            executions=self.executions,
            inputs=self.inputs,
            outputs=self.outputs,
            in_map=self.in_map,
            out_map=self.out_map,
            weights=self.weights,
            biases=self.biases,
        )


@dataclass(frozen=True)
class NeuronFiring:
    """A spiking neuron layer: ``spikes`` / ``elements`` over everything measured."""

    name: str
    spikes: int
    elements: int
    leaky: bool = False
    map_elements: int = 0  # neurons of one sample's map
    evaluations: int = 1  # images evaluated: spikes / evaluations is per call

    @property
    def firing_rate(self) -> float:
        return self.spikes / self.elements if self.elements else 0.0

    def memory_terms(self, model: MemoryEnergyModel, spikes: float | None = None):
        """Memory-aware terms per call (pJ); ``spikes`` per call replaces the measured ones."""
        n = max(self.evaluations, 1)
        return model.neuron_layer(
            elements=self.elements / n,
            spikes=self.spikes / n if spikes is None else spikes,
            map_elements=self.map_elements,
            leaky=self.leaky,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "firing_rate": self.firing_rate,
            "spikes": self.spikes,
            "elements": self.elements,
        }


@dataclass(frozen=True)
class RealPath:
    """A real-valued tensor outside the layers: a residual sum (``kind="residual"``), a skip
    tensor kept for the decoder (``"skip"``) or an ANN activation (``"activation"``), with its
    ``elements`` per call and ``map_elements`` per sample and step."""

    name: str
    kind: str
    elements: float
    map_elements: int

    def memory_terms(self, model: MemoryEnergyModel) -> dict[str, float]:
        return model.real_path(self.kind, elements=self.elements, map_elements=self.map_elements)


@dataclass(frozen=True)
class StepCounts:
    """The data-dependent counts of one diffusion step ``t`` (``None``: calls without t),
    per call: ``ops`` (SOPs per spike-fed layer) and ``spikes`` (input spikes per spike-fed
    layer, output spikes per neuron layer), over ``evaluations`` image evaluations."""

    t: int | None
    evaluations: int
    ops: dict[str, float]
    spikes: dict[str, float]


def _sum_terms(parts) -> dict[str, float]:
    total: dict[str, float] = {}
    for terms in parts:
        for k, v in terms.items():
            total[k] = total.get(k, 0.0) + v
    return total


def _totals(sops: float, macs_paper: float, macs_full: float, e_ac: float, e_mac: float):
    return {
        "sops": sops,
        "macs": macs_full,
        "macs_paper": macs_paper,
        "energy_pj_paper": sops * e_ac + macs_paper * e_mac,
        "energy_pj_full": sops * e_ac + macs_full * e_mac,
    }


@dataclass(frozen=True)
class EnergyReport:
    """Energy of a spiking network measured over real forward passes.

    Two accountings (both in pJ, with ``e_ac`` per SOP and ``e_mac`` per MAC):

    - ``paper``: every spike-fed layer as SOPs, plus the MACs of the first conv (the stem conv
      on the image) only, as SNN papers, SDDPM's included, usually count;
    - ``full``: every spike-fed layer as SOPs plus every real-fed layer as MACs (stem conv,
      shortcut 1x1 convs, time-embedding linears and time projections, head convs).

    BatchNorm (foldable into the preceding conv), activations, additions and the neurons' own
    membrane updates are not counted in either. The third, ``memory``
    (:meth:`memory_terms`, :class:`~.energy_memory.MemoryEnergyModel`), counts them, and
    memory traffic, after Lemaire et al.

    ``steps`` holds the data-dependent counts per diffusion step t (:meth:`step_summaries`).

    ``calls_per_image`` turns per-call numbers into per-image ones (the sampler's model calls
    per generated image). ``ann_macs`` is the ANN twin's dense MACs per call, when known.
    """

    layers: list[LayerEnergy]
    neurons: list[NeuronFiring]
    e_ac: float
    e_mac: float
    evaluations: int  # images evaluated (sum of batch sizes over all forward calls)
    model_calls: int  # forward calls (batches)
    calls_per_image: float
    num_images: int | None = None
    ann_macs: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    memory: MemoryEnergyModel = field(default_factory=MemoryEnergyModel)
    paths: list[RealPath] = field(default_factory=list)
    steps: list[StepCounts] = field(default_factory=list)
    ann_report: EnergyReport | None = None  # the ANN twin's own report (memory terms)

    # ---- totals
    @property
    def sops_per_call(self) -> float:
        return sum(la.ops for la in self.layers if la.kind == "sop")

    @property
    def macs_per_call(self) -> float:
        """MACs of every real-fed layer (the full accounting)."""
        return sum(la.ops for la in self.layers if la.kind == "mac")

    @property
    def paper_macs_per_call(self) -> float:
        return sum(la.ops for la in self.layers if la.kind == "mac" and la.paper)

    def memory_terms(
        self, step: StepCounts | None = None, model: MemoryEnergyModel | None = None
    ) -> dict[str, float]:
        """The memory-aware accounting per call (pJ), term by term (see
        :mod:`~.energy_memory`); for one diffusion ``step``'s counts when given, with the
        constants of ``model`` (default :attr:`memory`)."""
        model = model or self.memory

        def layer(la: LayerEnergy):
            if step is None or la.kind != "sop":
                return la.memory_terms(model)
            return la.memory_terms(model, step.ops.get(la.name, 0.0), step.spikes.get(la.name))

        return _sum_terms(
            [
                *(layer(la) for la in self.layers),
                *(
                    nf.memory_terms(model, None if step is None else step.spikes.get(nf.name))
                    for nf in self.neurons
                ),
                *(p.memory_terms(model) for p in self.paths),
            ]
        )

    def memory_energy(
        self, step: StepCounts | None = None, model: MemoryEnergyModel | None = None
    ) -> float:
        """The sum of :meth:`memory_terms` (pJ per call)."""
        return sum(self.memory_terms(step, model).values())

    @property
    def firing_rate(self) -> float:
        """Spikes / neuron elements over every neuron layer and everything measured."""
        elements = sum(n.elements for n in self.neurons)
        return sum(n.spikes for n in self.neurons) / elements if elements else 0.0

    @property
    def spikes_per_synapse(self) -> float:
        """Dampfhoffer et al.'s measure: synaptic events per synapse per inference (one call,
        all SNN steps): SOPs over the synapses of one step (dense ops / executions)."""
        synapses = sum(
            la.dense_ops / la.executions for la in self.layers if la.kind == "sop" and la.executions
        )
        return self.sops_per_call / synapses if synapses else 0.0

    @property
    def per_call(self) -> dict[str, float]:
        """``sops``, ``macs`` (full), ``macs_paper``, ``energy_pj_paper``, ``energy_pj_full``,
        ``energy_pj_memory``."""
        totals = _totals(
            self.sops_per_call,
            self.paper_macs_per_call,
            self.macs_per_call,
            self.e_ac,
            self.e_mac,
        )
        totals["energy_pj_memory"] = self.memory_energy()
        return totals

    def step_summaries(self) -> list[dict[str, Any]]:
        """One entry per diffusion step, in trajectory order: ``t``, ``evaluations``,
        ``firing_rate`` (all neurons), ``spikes_per_synapse`` and the energy per call by each
        accounting (``energy_pj_paper``, ``energy_pj_full``, ``energy_pj_memory``)."""
        neurons = {n.name: n for n in self.neurons}
        elements = sum(n.elements / max(n.evaluations, 1) for n in self.neurons)
        synapses = sum(
            la.dense_ops / la.executions for la in self.layers if la.kind == "sop" and la.executions
        )
        macs_paper, macs_full = self.paper_macs_per_call, self.macs_per_call
        out = []
        for st in self.steps:
            sops = sum(st.ops.values())
            spikes = sum(v for k, v in st.spikes.items() if k in neurons)
            out.append(
                {
                    "t": st.t,
                    "evaluations": st.evaluations,
                    "firing_rate": spikes / elements if elements else 0.0,
                    "spikes_per_synapse": sops / synapses if synapses else 0.0,
                    "sops": sops,
                    "energy_pj_paper": sops * self.e_ac + macs_paper * self.e_mac,
                    "energy_pj_full": sops * self.e_ac + macs_full * self.e_mac,
                    "energy_pj_memory": self.memory_energy(st),
                }
            )
        return out

    @property
    def per_image(self) -> dict[str, float]:
        """:attr:`per_call` times :attr:`calls_per_image`."""
        return {k: v * self.calls_per_image for k, v in self.per_call.items()}

    @property
    def ann(self) -> dict[str, float] | None:
        """The ANN twin (same architecture, dense, one time step): MACs and pJ per call and per
        image, and how many times the SNN's energy it costs."""
        if self.ann_macs is None:
            return None
        per_call = self.per_call
        energy = self.ann_macs * self.e_mac

        def ratio(x: float) -> float | None:
            return energy / x if x else None

        out: dict[str, Any] = {
            "macs": self.ann_macs,
            "energy_pj": energy,
            "macs_per_image": self.ann_macs * self.calls_per_image,
            "energy_pj_per_image": energy * self.calls_per_image,
            "ratio_to_snn_paper": ratio(per_call["energy_pj_paper"]),
            "ratio_to_snn_full": ratio(per_call["energy_pj_full"]),
        }
        if self.ann_report is not None:
            # the same memory-aware constants as the SNN's, on the twin's own counts
            terms = self.ann_report.memory_terms(model=self.memory)
            memory = sum(terms.values())
            out["energy_pj_memory"] = memory
            out["energy_pj_memory_per_image"] = memory * self.calls_per_image
            out["ratio_to_snn_memory"] = (
                memory / per_call["energy_pj_memory"] if per_call["energy_pj_memory"] else None
            )
            out["memory_terms"] = terms
        return out

    # ---- output
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "sddpm.energy",
            "version": 1,
            **self.settings,
            "num_images": self.num_images,
            "evaluations": self.evaluations,
            "model_calls": self.model_calls,
            "calls_per_image": self.calls_per_image,
            "e_ac_pj": self.e_ac,
            "e_mac_pj": self.e_mac,
            "per_call": self.per_call,
            "per_image": self.per_image,
            "firing_rate": self.firing_rate,
            "spikes_per_synapse_per_inference": self.spikes_per_synapse,
            "memory_aware": self._memory_section(),
            "ann": self.ann,
            "per_step": self.step_summaries(),
            "layers": [la.to_dict() for la in self.layers],
            "neurons": [n.to_dict() for n in self.neurons],
            "real_paths": [
                {"name": p.name, "kind": p.kind, "elements": p.elements} for p in self.paths
            ],
            "notes": (
                "per_call: one image, one U-Net evaluation. sop layers: exact (input spike, "
                "weight) pairs, zero padding excluded; mac layers: dense MACs. paper: SOPs + "
                "MACs of the first conv only; full: SOPs + MACs of every real-fed layer "
                "(BatchNorm, activations, additions and memory not counted in these two). "
                "memory: Lemaire et al.'s memory-aware model (arithmetic, addressing, weight, "
                "bias, membrane and spike memory, real-valued paths), constants in "
                "memory_aware.model. per_step: per diffusion step t (trajectory order), per call."
            ),
        }

    def _memory_section(self) -> dict[str, Any]:
        terms = self.memory_terms()
        total = sum(terms.values())
        return {
            "model": self.memory.to_dict(),
            "energy_pj_per_call": total,
            "energy_pj_per_image": total * self.calls_per_image,
            "terms_per_call": terms,
            "terms_per_image": {k: v * self.calls_per_image for k, v in terms.items()},
        }

    def save_json(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` as JSON, atomically."""
        write_json(path, self.to_dict())

    def table(self) -> str:
        """A plain-text table: one row per layer, then the totals."""
        headers = ["layer", "kind", "ops/call", "dense/call", "rate", "pJ/call", "paper"]
        rows = [
            [
                la.name,
                la.kind,
                f"{la.ops:,.0f}",
                f"{la.dense_ops:,.0f}",
                "" if la.firing_rate is None else f"{la.firing_rate:.4f}",
                f"{la.energy_pj:,.1f}",
                "yes" if la.paper else "no",
            ]
            for la in self.layers
        ]
        widths = [max(len(x) for x in col) for col in zip(headers, *rows, strict=False)]
        lines = []
        for i, line in enumerate([headers, ["-" * w for w in widths], *rows]):
            cells = [
                x.ljust(w) if j == 0 else x.rjust(w)
                for j, (x, w) in enumerate(zip(line, widths, strict=True))
            ]
            lines.append("  ".join(cells).rstrip() if i != 1 else "  ".join(cells))
        c, m = self.per_call, self.per_image
        rates = [n.firing_rate for n in self.neurons]
        if rates:
            spikes = sum(n.spikes for n in self.neurons)
            elements = sum(n.elements for n in self.neurons)
            lines.append("")
            lines.append(
                f"firing rate: {spikes / elements:.4f} overall, "
                f"{min(rates):.4f}..{max(rates):.4f} over {len(rates)} neuron layers"
            )
        lines.append("")
        lines.append(
            f"E_AC {self.e_ac} pJ/SOP, E_MAC {self.e_mac} pJ/MAC; "
            f"{self.evaluations} image evaluations in {self.model_calls} calls, "
            f"{self.calls_per_image:g} calls per image"
        )
        if self.settings.get("guidance_note"):
            lines.append(self.settings["guidance_note"])
        lines.append(
            f"per call : {c['sops']:,.0f} SOPs, {c['macs_paper']:,.0f} MACs (paper) / "
            f"{c['macs']:,.0f} MACs (full); energy {_pj(c['energy_pj_paper'])} (paper), "
            f"{_pj(c['energy_pj_full'])} (full)"
        )
        lines.append(
            f"per image: {m['sops']:,.0f} SOPs, {m['macs']:,.0f} MACs (full); energy "
            f"{_pj(m['energy_pj_paper'])} (paper), {_pj(m['energy_pj_full'])} (full)"
        )
        lines.append(
            f"memory-aware ({self.memory.memory_model} memory model): "
            f"{_pj(c['energy_pj_memory'])} per call, {_pj(m['energy_pj_memory'])} per image; "
            f"{self.spikes_per_synapse:.3f} spikes per synapse per inference"
        )
        ann = self.ann
        if ann is not None:
            lines.append(
                f"ANN twin : {ann['macs']:,.0f} MACs per call, {_pj(ann['energy_pj'])} per call, "
                f"{_pj(ann['energy_pj_per_image'])} per image "
                f"({ann['ratio_to_snn_paper'] or 0:.1f}x paper, "
                f"{ann['ratio_to_snn_full'] or 0:.1f}x full)"
            )
            if "energy_pj_memory" in ann:
                lines.append(
                    f"ANN twin memory-aware: {_pj(ann['energy_pj_memory'])} per call, "
                    f"{_pj(ann['energy_pj_memory_per_image'])} per image "
                    f"({ann['ratio_to_snn_memory'] or 0:.2f}x the SNN's)"
                )
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike) -> None:
        """A PNG: firing rate per neuron layer (top) and energy per call per layer (bottom,
        log scale, SOP layers and MAC layers in two colours). Written atomically."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch

        n_bars = max(len(self.layers), len(self.neurons), 1)
        fig = Figure(figsize=(max(8.0, 0.28 * n_bars + 2), 8.5), layout="constrained")
        FigureCanvasAgg(fig)
        top, bottom = fig.subplots(2, 1)

        names = [n.name for n in self.neurons]
        top.bar(range(len(names)), [n.firing_rate for n in self.neurons], color="tab:green")
        top.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        top.set_ylabel("firing rate (spikes / elements)")
        top.set_title("Firing rate per neuron layer")
        top.set_xlim(-0.6, max(len(names), 1) - 0.4)

        colors = {"sop": "tab:blue", "mac": "tab:orange"}
        bottom.bar(
            range(len(self.layers)),
            [la.energy_pj if la.energy_pj > 0 else float("nan") for la in self.layers],
            color=[colors[la.kind] for la in self.layers],
        )
        bottom.set_xticks(
            range(len(self.layers)), [la.name for la in self.layers], rotation=90, fontsize=7
        )
        positive = [la.energy_pj for la in self.layers if la.energy_pj > 0]
        if positive:  # layers that did nothing (no input spike) show no bar
            bottom.set_yscale("log")
            bottom.set_ylim(min(positive) / 2, max(positive) * 2)
        bottom.set_ylabel("energy per call (pJ)")
        c = self.per_call
        bottom.set_title(
            f"Energy per layer per call: {_pj(c['energy_pj_paper'])} (paper), "
            f"{_pj(c['energy_pj_full'])} (full)"
            + (f", ANN twin {_pj(self.ann['energy_pj'])}" if self.ann else "")
        )
        bottom.set_xlim(-0.6, max(len(self.layers), 1) - 0.4)
        bottom.legend(
            handles=[
                Patch(color=colors["sop"], label=f"SOP (x {self.e_ac} pJ)"),
                Patch(color=colors["mac"], label=f"MAC (x {self.e_mac} pJ)"),
            ]
        )
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)

    def plot_steps(self, path: str | os.PathLike) -> None:
        """A PNG against the diffusion step t: the firing rate (top) and the energy per call
        (bottom, log scale) of the SNN by the paper's and the memory-aware accounting, with
        the ANN twin's (constant in t) by the same two. Written atomically."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        steps = [s for s in self.step_summaries() if s["t"] is not None]
        if not steps:
            raise ValueError("no diffusion steps were measured (calls without t)")
        steps.sort(key=lambda s: s["t"])
        ts = [s["t"] for s in steps]
        fig = Figure(figsize=(8.0, 7.5), layout="constrained")
        FigureCanvasAgg(fig)
        top, bottom = fig.subplots(2, 1, sharex=True)
        top.plot(ts, [s["firing_rate"] for s in steps], ".-", color="tab:green", ms=3)
        top.set_ylabel("firing rate (all neurons)")
        top.set_title("Firing rate and energy per U-Net call against the diffusion step t")
        bottom.plot(ts, [s["energy_pj_paper"] for s in steps], ".-", ms=3, label="SNN, paper")
        bottom.plot(ts, [s["energy_pj_memory"] for s in steps], ".-", ms=3, label="SNN, memory")
        ann = self.ann
        if ann is not None:
            bottom.axhline(ann["energy_pj"], color="tab:blue", ls="--", label="ANN, paper")
            if "energy_pj_memory" in ann:
                bottom.axhline(
                    ann["energy_pj_memory"], color="tab:orange", ls="--", label="ANN, memory"
                )
        bottom.set_yscale("log")
        bottom.set_xlabel("diffusion step t")
        bottom.set_ylabel("energy per call (pJ)")
        bottom.legend(loc="best")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)


def _pj(x: float) -> str:
    """Energy with a readable unit."""
    for unit, scale in (("mJ", 1e9), ("uJ", 1e6), ("nJ", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3f} {unit}"
    return f"{x:.1f} pJ"
