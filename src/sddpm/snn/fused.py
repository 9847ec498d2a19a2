"""A neuron layer over all SNN time steps as one autograd node.

Autograd through the step loop keeps several float tensors per step (the surrogate's input,
the membrane and the spike of the reset) and records a dozen graph nodes per step. Here the
forward runs without autograd and keeps only the pre-spike membrane
``h_t`` of every step; spikes are recomputed from it (``h_t >= threshold``, which is the same
test as ``h_t - threshold >= 0`` in IEEE arithmetic) in the backward pass. Backpropagation
through time is written as a linear recurrence whose coefficients (surrogate slopes, reset
derivatives) are computed for all steps at once; only one multiply-add per step is serial. Without
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


KERNELS = ("eager", "compiled")
"""How the step loops run: ``eager`` (tensor operations from Python) or ``compiled``
(``torch.compile`` of the same loops: one generated kernel per loop, C++ on CPUs and Triton on
GPUs; compiled once per process and reused for every shape)."""

_COMPILED: dict = {}


def check_kernel(kernel: str) -> str:
    """``kernel`` if it is one of :data:`KERNELS`, else a ``ValueError`` naming the choices."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown neuron kernel {kernel!r}; choose one of {KERNELS}")
    return kernel


def _loop(fn, kernel: str):
    """``fn`` itself, or its compiled version for ``kernel="compiled"`` (made once)."""
    if check_kernel(kernel) == "eager" or torch.compiler.is_compiling():  # outer compile traces fn
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


class MultiStepNeuronFunction(torch.autograd.Function):
    """``x_seq [T, ...] -> (spikes [T, ...], last membrane [...])`` for an IF/LIF neuron whose
    membrane starts at rest; the last membrane carries no gradient."""

    @staticmethod
    def forward(
        ctx, x_seq, threshold, surrogate, tau, reset, v_reset, detach_reset, decay_input, kernel
    ):
        spikes, v, h_seq = _loop(_forward_loop, kernel)(
            _membrane_dtype(x_seq), threshold, tau, reset, v_reset, decay_input, True
        )
        ctx.save_for_backward(h_seq)
        ctx.settings = (
            threshold,
            surrogate.grad_fn,
            surrogate.resolved_width,
            tau,
            reset,
            v_reset,
            detach_reset,
            decay_input,
        )
        ctx.kernel = kernel
        ctx.input_dtype = x_seq.dtype
        ctx.mark_non_differentiable(v)
        return spikes.to(x_seq.dtype), v

    @staticmethod
    def backward(ctx, grad_spikes, _grad_last_v):
        (h_seq,) = ctx.saved_tensors
        grad_spikes = grad_spikes.to(h_seq.dtype)
        grad_x = _loop(_backward, ctx.kernel)(h_seq, grad_spikes, *ctx.settings)
        return (grad_x.to(ctx.input_dtype),) + (None,) * 8


def _backward(
    h_seq, grad_spikes, threshold, slope_fn, width, tau, reset, v_reset, detach_reset, decay_input
):
    """``dL/dx_seq`` from the pre-spike membranes and ``dL/dspikes``; ``slope_fn(u, width)`` is
    the surrogate derivative.

    With ``h_t = a v_{t-1} + b x_t``, spikes ``s_t = H(h_t - threshold)`` (surrogate slope
    ``g_t``) and the reset ``v_t = r(h_t, s_t)``, the gradient ``G_t = dL/dh_t`` obeys

        G_t = g_t dL/ds_t + c_t G_{t+1},   c_t = a (dr/dh + dr/ds g_t),   dL/dx_t = b G_t

    (``dr/ds`` taken as 0 when the reset is detached). ``g`` and ``c`` depend on the forward
    pass only, so they are computed for all steps at once; the serial part is one fused
    multiply-add per step, done in place on ``g dL/ds``.
    """
    if tau is None:
        a, b = 1.0, 1.0
    else:
        a, b = 1.0 - 1.0 / tau, (1.0 / tau if decay_input else 1.0)
    slope = slope_fn(h_seq - threshold, width)
    if reset == "hard":  # r = h (1 - s) + v_reset s
        c = 1.0 - _fire(h_seq, threshold)
        if not detach_reset and v_reset == 0.0:  # dr/ds = v_reset - h
            c.addcmul_(h_seq, slope, value=-1.0)
        elif not detach_reset:
            c.addcmul_(v_reset - h_seq, slope)
    else:  # r = h - threshold s
        c = torch.ones_like(h_seq) if detach_reset else 1.0 - threshold * slope
    if a != 1.0:
        c.mul_(a)
    grad = slope.mul_(grad_spikes)  # g_t dL/ds_t for every step; becomes G in place
    for t in range(h_seq.shape[0] - 2, -1, -1):
        grad[t].addcmul_(c[t], grad[t + 1])
    return grad.mul_(b) if b != 1.0 else grad


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
    kernel: str = "eager",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spikes ``[T, ...]`` of a neuron layer driven by ``x_seq [T, ...]`` (one autograd node)
    and the membrane after the last step; ``kernel`` is one of :data:`KERNELS`. Spikes have
    the input's dtype; 16-bit input is integrated in float32."""
    if torch.is_grad_enabled() and x_seq.requires_grad:
        return MultiStepNeuronFunction.apply(
            x_seq, threshold, surrogate, tau, reset, v_reset, detach_reset, decay_input, kernel
        )
    loop = _loop(_forward_loop, kernel)
    spikes, v, _ = loop(_membrane_dtype(x_seq), threshold, tau, reset, v_reset, decay_input, False)
    return spikes.to(x_seq.dtype), v


def _membrane_dtype(x_seq: torch.Tensor) -> torch.Tensor:
    """The input in the precision the membrane integrates in: float32 for 16-bit input (bf16
    autocast), whose 8-bit mantissa could not resolve a threshold moved by 0.3 %."""
    if x_seq.dtype in (torch.float16, torch.bfloat16):
        return x_seq.float()
    return x_seq
