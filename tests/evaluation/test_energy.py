"""The energy meter: exact SOPs (hand counts), closed-form MACs, firing rates, accountings, CLI.

Spikes are made by real ``SpikingNeuron`` layers (threshold 1, IF): an input of 2.0 fires at
the first SNN step, 0.0 never fires.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sddpm.evaluation.energy import (
    EnergyMeter,
    ann_twin_macs,
    spike_fed_layers,
    synaptic_ops,
)
from sddpm.models import UNetConfig, build_model, preset, save_pretrained
from sddpm.models.unet import Upsample
from sddpm.snn import SpikeConv2d, SpikingNeuron

from unet_configs import tiny_unet_config


def spikes_at(shape, positions) -> torch.Tensor:
    """A neuron input that makes the neuron fire exactly at ``positions`` (index tuples)."""
    x = torch.zeros(shape)
    for p in positions:
        x[p] = 2.0
    return x


def measure(net: nn.Module, *args, **meter_kwargs):
    with EnergyMeter(net, ann_macs=None, **meter_kwargs) as meter, torch.no_grad():
        net(*args)
    return meter.report()


def layer(report, name):
    (found,) = [la for la in report.layers if la.name == name]
    return found


# ---------------------------------------------------------------- hand-counted SOPs


def test_sops_of_a_padded_3x3_conv_equal_the_hand_count():
    # 4x4 map, 3x3 conv, padding 1, stride 1: output (i, j) sees inputs (i-1..i+1, j-1..j+1).
    # An input spike at p reaches the output positions whose window holds p:
    #   corner (0, 0): rows {0,1} x cols {0,1}       = 4 positions
    #   edge   (0, 2): rows {0,1} x cols {1,2,3}     = 6 positions
    #   inner  (2, 2): rows {1,2,3} x cols {1,2,3}   = 9 positions
    #   corner (3, 3): rows {2,3} x cols {2,3}       = 4 positions
    # each position has 2 output channels: SOPs = (4 + 6 + 9 + 4) * 2 = 46.
    net = nn.Sequential(SpikingNeuron(), nn.Conv2d(1, 2, 3, padding=1))
    x = spikes_at((1, 1, 4, 4), [(0, 0, 0, 0), (0, 0, 0, 2), (0, 0, 2, 2), (0, 0, 3, 3)])
    report = measure(net, x)
    conv = layer(report, "1")
    assert conv.kind == "sop" and conv.neuron == "0"
    assert conv.ops == 46
    assert conv.energy_pj == pytest.approx(46 * 0.9)
    assert conv.firing_rate == 4 / 16
    assert report.neurons[0].firing_rate == 4 / 16
    # Dense: 16 outputs x 2 channels x fan-in 9 = 288. rate x dense = 4/16 * 288 = 72 counts
    # every spike 9 times per output channel; padding takes 2 * (5 + 3 + 0 + 5) = 26 away.
    assert conv.dense_ops == 288
    assert conv.firing_rate * conv.dense_ops - conv.ops == 26


def test_sops_of_a_strided_two_channel_conv_equal_the_hand_count():
    # 4x4 map, 3x3 conv, stride 2, padding 1 -> 2x2 outputs; output row o sees input rows
    # 2o-1..2o+1, so input row 0 -> o {0}, 1 -> {0,1}, 2 -> {1}, 3 -> {1}; same for columns.
    #   ch0 (0, 0): 1 x 1 = 1     ch0 (1, 1): 2 x 2 = 4
    #   ch1 (3, 3): 1 x 1 = 1     ch1 (1, 2): 2 x 1 = 2
    # 8 (spike, output position) pairs x 3 output channels = 24 SOPs.
    net = nn.Sequential(SpikingNeuron(), nn.Conv2d(2, 3, 3, stride=2, padding=1))
    x = spikes_at((1, 2, 4, 4), [(0, 0, 0, 0), (0, 0, 1, 1), (0, 1, 3, 3), (0, 1, 1, 2)])
    assert layer(measure(net, x), "1").ops == 24


def test_a_strided_conv_can_do_more_sops_than_rate_times_dense():
    # Why "SOPs <= rate x dense" holds for stride-1 convs only: with stride 2 an input at an
    # odd position is shared by 2 x 2 outputs, more than the 9/4 an average input gets.
    net = nn.Sequential(SpikingNeuron(), nn.Conv2d(1, 1, 3, stride=2, padding=1))
    conv = layer(measure(net, spikes_at((1, 1, 4, 4), [(0, 0, 1, 1)])), "1")
    assert conv.ops == 4
    assert conv.firing_rate * conv.dense_ops == 1 / 16 * (4 * 9)  # 2.25 < 4


def test_sops_of_1x1_and_grouped_convs_and_linears():
    # 1x1: every spike meets every output channel once: SOPs = spikes x out_ch = rate x dense.
    net = nn.Sequential(SpikingNeuron(), nn.Conv2d(4, 6, 1))
    x = spikes_at((1, 4, 3, 3), [(0, 0, 0, 0), (0, 3, 2, 1), (0, 1, 1, 1)])
    conv = layer(measure(net, x), "1")
    assert conv.ops == 3 * 6 == conv.firing_rate * conv.dense_ops
    # groups=2: channels 0-1 feed output channels 0-2, channels 2-3 feed 3-5: 3 each.
    grouped = nn.Sequential(SpikingNeuron(), nn.Conv2d(4, 6, 1, groups=2))
    assert layer(measure(grouped, x), "1").ops == 3 * 3
    # Linear 5 -> 7: 2 spikes x 7 outputs.
    lin = nn.Sequential(SpikingNeuron(), nn.Linear(5, 7))
    assert layer(measure(lin, spikes_at((1, 5), [(0, 1), (0, 4)])), "1").ops == 14


def test_upsample_block_counts_sops_on_the_upsampled_map():
    # One spike at (0, 0) of a 2x2 map; nearest x2 makes spikes at (0..1, 0..1) of a 4x4 map,
    # which a 3x3 padding-1 conv reaches 4 + 6 + 6 + 9 = 25 times (1 output channel).
    block = Upsample(1, SpikingNeuron, SpikeConv2d).eval()
    x = spikes_at((1, 1, 1, 2, 2), [(0, 0, 0, 0, 0)])  # [S, B, C, H, W]
    report = measure(block, x, None)
    conv = layer(report, "conv")
    assert conv.ops == 25
    assert conv.dense_ops == 16 * 9
    assert conv.firing_rate == report.neurons[0].firing_rate == 1 / 4


def test_synaptic_ops_with_reflect_padding_counts_the_padded_copies():
    # A spike at the centre (1, 1) of a 3x3 map; reflect padding maps padded row -1 and row 3
    # to row 1 (columns alike), so the padded 5x5 map holds the spike at rows {0, 2, 4} x
    # columns {0, 2, 4}. The window of output row a spans padded rows a..a+2 and holds
    # r(a) = 2, 1, 2 spike rows for a = 0, 1, 2: (2 + 1 + 2)^2 = 25 SOPs. Zero padding: 9.
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 1, 1] = 1
    reflect = nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect")
    assert int(synaptic_ops(reflect, x)) == 25
    assert int(synaptic_ops(nn.Conv2d(1, 1, 3, padding=1), x)) == 9


def test_a_layer_wrongly_declared_spike_fed_is_an_error():
    net = nn.Sequential(nn.Conv2d(1, 1, 1), nn.Conv2d(1, 1, 1))
    with EnergyMeter(net, spike_fed={"1": "0"}, ann_macs=None) as meter:
        net(torch.randn(1, 1, 4, 4))
    with pytest.raises(ValueError, match="other than 0 and 1"):
        meter.report()


# ---------------------------------------------------------------- closed-form MACs


def test_macs_of_real_fed_conv_and_linear_equal_the_closed_form():
    net = nn.Sequential(
        nn.Conv2d(3, 5, 3, stride=2, padding=1),  # [2,3,8,8] -> [2,5,4,4]
        nn.Conv2d(5, 6, 1),  # -> [2,6,4,4]
        nn.Flatten(),
        nn.Linear(6 * 16, 7),
    )
    report = measure(net, torch.randn(2, 3, 8, 8))
    # per call = per image: output elements x fan-in.
    assert layer(report, "0").ops == 5 * 4 * 4 * (3 * 3 * 3)  # 2160
    assert layer(report, "1").ops == 6 * 4 * 4 * 5  # 480
    assert layer(report, "3").ops == 7 * 96  # 672
    assert all(la.kind == "mac" for la in report.layers)
    # The paper's accounting counts the first conv only.
    assert report.per_call["macs_paper"] == 2160
    assert report.per_call["macs"] == 2160 + 480 + 672
    assert report.per_call["energy_pj_full"] == pytest.approx((2160 + 480 + 672) * 4.6)


def test_grouped_real_fed_conv_macs():
    net = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2))
    report = measure(net, torch.randn(1, 4, 5, 5))
    assert layer(report, "0").ops == 6 * 25 * (2 * 9)


# ---------------------------------------------------------------- the digits U-Net


@pytest.fixture(scope="module")
def digits_run():
    """The digits preset (random init, eval mode) on 2 images, with every spike-fed conv's
    input captured by the test's own hooks."""
    torch.manual_seed(0)
    model = build_model(preset("digits")).eval()
    fed = spike_fed_layers(model)
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args):
            seen[name] = args[0].detach().clone()

        return hook

    handles = [modules[n].register_forward_pre_hook(keep(n)) for n in fed]
    x = torch.randn(2, 1, 8, 8) * 2
    t = torch.tensor([10, 500])
    with EnergyMeter(model) as meter, torch.inference_mode():
        model(x, t)
    for h in handles:
        h.remove()
    return model, meter.report(num_images=2, calls_per_image=50), seen


def test_digits_layers_are_classified_by_what_feeds_them(digits_run):
    model, report, _ = digits_run
    kinds = {la.name: la.kind for la in report.layers}
    sop = {n for n, k in kinds.items() if k == "sop"}
    mac = {n for n, k in kinds.items() if k == "mac"}
    assert sop == {
        "stem.conv2",
        *(
            f"{b}.conv{i}"
            for b in ("encoder.0", "encoder.2", "middle.0", "middle.1")
            for i in (1, 2)
        ),
        *(f"decoder.{b}.conv{i}" for b in (0, 1, 3, 4) for i in (1, 2)),
        "encoder.1.conv",  # downsample
        "decoder.2.conv",  # upsample
    }
    assert mac == {
        "time_embed.proj_in",
        "time_embed.proj_out",
        "stem.conv",
        "head.conv",
        "head.temporal_conv",
        *(f"{b}.time_proj" for b in ("encoder.0", "encoder.2", "middle.0", "middle.1")),
        *(f"decoder.{b}.time_proj" for b in (0, 1, 3, 4)),
        "encoder.2.skip",
        *(f"decoder.{b}.skip" for b in (0, 1, 3, 4)),
    }
    assert len(report.neurons) == len(sop) == 19
    assert [la.name for la in report.layers if la.paper and la.kind == "mac"] == ["stem.conv"]


def test_digits_sops_are_exact_receptive_field_counts(digits_run):
    model, report, seen = digits_run
    modules = dict(model.named_modules())
    n = report.evaluations
    assert n == 2
    padding_loss_seen = False
    for la in (la for la in report.layers if la.kind == "sop"):
        conv, s = modules[la.name], seen[la.name]
        assert set(s.unique().tolist()) <= {0.0, 1.0}
        spikes = int(s.sum())
        # Independent exact count: im2col columns hold each output position's receptive
        # field (zeros where padded); every output channel uses all of them.
        cols = F.unfold(s, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
        assert la.ops * n == int(cols.sum()) * conv.out_channels, la.name
        assert la.firing_rate == spikes / s.numel()
        if conv.stride == (1, 1):
            # Stride 1, same size: rate x dense = spikes x out_ch x 9 exactly (each spike
            # would meet 9 outputs per channel); the exact count loses, per spike at row i
            # and column j, 9 - r(i) r(j) with r = 2 on the first/last row (column), else 3.
            h, w = s.shape[-2:]
            r_row = torch.full((h,), 3.0)
            r_row[[0, -1]] = 2
            r_col = torch.full((w,), 3.0)
            r_col[[0, -1]] = 2
            loss = int((s * (9 - r_row[:, None] * r_col[None, :])).sum()) * conv.out_channels
            assert spikes * conv.out_channels * 9 - la.ops * n == loss, la.name
            assert la.firing_rate * la.dense_ops * n == pytest.approx(
                spikes * conv.out_channels * 9, rel=1e-12
            )
            assert la.ops <= la.firing_rate * la.dense_ops * (1 + 1e-12)
            padding_loss_seen |= loss > 0
        else:
            # Stride 2, 3x3 kernel: an input meets at most 2 x 2 output positions.
            assert la.ops * n <= spikes * conv.out_channels * 4
    assert padding_loss_seen  # the border case was exercised
    assert report.sops_per_call > 0


def test_digits_firing_rates_and_upsampled_rates(digits_run):
    model, report, seen = digits_run
    rates = {nf.name: nf.firing_rate for nf in report.neurons}
    for la in (la for la in report.layers if la.kind == "sop"):
        # A conv's input rate is its neuron's rate; nearest x2 up-sampling repeats every
        # element 4 times, so the rate is kept there too.
        assert la.firing_rate == pytest.approx(rates[la.neuron], abs=1e-15), la.name
    assert 0 < rates["stem.neuron"] < 1


def test_digits_macs_closed_form_and_accountings(digits_run):
    model, report, _ = digits_run
    c = model.config  # 1x8x8 images, ch 32, ch_mult (1, 2), S = 4
    S, ch, tdim = c.snn_timesteps, c.channels, c.time_embed_dim
    assert layer(report, "stem.conv").ops == 8 * 8 * ch * (1 * 9)  # once, broadcast over S
    assert layer(report, "time_embed.proj_in").ops == ch * tdim
    assert layer(report, "time_embed.proj_out").ops == tdim * tdim
    assert layer(report, "encoder.0.time_proj").ops == tdim * ch
    assert layer(report, "encoder.2.skip").ops == S * 4 * 4 * (2 * ch) * ch  # 1x1, 4x4 map
    assert layer(report, "head.conv").ops == S * 8 * 8 * 1 * (ch * 9)
    assert layer(report, "head.temporal_conv").ops == S * 8 * 8 * 1 * 9

    call, image = report.per_call, report.per_image
    assert call["sops"] == sum(la.ops for la in report.layers if la.kind == "sop")
    assert call["macs_paper"] == layer(report, "stem.conv").ops
    assert call["energy_pj_paper"] == pytest.approx(
        call["sops"] * 0.9 + call["macs_paper"] * 4.6, rel=1e-12
    )
    assert call["energy_pj_full"] == pytest.approx(
        call["sops"] * 0.9 + call["macs"] * 4.6, rel=1e-12
    )
    assert call["energy_pj_paper"] <= call["energy_pj_full"]
    for key in call:
        assert image[key] == pytest.approx(call[key] * 50, rel=1e-12)

    # Layer by layer, the SNN's dense ops are the ANN twin's (same images) times S, except
    # for the layers that run once per call in both: the stem conv (its output is broadcast
    # over the SNN steps), the time-embedding linears and the time projections.
    ann_model = build_model(c.replace(kind="ann")).eval()
    with EnergyMeter(ann_model, ann_macs=None) as meter, torch.no_grad():
        ann_model(torch.randn(2, 1, 8, 8), torch.tensor([10, 500]))
    ann_layers = {la.name: la for la in meter.report().layers}
    assert {la.name for la in report.layers} == set(ann_layers)
    for la in report.layers:
        once = la.name == "stem.conv" or "time" in la.name
        assert la.dense_ops == ann_layers[la.name].ops * (1 if once else S), la.name
    ann = report.ann["macs"]
    assert ann == sum(a.ops for a in ann_layers.values())
    assert report.ann["energy_pj"] == pytest.approx(ann * 4.6)
    assert report.ann["energy_pj_per_image"] == pytest.approx(ann * 4.6 * 50)


def test_ann_twin_macs_equal_the_closed_form():
    cfg = UNetConfig(
        image_channels=1,
        image_size=4,
        channels=4,
        channel_mult=(1, 2),
        num_res_blocks=1,
        diffusion_steps=10,
    )

    def conv(hw, cout, cin, k=3):  # output positions x out channels x fan-in
        return hw * cout * cin * k * k

    tdim = 16
    expected = sum(
        [
            4 * tdim + tdim * tdim,  # time embedding: 4 -> 16 -> 16
            conv(16, 4, 1) + conv(16, 4, 4),  # stem conv, conv2 (4x4)
            conv(16, 4, 4) + tdim * 4 + conv(16, 4, 4),  # encoder res 4 -> 4
            conv(4, 4, 4),  # downsample to 2x2
            conv(4, 8, 4) + tdim * 8 + conv(4, 8, 8) + conv(4, 8, 4, 1),  # res 4 -> 8 + skip
            2 * (conv(4, 8, 8) + tdim * 8 + conv(4, 8, 8)),  # middle
            conv(4, 8, 16) + tdim * 8 + conv(4, 8, 8) + conv(4, 8, 16, 1),  # dec res 8+8 -> 8
            conv(4, 8, 12) + tdim * 8 + conv(4, 8, 8) + conv(4, 8, 12, 1),  # dec res 8+4 -> 8
            conv(16, 8, 8),  # upsample conv at 4x4
            conv(16, 4, 12) + tdim * 4 + conv(16, 4, 4) + conv(16, 4, 12, 1),  # res 8+4 -> 4
            conv(16, 4, 8) + tdim * 4 + conv(16, 4, 4) + conv(16, 4, 8, 1),  # res 4+4 -> 4
            conv(16, 1, 4) + conv(16, 1, 1),  # head conv, temporal conv
        ]
    )
    assert expected == 62_928
    assert ann_twin_macs(cfg) == expected
    # The spiking model's report quotes the same number.
    model = build_model(cfg).eval()
    with EnergyMeter(model) as meter, torch.no_grad():
        model(torch.randn(3, 1, 4, 4), torch.tensor([0, 5, 9]))
    assert meter.report().ann["macs"] == expected


# ---------------------------------------------------------------- report outputs and CLI


def test_report_json_table_and_plot(digits_run, tmp_path):
    _, report, _ = digits_run
    report.save_json(tmp_path / "e.json")
    data = json.loads((tmp_path / "e.json").read_text())
    for section in ("per_call", "per_image"):
        assert set(data[section]) >= {"sops", "macs", "energy_pj_paper", "energy_pj_full"}
    assert set(data["ann"]) >= {"macs", "energy_pj"}
    first = data["layers"][0]
    assert set(first) >= {"name", "kind", "ops"}
    assert all("firing_rate" in la for la in data["layers"] if la["kind"] == "sop")
    text = report.table()
    assert "decoder.2.conv" in text and "per image" in text and "ANN twin" in text
    report.plot(tmp_path / "e.png")
    assert (tmp_path / "e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.json", "e.png"]  # no temp files


TINY = tiny_unet_config(diffusion_steps=20)


def test_cli_writes_json_and_plot(tmp_path):
    from typer.testing import CliRunner

    from sddpm.cli import app

    torch.manual_seed(0)
    save_pretrained(build_model(TINY).eval(), tmp_path / "model")
    out = tmp_path / "out"
    args = ["energy", "--run", str(tmp_path / "model"), "--json", str(out / "e.json")]
    args += ["--plot", str(out / "e.png"), "--sampler", "ddim", "--steps", "3", "--num", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "e.json").read_text())
    assert data["sampler"] == "ddim" and data["steps"] == 3 and data["num_images"] == 2
    assert data["calls_per_image"] == 3 and data["evaluations"] == 6
    assert {la["kind"] for la in data["layers"]} == {"sop", "mac"}
    for key in ("sops", "macs", "energy_pj_paper", "energy_pj_full"):
        assert data["per_image"][key] == pytest.approx(3 * data["per_call"][key], rel=1e-12)
    assert data["ann"]["macs"] == ann_twin_macs(TINY)
    assert (out / "e.png").is_file()
    assert "per call" in result.output


def test_cli_refuses_a_directory_without_checkpoint(tmp_path):
    from typer.testing import CliRunner

    from sddpm.cli import app

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["energy", "--run", str(run), "--json", str(out / "e.json")])
    assert result.exit_code == 2
    assert "holds no checkpoint" in result.output
    assert not out.exists()


def test_meter_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 17])
    with torch.no_grad():
        before = model(x, t)
        with EnergyMeter(model, ann_macs=None) as meter:
            during = model(x, t)
    assert torch.equal(before, during)
    assert meter.report().model_calls == 1
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------- memory-aware accounting


class TwoLayerToy(nn.Module):
    """``[B, 3]`` real input, repeated over S = 2 steps -> dense Linear(3, 4) -> IF ->
    spike-fed Linear(4, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(3, 4)
        self.neuron = SpikingNeuron()
        self.lin2 = nn.Linear(4, 2)
        with torch.no_grad():
            self.lin1.weight.copy_(torch.eye(4, 3))  # unit i passes input i; unit 3 gets 0
            self.lin1.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.neuron(self.lin1(x.expand(2, *x.shape))))


def test_memory_aware_terms_of_a_two_layer_toy_equal_the_hand_count():
    # S = 2 steps of x = [2, 0.6, 0]: neuron 0 charges 2 -> fires on both steps; neuron 1
    # charges 0.6, 1.2 -> fires on step 2; neurons 2, 3 never. Spikes S_out = S_in = 3.
    # lin1 (dense): 2 executions, MACs 2 x 4 x 3 = 24, inputs 6, outputs 8, 12 + 4 params.
    # lin2 (spike-fed): SYN = 3 spikes x 2 outputs = 6, outputs S x 2 = 4, 8 + 2 params.
    # Flat memory: every 32-bit value costs 10 pJ x 32 / 64 = 5 pJ.
    from sddpm.evaluation.energy import MemoryEnergyModel

    net = TwoLayerToy()
    x = torch.tensor([[2.0, 0.6, 0.0]])  # [B=1, 3]
    memory = MemoryEnergyModel(memory_model="flat")
    report = measure(net, x, memory=memory)
    lin2 = layer(report, "lin2")
    assert (lin2.ops, lin2.input_spikes, lin2.outputs) == (6, 3, 4)
    assert report.neurons[0].spikes == 3 and report.neurons[0].elements == 8

    e_add, e_mul, e = 0.9, 3.7, 5.0
    expected = {
        # lin2: E_add (SYN + S N_out)
        "accumulate": e_add * (6 + 4),
        # lin2: S_in 2 (E_mul + E_add) + SYN E_add
        "addressing": 3 * 2 * (e_mul + e_add) + 6 * e_add,
        "weight_reads": 6 * e,  # lin2: one per synaptic event
        "bias_reads": 4 * e,  # lin2: one per output per step
        "potential_rw": 2 * (6 + 4) * e,  # lin2: read + write per event and per step
        "spike_rw": 3 * e + 3 * e,  # lin2 reads its 3 input spikes, the neuron writes 3
        "neuron_update": e_add * (8 + 3),  # v += x on 8 neuron-steps, 3 resets
        "leak": 0.0,  # IF
        "dense_arith": 24 * (e_mul + e_add),  # lin1
        "dense_weight_reads": 2 * (12 + 4) * e,  # lin1: every parameter once per execution
        "activation_rw": 6 * e + 8 * e,  # lin1: inputs read, outputs written
    }
    terms = report.memory_terms()
    assert set(terms) == set(expected)
    for k, v in expected.items():
        assert terms[k] == pytest.approx(v, rel=1e-12), k
    total = sum(expected.values())
    assert total == pytest.approx(572.3)
    assert report.per_call["energy_pj_memory"] == pytest.approx(total, rel=1e-12)
    data = report.to_dict()
    assert data["memory_aware"]["energy_pj_per_call"] == pytest.approx(total, rel=1e-12)
    assert data["memory_aware"]["model"]["memory_model"] == "flat"
    # spikes per synapse per inference: 6 events over lin2's 4 x 2 synapses
    assert report.spikes_per_synapse == 6 / 8


def test_memory_size_models_and_overrides():
    from sddpm.evaluation.energy import MemoryEnergyModel

    kib = 8 * 1024  # bits
    linear = MemoryEnergyModel()
    # Lemaire's fit per 64-bit access: 1.09e-5 M + 13.2 pJ
    assert linear.access_pj(64, 8 * kib) == pytest.approx(1.09e-5 * 65536 + 13.2)
    assert linear.access_pj(32, 1024 * kib) == pytest.approx((1.09e-5 * 8388608 + 13.2) / 2)
    assert MemoryEnergyModel(memory_model="flat").access_pj(64, 1e9) == 10.0
    piece = MemoryEnergyModel(memory_model="piecewise")
    assert piece.access_pj(8, 8 * kib) == pytest.approx(2.5)  # 8 KiB: 2.5 pJ/B
    assert piece.access_pj(8, 20 * kib) == pytest.approx(2.5 + 2.5 * (20 - 8) / 24)
    assert piece.access_pj(8, 4096 * kib) == pytest.approx(25.0)  # capped at 1 MiB
    # LIF leak, weight reuse, and constants as parameters
    assert linear.neuron_layer(elements=10, spikes=2, map_elements=5, leaky=True)["leak"] == (
        pytest.approx(10 * (3.7 + 0.9))
    )
    flat = MemoryEnergyModel(memory_model="flat", e_add=0.1, e_mul=3.1)
    reuse = flat.dense_layer(
        macs=36, executions=1, inputs=16, outputs=4, in_map=16, out_map=4, weights=9, biases=1
    )
    per_mac = flat.replace(weight_reuse=False).dense_layer(
        macs=36, executions=1, inputs=16, outputs=4, in_map=16, out_map=4, weights=9, biases=1
    )
    assert reuse["dense_weight_reads"] == pytest.approx((9 + 1) * 5)
    assert per_mac["dense_weight_reads"] == pytest.approx((36 + 4) * 5)
    assert reuse["dense_arith"] == pytest.approx(36 * 3.2)
    with pytest.raises(ValueError, match="memory_model"):
        MemoryEnergyModel(memory_model="dram")
    with pytest.raises(ValueError, match=">= 0"):
        MemoryEnergyModel(e_add=-1)


def test_per_step_entries_and_the_ann_twin_memory_terms(digits_run):
    model, _, _ = digits_run
    torch.manual_seed(1)
    xs = {t: torch.randn(2, 1, 8, 8) * 2 for t in (900, 400, 10)}
    with EnergyMeter(model) as meter, torch.inference_mode():
        for t in (900, 400, 10, 900):  # 900 twice: one entry, both calls
            model(xs[t], torch.full((2,), t))
    report = meter.report(num_images=2)
    steps = report.step_summaries()
    assert [s["t"] for s in steps] == [900, 400, 10]
    assert [s["evaluations"] for s in steps] == [4, 2, 2]
    # each entry is that step's own counts: the firing rate of the calls at t alone
    for s in steps:
        with EnergyMeter(model) as alone, torch.inference_mode():
            model(xs[s["t"]], torch.full((2,), s["t"]))
        one = alone.report()
        assert s["firing_rate"] == pytest.approx(one.firing_rate, rel=1e-12)
        assert s["energy_pj_paper"] == pytest.approx(one.per_call["energy_pj_paper"], rel=1e-12)
        assert s["energy_pj_memory"] == pytest.approx(one.per_call["energy_pj_memory"], rel=1e-9)
    # the per-step entries average to the totals
    n = report.evaluations
    for key in ("energy_pj_paper", "energy_pj_full", "energy_pj_memory"):
        mean = sum(s[key] * s["evaluations"] for s in steps) / n
        assert mean == pytest.approx(report.per_call[key], rel=1e-9), key
    assert len({round(s["energy_pj_memory"]) for s in steps}) == 3  # data-dependent
    # the ANN twin: dense layers, activations, residual sums, skip tensors; no spikes
    ann = report.ann
    assert set(ann["memory_terms"]) == {
        "dense_arith",
        "dense_weight_reads",
        "activation_rw",
        "activation_fn",
        "residual",
        "skip",
    }
    assert ann["memory_terms"]["dense_arith"] == pytest.approx(ann["macs"] * (3.7 + 0.9))
    c = model.config
    twin = report.ann_report
    acts = [p for p in twin.paths if p.kind == "activation"]
    assert len(acts) == 19  # one per spiking neuron of the SNN
    twin_acts = sum(p.elements for p in acts)
    snn_elements = sum(nf.elements for nf in report.neurons) / n
    assert twin_acts * c.snn_timesteps == snn_elements  # same maps, S times in the SNN
    assert ann["energy_pj_memory"] == pytest.approx(sum(ann["memory_terms"].values()))
    assert ann["ratio_to_snn_memory"] == pytest.approx(
        ann["energy_pj_memory"] / report.per_call["energy_pj_memory"]
    )
    data = report.to_dict()
    assert [e["t"] for e in data["per_step"]] == [900, 400, 10]
    assert all("firing_rate" in e and "energy_pj_memory" in e for e in data["per_step"])


def test_residual_sums_and_skip_tensors_of_the_unet(digits_run):
    from sddpm.evaluation.energy import MemoryEnergyModel

    model, report, _ = digits_run
    c = model.config  # 8x8, ch 16, ch_mult (1, 2), 1 res block, S = 4
    S, ch = c.snn_timesteps, c.channels
    paths = {p.name: p for p in report.paths}
    full, half = 8 * 8, 4 * 4
    # skips: the stem, encoder.0 (res, 8x8 ch), encoder.1 (down, 4x4 ch), encoder.2 (res, 2ch)
    skips = {n: p.elements for n, p in paths.items() if p.kind == "skip"}
    assert skips == {
        "stem.skip_tensor": S * ch * full,
        "encoder.0.skip_tensor": S * ch * full,
        "encoder.1.skip_tensor": S * ch * half,
        "encoder.2.skip_tensor": S * 2 * ch * half,
    }
    # residual sums: every res block's output (encoder 0, 2; middle 0, 1; decoder 0, 1, 3, 4)
    res = {n: p.elements for n, p in paths.items() if p.kind == "residual"}
    # at ch x 8x8: encoder.0, decoder.3, decoder.4; at 2ch x 4x4: encoder.2, middle.0,
    # middle.1, decoder.0, decoder.1
    assert len(res) == 8
    assert sum(res.values()) == S * (3 * ch * full + 5 * 2 * ch * half)
    flat = MemoryEnergyModel(memory_model="flat")  # 5 pJ per 32-bit value
    terms = report.memory_terms(model=flat)
    assert terms["skip"] == pytest.approx(2 * sum(skips.values()) * 5.0)  # written + read
    assert terms["residual"] == pytest.approx(sum(res.values()) * (0.9 + 3 * 5.0))


def test_cli_checkpoint_per_step_json_memory_model_and_steps_plot(tmp_path):
    from typer.testing import CliRunner

    from sddpm.cli import app

    torch.manual_seed(0)
    save_pretrained(build_model(TINY).eval(), tmp_path / "model")
    out = tmp_path / "out"
    args = ["energy", "--checkpoint", str(tmp_path / "model"), "--json", str(out / "e.json")]
    args += ["--plot-steps", str(out / "t.png"), "--sampler", "ddim", "--steps", "4"]
    args += ["--num", "2", "--memory-model", "flat", "--neuron-kernel", "eager"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "e.json").read_text())
    per_step = data["per_step"]
    assert len(per_step) == 4 and len({e["t"] for e in per_step}) == 4
    assert per_step[0]["t"] > per_step[-1]["t"]  # trajectory order: noise first
    assert all(e["evaluations"] == 2 for e in per_step)
    memory = data["memory_aware"]
    assert memory["model"]["memory_model"] == "flat"
    assert memory["energy_pj_per_image"] == pytest.approx(4 * memory["energy_pj_per_call"])
    assert data["per_image"]["energy_pj_memory"] == pytest.approx(memory["energy_pj_per_image"])
    mean = sum(e["energy_pj_memory"] for e in per_step) / 4
    assert mean == pytest.approx(memory["energy_pj_per_call"], rel=1e-9)
    assert data["ann"]["energy_pj_memory"] > 0 and "spikes_per_synapse_per_inference" in data
    assert (out / "t.png").read_bytes()[:4] == b"\x89PNG"
    assert "memory-aware (flat memory model)" in result.output

    both = CliRunner().invoke(app, [*args, "--run", str(tmp_path / "model")])
    assert both.exit_code == 2 and "exactly one of --run" in both.output
    bad = CliRunner().invoke(app, [*args[:-4], "--memory-model", "dram"])
    assert bad.exit_code == 2 and "--memory-model must be one of" in bad.output


@pytest.mark.parametrize("folded", [False, True])
def test_tsm_scales_are_real_multiplies_of_the_full_accounting(folded):
    """SDM's TSM: every TSM conv's output is scaled per SNN step, one real multiply per output
    element per step, in the full accounting only; the stem's conv still runs once on the
    images; the ANN twin of a TSM model is the plain ANN."""
    from sddpm.models import fold_batchnorm, tsm_scale_layers

    torch.manual_seed(0)
    base = preset("digits").replace(channels=8)
    model = build_model(base.replace(tsm=True)).eval()
    plain = build_model(base).eval()  # the same weights: TSM adds scales at 1, draws nothing
    if folded:
        model, plain = fold_batchnorm(model), fold_batchnorm(plain)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 400, 999])
    reports = []
    for net in (model, plain):
        with EnergyMeter(net) as meter, torch.inference_mode():
            net(x, t)
        reports.append(meter.report())
    tsm, ref = reports
    S, ch = base.snn_timesteps, base.channels
    convs = [name for name, _ in tsm_scale_layers(model)]
    assert "stem.conv" in convs and "head.conv" in convs
    scales = {
        la.name.removesuffix(".step_scale"): la for la in tsm.layers if "step_scale" in la.name
    }
    assert sorted(scales) == sorted(convs)
    for conv, la in scales.items():
        assert la.kind == "mac" and not la.paper and la.module == "TSM step scale"
        assert la.ops == layer(tsm, conv).outputs  # one multiply per output element per step
        assert la.weights == S
    assert scales["stem.conv"].ops == S * ch * 8 * 8  # by hand: the stem's [S, ch, 8, 8]
    # The conv work is the plain model's: the stem conv runs once on the images (not S times).
    assert layer(tsm, "stem.conv").ops == layer(ref, "stem.conv").ops == 8 * 8 * ch * 9
    for la in ref.layers:
        assert layer(tsm, la.name).dense_ops == la.dense_ops, la.name
    added = sum(la.ops for la in scales.values())
    assert tsm.per_call["macs"] == ref.per_call["macs"] + added
    assert tsm.per_call["macs_paper"] == ref.per_call["macs_paper"]
    assert tsm.ann["macs"] == ref.ann["macs"]  # the twin of a TSM model is the plain ANN


def test_guided_sampling_energy_counts_two_evaluations_per_image_and_step():
    from sddpm.evaluation.energy import measure_sampling_energy

    torch.manual_seed(0)
    cfg = tiny_unet_config(num_classes=3)
    model = build_model(cfg).eval()
    kw = dict(sampler="ddim", steps=2, batch_size=2, progress=False, labels=[1])
    plain = measure_sampling_energy(model, 3, guidance=1.0, **kw)
    guided = measure_sampling_energy(model, 3, guidance=2.0, **kw)
    # 3 images x 2 steps: 6 evaluations in 4 calls (batches 2, 1); guided: 12 in the same 4
    assert (plain.evaluations, plain.model_calls, plain.calls_per_image) == (6, 4, 2.0)
    assert (guided.evaluations, guided.model_calls, guided.calls_per_image) == (12, 4, 4.0)
    assert guided.settings["steps"] == 2 and guided.settings["guidance"] == 2.0
    # the per-call numbers are those of one image evaluation; per image, twice as many calls
    per_call = guided.per_call["sops"]
    assert guided.per_image["sops"] == pytest.approx(4 * per_call)
    assert "two U-Net evaluations per step" in guided.table()
    assert "two U-Net evaluations" in guided.to_dict()["guidance_note"]
    assert "guidance_note" not in plain.to_dict() and "two U-Net" not in plain.table()
    # without labels the images are spread over the classes, and recorded so
    from sddpm.diffusion import NoiseSchedule

    short = NoiseSchedule.linear(T=10)  # steps=None: DDIM's default, capped at T = 10
    spread = measure_sampling_energy(
        model, 3, sampler="ddim", guidance=2.0, progress=False, schedule=short
    )
    assert spread.evaluations == 3 * 10 * 2 and spread.settings["labels"] == [0, 1, 2]
    assert spread.settings["steps"] == 10 and "two U-Net" in spread.table()  # steps=None
