"""The Triton neuron kernels compiled for NVIDIA GPUs, on the CPU: Triton's NVIDIA backend builds
PTX and cubins (with the ptxas it ships) without a GPU. The interpreter tests
(``test_triton_neuron.py``) check what the kernels compute; these check what only the compiler
sees: that every variant lowers for the GPUs users train on (A100 and H100/H200), that the LIF
division stays IEEE division on the GPU (``div.rn.f32``: the reason the kernels call
``tl.math.div_rn``), that no multiply-add is fused, and that offsets are 64-bit."""

from __future__ import annotations

import itertools
import re

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sddpm.snn import _triton_kernels, triton_neuron  # noqa: E402

if "nvidia" not in getattr(triton.backends, "backends", {}):
    pytest.skip("this triton has no NVIDIA backend", allow_module_level=True)

ARCHS = {"A100": 80, "H100/H200": 90}
DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
FLOAT32_POINTERS = ("h_ptr", "v_ptr")  # the membranes: float32 whatever the input's dtype
INTEGERS = ("n", "last")  # as the launcher passes them (i32 below 2^31 elements)


@pytest.fixture(autouse=True)
def _compiled_mode(monkeypatch, tmp_path):
    """Compiled (not interpreted) kernels, built into a fresh cache."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))


def compile_kernel(which: str, dtype: str, arch: int, **constexprs):
    """The ``forward`` or ``backward`` kernel compiled for ``sm_<arch>`` with pointers to
    ``dtype`` (``bf16``, ``fp16``, ``fp32``) for the input/gradient tensors."""
    forward, backward = _triton_kernels.kernels(interpret=False)
    fn = forward if which == "forward" else backward
    signature = {}
    for p in fn.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            signature[p.name] = "*fp32" if p.name in FLOAT32_POINTERS else f"*{dtype}"
        elif p.name in INTEGERS:
            signature[p.name] = "i32"
        else:
            signature[p.name] = "fp32"
    constexprs = {"STEPS": 4, "BLOCK": 1024, **constexprs}
    assert {n for n, t in signature.items() if t == "constexpr"} == set(constexprs)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    options = triton_neuron.COMPILE_OPTIONS  # what every launch passes
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


FORWARD_VARIANTS = [
    dict(LIF=lif, HARD=hard, DECAY_INPUT=decay, KEEP_H=keep)
    for lif, hard, decay, keep in itertools.product((False, True), repeat=4)
    if lif or not decay  # DECAY_INPUT only matters for LIF
]
BACKWARD_VARIANTS = [
    dict(HARD=hard, DETACH=detach, SURROGATE=surrogate)
    for hard, detach, surrogate in itertools.product(
        (False, True),
        (False, True),
        (_triton_kernels.ATAN, _triton_kernels.SIGMOID, _triton_kernels.RECTANGULAR),
    )
]


def _divisions(ptx: str) -> set[str]:
    return set(re.findall(r"\bdiv\.[a-z0-9.]*f32\b", ptx))


@pytest.mark.parametrize("variant", FORWARD_VARIANTS, ids=lambda v: ",".join(k for k in v if v[k]))
def test_every_forward_variant_compiles_for_an_h100(variant):
    kernel = compile_kernel("forward", "bf16", ARCHS["H100/H200"], **variant)
    assert kernel.asm["cubin"]
    # IEEE division for the LIF leak, never the approximate division of a plain '/'
    assert _divisions(kernel.asm["ptx"]) == ({"div.rn.f32"} if variant["LIF"] else set())
    # float32 membrane: the bf16 input widened on load, the membranes stored as 32-bit words,
    # the spikes as 16-bit ones (0 and 1 are exact in bf16: selected, not converted)
    ptx = kernel.asm["ptx"]
    assert "cvt.f32.bf16" in ptx and "st.global.b32" in ptx and "st.global.b16" in ptx


@pytest.mark.parametrize("variant", BACKWARD_VARIANTS, ids=str)
def test_every_backward_variant_compiles_for_an_h100(variant):
    kernel = compile_kernel("backward", "bf16", ARCHS["H100/H200"], **variant)
    assert kernel.asm["cubin"]
    # float32 arithmetic: the bf16 upstream gradient widened, dL/dx narrowed once per store
    assert "cvt.f32.bf16" in kernel.asm["ptx"] and "cvt.rn.bf16.f32" in kernel.asm["ptx"]
    # no fused multiply-add: each product rounded as the eager loop rounds it
    assert not re.search(r"\bfma\.", kernel.asm["ptx"])


@pytest.mark.parametrize("arch", ARCHS.values(), ids=ARCHS.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_both_kernels_compile_for_each_input_dtype_and_gpu(dtype, arch):
    fwd = compile_kernel("forward", dtype, arch, LIF=True, HARD=True, DECAY_INPUT=True, KEEP_H=True)
    bwd = compile_kernel("backward", dtype, arch, HARD=True, DETACH=False, SURROGATE=0)
    assert fwd.asm["cubin"] and bwd.asm["cubin"]
    assert f".target sm_{arch}" in fwd.asm["ptx"]


def test_offsets_are_64_bit():
    """The program's first neuron, ``program_id * BLOCK``, is computed in int64: a step of more
    than 2^31 neurons (a large batch of large images) would wrap in int32."""
    kernel = compile_kernel("forward", "bf16", ARCHS["H100/H200"], **FORWARD_VARIANTS[0])
    ttir = kernel.asm["ttir"]
    pid = re.search(r"(%\S+) = tt\.get_program_id x : i32", ttir)
    assert pid, ttir[:2000]
    assert re.search(rf"arith\.extsi {re.escape(pid.group(1))} : i32 to i64", ttir), ttir[:2000]
