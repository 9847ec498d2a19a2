"""Published checkpoints: name mapping, bad checkpoints, the convert command."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sddpm.compat import (
    from_published,
    load_published_file,
    our_name,
    published_name,
    to_published,
)
from sddpm.models import load_pretrained


def published_state(reference):
    tensors, meta = reference
    return (
        {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")},
        json.loads(meta["config"]),
    )


def test_mapping_is_an_exact_inverse(reference, published_model):
    state, _ = published_state(reference)
    ours = published_model.state_dict()
    back = to_published(ours)
    assert sorted(back) == sorted(state)
    for k, v in state.items():
        assert torch.equal(back[k], v), k
    assert all(our_name(published_name(k)) == k for k in ours)
    assert published_name("encoder.2.time_proj.weight") == "downblocks.2.temb_proj.1.weight"
    assert published_name("head.temporal_conv.bias") == "T_output_layer.bias"
    assert our_name("upblocks.3.shortcut.weight") == "decoder.3.skip.weight"


def test_bad_checkpoints_list_the_keys(reference):
    state, config = published_state(reference)
    broken = dict(state)
    del broken["tail_conv.weight"]
    broken["extra.weight"] = torch.zeros(1)
    broken["conv.weight"] = torch.zeros(32, 3, 3, 3)
    with pytest.raises(ValueError) as err:
        from_published(broken, config)
    msg = str(err.value)
    assert "missing keys: tail_conv.weight" in msg
    assert "unexpected keys: extra.weight" in msg
    assert "conv.weight: expected [32, 1, 3, 3], got [32, 3, 3, 3]" in msg


def test_dataparallel_prefix_is_accepted(reference):
    state, config = published_state(reference)
    model = from_published({f"module.{k}": v for k, v in state.items()}, config)
    assert torch.equal(model.stem.conv.weight, state["conv.weight"])


def test_pickled_objects_are_refused(tmp_path):
    import argparse

    # e.g. a training script that saved its argparse namespace beside the weights
    path = tmp_path / "with_args.pt"
    torch.save({"net_model": {}, "args": argparse.Namespace(lr=2e-4)}, path)
    with pytest.raises(ValueError, match="never unpickles"):
        load_published_file(path)


def test_convert_command(tmp_path, reference):
    from typer.testing import CliRunner

    from sddpm.cli import app

    state, config = published_state(reference)
    pt = tmp_path / "published.pt"
    torch.save({"net_model": state, "step": 45000, "x_T": torch.zeros(1)}, pt)
    out = tmp_path / "converted"
    args = [
        "convert",
        str(pt),
        "--out",
        str(out),
        "--ch",
        "32",
        "--ch-mult",
        "1,2",
        "--num-res-blocks",
        "1",
        "--img-ch",
        "1",
        "--img-size",
        "16",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    model = load_pretrained(out)
    weights = load_file(str(out / "model.safetensors"))
    assert torch.equal(weights["stem.conv.weight"], state["conv.weight"])
    x, t = reference[0]["input.x"], reference[0]["input.t"]
    with torch.no_grad():
        assert (model(x, t) - reference[0]["output.eval"]).abs().max() < 1e-5

    # a mis-shaped checkpoint: an error listing the keys, nothing written
    bad_out = tmp_path / "bad"
    result = CliRunner().invoke(
        app, ["convert", str(pt), "--preset", "cifar10", "--out", str(bad_out)]
    )
    assert result.exit_code != 0
    assert "mis-shaped keys" in result.output
    assert not bad_out.exists()


def test_convert_command_reads_an_sdm_tsm_checkpoint(tmp_path):
    """`sddpm convert` on an SDM Spk_UNet_TSM checkpoint: TSM detected from the keys (no flag),
    saved with tsm=True, and the converted model reproduces SDM's output."""
    from safetensors import safe_open
    from typer.testing import CliRunner

    from sddpm.cli import app

    path = Path(__file__).parents[1] / "data" / "sdm-tsm-small-gray.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    pt = tmp_path / "sdm.pt"
    torch.save({"net_model": state, "ema_model": state}, pt)
    out = tmp_path / "converted"
    args = ["convert", str(pt), "--out", str(out), "--ch", "32", "--ch-mult", "1,2",
            "--num-res-blocks", "1", "--img-ch", "1", "--img-size", "16"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    model = load_pretrained(out)
    assert model.config.tsm
    assert json.loads((out / "config.json").read_text())["model"]["tsm"] is True
    weights = load_file(str(out / "model.safetensors"))
    assert torch.equal(weights["stem.conv.step_scale"], state["conv.tsmp"].flatten())
    with torch.no_grad():
        y = model(tensors["input.x"], tensors["input.t"])
    assert (y - tensors["output.eval"]).abs().max() < 1e-5
    # a TSM checkpoint whose scales do not fit the SNN steps: named, nothing written
    bad = tmp_path / "bad"
    result = CliRunner().invoke(app, [*args[:3], str(bad), *args[4:], "--timestep", "2"])
    assert result.exit_code != 0
    assert "SDM Spk_UNet_TSM" in result.output and "conv.tsmp" in result.output
    assert not bad.exists()


def test_tsm_names_map_both_ways():
    assert published_name("stem.conv.step_scale") == "conv.tsmp"
    name = published_name("encoder.2.skip.weight", tsm=True)
    assert name == "downblocks.2.shortcut.tsmconv.weight"
    assert our_name("upblocks.3.shortcut.tsmp") == "decoder.3.skip.step_scale"
    assert our_name("conv_identity.tsmconv.bias") == "stem.conv2.bias"
    assert our_name("T_output_layer.weight") == "head.temporal_conv.weight"
