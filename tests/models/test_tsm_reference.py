"""Our TSM U-Net computes what SDM's ``Spk_UNet_TSM`` computes (tests/data/REFERENCE.md,
``sdm-tsm-small-gray.safetensors``: TSM scales drawn in 0.6..1.4, randomised BatchNorm).

Same tolerances and spike-flip accounting as the SDDPM vectors (test_reference_vectors.py):
every output element within 1e-5 absolute, at most MAX_FLIPPED_ELEMENTS beyond (measured: 0);
every gradient within 2e-5 of its largest element (a TSM conv bias: see the test).
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sddpm.compat import from_published, to_published
from sddpm.models import UNetConfig, build_model, fold_batchnorm
from sddpm.models.tsm import TSMConv2d, TSMRepeatedConv2d, TSMSpikeConv2d, tsm_scale_layers
from sddpm.snn import override_threshold, set_neuron_kernel

from .test_reference_vectors import assert_output_matches, train_output_and_gradients
from unet_configs import tiny_unet_config

TSM_REFERENCE = Path(__file__).parents[1] / "data" / "sdm-tsm-small-gray.safetensors"


@pytest.fixture(scope="module")
def tsm_reference():
    """Tensors and metadata of the SDM TSM vector."""
    with safe_open(str(TSM_REFERENCE), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def published_state(reference):
    tensors, meta = reference
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    return state, json.loads(meta["config"])


@pytest.fixture()
def tsm_model(tsm_reference):
    state, config = published_state(tsm_reference)
    return from_published(state, config, image_size=config["img_size"])


def test_the_sdm_checkpoint_loads_as_a_tsm_model(tsm_model, tsm_reference):
    assert tsm_model.config.tsm
    # every conv but the head's temporal Conv3d is a TSM conv: 2 in the stem, 2 per res block
    # (8 blocks; 5 shortcuts where the width changes), 1 per down/up block, the head's conv
    names = [n for n, _ in tsm_scale_layers(tsm_model)]
    assert len(names) == 2 + 2 * 8 + 5 + 2 + 1 == 26
    assert "head.conv" in names and "head.temporal_conv" not in names
    assert isinstance(tsm_model.stem.conv, TSMRepeatedConv2d)  # the image, once per call
    assert isinstance(tsm_model.encoder[2].skip, TSMConv2d)  # real-valued input
    assert isinstance(tsm_model.encoder[0].conv1, TSMSpikeConv2d)
    state, _ = published_state(tsm_reference)
    assert torch.equal(tsm_model.stem.conv.step_scale, state["conv.tsmp"].flatten())
    assert tsm_model.stem.conv.step_scale.shape == (4,)
    # the scales are not all 1, so the test below is a test of them
    assert (tsm_model.encoder[0].conv1.step_scale - 1).abs().max() > 0.1


def test_eval_output(tsm_model, tsm_reference):
    t, _ = tsm_reference
    with torch.no_grad():
        out = tsm_model(t["input.x"], t["input.t"])
    assert_output_matches(out, t["output.eval"])


def test_scales_matter(tsm_model, tsm_reference):
    """With every scale at 1 the output is not the reference: the scales are applied."""
    t, _ = tsm_reference
    with torch.no_grad():
        for _, conv in tsm_scale_layers(tsm_model):
            conv.step_scale.fill_(1.0)
        out = tsm_model(t["input.x"], t["input.t"])
    assert (out - t["output.eval"]).abs().max() > 1e-2


def test_eval_output_with_threshold_guidance(tsm_model, tsm_reference, kernel):
    t, meta = tsm_reference
    assert '"threshold_scale": 1.1' in meta["config"]
    set_neuron_kernel(tsm_model, kernel)
    with torch.no_grad(), override_threshold(tsm_model, 1.1):
        out = tsm_model(t["input.x"], t["input.t"])
    assert_output_matches(out, t["output.eval_threshold_scaled"])
    assert (t["output.eval_threshold_scaled"] - t["output.eval"]).abs().max() > 1e-3


def test_train_output_and_every_gradient(tsm_model, tsm_reference, kernel):
    grads, ref_grads = train_output_and_gradients(tsm_model, tsm_reference[0], kernel)
    assert sum(k.endswith(".tsmp") for k in ref_grads) == 26
    largest = max(g.abs().max().item() for g in ref_grads.values())
    for name, ref in ref_grads.items():
        ours = grads[name]
        assert ours.shape == ref.shape, name
        scale = ref.abs().max().item()
        if scale < 1e-3:
            # exactly 0 in exact arithmetic (a shift a train-mode BatchNorm removes): float
            # noise on both sides, bounded relative to the largest gradient
            assert ours.abs().max() <= 1e-5 * largest, name
            continue
        err = (ours - ref).abs().max().item()
        if name.endswith(".tsmconv.bias"):
            # A TSM conv's bias is scaled per step before a train-mode BatchNorm, so its
            # gradient sum_s p_s g_s is no longer 0 but the remainder of a cancellation
            # (sum_s g_s = 0): float noise ~1e-4 on both sides (ours and SDM's float32 are each
            # ~1e-4 from a float64 run), bounded relative to the largest gradient (measured
            # worst: 1.2e-7 of it, 5e-5 absolute).
            assert err <= 2e-5 * scale or err <= 1e-6 * largest, name
            continue
        assert err <= 2e-5 * scale, f"{name}: max error {err:.3g} vs gradient scale {scale:.3g}"


def test_batchnorm_folded_tsm_model_reproduces_eval_outputs(tsm_model, tsm_reference):
    t, _ = tsm_reference
    folded = fold_batchnorm(tsm_model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.stem.modules())
    assert folded.stem.conv.step_shift is not None
    with torch.inference_mode():
        unfolded = tsm_model(t["input.x"], t["input.t"])
        out = folded(t["input.x"], t["input.t"])
        assert_output_matches(out, t["output.eval"])
        assert_output_matches(out, unfolded)
        with override_threshold(folded, 1.1):
            out = folded(t["input.x"], t["input.t"])
        assert_output_matches(out, t["output.eval_threshold_scaled"])
    # the original is untouched
    assert isinstance(tsm_model.stem.bn, torch.nn.BatchNorm2d)
    assert tsm_model.stem.conv.step_shift is None


def test_forward_hooks_see_every_tsm_conv(tsm_model, tsm_reference):
    """Measurement is by hooks: every TSM conv, the stem's (run once) included, is called as a
    module; the stem's takes the B images and gives the S*B scaled maps."""
    t, _ = tsm_reference
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = (tuple(inputs[0].shape), tuple(output.shape))

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in tsm_scale_layers(tsm_model)]
    with torch.no_grad():
        tsm_model(t["input.x"], t["input.t"])
    for h in handles:
        h.remove()
    assert sorted(seen) == sorted(n for n, _ in tsm_scale_layers(tsm_model))
    assert seen["stem.conv"] == ((3, 1, 16, 16), (4 * 3, 32, 16, 16))


def test_round_trip_to_sdm_names(tsm_model, tsm_reference):
    state, _ = published_state(tsm_reference)
    back = to_published(tsm_model.state_dict())
    assert sorted(back) == sorted(state)
    for k, v in state.items():
        assert torch.equal(back[k], v), k


def test_tsm_at_one_is_the_plain_model():
    """A TSM model starts as the plain model: same initial weights (no extra random draws)
    and, with its scales at 1, the same function, in train and eval mode."""
    cfg = tiny_unet_config(snn_timesteps=3, diffusion_steps=50)
    torch.manual_seed(0)
    plain = build_model(cfg)
    after_plain = torch.rand(1)
    torch.manual_seed(0)
    tsm = build_model(cfg.replace(tsm=True))
    assert torch.equal(torch.rand(1), after_plain)
    tsm_state = tsm.state_dict()
    for k, v in plain.state_dict().items():
        assert torch.equal(tsm_state[k], v), k
    extra = sorted(set(tsm_state) - set(plain.state_dict()))
    assert extra and all(k.endswith(".step_scale") for k in extra)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 40])
    for mode in (True, False):
        plain.train(mode), tsm.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(tsm(x, t), plain(x, t), rtol=0, atol=1e-6)


def test_the_ann_twin_refuses_tsm():
    with pytest.raises(ValueError, match="tsm=True needs kind='spiking'"):
        UNetConfig(kind="ann", tsm=True)
    with pytest.raises(ValueError, match="tsm=True needs kind='spiking'"):
        from sddpm.models import ANNUNet

        ANNUNet(UNetConfig(tsm=True, channels=8, channel_mult=(1,), image_size=8))
    # the twin of a TSM model's architecture is the plain ANN
    twin = UNetConfig(tsm=True).ann_twin()
    assert twin.kind == "ann" and not twin.tsm
    assert UNetConfig(tsm=True).replace(tsm=False).ann_twin() == twin
