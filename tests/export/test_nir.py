"""NIR export: the graph, read back from its file by an interpreter of NIR's semantics written
here (it knows nothing of sddpm), reproduces the model's head input and every neuron's spikes
in float64, at the first, a middle and the last diffusion step, with randomised BatchNorm."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

nir = pytest.importorskip("nir")

from sddpm.export import NIRExportError, export_nir, nir_head, read_nir, write_nir  # noqa: E402
from sddpm.models import NeuronConfig, UNetConfig, build_model  # noqa: E402
from sddpm.snn import SpikingNeuron  # noqa: E402

from unet_configs import tiny_unet_config  # noqa: E402

SMALL = tiny_unet_config(image_channels=2, diffusion_steps=20, snn_timesteps=4)


# ---------------------------------------------------------------- an interpreter of NIR


def _topological(graph) -> list[str]:
    preds = defaultdict(list)
    for a, b in graph.edges:
        preds[b].append(a)
    done, order = set(), []
    pending = list(graph.nodes)
    while pending:
        ready = [n for n in pending if all(p in done for p in preds[n])]
        assert ready, "the graph has a cycle"
        for n in ready:
            order.append(n)
            done.add(n)
        pending = [n for n in pending if n not in done]
    return order, preds


def run_nir(graph, x: torch.Tensor, steps: int):
    """NIR semantics, discrete time with dt = 1, float64, batched over x's first axis: the
    edges into a node are summed; Conv2d is a cross-correlation with bias; Scale multiplies;
    IF: v += r * input, spike where v > v_threshold, then v = v_reset (v starts at 0).
    Returns the Output node's values ``[S, B, ...]`` and each IF node's spikes ``[S, B, ...]``.
    """
    order, preds = _topological(graph)
    state = {}
    outputs, spikes = [], defaultdict(list)
    for _ in range(steps):
        vals = {}
        for name in order:
            node = graph.nodes[name]
            if isinstance(node, nir.Input):
                vals[name] = x
                continue
            inp = sum(vals[p] for p in preds[name])
            t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64))  # noqa: E731
            if isinstance(node, nir.Conv2d):
                vals[name] = F.conv2d(
                    inp,
                    t(node.weight),
                    t(node.bias),
                    stride=tuple(int(s) for s in np.atleast_1d(node.stride)),
                    padding=tuple(int(p) for p in np.atleast_1d(node.padding)),
                    dilation=tuple(int(d) for d in np.atleast_1d(node.dilation)),
                    groups=int(node.groups),
                )
            elif isinstance(node, nir.Scale):
                vals[name] = inp * t(node.scale)
            elif isinstance(node, nir.IF):
                v = state.get(name, torch.zeros_like(inp)) + t(node.r) * inp
                z = v > t(node.v_threshold)
                state[name] = torch.where(z, t(node.v_reset).expand_as(v), v)
                vals[name] = z.to(torch.float64)
                spikes[name].append(vals[name])
            elif isinstance(node, nir.Output):
                outputs.append(inp)
            else:
                raise AssertionError(f"unexpected NIR node {type(node).__name__}")
    return torch.stack(outputs), {k: torch.stack(v) for k, v in spikes.items()}


# ---------------------------------------------------------------- the model side


def randomised(config: UNetConfig, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(config)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.6, 1.6)
            m.bias.data.uniform_(-0.2, 0.4)
        elif isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear)) and m.bias is not None:
            m.bias.data.uniform_(-0.2, 0.2)  # initialised at zero: make every bias matter
    # the head's first conv is initialised near zero; make it matter
    nn.init.normal_(model.head.conv.weight, std=0.1)
    return model.eval().double()


def model_run(model, x, t):
    """eps, the head's input [S, B, C', H, W] and each neuron's spikes [S, B, C, H, W]."""
    seen = {}
    handles = [model.head.register_forward_pre_hook(lambda m, a: seen.update(head=a[0]))]
    for name, m in model.named_modules():
        if isinstance(m, SpikingNeuron):
            handles.append(
                m.register_forward_hook(lambda mod, a, out, n=name: seen.update({n: out}))
            )
    with torch.no_grad():
        eps = model(x, torch.full((x.shape[0],), t))
    for h in handles:
        h.remove()
    return eps, seen.pop("head"), seen


@pytest.fixture(scope="module")
def small_model():
    return randomised(SMALL)


@pytest.mark.parametrize("t", [0, 9, 19])
def test_round_trip_through_the_file_is_exact_in_float64(small_model, tmp_path, t):
    model = small_model
    path = tmp_path / "unet.nir"
    write_nir(path, export_nir(model, t, dtype="float64"))
    graph = read_nir(path)  # everything below reads only the file

    x = torch.randn(3, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(t))
    eps, head_in, neuron_spikes = model_run(model, x, t)
    S = model.config.snn_timesteps
    assert graph.metadata["snn_steps"] == S and graph.metadata["t"] == t
    out, spikes = run_nir(graph, x, S)

    # the output is the head's input on every SNN step, every element
    assert out.shape == head_in.shape
    torch.testing.assert_close(out, head_in, rtol=0, atol=1e-12)
    # and the head stored in the metadata finishes the call
    torch.testing.assert_close(nir_head(graph)(out), eps, rtol=0, atol=1e-12)

    # every IF node fires exactly as its sddpm neuron (channel slice of a split neuron)
    covered = defaultdict(int)
    total_spikes = 0
    for name, z in spikes.items():
        meta = graph.nodes[name].metadata
        ours = neuron_spikes[meta["module"]]
        if "channels" in meta:
            a, b = (int(c) for c in meta["channels"])
            ours = ours[:, :, a:b]
        assert torch.equal(z, ours), name
        covered[meta["module"]] += z[0, 0].numel()
        total_spikes += int(z.sum())
    assert set(covered) == set(neuron_spikes)
    for module, n in covered.items():
        assert n == neuron_spikes[module][0, 0].numel(), module
    # the comparison means something: neurons fire, but not everywhere
    rate = total_spikes / sum(v.numel() for v in spikes.values())
    assert 0.02 < rate < 0.9


def test_write_and_read_preserve_every_array_edge_and_metadata(small_model, tmp_path):
    graph = export_nir(small_model, 5)
    write_nir(tmp_path / "g.nir", graph)
    back = read_nir(tmp_path / "g.nir")
    assert sorted(back.edges) == sorted(graph.edges)
    assert set(back.nodes) == set(graph.nodes)

    def same(a, b, where):
        if isinstance(a, dict):
            assert set(a) == set(b), where
            for k in a:
                same(a[k], b[k], f"{where}.{k}")
        elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            a, b = np.asarray(a), np.asarray(b)
            assert a.shape == b.shape and a.dtype == b.dtype, where
            assert np.array_equal(a, b), where
        elif isinstance(a, (tuple, list)):
            assert np.array_equal(np.asarray(a), np.asarray(b)), where
        else:
            assert a == b, where

    for name, node in graph.nodes.items():
        assert type(back.nodes[name]) is type(node), name
        same(node.to_dict(), back.nodes[name].to_dict(), name)
    same(graph.metadata, back.metadata, "metadata")
    assert (tmp_path / "g.nir").is_file() and len(list(tmp_path.iterdir())) == 1


def test_graph_uses_only_nir_primitives_and_tags_routing(small_model):
    graph = export_nir(small_model, 3)
    allowed = (nir.Input, nir.Output, nir.Conv2d, nir.Scale, nir.IF)
    assert all(isinstance(n, allowed) for n in graph.nodes.values())
    roles = defaultdict(list)
    for name, node in graph.nodes.items():
        if not isinstance(node, (nir.Input, nir.Output)):
            roles[node.metadata["role"]].append(name)
    # one upsample block: four 0/1 routing convs, no bias
    assert len(roles["routing"]) == 4
    for name in roles["routing"]:
        node = graph.nodes[name]
        assert set(np.unique(node.weight)) == {0.0, 1.0} and not node.bias.any()
    # dense convs: the stem conv on x_t and the 1x1 shortcuts on real residuals
    assert "stem_conv" in roles["dense"]
    assert all(graph.nodes[n].weight.shape[2:] == (1, 1) for n in roles["dense"][1:])
    # the output has exactly one edge into it
    assert [a for a, b in graph.edges if b == "output"] == ["decoder_4"]
    assert graph.metadata["sddpm_version"] and "v > v_threshold" in graph.metadata["firing_rule"]


def test_thresholds_make_nir_strict_rule_fire_on_ties():
    cfg = SMALL.replace(neuron=NeuronConfig(threshold=0.75, v_reset=-0.25))
    model = randomised(cfg, seed=1)
    for dtype in ("float32", "float64"):
        graph = export_nir(model, 0, dtype=dtype)
        ifs = [n for n in graph.nodes.values() if isinstance(n, nir.IF)]
        d = np.dtype(dtype).type
        # shifted by v_reset: NIR starts at 0 and resets to 0; threshold - v_reset = 1.0
        for node in ifs:
            assert node.v_threshold.dtype == np.dtype(dtype)
            assert np.all(node.v_threshold == np.nextafter(d(1.0), d(-np.inf)))
            assert not node.v_reset.any() and np.all(node.r == 1)
            # a tie (v exactly at threshold) fires under `>`; the value just below does not
            assert np.all(d(1.0) > node.v_threshold)
            assert not np.any(np.nextafter(d(1.0), d(-np.inf)) > node.v_threshold)
    # and the shifted neuron spikes as ours does, end to end
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    _, head_in, _ = model_run(model, x, 0)
    out, _ = run_nir(export_nir(model, 0, dtype="float64"), x, cfg.snn_timesteps)
    torch.testing.assert_close(out, head_in, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "config, match",
    [
        (SMALL.replace(kind="ann"), "ANN twin"),
        (SMALL.replace(neuron=NeuronConfig(reset="soft")), "soft reset"),
        (SMALL.replace(neuron=NeuronConfig(detach_reset=True)), "detached reset"),
        (SMALL.replace(neuron=NeuronConfig(tau=2.0)), "LIF"),
    ],
)
def test_models_nir_cannot_express_are_refused(config, match):
    with pytest.raises(NIRExportError, match=match):
        export_nir(build_model(config), 0)


def test_tsm_model_and_bad_arguments_are_refused(small_model):
    model = build_model(SMALL)
    model.stem.register_parameter("tsmp", nn.Parameter(torch.ones(4, 1, 1, 1, 1)))
    with pytest.raises(NIRExportError, match="TSM"):
        export_nir(model, 0)
    with pytest.raises(ValueError, match=r"t must be in \[0, 19\]"):
        export_nir(small_model, 20)
    with pytest.raises(ValueError, match="dtype"):
        export_nir(small_model, 0, dtype="float16")


def test_cli_writes_a_graph_that_matches_the_library_and_refuses_the_ann(tmp_path):
    from typer.testing import CliRunner

    from sddpm.cli import app
    from sddpm.models import save_pretrained

    torch.manual_seed(0)
    model = build_model(SMALL).eval()
    save_pretrained(model, tmp_path / "model")
    out = tmp_path / "g.nir"
    args = ["export-nir", "--checkpoint", str(tmp_path / "model"), "--t", "7", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    graph = read_nir(out)
    assert graph.metadata["t"] == 7 and graph.metadata["dtype"] == "float32"
    expected = export_nir(model, 7)
    assert sorted(graph.edges) == sorted(expected.edges)
    for name, node in expected.nodes.items():
        if isinstance(node, nir.Conv2d):
            assert np.array_equal(graph.nodes[name].bias, node.bias), name
    assert "4 routing" in result.output

    save_pretrained(build_model(SMALL.replace(kind="ann")), tmp_path / "ann")
    bad = CliRunner().invoke(
        app, ["export-nir", "--checkpoint", str(tmp_path / "ann"), "--t", "0", "--out", str(out)]
    )
    assert bad.exit_code == 2 and "ANN twin" in bad.output
    late = CliRunner().invoke(app, [*args[:4], "20", "--out", str(tmp_path / "late.nir")])
    assert late.exit_code == 2 and "--t must be in [0, 19]" in late.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ann", "g.nir", "model"]


def test_a_class_conditional_model_exports_one_class_folded_into_the_biases(tmp_path):
    from typer.testing import CliRunner

    from sddpm.cli import app
    from sddpm.models import save_pretrained

    model = randomised(SMALL.replace(num_classes=3))
    with torch.no_grad():
        model.class_embed.weight.normal_(0, 1.0)  # classes that differ
    t, S = 9, SMALL.snn_timesteps
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    outs = []
    for y in (0, 2, 3):  # two classes and the null class
        seen = {}
        hook = model.head.register_forward_pre_hook(lambda m, a, s=seen: s.update(head=a[0]))
        with torch.no_grad():
            eps = model(x, torch.full((2,), t), torch.full((2,), y))
        hook.remove()
        graph = export_nir(model, t, dtype="float64", y=y)
        assert graph.metadata["class"] == y and graph.metadata["model"]["num_classes"] == 3
        out, _ = run_nir(graph, x, S)
        torch.testing.assert_close(out, seen["head"], rtol=0, atol=1e-12)
        torch.testing.assert_close(nir_head(graph)(out), eps, rtol=0, atol=1e-12)
        outs.append(out)
    assert not torch.allclose(outs[0], outs[1])  # the class matters
    with pytest.raises(ValueError, match="class-conditional .*give the class"):
        export_nir(model, t)
    with pytest.raises(ValueError, match="unconditional model"):
        export_nir(randomised(SMALL), t, y=0)
    with pytest.raises(ValueError, match=r"class indices in \[0, 2\]"):
        export_nir(model, t, y=4)

    save_pretrained(model.float(), tmp_path / "model")
    save_pretrained(randomised(SMALL).float(), tmp_path / "plain")
    base = ["export-nir", "--t", "3", "--out", str(tmp_path / "g.nir")]
    ok = CliRunner().invoke(app, [*base, "--checkpoint", str(tmp_path / "model"), "--class", "1"])
    assert ok.exit_code == 0, ok.output
    assert "class 1" in ok.output and read_nir(tmp_path / "g.nir").metadata["class"] == 1
    cases = [
        (["--checkpoint", str(tmp_path / "model")], "give --class K (0..2)"),
        (["--checkpoint", str(tmp_path / "model"), "--class", "7"], "--class must be in [0, 2]"),
        (["--checkpoint", str(tmp_path / "plain"), "--class", "0"], "is unconditional"),
    ]
    for args, message in cases:
        bad = CliRunner().invoke(app, [*base, *args])
        assert bad.exit_code == 2 and message in bad.output, bad.output
