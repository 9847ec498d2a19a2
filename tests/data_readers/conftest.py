"""Writers for small files in the real on-disk formats (idx, CIFAR pickles, images)."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _write_idx(path: Path, array: np.ndarray, magic: int | None = None, gz: bool = False) -> Path:
    """Write ``array`` (uint8) as an idx file: big-endian magic (0, 0, 0x08, ndim), dims, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 + array.ndim
    payload = magic.to_bytes(4, "big")
    payload += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload += array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def _write_cifar_batch(path: Path, images: np.ndarray, labels=None) -> Path:
    """Write a CIFAR python batch: ``images`` uint8 [N, 3, 32, 32] as the real dict layout."""
    n = images.shape[0]
    batch = {
        b"batch_label": b"training batch 1 of 5",
        b"labels": list(labels if labels is not None else range(n)),
        b"data": np.ascontiguousarray(images, dtype=np.uint8).reshape(n, -1),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    return path


def _write_image(path: Path, array: np.ndarray, **save_kwargs) -> Path:
    """Save a uint8 [H, W] or [H, W, 3] array with PIL (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path, **save_kwargs)
    return path


@pytest.fixture
def write_idx():
    return _write_idx


@pytest.fixture
def write_cifar_batch():
    return _write_cifar_batch


@pytest.fixture
def write_image():
    return _write_image
