"""The Triton neuron kernels against the eager loops, run on the CPU by Triton's interpreter.

Spikes and the last membrane must be bit-for-bit the eager ones (the kernels do the same float
operations); gradients agree to float rounding. Sizes are odd and small (the interpreter is
slow): several programs of a small block, the last one partly masked.
"""

import pytest
import torch

from sddpm.snn import (
    NeuronKernelError,
    SpikingNeuron,
    Surrogate,
    fused,
    set_neuron_kernel,
    triton_neuron,
)

pytest.importorskip("triton")

BLOCK = 64  # 3 * 67 = 201 neurons per step: four programs, the last one 9 wide


@pytest.fixture(autouse=True)
def small_block(monkeypatch, triton_interpreter):
    monkeypatch.setattr(triton_neuron, "BLOCK", BLOCK)


def run(neuron: SpikingNeuron, x: torch.Tensor, w: torch.Tensor):
    """Spikes, last membrane, input gradient of ``(spikes * w).sum()``, and no-grad spikes."""
    xg = x.clone().requires_grad_()
    out = neuron(xg)
    last_v = neuron.last_v
    (grad,) = torch.autograd.grad((out * w).sum(), xg)
    with torch.no_grad():
        plain = neuron(x)
    return out, last_v, grad, plain


def test_triton_kernel_equals_eager_for_every_variant(neuron_variant):
    torch.manual_seed(0)
    x = torch.randn(5, 3, 67) * 1.5
    w = torch.randn(5, 3, 67)
    ref, v_ref, g_ref, _ = run(neuron_variant(kernel="eager"), x, w)
    out, v, g, plain = run(neuron_variant(kernel="triton"), x, w)
    assert 0 < ref.mean() < 1  # some spikes, some silence
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    assert torch.equal(plain, ref)
    assert v.dtype == torch.float32 and torch.equal(v, v_ref)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "settings",
    [
        {},  # the published neuron: IF, hard reset to 0, ATan
        {"tau": 3.0, "reset": "soft", "surrogate": Surrogate("sigmoid", 3.0)},
        {"tau": 2.0, "v_reset": 0.1, "decay_input": False, "surrogate": Surrogate("rectangular")},
    ],
)
def test_triton_kernel_takes_16_bit_input_with_a_float32_membrane(settings, dtype):
    """Spikes in the input's dtype, exactly eager's (both integrate 16-bit input in float32);
    the gradient in the input's dtype, within one rounding of it."""
    torch.manual_seed(1)
    x = (torch.randn(4, 2, 7, 9) * 1.5).to(dtype)
    w = torch.randn(4, 2, 7, 9).to(dtype)
    ref, v_ref, g_ref, _ = run(SpikingNeuron(threshold=0.9, kernel="eager", **settings), x, w)
    out, v, g, plain = run(SpikingNeuron(threshold=0.9, kernel="triton", **settings), x, w)
    assert 0 < ref.float().mean() < 1
    assert out.dtype == dtype and torch.equal(out, ref) and torch.equal(plain, ref)
    assert v.dtype == torch.float32 and torch.equal(v, v_ref)
    assert g.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(g.float(), g_ref.float(), rtol=2 * eps, atol=2 * eps)


@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (2, 63), (2, 64), (2, 65), (1, 2, 3, 5)])
def test_triton_kernel_on_sizes_around_the_block(shape):
    torch.manual_seed(2)
    x = torch.randn(*shape) * 2
    w = torch.randn(*shape)
    ref, v_ref, g_ref, _ = run(SpikingNeuron(kernel="eager"), x, w)
    out, v, g, _ = run(SpikingNeuron(kernel="triton"), x, w)
    assert torch.equal(out, ref) and torch.equal(v, v_ref)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


def test_saved_membranes_are_float32_and_all_that_backward_keeps():
    """The forward keeps the pre-spike membranes, float32 for 16-bit input, and nothing else
    (spikes are recomputed from them as ``h >= threshold``)."""
    x = (torch.randn(3, 2, 40) * 1.5).to(torch.bfloat16).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        SpikingNeuron(kernel="triton")(x)
    assert [(t.dtype, tuple(t.shape)) for t in saved] == [(torch.float32, (3, 2, 40))]
    h = saved[0]
    v = torch.zeros(2, 40)
    for t in range(3):  # IF, hard reset to 0: h_t = v_{t-1} + x_t
        torch.testing.assert_close(h[t], v + x[t].float(), rtol=0, atol=0)
        v = torch.where(h[t] >= 1.0, 0.0, h[t])


def test_auto_runs_eager_on_cpu_and_triton_on_cuda(monkeypatch):
    x = torch.randn(2, 5)
    assert fused.resolve_kernel("auto", x) == "eager"
    assert SpikingNeuron().kernel == "auto"
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert fused.resolve_kernel("auto", x) == "triton"
    assert fused.resolve_kernel("auto", x.double()) == "eager"  # float64: eager
    monkeypatch.setattr(triton_neuron, "available", lambda: False)
    assert fused.resolve_kernel("auto", x) == "eager"


def test_triton_kernel_refuses_what_it_cannot_run(monkeypatch):
    with pytest.raises(NeuronKernelError, match="float64.*'eager'"):
        SpikingNeuron(kernel="triton")(torch.randn(2, 3, dtype=torch.float64))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(NeuronKernelError, match="TRITON_INTERPRET=1"):
        SpikingNeuron(kernel="triton")(torch.randn(2, 3))
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), SpikingNeuron())
    with pytest.raises(NeuronKernelError, match="TRITON_INTERPRET=1"):
        set_neuron_kernel(model, "triton", device="cpu")  # up front, for the device given


@pytest.mark.parametrize("reset", ["hard", "soft"])
def test_triton_kernel_fires_at_exactly_the_threshold(reset):
    """Input in quarters reaches threshold 1 exactly (no rounding): ``h >= threshold`` fires."""
    torch.manual_seed(3)
    x = torch.randint(-2, 5, (6, 3, 31)).float() / 4
    w = torch.randn(6, 3, 31)
    ref, v_ref, g_ref, _ = run(SpikingNeuron(reset=reset, kernel="eager"), x, w)
    out, v, g, _ = run(SpikingNeuron(reset=reset, kernel="triton"), x, w)
    h_hits = (x.cumsum(0)[0] == 1.0).sum()  # first-step membranes at the threshold
    assert h_hits > 0
    assert torch.equal(out, ref) and torch.equal(v, v_ref)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
