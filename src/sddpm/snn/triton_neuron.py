"""The multi-step neuron as two hand-written Triton kernels (``kernel="triton"``).

One launch runs the forward pass over all T SNN steps (a loop over T inside the kernel,
elementwise over the flattened neurons); one launch runs backpropagation through time. The
membrane is float32 in registers; spikes are stored in the input's dtype; the pre-spike
membranes ``h`` are saved for the backward pass in float32, as the eager kernel saves them:
the backward recomputes the spikes as ``h >= threshold``, and a 16-bit ``h`` would round values
just under the threshold onto it, so the backward would take a silent neuron for a firing one
(wrong reset derivative) and the surrogate slopes would lose their resolution near the
threshold. The kernels (:mod:`._triton_kernels`) are the same float operations as the eager
loop, so spikes are bit-for-bit the eager ones on the CPU. (On CUDA, eager PyTorch divides a
tensor by a Python number as a multiplication by its reciprocal, one rounding apart from the
kernel's IEEE division: a LIF neuron whose tau is not a power of two may then flip a spike
that sits exactly at the threshold.)

Triton is imported only here, when this kernel is used: the package imports without it. Triton
runs CUDA tensors; CPU tensors run only under its interpreter (``TRITON_INTERPRET=1``, read
when the kernels are first built), which is how the tests run them on a CPU.
"""

from __future__ import annotations

import math
import os

import torch

from .layout import empty_steps, in_step_layout
from .surrogate import atan_grad, rectangular_grad, sigmoid_grad

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""Input dtypes the kernels take (float64 runs on the eager kernel)."""

BLOCK = 1024
"""Neurons per Triton program (read at each launch)."""

COMPILE_OPTIONS = {"enable_fp_fusion": False}
"""Options of every launch. No multiply-add fusion: each product and sum is rounded as the
eager loop rounds it, whatever the Triton version's default (triton 3.9 fuses unless told,
and says 3.10 will not)."""


def available() -> bool:
    """Whether ``import triton`` works here."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET=1``, or ``triton.knobs``)."""
    import triton

    knobs = getattr(triton, "knobs", None)  # triton >= 3.4 reads the variable through knobs
    if knobs is not None and hasattr(knobs, "runtime"):
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels():
    from . import _triton_kernels

    return _triton_kernels.kernels(interpreting())


def _launch(kernel, x: torch.Tensor, n: int, *args, **meta) -> None:
    grid = (max(1, -(-n // meta["BLOCK"])),)
    meta = {**COMPILE_OPTIONS, **meta}
    if x.is_cuda:
        with torch.cuda.device(x.device):
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


def forward(
    x_seq: torch.Tensor,
    threshold: float,
    tau: float | None,
    reset: str,
    v_reset: float,
    decay_input: bool,
    keep_h: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``x_seq [T, ...]`` (float16/bfloat16/float32) -> spikes ``[T, ...]`` in its dtype, the
    last membrane ``[...]`` float32, and the pre-spike membranes ``[T, ...]`` float32 if
    ``keep_h`` (else ``None``); the arguments are those of :func:`sddpm.snn.neuron_step`."""
    x = in_step_layout(x_seq)  # the kernel walks each step's values as one flat run
    steps, n = x.shape[0], x[0].numel()
    spikes = empty_steps(x)
    v = (
        torch.empty_like(x[0], dtype=torch.float32)
        if steps
        else x.new_empty(x.shape[1:], dtype=torch.float32)
    )
    h_seq = empty_steps(x, torch.float32) if keep_h else None
    hard = reset == "hard"
    if n and steps:
        _launch(
            _kernels()[0],
            x,
            n,
            x,
            spikes,
            h_seq if keep_h else v,
            v,
            n,
            float(threshold),
            float(tau) if tau is not None else 1.0,
            float(v_reset),
            float(v_reset) if hard else 0.0,
            LIF=tau is not None,
            HARD=hard,
            DECAY_INPUT=bool(decay_input),
            KEEP_H=keep_h,
            STEPS=steps,
            BLOCK=BLOCK,
        )
    else:
        v.fill_(float(v_reset) if hard else 0.0)
    return spikes, v, h_seq


_SURROGATES = {atan_grad: 0, sigmoid_grad: 1, rectangular_grad: 2}  # ids in _triton_kernels


def _slope_constants(slope_fn, width: float) -> tuple[int, float, float]:
    """``(id, scale, param)`` of a surrogate derivative for the backward kernel."""
    if slope_fn not in _SURROGATES:
        raise ValueError(f"the triton neuron kernel has no surrogate {slope_fn!r}")
    kind = _SURROGATES[slope_fn]
    if kind == 0:  # atan: alpha/2 / (1 + (pi/2 alpha u)^2)
        return kind, width / 2, math.pi / 2 * width
    if kind == 1:  # sigmoid: alpha s (1 - s)
        return kind, 1.0, width
    return kind, 1.0 / width, width / 2  # rectangular: 1/width where |u| < width/2


def backward(
    h_seq: torch.Tensor,
    grad_spikes: torch.Tensor,
    threshold: float,
    slope_fn,
    width: float,
    tau: float | None,
    reset: str,
    v_reset: float,
    detach_reset: bool,
    decay_input: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``dL/dx_seq [T, ...]`` in ``dtype`` from the float32 pre-spike membranes ``h_seq`` and
    ``dL/dspikes`` (any float dtype and layout), laid out as ``h_seq``; ``slope_fn`` is one of
    the surrogate derivatives of :mod:`sddpm.snn.surrogate` at shape parameter ``width``."""
    kind, scale, param = _slope_constants(slope_fn, width)
    if tau is None:
        a, b = 1.0, 1.0
    else:
        a, b = 1.0 - 1.0 / tau, (1.0 / tau if decay_input else 1.0)
    grad_spikes = in_step_layout(grad_spikes, like=h_seq)  # walked in h_seq's order
    steps, n = h_seq.shape[0], h_seq[0].numel()
    grad_x = empty_steps(h_seq, dtype)
    if n and steps:
        _launch(
            _kernels()[1],
            h_seq,
            n,
            h_seq,
            grad_spikes,
            grad_x,
            n,
            (steps - 1) * n,
            float(threshold),
            float(v_reset),
            a,
            b,
            scale,
            param,
            HARD=reset == "hard",
            DETACH=bool(detach_reset),
            SURROGATE=kind,
            STEPS=steps,
            BLOCK=BLOCK,
        )
    return grad_x
