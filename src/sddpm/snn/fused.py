"""A neuron layer over all SNN time steps as one autograd node.

Autograd through the step loop keeps several float tensors per step (the surrogate's input,
the membrane and the spike of the reset) and records a dozen graph nodes per step. Here the
forward runs without autograd and keeps only the pre-spike membrane
``h_t`` of every step; spikes are recomputed from it (``h_t >= threshold``, which is the same
test as ``h_t - threshold >= 0`` in IEEE arithmetic) in the backward pass, which walks the steps
in reverse (backpropagation through time) with the formulas autograd would apply. Without
gradients the loop runs in place on the membrane: three tensor operations per step for IF.
Spikes are float comparisons (``ge`` with a float ``out``), which CPUs do an order of
magnitude faster than bool masks.
"""

from __future__ import annotations

import torch

from .surrogate import Surrogate


def _fire(h: torch.Tensor, threshold: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Float spikes ``h >= threshold`` (a float ``out=`` comparison: far cheaper on CPUs than
    making a bool mask and converting it)."""
    if out is None:
        out = torch.empty_like(h)
    return torch.ge(h, threshold, out=out)


def _reset(h, s, threshold, reset, v_reset, in_place):
    """The membrane after the reset, from the pre-spike membrane ``h`` and float spikes ``s``.

    Exact for spikes in {0, 1}: ``h - h s`` is h or 0, as ``h (1 - s)`` is."""
    if reset == "soft":
        return h.sub_(s, alpha=threshold) if in_place else torch.sub(h, s, alpha=threshold)
    if v_reset == 0.0:
        return h.addcmul_(h, s, value=-1.0) if in_place else torch.addcmul(h, h, s, value=-1.0)
    return h * (1.0 - s) + v_reset * s


def _forward_loop(x_seq, threshold, tau, reset, v_reset, decay_input, keep_h):
    """Float spikes, last membrane, and the pre-spike membranes if ``keep_h``."""
    v_rest = v_reset if reset == "hard" else 0.0
    v = torch.full_like(x_seq[0], v_rest)
    h_seq = torch.empty_like(x_seq) if keep_h else None
    spikes = torch.empty_like(x_seq)
    for t in range(x_seq.shape[0]):
        x = x_seq[t]
        h = h_seq[t] if keep_h else v  # without h_seq, charge the membrane in place
        if tau is None:
            torch.add(v, x, out=h)
        elif decay_input:  # h = v + (x - (v - v_rest)) / tau
            torch.add(v, (x - v + v_rest) / tau, out=h)
        else:  # h = v - (v - v_rest) / tau + x
            torch.add(v - (v - v_rest) / tau, x, out=h)
        s = _fire(h, threshold, out=spikes[t])
        v = _reset(h, s, threshold, reset, v_reset, in_place=not keep_h)
    return spikes, v, h_seq


class MultiStepNeuronFunction(torch.autograd.Function):
    """``x_seq [T, ...] -> (spikes [T, ...], last membrane [...])`` for an IF/LIF neuron whose
    membrane starts at rest; the last membrane carries no gradient."""

    @staticmethod
    def forward(ctx, x_seq, threshold, surrogate, tau, reset, v_reset, detach_reset, decay_input):
        spikes, v, h_seq = _forward_loop(x_seq, threshold, tau, reset, v_reset, decay_input, True)
        ctx.save_for_backward(h_seq)
        ctx.settings = (threshold, surrogate, tau, reset, v_reset, detach_reset, decay_input)
        ctx.mark_non_differentiable(v)
        return spikes, v

    @staticmethod
    def backward(ctx, grad_spikes, _grad_last_v):
        (h_seq,) = ctx.saved_tensors
        threshold, surrogate, tau, reset, v_reset, detach_reset, decay_input = ctx.settings
        # charge derivatives: h = a * v_prev + b * x (+ const)
        if tau is None:
            dh_dv, dh_dx = 1.0, 1.0
        else:
            dh_dv, dh_dx = 1.0 - 1.0 / tau, (1.0 / tau if decay_input else 1.0)
        grad_x = torch.empty_like(h_seq)
        grad_v = torch.zeros_like(h_seq[0])  # dL/dv_t, the membrane after the reset of step t
        for t in range(h_seq.shape[0] - 1, -1, -1):
            h = h_seq[t]
            u = h - threshold
            s = _fire(h, threshold)
            if reset == "hard":  # v = h (1 - s) + v_reset s
                dv_dh = 1.0 - s
                dv_ds = None if detach_reset else v_reset - h
            else:  # v = h - threshold s
                dv_dh = 1.0
                dv_ds = None if detach_reset else -threshold
            g_s = grad_spikes[t] if dv_ds is None else grad_spikes[t] + grad_v * dv_ds
            g_h = g_s * surrogate.grad(u) + grad_v * dv_dh
            grad_x[t] = g_h * dh_dx
            grad_v = g_h * dh_dv
        return grad_x, None, None, None, None, None, None, None


def multistep_neuron(
    x_seq: torch.Tensor,
    *,
    threshold: float,
    surrogate: Surrogate,
    tau: float | None = None,
    reset: str = "hard",
    v_reset: float = 0.0,
    detach_reset: bool = False,
    decay_input: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spikes ``[T, ...]`` of a neuron layer driven by ``x_seq [T, ...]`` (one autograd node)
    and the membrane after the last step."""
    if torch.is_grad_enabled() and x_seq.requires_grad:
        return MultiStepNeuronFunction.apply(
            x_seq, threshold, surrogate, tau, reset, v_reset, detach_reset, decay_input
        )
    spikes, v, _ = _forward_loop(x_seq, threshold, tau, reset, v_reset, decay_input, False)
    return spikes, v
