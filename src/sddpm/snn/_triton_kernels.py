"""The Triton kernels of the multi-step IF/LIF neuron (imported only when Triton is used).

Each program owns ``BLOCK`` neurons of the flattened ``[T, N]`` input and loops over the T SNN
steps inside the kernel, so one launch covers the whole sequence and the membrane stays in
registers, in float32 (float64 pointers are never passed). T is a compile-time constant
(``STEPS``; a model has one, so each kernel is built once) and its loop is unrolled: triton
3.6's interpreter cannot loop ``range`` over a run-time scalar under NumPy 2.4 (it converts the
bound with ``int`` of a one-element array).

The functions are decorated when first asked for (:func:`kernels`), so ``TRITON_INTERPRET`` is
read then (triton 3.6 and 3.9 read it through ``triton.knobs`` at each ``triton.jit``). They
call only ``tl`` builtins, never a ``@triton.jit`` library function such as ``tl.zeros``: those
are decorated when triton is imported, and would stay compiled-mode functions inside an
interpreted kernel when the variable is set after ``import triton`` (which
``import torch._inductor`` does).

Only long-stable ``tl`` builtins are used (``program_id``, ``arange``, ``full``,
``load``/``store`` with masks, ``where``, ``abs``, ``exp``, ``math.div_rn``, ``static_range``);
the tests pass under the interpreters of triton 3.6 (torch 2.11) and 3.9 (torch 2.13), and
compile every variant to cubins for sm_80 and sm_90 with both
(``tests/snn/test_triton_compile.py``; Triton's NVIDIA backend needs no GPU for that).

``div_rn`` is IEEE division (``/`` is an approximate division on NVIDIA GPUs), and launches
turn multiply-add fusion off (:data:`sddpm.snn.triton_neuron.COMPILE_OPTIONS`), so that the
float operations are rounded as the eager loop rounds them: a LIF membrane is bit-for-bit the
eager one on the CPU. Offsets are int64: one step of a large batch may hold more than 2^31
neurons, past which int32 offsets would wrap.
"""

from __future__ import annotations

import triton
import triton.language as tl

ATAN, SIGMOID, RECTANGULAR = 0, 1, 2
"""Surrogate ids of the backward kernel's ``SURROGATE`` (see :mod:`sddpm.snn.surrogate`)."""


def neuron_forward(
    x_ptr,
    spike_ptr,
    h_ptr,
    v_ptr,
    n,
    threshold,
    tau,
    v_reset,
    v_rest,
    LIF: tl.constexpr,
    HARD: tl.constexpr,
    DECAY_INPUT: tl.constexpr,
    KEEP_H: tl.constexpr,
    STEPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Spikes ``[T, N]`` (in ``spike_ptr``'s dtype), pre-spike membranes ``h`` ``[T, N]``
    float32 if ``KEEP_H``, and the last membrane ``[N]`` float32, from ``x [T, N]``.

    Charge, fire and reset are those of :func:`sddpm.snn.neuron_step`, in the same order of
    float operations as the eager loop."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # n may pass 2^31
    mask = offs < n
    v = tl.full([BLOCK], 0.0, tl.float32) + v_rest
    x_ptrs = x_ptr + offs
    s_ptrs = spike_ptr + offs
    h_ptrs = h_ptr + offs
    for _ in tl.static_range(STEPS):
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        if LIF:
            if DECAY_INPUT:  # h = v + (x - (v - v_rest)) / tau
                h = v + tl.math.div_rn(x - v + v_rest, tau)
            else:  # h = v - (v - v_rest) / tau + x
                h = v - tl.math.div_rn(v - v_rest, tau) + x
        else:
            h = v + x
        fired = h >= threshold
        tl.store(s_ptrs, fired.to(tl.float32).to(spike_ptr.dtype.element_ty), mask=mask)
        if KEEP_H:
            tl.store(h_ptrs, h, mask=mask)
        if HARD:
            v = tl.where(fired, v_reset, h)
        else:
            v = tl.where(fired, h - threshold, h)
        x_ptrs += n
        s_ptrs += n
        h_ptrs += n
    tl.store(v_ptr + offs, v, mask=mask)


def neuron_backward(
    h_ptr,
    grad_s_ptr,
    grad_x_ptr,
    n,
    last,
    threshold,
    v_reset,
    a,
    b,
    slope_scale,
    slope_param,
    HARD: tl.constexpr,
    DETACH: tl.constexpr,
    SURROGATE: tl.constexpr,
    STEPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``dL/dx [T, N]`` (in ``grad_x_ptr``'s dtype) from the float32 pre-spike membranes
    ``h [T, N]`` and ``dL/dspikes [T, N]``, backwards from step T-1 (offset ``last`` =
    ``(T-1) N``).

    ``G_t = g_t dL/ds_t + c_t G_{t+1}``, ``dL/dx_t = b G_t`` with the surrogate slope ``g_t``
    and ``c_t = a (dr/dh + dr/ds g_t)`` (see :func:`sddpm.snn.fused._backward`). The slope at
    ``u = h - threshold``: atan ``scale / (1 + (param u)^2)`` (scale alpha/2, param pi alpha/2);
    sigmoid ``param s (1 - s)``, ``s = 1 / (1 + exp(-param u))`` (param alpha); rectangular
    ``scale`` where ``|u| < param`` (scale 1/width, param width/2), else 0."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # n may pass 2^31
    mask = offs < n
    grad_next = tl.full([BLOCK], 0.0, tl.float32)
    h_ptrs = h_ptr + last + offs
    gs_ptrs = grad_s_ptr + last + offs
    gx_ptrs = grad_x_ptr + last + offs
    for _ in tl.static_range(STEPS):
        h = tl.load(h_ptrs, mask=mask, other=0.0)
        grad_s = tl.load(gs_ptrs, mask=mask, other=0.0).to(tl.float32)
        u = h - threshold
        if SURROGATE == 0:
            z = slope_param * u
            slope = slope_scale / (1.0 + z * z)
        elif SURROGATE == 1:
            sig = 1.0 / (1.0 + tl.exp(-(slope_param * u)))
            slope = slope_param * sig * (1.0 - sig)
        else:
            slope = tl.where(tl.abs(u) < slope_param, slope_scale, 0.0)
        if HARD:  # r = h (1 - s) + v_reset s
            c = tl.where(h >= threshold, 0.0, 1.0)
            if not DETACH:
                c = c + (v_reset - h) * slope
        else:  # r = h - threshold s
            if DETACH:
                c = tl.full([BLOCK], 1.0, tl.float32)
            else:
                c = 1.0 - threshold * slope
        grad = slope * grad_s + a * c * grad_next
        tl.store(gx_ptrs, (b * grad).to(grad_x_ptr.dtype.element_ty), mask=mask)
        grad_next = grad
        h_ptrs -= n
        gs_ptrs -= n
        gx_ptrs -= n


_JITTED: dict[bool, tuple] = {}


def kernels(interpret: bool) -> tuple:
    """``(forward, backward)`` as Triton kernels; ``interpret`` says whether Triton's
    interpreter is on now (it decides, at decoration, what ``triton.jit`` makes)."""
    if interpret not in _JITTED:
        _JITTED[interpret] = (triton.jit(neuron_forward), triton.jit(neuron_backward))
    return _JITTED[interpret]
