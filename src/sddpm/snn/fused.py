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

The same forward and backward also exist as two Triton kernels (:mod:`.triton_neuron`);
:data:`KERNELS` lists how a call can run, and :func:`resolve_kernel` picks one per call.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys

import torch

from . import triton_neuron
from .layout import empty_steps
from .surrogate import Surrogate


def _fire(h: torch.Tensor, threshold: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Float spikes ``h >= threshold`` (a float ``out=`` comparison: far cheaper on CPUs than
    making a bool mask and converting it). Traced by ``torch.compile``, a plain comparison:
    Dynamo refuses ``out=`` into a tensor that is not contiguous (a channels-last map)."""
    if out is None and torch.compiler.is_compiling():
        return torch.ge(h, threshold).to(h.dtype)
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


def _charge(v, x, tau, decay_input, v_rest, out=None):
    """The pre-spike membrane ``h`` from the membrane ``v`` and the input ``x`` (into ``out``)."""
    if tau is None:
        return torch.add(v, x, out=out)
    if decay_input:  # h = v + (x - (v - v_rest)) / tau
        return torch.add(v, (x - v + v_rest) / tau, out=out)
    return torch.add(v - (v - v_rest) / tau, x, out=out)  # h = v - (v - v_rest) / tau + x


def _forward_loop(x_seq, threshold, tau, reset, v_reset, decay_input, keep_h):
    """Float spikes, last membrane, and the pre-spike membranes if ``keep_h``."""
    v_rest = v_reset if reset == "hard" else 0.0
    v = torch.full_like(x_seq[0], v_rest)
    h_seq = empty_steps(x_seq) if keep_h else None
    spikes = empty_steps(x_seq)
    for t in range(x_seq.shape[0]):
        # without h_seq, charge the membrane in place
        h = _charge(v, x_seq[t], tau, decay_input, v_rest, out=h_seq[t] if keep_h else v)
        s = _fire(h, threshold, out=spikes[t])
        v = _reset(h, s, threshold, reset, v_reset, in_place=not keep_h)
    return spikes, v, h_seq


def _traced_forward_loop(x_seq, threshold, tau, reset, v_reset, decay_input, keep_h):
    """:func:`_forward_loop`'s float operations without ``out=``: what ``torch.compile``
    traces (the ``compiled`` kernel, and every kernel under an outer compile). Dynamo refuses
    ``out=`` into a tensor that is not contiguous, such as one step of a channels-last map, and
    breaks the graph at every neuron; copying each step into its slot keeps the layout."""
    v_rest = v_reset if reset == "hard" else 0.0
    v = torch.full_like(x_seq[0], v_rest)
    h_seq = empty_steps(x_seq) if keep_h else None
    spikes = empty_steps(x_seq)
    for t in range(x_seq.shape[0]):
        h = _charge(v, x_seq[t], tau, decay_input, v_rest)
        s = spikes[t].copy_(_fire(h, threshold))
        if keep_h:
            h_seq[t].copy_(h)
        v = _reset(h, s, threshold, reset, v_reset, in_place=False)
    return spikes, v, h_seq


KERNELS = ("auto", "eager", "compiled", "triton")
"""How the step loops run: ``eager`` (tensor operations from Python), ``compiled``
(``torch.compile`` of the same loops: one generated kernel per loop, C++ on CPUs and Triton on
GPUs; compiled once per process and reused for every shape), ``triton`` (two hand-written Triton
kernels, :mod:`sddpm.snn.triton_neuron`: CUDA tensors, or CPU tensors under Triton's
interpreter) or ``auto`` (the default: ``triton`` for CUDA tensors when Triton is importable,
else ``eager``; decided per call from the input's device). All give the same spikes. Under an
outer ``torch.compile`` every kernel runs the eager loops, which the outer compile turns into
its own kernels."""

_COMPILED: dict = {}
_TRACED = {_forward_loop: _traced_forward_loop}  # what torch.compile traces in place of a loop


class NeuronKernelError(ValueError):
    """A neuron kernel that cannot run here; the message names the fix."""


def check_kernel(kernel: str) -> str:
    """``kernel`` if it is one of :data:`KERNELS`, else a ``ValueError`` naming the choices."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown neuron kernel {kernel!r}; choose one of {KERNELS}")
    return kernel


@functools.lru_cache(maxsize=8)
def _find_cxx(candidates: tuple, path: str) -> str | None:
    """The first of ``candidates`` that is a program on ``path`` (cached: called per step)."""
    for cxx in candidates:
        found = cxx is not None and shutil.which(cxx, path=path)
        if found:
            return found
    return None


def _cxx_candidates() -> tuple:
    """The C++ compilers inductor would try, in its order (``torch._inductor.config.cpp.cxx``,
    whose default holds ``$CXX`` or g++)."""
    if sys.platform == "win32":
        return (os.environ.get("CXX", "cl"),)
    from torch._inductor import config

    cxx = config.cpp.cxx
    return tuple(cxx) if isinstance(cxx, (list, tuple)) else (cxx,)


def check_kernel_available(kernel: str, device_type: str | None = None) -> str:
    """``kernel`` if it can run tensors of ``device_type`` here (``None``: checks that hold on
    any device), else a :class:`NeuronKernelError` naming the fix. Cheap: nothing is compiled.

    ``triton`` needs Triton importable, and for non-CUDA tensors its interpreter on;
    ``compiled`` needs a C++ compiler on PATH for CPU tensors and Triton for CUDA tensors."""
    check_kernel(kernel)
    if kernel == "triton":
        if not triton_neuron.available():
            raise NeuronKernelError(
                "neuron kernel 'triton' needs Triton, which cannot be imported here: "
                "pip install triton, or use neuron kernel 'auto' or 'eager'"
            )
        if device_type not in (None, "cuda") and not triton_neuron.interpreting():
            raise NeuronKernelError(
                f"neuron kernel 'triton' runs {device_type} tensors only under Triton's "
                "interpreter: set TRITON_INTERPRET=1 in the environment (slow; for tests), or "
                "use neuron kernel 'auto' or 'eager'"
            )
    elif kernel == "compiled":
        if device_type == "cpu":
            candidates = _cxx_candidates()
            if _find_cxx(candidates, os.environ.get("PATH", os.defpath)) is None:
                names = ", ".join(str(c) for c in candidates if c is not None) or "none set"
                raise NeuronKernelError(
                    "neuron kernel 'compiled' builds C++ for CPU tensors (torch.compile), but no "
                    f"C++ compiler is on PATH (tried: {names}): install one (e.g. g++) or set "
                    "CXX to one, or use neuron kernel 'eager'"
                )
        elif device_type == "cuda" and not triton_neuron.available():
            raise NeuronKernelError(
                "neuron kernel 'compiled' generates Triton code for CUDA tensors, but Triton "
                "cannot be imported here: pip install triton, or use neuron kernel 'eager'"
            )
    return kernel


def resolve_kernel(kernel: str, x: torch.Tensor) -> str:
    """The kernel that runs ``x``: ``eager``, ``compiled`` or ``triton`` (``auto`` decided from
    ``x``'s device and dtype); a :class:`NeuronKernelError` if ``kernel`` cannot run it."""
    if kernel == "eager" or torch.compiler.is_compiling():  # an outer compile traces the loops
        return "eager"
    if kernel == "auto":
        triton_ok = x.is_cuda and x.dtype in triton_neuron.DTYPES and triton_neuron.available()
        return "triton" if triton_ok else "eager"
    if kernel == "triton" and x.dtype not in triton_neuron.DTYPES:
        raise NeuronKernelError(
            f"neuron kernel 'triton' takes {[str(d) for d in triton_neuron.DTYPES]} input, got "
            f"{x.dtype}: use neuron kernel 'auto' or 'eager'"
        )
    return check_kernel_available(kernel, x.device.type)


def _loop(fn, kernel: str):
    """``fn`` itself, or its compiled version for ``kernel="compiled"`` (made once). Traced, the
    forward loop is :func:`_traced_forward_loop` (the same arithmetic)."""
    traced = _TRACED.get(fn, fn)
    if kernel != "compiled":
        return traced if torch.compiler.is_compiling() else fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(traced, dynamic=True)
    return _COMPILED[fn]


def _run_forward(kernel: str, x_seq: torch.Tensor, *settings, keep_h: bool):
    """Spikes in ``x_seq``'s dtype, the last membrane and (if ``keep_h``) the pre-spike
    membranes, by the resolved ``kernel``; ``settings`` are threshold, tau, reset, v_reset,
    decay_input."""
    if kernel == "triton":
        return triton_neuron.forward(x_seq, *settings, keep_h)
    spikes, v, h_seq = _loop(_forward_loop, kernel)(_membrane_dtype(x_seq), *settings, keep_h)
    if spikes.dtype != x_seq.dtype:  # never a no-op .to: an output that aliases a tensor
        spikes = spikes.to(x_seq.dtype)  # loses its gradient under Dynamo 2.11
    return spikes, v, h_seq


class MultiStepNeuronFunction(torch.autograd.Function):
    """``x_seq [T, ...] -> (spikes [T, ...], last membrane [...])`` for an IF/LIF neuron whose
    membrane starts at rest; the last membrane carries no gradient. ``kernel`` is resolved
    (``eager``, ``compiled`` or ``triton``).

    Elementwise, so autocast leaves it alone as it leaves built-in elementwise ops: spikes and
    the input gradient have the input's dtype (the membrane is float32 for 16-bit input)."""

    @staticmethod
    def forward(
        ctx, x_seq, threshold, surrogate, tau, reset, v_reset, detach_reset, decay_input, kernel
    ):
        spikes, v, h_seq = _run_forward(
            kernel, x_seq, threshold, tau, reset, v_reset, decay_input, keep_h=True
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
        return spikes, v

    @staticmethod
    def backward(ctx, grad_spikes, _grad_last_v):
        (h_seq,) = ctx.saved_tensors
        if ctx.kernel == "triton":
            grad_x = triton_neuron.backward(h_seq, grad_spikes, *ctx.settings, ctx.input_dtype)
        else:
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
    kernel: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spikes ``[T, ...]`` of a neuron layer driven by ``x_seq [T, ...]`` (one autograd node)
    and the membrane after the last step; ``kernel`` is one of :data:`KERNELS`. Spikes have
    the input's dtype; 16-bit input is integrated in float32."""
    kernel = resolve_kernel(kernel, x_seq)
    if torch.is_grad_enabled() and x_seq.requires_grad:
        return MultiStepNeuronFunction.apply(
            x_seq, threshold, surrogate, tau, reset, v_reset, detach_reset, decay_input, kernel
        )
    spikes, v, _ = _run_forward(
        kernel, x_seq, threshold, tau, reset, v_reset, decay_input, keep_h=False
    )
    return spikes, v


def _membrane_dtype(x_seq: torch.Tensor) -> torch.Tensor:
    """The input in the precision the membrane integrates in: float32 for 16-bit input (bf16
    autocast), whose 8-bit mantissa could not resolve a threshold moved by 0.3 %. Each step
    keeps its layout (:func:`~sddpm.snn.layout.empty_steps`), also for a broadcast input."""
    if x_seq.dtype in (torch.float16, torch.bfloat16):
        return empty_steps(x_seq, torch.float32).copy_(x_seq)
    return x_seq
