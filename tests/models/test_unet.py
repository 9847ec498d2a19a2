"""Presets, the ANN twin, input checks and the model directory format."""

import pytest
import torch

from sddpm.models import (
    PRESETS,
    ANNUNet,
    SpikingUNet,
    UNetConfig,
    build_model,
    count_parameters,
    load_pretrained,
    preset,
    save_pretrained,
)
from sddpm.snn import spiking_neurons

from unet_configs import tiny_unet_config

# Published CIFAR-10 model: 66,696,413 parameters (DEVELOPERS.md). The others follow from the
# same architecture with 1 image channel / the small digits configuration; the ANN twin has
# exactly the same parameters.
EXPECTED_PARAMETERS = {
    "cifar10": 66_696_413,
    "celeba64": 66_696_413,
    "mnist": 66_691_725,
    "fashion-mnist": 66_691_725,
    "digits": 178_029,
}


def test_preset_parameter_counts():
    assert sorted(PRESETS) == sorted(EXPECTED_PARAMETERS)
    for name, expected in EXPECTED_PARAMETERS.items():
        with torch.device("meta"):
            spiking = build_model(preset(name))
            ann = build_model(preset(name, kind="ann"))
        assert count_parameters(spiking) == expected, name
        assert count_parameters(ann) == expected, name


def tiny(kind="spiking", **kw):
    cfg = tiny_unet_config(diffusion_steps=50, kind=kind, **kw)
    torch.manual_seed(0)
    return build_model(cfg).eval()


def test_spiking_model_has_a_neuron_before_every_conv_but_the_first():
    model = tiny()
    convs = [
        m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
    ]
    # stem.conv (real input) and head.conv (after tail BN + swish, as published) are fed real
    # values; every other 3x3 conv has a neuron in front of it.
    assert len(spiking_neurons(model)) == len(convs) - 2
    assert isinstance(model, SpikingUNet)


def test_ann_twin_same_interface_and_parameters():
    snn, ann = tiny(), tiny("ann")
    assert isinstance(ann, ANNUNet) and not spiking_neurons(ann)
    assert [k for k, _ in snn.named_parameters()] == [k for k, _ in ann.named_parameters()]
    ann.load_state_dict(snn.state_dict())
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 40])
    out = ann(x, t)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert ann.time_steps == 1 and snn.time_steps == 4


def test_output_is_the_decayed_sum_over_snn_steps():
    model = tiny()
    captured = {}
    model.head.register_forward_pre_hook(lambda m, args: captured.setdefault("h", args[0]))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    out = model(x, t)
    # recompute the head by hand on the captured [S, B, C, H, W] input
    head, h = model.head, captured["h"]
    S = h.shape[0]
    y = head.conv(torch.nn.functional.silu(head.bn(h.flatten(0, 1))))
    z = head.temporal_bn(
        head.temporal_conv(y.unflatten(0, (S, -1)).permute(1, 2, 3, 4, 0))
        .permute(4, 0, 1, 2, 3)
        .flatten(0, 1)
    )
    per_step = (torch.nn.functional.silu(z) + y).unflatten(0, (S, -1))
    expected = sum(0.8 ** (S - 1 - i) * per_step[i] for i in range(S))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_bad_inputs_name_what_is_allowed():
    model = tiny()
    t = torch.tensor([1])
    with pytest.raises(ValueError, match="multiples of 2"):
        model(torch.randn(1, 1, 7, 8), t)
    with pytest.raises(ValueError, match="1-channel images, got 3"):
        model(torch.randn(1, 3, 8, 8), t)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        model(torch.randn(1, 8, 8), t)
    with pytest.raises(ValueError, match=r"t must be in \[0, 49\]"):
        model(torch.randn(1, 1, 8, 8), torch.tensor([50]))
    with pytest.raises(ValueError, match="integer"):
        model(torch.randn(1, 1, 8, 8), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="multiple of 8"):
        UNetConfig(image_size=36)


def test_config_json_round_trip_and_unknown_fields():
    cfg = preset("digits").replace(neuron={"threshold": 0.9, "tau": 2.0})
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown UNetConfig fields"):
        UNetConfig.from_dict({**cfg.to_dict(), "chanels": 3})


def test_model_directory_round_trip(tmp_path):
    model = tiny()
    model.train()(torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 4]))  # move BN running stats
    model.eval()
    save_pretrained(model, tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 6])
    with torch.no_grad():
        assert torch.equal(loaded(x, t), model(x, t))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]


def test_loading_a_directory_without_config_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        load_pretrained(tmp_path)


def test_run_directory_resolves_to_latest_complete_checkpoint(tmp_path):
    model = tiny()
    run = tmp_path / "run"
    save_pretrained(model, run / "checkpoints" / "step_00000010")
    save_pretrained(model, run / "checkpoints" / "step_00000020")
    (run / "checkpoints" / "step_00000030").mkdir()  # incomplete: no config.json
    from sddpm.models import find_model_dir

    assert find_model_dir(run).name == "step_00000020"
    assert load_pretrained(run).config == model.config
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        find_model_dir(tmp_path / "empty")


def test_stem_once_equals_batchnorm_on_the_repeated_image():
    """The stem runs conv + BatchNorm once for all SNN steps: same output, same running stats."""
    model = tiny().train()
    stem = model.stem
    x = torch.randn(3, 1, 8, 8)
    bn = torch.nn.BatchNorm2d(8)
    bn.load_state_dict(stem.bn.state_dict())
    repeated = bn(stem.conv(x.repeat(4, 1, 1, 1)))  # the published computation
    from sddpm.models.unet import _batch_norm_repeated

    once = _batch_norm_repeated(stem.bn, stem.conv(x), 4)
    torch.testing.assert_close(once.repeat(4, 1, 1, 1), repeated, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stem.bn.running_mean, bn.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(stem.bn.running_var, bn.running_var, rtol=1e-6, atol=1e-7)
    assert int(stem.bn.num_batches_tracked) == int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize(
    "changes",
    [{}, {"kind": "ann"}, {"tsm": True}, {"num_classes": 3}, {"memory_format": "channels_last"}],
    ids=["spiking", "ann", "tsm", "conditional", "channels-last"],
)
def test_torch_compile_traces_the_model_in_one_graph(changes):
    """No graph break in a training step (forward, and the backward Dynamo traces with the
    neurons' autograd functions), and the traced step's gradients are eager mode's. A break per
    layer makes Dynamo recompile the rest for every layer's shapes and go dynamic; on torch 2.11
    (the GPU machines) the autocast queries of the spike-fed convs did that, and inductor then
    failed on the dynamic strides; in channels-last, ``out=`` into a non-contiguous step did it
    on every torch. And on torch 2.11 every parameter had a zero gradient, because Dynamo
    loses the gradient of an autograd Function output returned by an aliasing op: the
    neurons' no-op ``.to`` and the head step sum's ``out=``. ``--compile`` trained nothing."""
    from torch._dynamo.testing import CompileCounter

    from sddpm.models import set_memory_format

    changes = dict(changes)
    fmt = changes.pop("memory_format", "contiguous")
    cfg = preset("digits").replace(channels=8, **changes)
    model = set_memory_format(build_model(cfg).train(), fmt)
    model.check_t_values = model.check_y_values = False  # as the trainer sets them
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 999])
    y = torch.tensor([0, 3]) if changes.get("num_classes") else None
    model(x, t, y).square().mean().backward()
    eager = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    counter = CompileCounter()
    step = torch.compile(lambda x, t: model(x, t, y).square().mean(), backend=counter)
    step(x, t).backward()
    assert counter.frame_count == 1
    traced = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert traced.keys() == eager.keys() and len(eager) > 50
    # the same ops, eagerly run: the same gradients, but for rounding (the biases of convs
    # before a BatchNorm have a true gradient of 0: theirs is rounding noise, ~1e-12)
    scale = max(float(g.abs().max()) for g in eager.values())
    assert scale > 1e-4
    for name, grad in eager.items():
        torch.testing.assert_close(traced[name], grad, rtol=1e-5, atol=1e-6 * scale, msg=name)
