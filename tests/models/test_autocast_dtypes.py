"""Autocast discipline, checked on the CPU by the GPU's rules.

cuDNN and cuBLAS refuse a convolution or matmul whose floating-point inputs differ in dtype; the
CPU accepts them. A ``TorchDispatchMode`` sees every aten call after autocast and autograd, so
it can fail a training step on the CPU wherever a GPU would.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sddpm.diffusion import NoiseSchedule, training_loss
from sddpm.models import build_model, preset
from sddpm.models.unet import _batch_norm_repeated

# every aten op a cuDNN/cuBLAS call comes from (convolutions, matmuls, attention)
STRICT_OPS = {
    "convolution",
    "convolution_backward",
    "_convolution",
    "cudnn_convolution",
    "mkldnn_convolution",
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "addbmm",
    "addmv",
    "mv",
    "dot",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_efficient_attention_backward",
    "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_flash_attention_for_cpu_backward",
}


class SameDtypeMode(TorchDispatchMode):
    """Records every strict op whose floating-point tensor inputs have more than one dtype, and
    counts the strict ops seen (so a test can tell that it looked at something)."""

    def __init__(self):
        super().__init__()
        self.mixed: list[str] = []
        self.seen: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in STRICT_OPS:
            self.seen[name] = self.seen.get(name, 0) + 1
            flat, _ = tree_flatten((args, kwargs or {}))
            dtypes = {
                a.dtype for a in flat if isinstance(a, torch.Tensor) and a.is_floating_point()
            }
            if len(dtypes) > 1:
                self.mixed.append(f"{name}{sorted(str(d) for d in dtypes)}")
        return func(*args, **(kwargs or {}))


def tiny(kind):
    return preset("digits", kind).replace(channels=8, diffusion_steps=50, snn_timesteps=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["spiking", "ann"])
def test_autocast_training_step_never_mixes_dtypes_in_a_conv_or_matmul(kind, dtype):
    """Forward, diffusion loss and backward of a training step under CPU autocast: every
    convolution and matmul (and its backward) gets inputs of one dtype, as cuDNN demands."""
    torch.manual_seed(0)
    model = build_model(tiny(kind)).train()
    schedule = NoiseSchedule.linear(T=50)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    mode = SameDtypeMode()
    with mode:
        with torch.autocast("cpu", dtype=dtype):
            loss = training_loss(model, x0, schedule).mean()
        loss.backward()
    assert mode.mixed == []
    assert torch.isfinite(loss)
    # the step really ran convolutions in the low precision, forward and backward
    assert mode.seen.get("convolution", 0) >= 10 and mode.seen.get("convolution_backward", 0) >= 10
    assert all(
        p.grad is not None and p.grad.dtype == torch.float32
        for p in model.parameters()
        if p.requires_grad
    )


def test_spike_conv_follows_autocast_like_conv2d():
    """SpikeConv2d under autocast: output and gradients in the dtypes nn.Conv2d gives them."""
    from sddpm.snn import SpikeConv2d

    torch.manual_seed(0)
    ref = torch.nn.Conv2d(3, 5, 3, padding=1)
    conv = SpikeConv2d(3, 5, 3, padding=1)
    conv.load_state_dict(ref.state_dict())
    for in_dtype in (torch.float32, torch.bfloat16):
        spikes = (torch.rand(2, 3, 6, 6) < 0.4).to(in_dtype).requires_grad_()
        outs, grads = [], []
        for m in (ref, conv):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = m(spikes)
            outs.append(out)
            grads.append(torch.autograd.grad(out.float().square().sum(), [spikes, *m.parameters()]))
        assert outs[1].dtype == outs[0].dtype == torch.bfloat16
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
        for g, g_ref in zip(grads[1], grads[0], strict=True):
            assert g.dtype == g_ref.dtype
            torch.testing.assert_close(g, g_ref)


def test_stem_batchnorm_running_statistics_accumulate_in_float32_under_autocast():
    """``_batch_norm_repeated`` updates running statistics as nn.BatchNorm2d does on the
    repeated batch under the same autocast: from float32 means and variances."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 6, 3, padding=1)
    x = torch.randn(3, 2, 5, 5) * 3 + 1.7
    bn_ref, bn = torch.nn.BatchNorm2d(6), torch.nn.BatchNorm2d(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x) + 5.3  # bf16, with a mean that bf16 resolves to about 2 decimals
        assert y.dtype == torch.bfloat16
        out_ref = bn_ref(y.repeat(4, 1, 1, 1))[: y.shape[0]]
        out = _batch_norm_repeated(bn, y, 4)
    assert out.dtype == out_ref.dtype
    torch.testing.assert_close(out, out_ref)
    assert bn.running_mean.dtype == torch.float32
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var, rtol=1e-6, atol=1e-6)
    # the reference really differs from statistics computed in bf16
    bf16_mean = y.mean((0, 2, 3)).float()
    assert (0.1 * bf16_mean - bn_ref.running_mean).abs().max() > 1e-5
