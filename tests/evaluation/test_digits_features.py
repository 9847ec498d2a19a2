"""The digits proxy feature network: accuracy, proxy FID, sample report, cache."""

from __future__ import annotations

import pytest
import torch

import sddpm.evaluation.digits_features as digits
from sddpm.evaluation import (
    DigitsTrainingRecipe,
    digits_proxy_fid,
    digits_sample_report,
    load_digits_feature_net,
    load_digits_split,
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sddpm-cache")


@pytest.fixture(scope="module")
def net(cache_dir):
    return load_digits_feature_net(cache_dir)  # trains (a few seconds) and caches


@pytest.fixture(scope="module")
def split():
    return load_digits_split()


def test_split_is_fixed_and_in_unit_range(split):
    assert split.x_train.shape == (1347, 1, 8, 8) and split.x_test.shape == (450, 1, 8, 8)
    assert float(split.x_train.min()) == 0.0 and float(split.x_train.max()) == 1.0
    assert torch.bincount(split.y_test, minlength=10).min() >= 30  # every class present


def test_held_out_accuracy(net, split):
    # Measured 0.978 (MLP, 200 full-batch Adam steps, one thread).
    assert net.test_accuracy > 0.95
    acc = (net.probs(split.x_test).argmax(dim=1) == split.y_test).float().mean()
    assert float(acc) == pytest.approx(net.test_accuracy)


def test_proxy_fid_real_vs_noise(net, split):
    real = digits_proxy_fid(split.x_test, split.x_train, net)
    noise = torch.rand(450, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    fake = digits_proxy_fid(noise, split.x_train, net)
    # Measured: test vs train 3.15, uniform noise vs train 1343.
    assert real < 10.0
    assert fake > 100.0 and fake > 50 * real


def test_sample_report(net, split):
    report = digits_sample_report(split.x_test, net)
    assert report["num_images"] == 450
    assert report["confident_fraction"] > 0.9  # measured 0.962
    assert report["class_coverage"] == 1.0
    assert sum(report["class_counts"]) == round(report["confident_fraction"] * 450)
    noise = torch.rand(450, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert digits_sample_report(noise, net)["confident_fraction"] < 0.5  # measured 0.24
    # 16x16 nearest-upsampled digits are area-averaged back to the same 8x8 images.
    upsampled = split.x_test.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert digits_sample_report(upsampled, net) == report


def test_refuses_minus_one_to_one_images(net):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        net.features(torch.full((2, 1, 8, 8), -1.0))


def test_cache_is_reused_and_recipe_checked(net, cache_dir, monkeypatch):
    assert (cache_dir / "digits-features-v1.safetensors").is_file()

    def no_training(recipe=None):
        raise AssertionError("should have loaded from the cache")

    monkeypatch.setattr(digits, "train_digits_feature_net", no_training)
    again = load_digits_feature_net(cache_dir)
    for a, b in zip(net.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert again.test_accuracy == net.test_accuracy
    with pytest.raises(AssertionError, match="from the cache"):  # another recipe: retrain
        load_digits_feature_net(cache_dir, recipe=DigitsTrainingRecipe(steps=5))


def test_training_is_deterministic(tmp_path):
    recipe = DigitsTrainingRecipe(steps=20)
    a = load_digits_feature_net(tmp_path / "a", recipe=recipe)
    b = load_digits_feature_net(tmp_path / "b", recipe=recipe)
    for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y)
