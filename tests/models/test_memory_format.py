"""Channels-last (NHWC) U-Nets: every conv sees NHWC tensors, results equal the NCHW model's.

A ``TorchDispatchMode`` sees every convolution after autograd, so the layout a GPU's cuDNN
would be handed is checked on the CPU: a tensor in the other layout means a transpose on either
side of that conv.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sddpm.config import RunConfig
from sddpm.models import (
    MEMORY_FORMATS,
    build_model,
    load_pretrained,
    memory_format_name,
    preset,
    save_pretrained,
    set_memory_format,
)
from sddpm.snn import multistep_neuron, set_neuron_kernel
from sddpm.snn.layout import empty_steps, in_step_layout
from sddpm.snn.surrogate import Surrogate

CONV_OPS = {"convolution", "convolution_backward"}
TINY = dict(channels=8, channel_mult=(1, 2), num_res_blocks=1, image_size=16)


def nhwc_ordered(t: torch.Tensor) -> bool:
    """Whether a 4-D tensor's channels vary fastest, then W, H, N (dense or a slice of such:
    the gradient of a channel concatenation is a channel slice in either layout)."""
    order = [t.stride(d) for d in (0, 2, 3, 1) if t.shape[d] > 1]
    return order == sorted(order, reverse=True) and (t.shape[1] == 1 or t.stride(1) == 1)


class LayoutMode(TorchDispatchMode):
    """Records each conv whose 4-D tensor inputs are not NHWC-ordered, and counts convs seen."""

    def __init__(self):
        super().__init__()
        self.wrong: list[str] = []
        self.seen = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in CONV_OPS:
            self.seen += 1
            for i, a in enumerate(args[:3]):  # (input, weight) / (grad, input, weight)
                if isinstance(a, torch.Tensor) and a.dim() == 4 and not nhwc_ordered(a):
                    self.wrong.append(f"{name} arg {i} {tuple(a.shape)} strides {a.stride()}")
        return func(*args, **(kwargs or {}))


def _model(kind="spiking", tsm=False, image_channels=1, fmt="channels_last", seed=0):
    cfg = preset("digits").replace(kind=kind, tsm=tsm, image_channels=image_channels, **TINY)
    torch.manual_seed(seed)
    model = build_model(cfg)
    return set_memory_format(model, fmt), cfg


def _step(model, cfg, batch=3, dtype=None):
    torch.manual_seed(1)
    x = torch.randn(batch, cfg.image_channels, 16, 16)
    t = torch.randint(0, cfg.diffusion_steps, (batch,))
    if dtype is None:
        out = model(x, t)
    else:
        with torch.autocast("cpu", dtype):
            out = model(x, t)
    out.float().square().mean().backward()
    return out


@pytest.mark.parametrize("kind", ["spiking", "ann"])
@pytest.mark.parametrize("image_channels", [1, 3])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_conv_sees_nhwc(kind, image_channels, dtype):
    model, cfg = _model(kind, image_channels=image_channels)
    with LayoutMode() as mode:
        _step(model, cfg, dtype=dtype)
    assert mode.seen >= 30  # every conv of the tiny net, forward and backward
    assert mode.wrong == []


def test_contiguous_model_is_checked_too():
    """The check is not vacuous: the NCHW model hands every multi-channel conv NCHW tensors."""
    model, cfg = _model(fmt="contiguous")
    with LayoutMode() as mode:
        _step(model, cfg)
    assert len(mode.wrong) > mode.seen // 2


def test_tsm_model_sees_nhwc_but_for_its_stem_gradient():
    """TSM's stem conv runs once for all steps; the gradient of that broadcast is summed over
    the steps into an NCHW tensor (torch's reduction chooses), one conv backward in ~50."""
    model, cfg = _model(tsm=True)
    with LayoutMode() as mode:
        _step(model, cfg)
    assert len(mode.wrong) == 1 and mode.wrong[0].startswith("convolution_backward arg 0")


@pytest.mark.parametrize("kind", ["spiking", "ann"])
def test_channels_last_matches_contiguous(kind):
    """Same weights, same results in float64: outputs and every gradient."""
    results = {}
    for fmt in MEMORY_FORMATS:
        model, cfg = _model(kind, image_channels=3, fmt=fmt)
        model.double()
        torch.manual_seed(1)
        x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
        t = torch.randint(0, cfg.diffusion_steps, (3,))
        out = model(x, t)
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[fmt] = out.detach(), grads
    (out_a, grads_a), (out_b, grads_b) = results.values()
    assert out_a.abs().max() > 0
    torch.testing.assert_close(out_a, out_b, rtol=1e-10, atol=1e-12)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 20
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-9, atol=1e-12)


def test_neuron_keeps_each_steps_layout(kernel):
    """A neuron layer returns spikes laid out as its input's steps, with every kernel, also for
    an image broadcast over the steps; spikes and gradients equal those of NCHW input."""
    surrogate = Surrogate("atan", 2.0)
    torch.manual_seed(0)
    base = torch.randn(4, 2, 6, 5, 3) * 2  # [T, B, C, H, W]
    nhwc = base.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (4, 2))
    image = torch.randn(2, 6, 5, 3).contiguous(memory_format=torch.channels_last) * 2
    broadcast = image.unsqueeze(0).expand(4, *image.shape)
    for x in (nhwc, broadcast):
        x_cl = x.clone().requires_grad_() if x is nhwc else image.clone().requires_grad_()
        feed = x_cl if x is nhwc else x_cl.unsqueeze(0).expand(4, *image.shape)
        ref_in = x.contiguous().clone().requires_grad_()
        s_cl, _ = multistep_neuron(feed, threshold=1.0, surrogate=surrogate, kernel=kernel)
        s_ref, _ = multistep_neuron(ref_in, threshold=1.0, surrogate=surrogate, kernel=kernel)
        assert all(s_cl[t].is_contiguous(memory_format=torch.channels_last) for t in range(4))
        assert torch.equal(s_cl, s_ref) and 0 < s_ref.mean() < 1
        weights = torch.arange(s_ref.numel(), dtype=torch.float32).view(s_ref.shape) % 7
        (s_cl * weights).sum().backward()
        (s_ref * weights).sum().backward()
        expected = ref_in.grad if x is nhwc else ref_in.grad.sum(0)
        torch.testing.assert_close(x_cl.grad, expected, rtol=1e-6, atol=1e-6)
        assert x_cl.grad.abs().sum() > 0


def test_empty_steps_layout():
    image = torch.randn(2, 6, 5, 3).contiguous(memory_format=torch.channels_last)
    broadcast = image.unsqueeze(0).expand(4, *image.shape)
    out = empty_steps(broadcast, torch.float16)
    assert out.shape == broadcast.shape and out.dtype == torch.float16
    assert out.stride() == (2 * 6 * 5 * 3, 6 * 5 * 3, 1, 3 * 6, 6)
    nchw = torch.randn(4, 2, 6, 5, 3)
    assert empty_steps(nchw).stride() == nchw.stride()
    assert in_step_layout(nchw) is nchw
    moved = in_step_layout(nchw, like=broadcast)
    assert moved.stride() == out.stride() and torch.equal(moved, nchw)


def test_set_memory_format_lays_out_every_conv_weight():
    model, _ = _model(image_channels=1)
    assert memory_format_name(model) == "channels_last"
    weights = [p for p in model.parameters() if p.dim() == 4]
    assert len(weights) > 10
    # one-input-channel weights too (is_contiguous counts them as both layouts)
    assert all(p.stride(1) == 1 for p in weights)
    set_memory_format(model, "contiguous")
    assert memory_format_name(model) == "contiguous"
    assert all(p.is_contiguous() for p in model.parameters())
    with pytest.raises(ValueError, match="unknown memory format 'nhwc'; choose one of"):
        set_memory_format(model, "nhwc")


def test_checkpoint_of_channels_last_model_loads_into_either(tmp_path):
    model, cfg = _model(image_channels=3)
    _step(model, cfg)  # train-mode statistics move the BatchNorm buffers
    save_pretrained(model, tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m")
    assert all(p.is_contiguous() for p in loaded.parameters())
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    set_memory_format(loaded, "channels_last")
    set_neuron_kernel(loaded, "eager")
    model.eval(), loaded.eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), loaded(x, t), rtol=0, atol=0)


def test_run_config_checks_memory_format():
    config = RunConfig()
    config.train.memory_format = "nhwc"
    with pytest.raises(ValueError, match="train.memory_format must be one of"):
        config.validate()


def test_sampling_in_channels_last_gives_the_same_images(monkeypatch):
    """SamplingOptions.memory_format lays out the folded copy that samples (the given model is
    not touched); the images equal NCHW sampling's (the ANN twin: no spike to flip on the
    float32 rounding of another summation order)."""
    from sddpm import generation
    from sddpm.diffusion import OptionError

    model, cfg = _model("ann", image_channels=3, fmt="contiguous")
    model.eval()
    shape = (3, 16, 16)
    common = dict(sampler="ddim", steps=3, batch_size=2, progress=False)
    nchw = generation.generate(model, 2, shape, **common)
    called = []
    real = generation.sample
    monkeypatch.setattr(
        generation, "sample", lambda m, *a, **k: called.append(m) or real(m, *a, **k)
    )
    nhwc = generation.generate(model, 2, shape, memory_format="channels_last", **common)
    assert called and called[0] is not model and memory_format_name(called[0]) == "channels_last"
    assert all(p.stride(1) == 1 for p in called[0].parameters() if p.dim() == 4)
    assert memory_format_name(model) == "contiguous"
    assert all(p.is_contiguous() for p in model.parameters())
    assert nhwc.abs().max() > 0
    torch.testing.assert_close(nhwc, nchw, rtol=1e-5, atol=1e-5)
    with pytest.raises(OptionError, match=r"set_memory_format\(model, 'channels_last'\)"):
        generation.generate(model, 2, shape, memory_format="channels_last", fold_bn=False, **common)
