"""SpikeConv2d: the same values and gradients as nn.Conv2d, with the input saved as bool."""

import pytest
import torch

from sddpm.snn import SpikeConv2d


@pytest.mark.parametrize("stride,padding,groups", [(1, 1, 1), (2, 1, 1), (1, 0, 2)])
def test_spike_conv_matches_conv2d(stride, padding, groups):
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(4, 6, 3, stride=stride, padding=padding, groups=groups).double()
    conv = SpikeConv2d(4, 6, 3, stride=stride, padding=padding, groups=groups).double()
    conv.load_state_dict(ref.state_dict())
    spikes = (torch.rand(3, 4, 9, 9, dtype=torch.float64) < 0.3).double().requires_grad_()
    w = torch.randn_like(ref(spikes))
    grads_ref = torch.autograd.grad((ref(spikes) * w).sum(), [spikes, *ref.parameters()])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = conv(spikes)
    grads = torch.autograd.grad((out * w).sum(), [spikes, *conv.parameters()])
    torch.testing.assert_close(out, ref(spikes), rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
    # what the backward pass keeps of the input is one byte per element
    inputs = [t for t in saved if t.shape == spikes.shape]
    assert inputs and all(t.dtype == torch.bool for t in inputs)


def test_compiled_training_of_a_spike_conv():
    """Under torch.compile a spike-fed conv trains as in eager mode, and the traced backward
    has no bool -> uint8 view (torch 2.11's inductor, on the GPU machines, cannot lower it)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    torch.manual_seed(0)
    conv = SpikeConv2d(4, 6, 3, padding=1)
    spikes = (torch.rand(2, 4, 8, 8) < 0.4).float()

    def loss(x):
        return conv(x).square().sum()

    graphs = []

    def keep(gm, _inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    grads = {}
    for name, backend in {
        "eager": None,
        "traced": aot_autograd(fw_compiler=keep, bw_compiler=keep),
        "inductor": "inductor",
    }.items():
        torch._dynamo.reset()
        fn = loss if backend is None else torch.compile(loss, backend=backend)
        x = spikes.clone().requires_grad_()
        conv.zero_grad()
        fn(x).backward()
        grads[name] = (x.grad, conv.weight.grad.clone(), conv.bias.grad.clone())
    views = [n for g in graphs for n in g.graph.nodes if n.target is torch.ops.aten.view.dtype]
    assert len(graphs) >= 2 and views == []  # forward and backward graphs (torch 2.11: 2 each)
    for name in ("traced", "inductor"):
        for got, want in zip(grads[name], grads["eager"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
