"""Images out: [-1, 1] tensors to uint8 arrays, PNG grids and ``.npz`` files (atomic writes)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .io import atomic_path


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[N, C, H, W]`` in [-1, 1] -> uint8 ``[N, H, W, C]`` (values clipped, rounded)."""
    if images.dim() != 4:
        raise ValueError(f"expected images [N, C, H, W], got {tuple(images.shape)}")
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def make_grid(
    images: torch.Tensor, nrow: int | None = None, padding: int = 2, pad_value: float = 1.0
) -> np.ndarray:
    """``[N, C, H, W]`` images in [-1, 1] -> ``uint8`` array ``[rows*(H+p)+p, cols*(W+p)+p, C]``.

    ``nrow`` images per row (default: ``ceil(sqrt(N))``); ``padding`` pixels of ``pad_value``
    (in [0, 1], default white) between and around the images. Values outside [-1, 1] are clipped.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 1 or 3, H, W], got {tuple(images.shape)}")
    n, c, h, w = images.shape
    if n == 0:
        raise ValueError("no images to put in a grid")
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    arr = to_uint8(images)
    fill = int(round(pad_value * 255))
    grid = np.full(
        (rows * (h + padding) + padding, cols * (w + padding) + padding, c), fill, np.uint8
    )
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[top : top + h, left : left + w] = arr[i]
    return grid


def save_grid(
    images: torch.Tensor,
    path: str | os.PathLike,
    nrow: int | None = None,
    padding: int = 2,
    scale: int | None = None,
) -> Path:
    """Write ``[N, C, H, W]`` images in [-1, 1] as one PNG grid, atomically; returns the path.

    ``scale``: nearest-neighbour magnification of the whole grid (default: enough to make each
    image at least 32 pixels tall, so 8x8 digits are visible).
    """
    grid = make_grid(images, nrow=nrow, padding=padding)
    if scale is None:
        scale = max(1, math.ceil(32 / images.shape[-2]))
    mode = "L" if grid.shape[2] == 1 else "RGB"
    img = Image.fromarray(grid[:, :, 0] if mode == "L" else grid, mode=mode)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def save_npz(images: torch.Tensor | np.ndarray, path: str | os.PathLike, **extra) -> Path:
    """Write ``images`` (uint8 ``[N, H, W, C]``) and any extra arrays to an ``.npz``."""
    arr = to_uint8(images) if isinstance(images, torch.Tensor) else np.asarray(images)
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, images=arr, **extra)
    return path


def save_images(images: torch.Tensor, path: str | os.PathLike) -> Path:
    """``.png``: a grid; ``.npz``: the array ``images`` uint8 ``[N, H, W, C]``."""
    suffix = Path(path).suffix.lower()
    if suffix == ".png":
        return save_grid(images, path)
    if suffix == ".npz":
        return save_npz(images, path)
    raise ValueError(f"output must end in .png (a grid) or .npz (an array), got {path}")
