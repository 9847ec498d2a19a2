"""Image grids as PNG files."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..io import atomic_path


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
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    fill = int(round(pad_value * 255))
    grid = np.full(
        (rows * (h + padding) + padding, cols * (w + padding) + padding, c), fill, np.uint8
    )
    arr = x.permute(0, 2, 3, 1).numpy()
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
