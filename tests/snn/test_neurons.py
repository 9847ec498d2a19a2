"""Hand-computed membrane and spike trajectories, surrogate gradients vs their formulas."""

import math

import pytest
import torch

from sddpm.snn import (
    SpikingNeuron,
    Surrogate,
    get_thresholds,
    neuron_step,
    override_threshold,
    set_threshold,
)


def run(neuron: SpikingNeuron, xs: list[float]) -> tuple[list[float], list[float]]:
    """Spikes and the membrane after reset, step by step, for a single neuron."""
    v = torch.tensor([neuron.v_reset if neuron.reset == "hard" else 0.0])
    spikes, vs = [], []
    for x in xs:
        s, v = neuron_step(
            v,
            torch.tensor([x]),
            threshold=neuron.threshold,
            surrogate=neuron.surrogate,
            tau=neuron.tau,
            reset=neuron.reset,
            v_reset=neuron.v_reset,
        )
        spikes.append(s.item())
        vs.append(v.item())
    # the multi-step module must agree with the step function
    seq = neuron(torch.tensor(xs).view(-1, 1))
    assert seq.view(-1).tolist() == spikes
    assert neuron.last_v.item() == pytest.approx(vs[-1])
    return spikes, vs


def test_if_hard_reset_trajectory():
    # v: 0.6 -> 1.2 fires, reset 0 -> 0.5 -> 1.0 fires at exactly the threshold -> 0 -> -0.3
    spikes, vs = run(SpikingNeuron(), [0.6, 0.6, 0.5, 0.5, -0.3])
    assert spikes == [0, 1, 0, 1, 0]
    assert vs == pytest.approx([0.6, 0.0, 0.5, 0.0, -0.3])


def test_if_hard_reset_to_nonzero_value():
    spikes, vs = run(SpikingNeuron(threshold=1.0, v_reset=-0.5), [1.0, 1.6, 0.2])
    # start at -0.5: 0.5 (no spike), 2.1 spike -> -0.5, -0.3
    assert spikes == [0, 1, 0]
    assert vs == pytest.approx([0.5, -0.5, -0.3])


def test_if_soft_reset_trajectory():
    spikes, vs = run(SpikingNeuron(reset="soft"), [0.7, 0.7, 1.5, 0.1])
    # 0.7; 1.4 fires -> 0.4; 1.9 fires -> 0.9; 1.0 fires -> 0.0
    assert spikes == [0, 1, 1, 1]
    assert vs == pytest.approx([0.7, 0.4, 0.9, 0.0])


def test_lif_hard_reset_trajectory():
    # tau 2, decay_input: h = v + (x - v) / 2
    spikes, vs = run(SpikingNeuron(tau=2.0), [1.0, 1.0, 3.0, 0.0])
    # 0.5; 0.75; 0.75 + (3 - 0.75)/2 = 1.875 fires -> 0; 0
    assert spikes == [0, 0, 1, 0]
    assert vs == pytest.approx([0.5, 0.75, 0.0, 0.0])


def test_lif_soft_reset_trajectory():
    spikes, vs = run(SpikingNeuron(tau=2.0, reset="soft"), [2.0, 2.0, 0.0])
    # 1.0 fires -> 0.0; 1.0 fires -> 0.0; 0.0
    assert spikes == [1, 1, 0]
    assert vs == pytest.approx([0.0, 0.0, 0.0])
    spikes, vs = run(SpikingNeuron(tau=4.0, reset="soft"), [3.0, 3.0])
    # 0.75; 0.75 + (3 - 0.75)/4 = 1.3125 fires -> 0.3125
    assert spikes == [0, 1]
    assert vs == pytest.approx([0.75, 0.3125])


def test_lif_without_input_decay():
    s, v = neuron_step(
        torch.tensor([0.8]),
        torch.tensor([0.1]),
        threshold=1.0,
        surrogate=Surrogate(),
        tau=2.0,
        decay_input=False,
    )
    assert s.item() == 0 and v.item() == pytest.approx(0.8 - 0.4 + 0.1)


def test_spikes_are_exactly_binary_and_state_never_leaks():
    n = SpikingNeuron()
    x = torch.randn(4, 3, 5, 5) * 2
    s1 = n(x)
    assert set(s1.unique().tolist()) <= {0.0, 1.0}
    n(torch.randn(4, 3, 5, 5) * 5)  # another batch in between
    assert torch.equal(n(x), s1)
    assert "last_v" not in n.state_dict() and len(n.state_dict()) == 0


@pytest.mark.parametrize(
    "kind,width,formula",
    [
        ("atan", 2.0, lambda u, a: a / 2 / (1 + (math.pi / 2 * a * u) ** 2)),
        ("atan", 3.0, lambda u, a: a / 2 / (1 + (math.pi / 2 * a * u) ** 2)),
        ("sigmoid", 4.0, lambda u, a: a * torch.sigmoid(a * u) * (1 - torch.sigmoid(a * u))),
        ("rectangular", 1.0, lambda u, w: (u.abs() < w / 2).to(u.dtype) / w),
        ("rectangular", 0.5, lambda u, w: (u.abs() < w / 2).to(u.dtype) / w),
    ],
)
def test_surrogate_gradient_equals_formula(kind, width, formula):
    u = torch.linspace(-2, 2, 41, dtype=torch.float64).requires_grad_()
    sg = Surrogate(kind, width)
    s = sg(u)
    assert torch.equal(s.detach(), (u >= 0).double())
    g = torch.linspace(0.5, 1.5, 41, dtype=torch.float64)
    s.backward(g)
    torch.testing.assert_close(u.grad, g * formula(u.detach(), width), rtol=1e-12, atol=0)
    torch.testing.assert_close(sg.grad(u.detach()), formula(u.detach(), width))


def test_atan_default_alpha_is_published_value():
    assert Surrogate().resolved_width == 2.0
    u = torch.zeros(1, requires_grad=True)
    Surrogate()(u).sum().backward()
    assert u.grad.item() == pytest.approx(1.0)  # alpha / 2 at u = 0


def test_hard_reset_gradient_flows_through_spike_unless_detached():
    # v_next = h * (1 - s): d v_next / d x = (1 - s) - h * ds/du
    for detach, expected in [(False, (1 - 1) - 1.2 * 1 / (1 + (math.pi * 0.2) ** 2)), (True, 0.0)]:
        x = torch.tensor([1.2], requires_grad=True)
        _, v = neuron_step(
            torch.zeros(1), x, threshold=1.0, surrogate=Surrogate(), detach_reset=detach
        )
        v.sum().backward()
        assert x.grad.item() == pytest.approx(expected)


def test_threshold_helpers_set_and_restore():
    model = torch.nn.Sequential(SpikingNeuron(), torch.nn.Linear(2, 2), SpikingNeuron(0.5))
    assert get_thresholds(model) == [1.0, 0.5]
    with override_threshold(model, 0.997):
        assert get_thresholds(model) == [0.997, 0.997]
    assert get_thresholds(model) == [1.0, 0.5]
    with pytest.raises(RuntimeError, match="boom"), override_threshold(model, 2.0):
        raise RuntimeError("boom")
    assert get_thresholds(model) == [1.0, 0.5]
    assert set_threshold(model, 1.1) == [1.0, 0.5]
    assert get_thresholds(model) == [1.1, 1.1]
    with pytest.raises(ValueError, match="> 0"):
        set_threshold(model, 0.0)
    with pytest.raises(ValueError, match="no spiking neurons"):
        set_threshold(torch.nn.Linear(2, 2), 1.0)


def test_bad_neuron_settings_are_refused():
    with pytest.raises(ValueError, match="reset"):
        SpikingNeuron(reset="sideways")
    with pytest.raises(ValueError, match="surrogate"):
        Surrogate("tanh")
    with pytest.raises(ValueError, match="tau"):
        SpikingNeuron(tau=0.5)


def test_fused_neuron_equals_step_by_step_autograd(neuron_variant):
    torch.manual_seed(0)
    neuron = neuron_variant(kernel="eager")
    x = (torch.randn(6, 3, 17, dtype=torch.float64) * 1.5).requires_grad_()
    w = torch.randn(6, 3, 17, dtype=torch.float64)
    neuron.fused = False
    ref = neuron(x)
    (gx_ref,) = torch.autograd.grad((ref * w).sum(), x)
    v_ref = neuron.last_v
    neuron.fused = True
    out = neuron(x)
    (gx,) = torch.autograd.grad((out * w).sum(), x)
    assert torch.equal(out, ref)
    with torch.no_grad():  # the in-place loop used without gradients
        assert torch.equal(neuron(x), ref)
        torch.testing.assert_close(neuron.last_v, v_ref, rtol=1e-12, atol=1e-12)
    neuron(x)
    assert 0 < out.mean() < 1  # some spikes, some silence: the test means something
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(neuron.last_v, v_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "settings",
    [
        {},  # the published neuron: IF, hard reset to 0, ATan
        {"tau": 2.0, "reset": "soft", "detach_reset": True, "surrogate": Surrogate("sigmoid")},
    ],
)
def test_compiled_neuron_kernel_equals_eager(settings):
    """``kernel="compiled"`` runs the same loops through torch.compile (C++ here, Triton on
    GPUs): same spikes, same last membrane, same gradients, for any shape and threshold."""
    torch.manual_seed(0)
    eager = SpikingNeuron(threshold=0.7, **settings)
    compiled = SpikingNeuron(threshold=0.7, kernel="compiled", **settings)
    for shape in [(4, 3, 5, 6), (2, 7, 11)]:
        x = (torch.randn(*shape) * 1.5).requires_grad_()
        w = torch.randn(*shape)
        ref = eager(x)
        (gx_ref,) = torch.autograd.grad((ref * w).sum(), x)
        out = compiled(x)
        (gx,) = torch.autograd.grad((out * w).sum(), x)
        assert torch.equal(out, ref)
        assert 0 < out.mean() < 1
        torch.testing.assert_close(compiled.last_v, eager.last_v, rtol=0, atol=1e-6)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            assert torch.equal(compiled(x), ref)
    with pytest.raises(ValueError, match="kernel"):
        SpikingNeuron(kernel="cuda")


def test_16_bit_input_is_integrated_in_float32():
    """Under bf16 autocast the membrane still integrates in float32: a threshold moved by
    0.3 % (threshold guidance) changes spikes that a bf16 membrane could not tell apart."""
    torch.manual_seed(0)
    x = (torch.randn(4, 2, 500) * 0.6).to(torch.bfloat16)
    for threshold in (1.0, 0.997):
        neuron = SpikingNeuron(threshold=threshold)
        ref = neuron(x.float())
        xg = x.clone().requires_grad_()
        out = neuron(xg)
        assert out.dtype == torch.bfloat16
        assert torch.equal(out.float(), ref)
        (grad,) = torch.autograd.grad(out.float().sum(), xg)
        assert grad.dtype == torch.bfloat16
        xf = x.float().requires_grad_()
        (grad_ref,) = torch.autograd.grad(neuron(xf).sum(), xf)
        torch.testing.assert_close(grad.float(), grad_ref.to(torch.bfloat16).float())
    low, high = SpikingNeuron(threshold=0.997)(x), SpikingNeuron(threshold=1.0)(x)
    assert (low != high).any()  # the 0.3 % move is visible


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_traced_neuron_layer_trains_as_in_eager_mode(neuron_variant, dtype):
    """Under ``torch.compile`` (Dynamo's tracing, run by the eager backend) the neuron layer
    gives eager mode's spikes and input gradients. Torch 2.11's Dynamo gave a float32 layer a
    zero gradient: its autograd Function returned the spikes through a no-op ``.to``, and an
    output returned by an aliasing op loses its gradient there."""
    torch.manual_seed(0)
    x = (torch.randn(4, 2, 3, 5, 5) * 0.8 + 0.45).to(dtype)
    upstream = torch.randn(x.shape)
    neuron = neuron_variant()

    def loss(x):
        return (neuron(x).float() * upstream).sum()

    results = []
    for fn in (loss, torch.compile(loss, backend="eager")):
        torch._dynamo.reset()
        xi = x.clone().requires_grad_()
        value = fn(xi)
        value.backward()
        results.append((value.detach(), xi.grad))
    (eager_loss, eager_grad), (traced_loss, traced_grad) = results
    assert float(eager_grad.float().abs().max()) > 0
    torch.testing.assert_close(traced_loss, eager_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(traced_grad, eager_grad, rtol=1e-5, atol=1e-6)
