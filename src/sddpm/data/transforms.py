"""Pixel transforms shared by the readers, matching the published preprocessing.

The published training script (``main_SDDPM.py``) builds its inputs with torchvision on PIL
images: ``Resize((32, 32))`` for MNIST / Fashion-MNIST, ``CenterCrop(148)`` then
``Resize((64, 64))`` for CelebA, ``RandomHorizontalFlip`` for CIFAR-10 and CelebA, then
``ToTensor`` and ``2x - 1``. torchvision's PIL path is ``PIL.Image.resize(size, BILINEAR)``
(antialiased when shrinking) and rounds the crop offsets with Python's ``round``; the functions
here do the same with PIL alone, so the pixels agree exactly.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

_MASK64 = (1 << 64) - 1


def uint8_to_signed(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pixels in 0..255 -> float32 in [-1, 1] (0 -> -1, 255 -> 1).

    Computed as ``x / 255 * 2 - 1`` in float32, bit-identical to torchvision's
    ``ToTensor()`` followed by ``Normalize(0.5, 0.5)`` or ``2 * x - 1``.
    """
    t = torch.as_tensor(x)
    if t.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, got {t.dtype}")
    return t.to(torch.float32).div(255.0).mul(2.0).sub(1.0)


def pil_to_array(img: Image.Image) -> np.ndarray:
    """A PIL image in mode ``L`` or ``RGB`` -> uint8 array ``[C, H, W]``."""
    a = np.asarray(img, dtype=np.uint8)
    if a.ndim == 2:
        return a[None].copy()
    return np.ascontiguousarray(a.transpose(2, 0, 1))


def center_crop_box(width: int, height: int, crop_w: int, crop_h: int) -> tuple[int, int, int, int]:
    """The ``(left, top, right, bottom)`` box of torchvision's ``CenterCrop`` on a PIL image.

    Offsets are ``int(round((size - crop) / 2))`` (Python's round, halves to even). A crop larger
    than the image is zero padded, ``(crop - size) // 2`` on the left/top, as torchvision does;
    PIL's ``crop`` fills a box outside the image with zeros.
    """
    if width >= crop_w:
        left = int(round((width - crop_w) / 2.0))
    else:
        left = -((crop_w - width) // 2)
    if height >= crop_h:
        top = int(round((height - crop_h) / 2.0))
    else:
        top = -((crop_h - height) // 2)
    return left, top, left + crop_w, top + crop_h


def center_crop(img: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """torchvision ``CenterCrop(size)`` on a PIL image; ``size`` is an int or ``(h, w)``."""
    crop_h, crop_w = (size, size) if isinstance(size, int) else size
    return img.crop(center_crop_box(img.width, img.height, crop_w, crop_h))


def center_crop_square(img: Image.Image) -> Image.Image:
    """Crop the largest centred square (side ``min(width, height)``)."""
    return center_crop(img, min(img.width, img.height))


def resize(img: Image.Image, size: int) -> Image.Image:
    """torchvision ``Resize((size, size))`` on a PIL image: PIL bilinear, antialiased."""
    if img.size == (size, size):
        return img
    return img.resize((size, size), Image.BILINEAR)


def resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 stack ``[N, C, H, W]`` (C = 1 or 3) to ``[N, C, size, size]`` with PIL."""
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    out = np.empty((n, c, size, size), dtype=np.uint8)
    for i in range(n):
        img = Image.fromarray(images[i, 0] if c == 1 else images[i].transpose(1, 2, 0))
        out[i] = pil_to_array(resize(img, size))
    return out


def _splitmix64(x: int) -> int:
    # The SplitMix64 finaliser: a fixed, platform-independent 64-bit mixing function.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def flip_decision(seed: int, epoch: int, index: int) -> bool:
    """Whether item ``index`` is flipped horizontally in ``epoch`` of a run seeded ``seed``.

    A pure function of its three arguments (probability 1/2), so a resumed run, any number of
    data-loader workers and any sharding across ranks flip exactly the same items; no global RNG
    is touched.
    """
    h = _splitmix64(
        _splitmix64(_splitmix64(seed & _MASK64) ^ (epoch & _MASK64)) ^ (index & _MASK64)
    )
    return bool(h >> 63)


def mirror(x: torch.Tensor) -> torch.Tensor:
    """Mirror ``[..., H, W]`` along the width."""
    return torch.flip(x, dims=(-1,))
