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
