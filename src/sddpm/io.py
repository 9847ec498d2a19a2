"""Small file helpers: atomic writes and state_dict checks with readable errors."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    Nothing is left half written: if the block raises, the temporary file is removed and
    ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, standard JSON, atomically. NaN and infinities are refused
    (a ``ValueError`` naming ``path``; nothing is written): JSON has no such numbers."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False)
    except ValueError as err:
        raise ValueError(f"{path}: not written, it would hold NaN or infinity ({err})") from None
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")


def state_dict_mismatch(
    expected: Mapping[str, torch.Size | tuple[int, ...]],
    given: Mapping[str, torch.Tensor],
    show: int = 5,
) -> str | None:
    """A message listing missing, unexpected and mis-shaped keys (the first ``show`` of each,
    with counts), or None when ``given`` has exactly the expected keys and shapes."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    misshaped = [
        f"{k}: expected {list(expected[k])}, got {list(given[k].shape)}"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k])
    ]
    parts = []
    for title, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("mis-shaped keys", misshaped),
    ):
        if items:
            more = f" (and {len(items) - show} more)" if len(items) > show else ""
            parts.append(f"{len(items)} {title}: {', '.join(items[:show])}{more}")
    return "; ".join(parts) or None
