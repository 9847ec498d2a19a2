"""Small file helpers: durable atomic writes, checksums, safe torch reads, state_dict checks."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a directory's entries') data to the disk.

    A rename is durable only once the renamed file's data and its directory's entry are on
    disk; directories that cannot be opened for fsync (some platforms) are skipped."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # e.g. a directory on a file system without fsync support
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    Nothing is left half written: the temporary file is fsynced before the rename and the
    directory after it, so after a crash ``path`` holds either its old or its new content.
    If the block raises, the temporary file is removed and ``path`` is untouched. This is the
    one atomic-write helper of the package: every file sddpm writes goes through it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        fsync_path(tmp_path)
        os.replace(tmp_path, path)
        fsync_path(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path``.

    The directory counterpart of :func:`atomic_path`: files written inside (with
    :func:`atomic_path`, or fsynced by the caller) appear at ``path`` all at once. The
    temporary directory is fsynced before the rename and the parent after it; an existing
    ``path`` is removed just before the rename. If the block raises, the temporary directory
    is removed and ``path`` is untouched. Temporary names start with ``.NAME.`` and end in
    ``.tmp``, so a reader skips them and a cleanup can find what a killed writer left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        fsync_path(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, standard JSON, atomically. NaN and infinities are refused
    (a ``ValueError`` naming ``path``; nothing is written): JSON has no such numbers."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False)
    except ValueError as err:
        raise ValueError(f"{path}: not written, it would hold NaN or infinity ({err})") from None
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The hex SHA-256 digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class UnreadableFileError(ValueError):
    """A file is truncated, corrupt or not of the expected kind; ``path`` names it."""

    def __init__(self, path: str | os.PathLike, message: str) -> None:
        self.path = Path(path)
        super().__init__(message)


class PickledObjectsError(ValueError):
    """A ``.pt`` file is intact but needs arbitrary pickled Python objects to be read."""


def load_torch_file(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU, with errors that name the file.

    Raises :class:`UnreadableFileError` for a truncated or corrupt file (or one that is not a
    torch file at all) and :class:`PickledObjectsError` for an intact file that holds pickled
    Python objects beyond tensors, numbers, strings and containers (which sddpm never unpickles).
    ``FileNotFoundError`` passes through."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as err:
        text = str(err)
        if "Unsupported global" in text or "Unsupported class" in text:
            raise PickledObjectsError(
                f"{path} holds pickled Python objects (torch.load(weights_only=True) refused "
                "them), which sddpm never unpickles"
            ) from None
        raise UnreadableFileError(path, f"{path} is corrupt or not a torch file") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, IndexError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UnreadableFileError(
            path, f"{path} is truncated or corrupt and cannot be read ({first})"
        ) from None


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
