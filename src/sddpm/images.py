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


def grid_cells(
    n: int, nrow: int | None = None, labels: torch.Tensor | np.ndarray | None = None
) -> tuple[list[tuple[int, int]], int, int]:
    """Where each of ``n`` images goes in a grid: ``([(row, col)] per image, rows, cols)``.

    Without ``labels``: ``nrow`` images per row (default ``ceil(sqrt(n))``), in order. With
    ``labels [n]`` of two or more classes: one class per row (classes in ascending order,
    each row's images in their order), ``cols`` the largest class's count; a single class
    is laid out as without labels."""
    classes = None if labels is None else [int(v) for v in np.asarray(labels).reshape(-1)]
    if classes is not None and len(classes) != n:
        raise ValueError(f"{len(classes)} labels for {n} images; give one label per image")
    if classes is None or len(set(classes)) < 2:
        cols = nrow or math.ceil(math.sqrt(n))
        return [divmod(i, cols) for i in range(n)], math.ceil(n / cols), cols
    row_of = {k: r for r, k in enumerate(sorted(set(classes)))}
    filled = dict.fromkeys(row_of, 0)
    cells = []
    for k in classes:
        cells.append((row_of[k], filled[k]))
        filled[k] += 1
    return cells, len(row_of), max(filled.values())


def make_grid(
    images: torch.Tensor,
    nrow: int | None = None,
    padding: int = 2,
    pad_value: float = 1.0,
    labels: torch.Tensor | np.ndarray | None = None,
) -> np.ndarray:
    """``[N, C, H, W]`` images in [-1, 1] -> ``uint8`` array ``[rows*(H+p)+p, cols*(W+p)+p, C]``.

    ``nrow`` images per row (default: ``ceil(sqrt(N))``); ``padding`` pixels of ``pad_value``
    (in [0, 1], default white) between and around the images. Values outside [-1, 1] are clipped.
    ``labels [N]`` (class-conditional samples): one class per row (see :func:`grid_cells`).
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 1 or 3, H, W], got {tuple(images.shape)}")
    n, c, h, w = images.shape
    if n == 0:
        raise ValueError("no images to put in a grid")
    cells, rows, cols = grid_cells(n, nrow, labels)
    arr = to_uint8(images)
    fill = int(round(pad_value * 255))
    grid = np.full(
        (rows * (h + padding) + padding, cols * (w + padding) + padding, c), fill, np.uint8
    )
    for i, (r, q) in enumerate(cells):
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[top : top + h, left : left + w] = arr[i]
    return grid


def save_grid(
    images: torch.Tensor,
    path: str | os.PathLike,
    nrow: int | None = None,
    padding: int = 2,
    scale: int | None = None,
    labels: torch.Tensor | np.ndarray | None = None,
) -> Path:
    """Write ``[N, C, H, W]`` images in [-1, 1] as one PNG grid, atomically; returns the path.

    ``scale``: nearest-neighbour magnification of the whole grid (default: enough to make each
    image at least 32 pixels tall, so 8x8 digits are visible). ``labels [N]``: one class per
    row (:func:`make_grid`).
    """
    grid = make_grid(images, nrow=nrow, padding=padding, labels=labels)
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


def save_images(
    images: torch.Tensor, path: str | os.PathLike, labels: torch.Tensor | None = None
) -> Path:
    """``.png``: a grid (one class per row with ``labels``); ``.npz``: the array ``images``
    uint8 ``[N, H, W, C]``, and ``labels`` int64 ``[N]`` when given."""
    suffix = Path(path).suffix.lower()
    if suffix == ".png":
        return save_grid(images, path, labels=labels)
    if suffix == ".npz":
        extra = {} if labels is None else {"labels": np.asarray(labels, dtype=np.int64)}
        return save_npz(images, path, **extra)
    raise ValueError(f"output must end in .png (a grid) or .npz (an array), got {path}")
