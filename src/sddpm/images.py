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
    images: np.ndarray, ncol: int | None = None, pad: int = 2, scale: int = 1
) -> np.ndarray:
    """uint8 ``[N, H, W, C]`` -> one uint8 ``[rows*(H+pad)+pad, cols*(W+pad)+pad, C]`` image,
    black padding; ``scale`` enlarges each pixel (nearest) so small images stay visible."""
    n, h, w, c = images.shape
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    ncol = ncol or max(1, math.ceil(math.sqrt(n)))
    nrow = max(1, math.ceil(n / ncol))
    grid = np.zeros((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        grid[top : top + h, left : left + w] = images[i]
    return grid


def save_grid(
    images: torch.Tensor | np.ndarray, path: str | os.PathLike, ncol: int | None = None
) -> Path:
    """Write images (tensor in [-1, 1] ``[N,C,H,W]`` or uint8 ``[N,H,W,C]``) as one PNG grid.

    Images smaller than 32 pixels are enlarged so that the grid can be looked at."""
    arr = to_uint8(images) if isinstance(images, torch.Tensor) else np.asarray(images)
    scale = max(1, 32 // max(arr.shape[1], arr.shape[2]))
    grid = make_grid(arr, ncol=ncol, scale=scale)
    pil = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    path = Path(path)
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")
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
