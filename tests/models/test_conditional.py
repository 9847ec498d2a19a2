"""The class-conditional U-Net: the embedding, the null class, label checks, checkpoints."""

import json
import types

import pytest
import torch

from sddpm.models import (
    UNetConfig,
    build_model,
    check_labels,
    fold_batchnorm,
    load_pretrained,
    save_pretrained,
)
from sddpm.models.labels import num_classes_of

from unet_configs import tiny_unet_config

CLASSES = 5


def config(kind="spiking", num_classes=CLASSES):
    return tiny_unet_config(diffusion_steps=50, kind=kind, num_classes=num_classes)


def pair(kind="spiking"):
    """A conditional model and the unconditional one built under the same seed, eval mode."""
    torch.manual_seed(0)
    cond = build_model(config(kind)).eval()
    torch.manual_seed(0)
    plain = build_model(config(kind, 0)).eval()
    return cond, plain


def inputs(batch=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 1, 8, 8, generator=g), torch.tensor([3, 17, 42][:batch])


def test_unconditional_config_has_no_class_parameters():
    assert UNetConfig().num_classes == 0 and UNetConfig().null_class is None
    cond, plain = pair()
    assert not any("class" in k for k in plain.state_dict())
    assert sorted(cond.state_dict()) == sorted([*plain.state_dict(), "class_embed.weight"])
    assert cond.class_embed.weight.shape == (CLASSES + 1, 4 * 8)
    assert cond.config.null_class == CLASSES
    # An older config without the field loads as unconditional.
    d = plain.config.to_dict()
    assert d["num_classes"] == 0
    del d["num_classes"]
    assert UNetConfig.from_dict(d) == plain.config


@pytest.mark.parametrize("kind", ["spiking", "ann"])
def test_shared_parameters_draw_the_same_initial_values(kind):
    cond, plain = pair(kind)
    for name, p in plain.state_dict().items():
        assert torch.equal(cond.state_dict()[name], p), name


@pytest.mark.parametrize("kind", ["spiking", "ann"])
def test_class_embedding_is_added_to_the_time_embedding(kind):
    """The conditional output equals the unconditional model's with embed[y] added to its time
    embedding (a hook), bit for bit; a zero embedding gives the unconditional model."""
    cond, plain = pair(kind)
    x, t = inputs()
    y = torch.tensor([0, 4, 2])
    row = cond.class_embed.weight.detach()[y]
    handle = plain.time_embed.register_forward_hook(lambda m, a, out: out + row)
    with torch.no_grad():
        expected = plain(x, t)
        handle.remove()
        out = cond(x, t, y)
        assert out.shape == (3, 1, 8, 8)
        assert torch.equal(out, expected)
        # another class changes the output
        assert not torch.allclose(cond(x, t, torch.tensor([1, 4, 2]))[0], out[0])
        cond.class_embed.weight.zero_()
        assert torch.equal(cond(x, t, y), plain(x, t))


def test_null_class_is_the_unconditional_path():
    cond, _ = pair()
    x, t = inputs()
    with torch.no_grad():
        none = cond(x, t)
        null = cond(x, t, torch.full((3,), CLASSES))
        mixed = cond(x, t, torch.tensor([CLASSES, 1, CLASSES]))
    assert torch.equal(none, null)
    assert torch.equal(mixed[[0, 2]], null[[0, 2]])
    assert not torch.allclose(mixed[1], null[1])


def test_gradients_reach_only_the_rows_used():
    cond, _ = pair()
    cond.train()
    x, t = inputs()
    cond(x, t, torch.tensor([1, 1, CLASSES])).square().sum().backward()
    used = cond.class_embed.weight.grad.abs().sum(1) > 0
    assert used.tolist() == [False, True, False, False, False, True]


def test_label_errors_name_the_problem():
    cond, plain = pair()
    x, t = inputs(2)
    with pytest.raises(ValueError, match="unconditional model") as info:
        plain(x, t, torch.tensor([0, 1]))
    assert "(UNetConfig(num_classes=N); CLI: --set num_classes=N)" in str(info.value)
    with pytest.raises(ValueError, match=r"\[0, 4\] or 5 \(the null class\), got values 0\.\.6"):
        cond(x, t, torch.tensor([0, 6]))
    with pytest.raises(ValueError, match=r"got values -1\.\.2"):
        cond(x, t, torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        cond(x, t, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        cond(x, t, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="dtype torch.float32"):
        cond(x, t, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="dtype torch.bool"):
        cond(x, t, torch.tensor([True, False]))
    with pytest.raises(ValueError, match="num_classes must be >= 0"):
        UNetConfig(num_classes=-1)
    with pytest.raises(ValueError, match="num_classes must be an integer"):
        UNetConfig(num_classes=2.5)


def test_label_values_are_not_read_off_the_host():
    """Like t, off-CPU labels get the shape and dtype checks only: no device sync (a meta
    tensor has no values; reading one would raise)."""
    cond, _ = pair()
    x = torch.empty(2, 1, 8, 8, device="meta")
    t = torch.empty(2, dtype=torch.int64, device="meta")
    cond.validate_input(x, t, torch.empty(2, dtype=torch.int64, device="meta"))
    with pytest.raises(ValueError, match="dtype"):
        cond.validate_input(x, t, torch.empty(2, device="meta"))


def test_check_labels_on_the_host():
    y = check_labels([0, 4, 5], CLASSES)
    assert y.dtype == torch.int64 and y.tolist() == [0, 4, 5]
    assert check_labels(torch.tensor([1, 2], dtype=torch.int32), CLASSES, batch=2).dtype == (
        torch.int64
    )
    with pytest.raises(ValueError, match=r"got values 0\.\.6"):
        check_labels([0, 6], CLASSES)
    with pytest.raises(ValueError, match="integer class indices"):
        check_labels([0.5], CLASSES)
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        check_labels([0, 1], CLASSES, batch=3)
    with pytest.raises(ValueError, match="unconditional model"):
        check_labels([0], 0)


def test_num_classes_of_reads_the_config():
    cond, plain = pair()
    assert num_classes_of(cond) == CLASSES
    assert num_classes_of(plain) == 0
    assert num_classes_of(torch.nn.Identity()) == 0  # no config: unconditional
    assert num_classes_of(types.SimpleNamespace(config=object())) == 0  # config without the field


def test_checkpoint_records_the_class_count(tmp_path):
    cond, _ = pair()
    with torch.no_grad():
        cond.class_embed.weight.add_(1.0)  # not the initial values
    save_pretrained(cond, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["model"]["num_classes"] == CLASSES
    loaded = load_pretrained(tmp_path / "m")
    assert loaded.config.num_classes == CLASSES
    x, t = inputs()
    y = torch.tensor([0, 3, CLASSES])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), cond(x, t, y))


def test_batchnorm_folding_keeps_the_conditional_model():
    cond, _ = pair()
    cond.train()(*inputs(), torch.tensor([0, 1, 2]))  # move the BatchNorm running statistics
    cond.eval()
    folded = fold_batchnorm(cond)
    x, t = inputs()
    y = torch.tensor([4, 0, CLASSES])
    with torch.no_grad():
        ref, out = cond(x, t, y), folded(x, t, y)
    # float rounding may flip a rare spike; nearly every element agrees to 1e-4
    assert ((out - ref).abs() > 1e-4).float().mean() < 0.02
    assert torch.equal(folded.class_embed.weight, cond.class_embed.weight)
