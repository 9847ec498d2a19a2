"""Integrate-and-fire neurons over the SNN time axis.

A neuron step is charge -> fire -> reset, written once as a pure function
(:func:`neuron_step`). :class:`SpikingNeuron` runs it over a ``[T, B, ...]`` sequence. The
membrane potential starts at the reset value on every call, so a neuron never carries state
from one call (one batch) to the next; the last membrane potential is kept on the module only
for inspection (``last_v``) and never enters the state_dict.

Published SDDPM neurons are spikingjelly ``IFNode``: threshold 1, hard reset to 0, reset not
detached, ATan surrogate alpha 2.
"""

from __future__ import annotations

import torch
from torch import nn

from .fused import check_kernel_available, multistep_neuron
from .surrogate import Surrogate

RESET_MODES = ("hard", "soft")


def neuron_step(
    v: torch.Tensor,
    x: torch.Tensor,
    *,
    threshold: float,
    surrogate: Surrogate,
    tau: float | None = None,
    reset: str = "hard",
    v_reset: float = 0.0,
    detach_reset: bool = False,
    decay_input: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One time step of an IF (``tau is None``) or LIF neuron; returns ``(spike, v_next)``.

    - charge: IF ``h = v + x``; LIF ``h = v + (x - (v - v_rest)) / tau`` with ``decay_input``,
      else ``h = v - (v - v_rest) / tau + x``; ``v_rest`` is ``v_reset`` for a hard reset and 0
      for a soft one;
    - fire: ``s = heaviside(h - threshold)`` with the surrogate gradient;
    - reset: hard ``v = h * (1 - s) + v_reset * s``; soft ``v = h - threshold * s``. With
      ``detach_reset`` the spike used in the reset carries no gradient.
    """
    v_rest = v_reset if reset == "hard" else 0.0
    if tau is None:
        h = v + x
    elif decay_input:
        h = v + (x - (v - v_rest)) / tau
    else:
        h = v - (v - v_rest) / tau + x
    spike = surrogate(h - threshold)
    s = spike.detach() if detach_reset else spike
    if reset == "hard":
        v_next = h * (1.0 - s) + v_reset * s
    else:
        v_next = h - threshold * s
    return spike, v_next


class SpikingNeuron(nn.Module):
    """Multi-step IF/LIF neuron layer: ``[T, B, ...]`` real input -> ``[T, B, ...]`` spikes.

    Args:
        threshold: firing threshold (``sddpm.snn.set_threshold`` changes it model-wide).
        tau: membrane time constant for LIF; ``None`` is integrate-and-fire (no leak).
        reset: ``"hard"`` (to ``v_reset``) or ``"soft"`` (subtract the threshold).
        v_reset: the reset value of a hard reset, also the initial membrane potential.
        detach_reset: stop the gradient through the reset.
        surrogate: the surrogate gradient of the spike.
        decay_input: LIF only: the input is divided by tau too (spikingjelly's default).
        fused: run all time steps as one autograd node that keeps only the pre-spike membrane
            for the backward pass (:mod:`sddpm.snn.fused`); ``False`` records every step.
        kernel: how the fused step loops run: ``"auto"`` (Triton for CUDA tensors when it is
            importable, else eager), ``"eager"``, ``"compiled"`` (``torch.compile``) or
            ``"triton"``; see :data:`sddpm.snn.fused.KERNELS` and :func:`set_neuron_kernel`.
    """

    def __init__(
        self,
        threshold: float = 1.0,
        tau: float | None = None,
        reset: str = "hard",
        v_reset: float = 0.0,
        detach_reset: bool = False,
        surrogate: Surrogate | None = None,
        decay_input: bool = True,
        fused: bool = True,
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        if reset not in RESET_MODES:
            raise ValueError(f"unknown reset {reset!r}; choose one of {RESET_MODES}")
        if tau is not None and not tau > 1.0:
            raise ValueError(f"LIF tau must be > 1 (tau=None for IF), got {tau}")
        if not threshold > 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        self.threshold = float(threshold)
        self.tau = tau
        self.reset = reset
        self.v_reset = float(v_reset)
        self.detach_reset = detach_reset
        self.surrogate = surrogate or Surrogate()
        self.decay_input = decay_input
        self.fused = fused
        self.kernel = check_kernel_available(kernel)
        self.last_v: torch.Tensor | None = None

    def settings(self) -> dict:
        """The keyword arguments of :func:`neuron_step` / :func:`multistep_neuron`."""
        return {
            "threshold": self.threshold,
            "surrogate": self.surrogate,
            "tau": self.tau,
            "reset": self.reset,
            "v_reset": self.v_reset,
            "detach_reset": self.detach_reset,
            "decay_input": self.decay_input,
        }

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        """``x_seq`` is ``[T, B, ...]``; returns spikes of the same shape (0.0 or 1.0)."""
        if self.fused:
            spikes, v = multistep_neuron(x_seq, **self.settings(), kernel=self.kernel)
            self.last_v = v
            return spikes
        return self.step_by_step(x_seq)

    def step_by_step(self, x_seq: torch.Tensor) -> torch.Tensor:
        """The same computation with autograd through every step (the plain reference)."""
        v = torch.full_like(x_seq[0], self.v_reset if self.reset == "hard" else 0.0)
        spikes = []
        for x in x_seq:
            s, v = neuron_step(v, x, **self.settings())
            spikes.append(s)
        self.last_v = v.detach()
        return torch.stack(spikes)

    def reset_state(self) -> None:
        """Forget the inspected membrane potential (a call always starts from rest anyway)."""
        self.last_v = None

    def extra_repr(self) -> str:
        kind = "IF" if self.tau is None else f"LIF(tau={self.tau})"
        return (
            f"{kind}, threshold={self.threshold}, reset={self.reset}, v_reset={self.v_reset}, "
            f"detach_reset={self.detach_reset}, surrogate={self.surrogate.kind}"
            f"({self.surrogate.resolved_width})"
        )


def set_neuron_kernel(
    model: nn.Module, kernel: str, device: str | torch.device | None = None
) -> int:
    """Run every :class:`SpikingNeuron` in ``model`` with ``kernel`` (``"auto"``, ``"eager"``,
    ``"compiled"`` or ``"triton"``); returns how many neurons were set. The spikes are the same
    whichever runs.

    A kernel that cannot run here is a :class:`sddpm.snn.NeuronKernelError` naming the fix:
    raised now where it cannot run on any device (``triton`` without Triton), or on ``device``
    when it is given (the device the model will run on: no C++ compiler for ``compiled`` on a
    CPU, ...); otherwise at the first call, before anything is compiled."""
    device_type = torch.device(device).type if device is not None else None
    check_kernel_available(kernel, device_type)
    neurons = [m for m in model.modules() if isinstance(m, SpikingNeuron)]
    for m in neurons:
        m.kernel = kernel
    return len(neurons)
