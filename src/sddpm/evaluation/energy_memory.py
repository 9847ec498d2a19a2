"""A memory-aware energy model, after Lemaire et al. (ICONIP 2022, arXiv 2210.13107), with
Horowitz's 45 nm constants (ISSCC 2014).

The paper's accounting (0.9 pJ per synaptic operation, 4.6 pJ per MAC of the first layer)
leaves memory out; Dampfhoffer et al. (IEEE TETCI 2023) and Lemaire et al. show that memory
access dominates. This model counts, per U-Net call on one image (all S SNN steps):

spike-fed layers (Lemaire's terms; SYN = the exact synaptic events, S_in = input spikes,
``outputs`` = S x N_out output elements):

- ``accumulate``: ``E_add * (SYN + outputs)`` (synaptic adds, one bias add per output per step);
- ``addressing``: ``S_in * 2 (E_mul + E_add) + SYN * E_add`` (the weight address of every
  input spike, then one add per synaptic event; Lemaire's form);
- ``weight_reads``: ``SYN * e(weight memory)``: one weight read per synaptic event;
- ``bias_reads``: ``outputs * e(bias memory)``;
- ``potential_rw``: ``2 (SYN + outputs) * e(potential memory)``: the conv accumulates into the
  membrane of the neurons it feeds (read and write per event and per step);
- ``spike_rw``: ``S_in * e(spike memory)`` (input spikes read; output spikes are written by the
  neuron layer below).

neuron layers (IF; LIF adds the leak):

- ``neuron_update``: ``E_add * (elements + spikes)`` (``v += x`` per neuron per step, and the
  reset per spike);
- ``leak``: ``(E_mul + E_add) * elements`` for LIF, 0 for IF;
- ``spike_rw``: ``spikes * e(spike memory)`` (output spikes written).

real-valued paths (the first conv, the 1x1 shortcuts on residuals, the time-embedding MLP and
time projections, the head; every layer of the ANN twin), dense:

- ``dense_arith``: ``MACs * (E_mul + E_add)``;
- ``dense_weight_reads``: every weight and bias read once per execution (``weight_reuse``,
  default) or once per MAC;
- ``activation_rw``: every input element read once, every output element written once;
- ``residual``: one add, two reads and one write per element of a residual sum;
- ``skip``: every skip tensor (encoder output kept for the decoder) written once and read once;
- ``activation_fn`` (ANN twin only): ``E_mul + E_add`` per element of a SiLU/ReLU (a table or
  piecewise approximation; BatchNorm is folded and not counted).

Memory access energy ``e(M)``: the cost of one ``word_bits``-bit access to a memory of M bits;
a value of b bits costs ``b / word_bits`` of an access (values packed in words). Every layer has
its own weight and bias memory (its weight count x bits); the potential memory of a layer is one
output map (N_out x potential_bits), the spike memory one input map's events (elements x
spike_bits), an activation memory one map (elements x activation_bits). Three size models
(``memory_model``):

- ``"linear"`` (default, Lemaire et al.'s fit to Horowitz): ``e(M) = 1.09e-5 M + 13.2`` pJ per
  64-bit access (8 KiB: 13.9, 32 KiB: 16.1, 1 MiB: 104.6 pJ; Horowitz: 10, 20, 100);
- ``"flat"``: 10 pJ per 64-bit access, whatever the size (Horowitz's 8 KiB SRAM);
- ``"piecewise"``: spikingjelly 2.x's cost per byte, linear through (0, 0), (8 KiB, 2.5),
  (32 KiB, 5) and (1 MiB, 25) pJ/B, constant above 1 MiB.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["MEMORY_MODELS", "MemoryEnergyModel"]

MEMORY_MODELS = ("linear", "flat", "piecewise")


@dataclass(frozen=True)
class MemoryEnergyModel:
    """Every constant of the memory-aware accounting, in pJ and bits (defaults: Horowitz,
    ISSCC 2014, 45 nm, 32-bit floats; see the module docstring for the terms)."""

    e_add: float = 0.9  # fp32 add (int32 0.1, fp16 0.4, int8 0.03)
    e_mul: float = 3.7  # fp32 mul (int32 3.1, fp16 1.1, int8 0.2)
    memory_model: str = "linear"
    linear_pj_per_bit: float = 1.09e-5  # Lemaire et al.'s fit, per 64-bit access
    linear_offset_pj: float = 13.2
    flat_pj: float = 10.0  # Horowitz 8 KiB SRAM, 64-bit access
    piecewise_bytes: tuple[float, ...] = (0.0, 8192.0, 32768.0, 1048576.0)
    piecewise_pj_per_byte: tuple[float, ...] = (0.0, 2.5, 5.0, 25.0)
    word_bits: int = 64
    weight_bits: int = 32
    bias_bits: int = 32
    potential_bits: int = 32
    activation_bits: int = 32
    spike_bits: int = 32  # one address event per spike
    weight_reuse: bool = True  # dense layers read each weight once per execution

    def __post_init__(self) -> None:
        if self.memory_model not in MEMORY_MODELS:
            raise ValueError(
                f"memory_model must be one of {MEMORY_MODELS}, got {self.memory_model!r}"
            )
        numbers = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        bad = [
            k
            for k, v in numbers.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0
        ]
        if bad or self.word_bits <= 0:
            raise ValueError(f"MemoryEnergyModel constants must be >= 0 (word_bits > 0): {bad}")
        if len(self.piecewise_bytes) != len(self.piecewise_pj_per_byte):
            raise ValueError("piecewise_bytes and piecewise_pj_per_byte differ in length")

    def replace(self, **changes: Any) -> MemoryEnergyModel:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["piecewise_bytes"] = list(self.piecewise_bytes)
        d["piecewise_pj_per_byte"] = list(self.piecewise_pj_per_byte)
        return d

    def access_pj(self, bits: float, memory_bits: float) -> float:
        """pJ to read or write one value of ``bits`` bits in a memory of ``memory_bits``."""
        if self.memory_model == "flat":
            return self.flat_pj * bits / self.word_bits
        if self.memory_model == "linear":
            per_word = self.linear_pj_per_bit * memory_bits + self.linear_offset_pj
            return per_word * bits / self.word_bits
        size = min(memory_bits / 8, self.piecewise_bytes[-1])
        per_byte = float(np.interp(size, self.piecewise_bytes, self.piecewise_pj_per_byte))
        return per_byte * bits / 8

    # ---- the terms, per call on one image
    def synaptic_layer(
        self,
        *,
        syn: float,
        input_spikes: float,
        outputs: float,
        out_map: float,
        in_map: float,
        weights: float,
        biases: float,
    ) -> dict[str, float]:
        """A spike-fed layer: ``syn`` synaptic events, ``input_spikes``, ``outputs`` (output
        elements over all steps), ``out_map``/``in_map`` (elements of one output/input map),
        ``weights``/``biases`` (counts)."""
        e_w = self.access_pj(self.weight_bits, weights * self.weight_bits)
        e_b = self.access_pj(self.bias_bits, max(biases, 1) * self.bias_bits)
        e_v = self.access_pj(self.potential_bits, out_map * self.potential_bits)
        e_s = self.access_pj(self.spike_bits, in_map * self.spike_bits)
        return {
            "accumulate": self.e_add * (syn + outputs),
            "addressing": input_spikes * 2 * (self.e_mul + self.e_add) + syn * self.e_add,
            "weight_reads": syn * e_w,
            "bias_reads": outputs * e_b if biases else 0.0,
            "potential_rw": 2 * (syn + outputs) * e_v,
            "spike_rw": input_spikes * e_s,
        }

    def neuron_layer(
        self, *, elements: float, spikes: float, map_elements: float, leaky: bool
    ) -> dict[str, float]:
        """A neuron layer: ``elements`` neuron updates (over all steps), ``spikes`` emitted,
        ``map_elements`` neurons in one step's map."""
        e_s = self.access_pj(self.spike_bits, map_elements * self.spike_bits)
        return {
            "neuron_update": self.e_add * (elements + spikes),
            "leak": (self.e_mul + self.e_add) * elements if leaky else 0.0,
            "spike_rw": spikes * e_s,
        }

    def dense_layer(
        self,
        *,
        macs: float,
        executions: float,
        inputs: float,
        outputs: float,
        in_map: float,
        out_map: float,
        weights: float,
        biases: float,
    ) -> dict[str, float]:
        """A real-fed layer: ``macs``, ``executions`` (times it runs per call), ``inputs`` /
        ``outputs`` (elements over all executions), maps and parameter counts as above."""
        e_w = self.access_pj(self.weight_bits, weights * self.weight_bits)
        e_b = self.access_pj(self.bias_bits, max(biases, 1) * self.bias_bits)
        e_in = self.access_pj(self.activation_bits, in_map * self.activation_bits)
        e_out = self.access_pj(self.activation_bits, out_map * self.activation_bits)
        if self.weight_reuse:
            reads = executions * (weights * e_w + biases * e_b)
        else:
            reads = macs * e_w + (outputs * e_b if biases else 0.0)
        return {
            "dense_arith": macs * (self.e_mul + self.e_add),
            "dense_weight_reads": reads,
            "activation_rw": inputs * e_in + outputs * e_out,
        }

    def real_path(self, kind: str, *, elements: float, map_elements: float) -> dict[str, float]:
        """``kind`` "residual" (adds), "skip" (kept tensors) or "activation" (ANN SiLU/ReLU)."""
        e = self.access_pj(self.activation_bits, map_elements * self.activation_bits)
        if kind == "residual":
            return {"residual": elements * (self.e_add + 3 * e)}
        if kind == "skip":
            return {"skip": 2 * elements * e}
        if kind == "activation":
            return {"activation_fn": elements * (self.e_mul + self.e_add)}
        raise ValueError(f"unknown real-valued path kind {kind!r}")
