"""Pixel mapping, centre-crop geometry and the flip decisions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sddpm.data import center_crop, center_crop_box, flip_decision, uint8_to_signed


def test_uint8_to_signed_endpoints_and_midpoints():
    x = uint8_to_signed(np.array([0, 255, 51, 204], dtype=np.uint8))
    assert x.dtype == torch.float32
    assert x[0].item() == -1.0 and x[1].item() == 1.0
    # 51/255 = 0.2 -> -0.6 ; 204/255 = 0.8 -> 0.6
    assert x[2].item() == pytest.approx(-0.6, abs=1e-7)
    assert x[3].item() == pytest.approx(0.6, abs=1e-7)
    # bit-identical to torchvision's ToTensor + Normalize(0.5, 0.5)
    all_values = torch.arange(256, dtype=torch.uint8)
    reference = (all_values.float().div(255) - 0.5) / 0.5
    assert torch.equal(uint8_to_signed(all_values), reference)


def test_uint8_to_signed_rejects_floats():
    with pytest.raises(TypeError):
        uint8_to_signed(np.zeros(3, dtype=np.float32))


def test_center_crop_box_celeba_geometry():
    # aligned CelebA is 178 wide, 218 high: CenterCrop(148) starts at x=15, y=35
    assert center_crop_box(178, 218, 148, 148) == (15, 35, 163, 183)


def test_center_crop_box_rounds_like_python_round():
    # (5 - 2) / 2 = 1.5 -> 2 ; (7 - 2) / 2 = 2.5 -> 2 (halves go to even, as torchvision)
    assert center_crop_box(5, 7, 2, 2) == (2, 2, 4, 4)
    # (4 - 1) / 2 = 1.5 -> 2 ; (6 - 3) / 2 = 1.5 -> 2
    assert center_crop_box(4, 6, 1, 3) == (2, 2, 3, 5)


def test_center_crop_pads_when_larger_like_torchvision():
    img = Image.fromarray(np.full((3, 5), 9, dtype=np.uint8))  # 5 wide, 3 high
    out = np.asarray(center_crop(img, 8))
    assert out.shape == (8, 8)
    # torchvision pads left (8-5)//2 = 1 and top (8-3)//2 = 2
    expected = np.zeros((8, 8), dtype=np.uint8)
    expected[2:5, 1:6] = 9
    np.testing.assert_array_equal(out, expected)


def test_center_crop_pixels():
    a = np.arange(6 * 8, dtype=np.uint8).reshape(6, 8)  # 8 wide, 6 high
    out = np.asarray(center_crop(Image.fromarray(a), (4, 2)))  # (h, w)
    np.testing.assert_array_equal(out, a[1:5, 3:5])


def test_flip_decision_is_pure_and_balanced():
    decisions = [flip_decision(7, 3, i) for i in range(4000)]
    assert decisions == [flip_decision(7, 3, i) for i in range(4000)]
    assert 0.45 < np.mean(decisions) < 0.55
    # it depends on each of seed, epoch and index
    assert decisions != [flip_decision(8, 3, i) for i in range(4000)]
    assert decisions != [flip_decision(7, 4, i) for i in range(4000)]
    # not a periodic pattern in the index
    assert decisions[:2000] != decisions[2000:]
    # epochs are not simply complements or copies of each other
    other = [flip_decision(7, 4, i) for i in range(4000)]
    agree = np.mean(np.array(decisions) == np.array(other))
    assert 0.4 < agree < 0.6


def test_flip_decision_does_not_touch_global_rng():
    torch.manual_seed(0)
    np.random.seed(0)
    before_t, before_n = torch.get_rng_state(), np.random.get_state()[1].copy()
    for i in range(10):
        flip_decision(0, 0, i)
    assert torch.equal(torch.get_rng_state(), before_t)
    np.testing.assert_array_equal(np.random.get_state()[1], before_n)
