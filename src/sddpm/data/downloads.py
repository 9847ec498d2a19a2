"""Fetching the standard dataset archives, checksum-verified, written atomically.

``download(name, root)`` (exported as :func:`sddpm.data.download`) puts each dataset where its
reader looks first: ``root/mnist/*.gz``, ``root/fashion-mnist/*.gz`` and
``root/cifar-10-batches-py/`` (from ``root/cifar-10-python.tar.gz``, which is kept so a later call
can verify it without the network). Every file goes to a temporary name beside its destination,
is hashed, and is renamed into place only when its checksum matches; a mismatch deletes the
temporary file and raises :class:`ChecksumError`. CelebA cannot be downloaded: its license
forbids redistribution.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..io import atomic_dir, atomic_path
from .datasets import CELEBA_FOLDER, CELEBA_URL, CIFAR10_FOLDER, CIFAR10_URL, IdxDataset
from .errors import ChecksumError, DatasetError

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Resource:
    """One file to fetch: its name under the dataset folder, mirror URLs tried in order, and its
    published checksum as ``(algorithm, hexdigest)`` (``"md5"`` or ``"sha256"``)."""

    filename: str
    urls: tuple[str, ...]
    checksum: tuple[str, str]


def _mirrored(bases: Sequence[str], files: dict[str, str]) -> tuple[Resource, ...]:
    return tuple(
        Resource(name, tuple(b + name for b in bases), ("md5", md5)) for name, md5 in files.items()
    )


# MD5s are the published ones (the Fashion-MNIST README, the CIFAR page, LeCun's MNIST files as
# mirrored by PyTorch's S3 bucket and Google's CVDF bucket).
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
FASHION_MNIST_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)

RESOURCES: dict[str, tuple[Resource, ...]] = {
    "mnist": _mirrored(
        MNIST_MIRRORS,
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion-mnist": _mirrored(
        FASHION_MNIST_MIRRORS,
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
    "cifar10": (
        Resource(
            "cifar-10-python.tar.gz", (CIFAR10_URL,), ("md5", "c58f30108f718f92721af3b95e74349a")
        ),
    ),
}

# Where each dataset's files go, relative to ``root``.
TARGET_FOLDERS = {
    "mnist": IdxDataset.FOLDERS["mnist"][0],
    "fashion-mnist": IdxDataset.FOLDERS["fashion-mnist"][0],
    "cifar10": ".",
}

CELEBA_INSTRUCTIONS = (
    "CelebA cannot be downloaded automatically: its license forbids redistribution. Request the "
    f"'Align&Cropped Images' (img_align_celeba.zip) from {CELEBA_URL} (or its Google Drive), "
    f"unzip it so that ROOT/{CELEBA_FOLDER}/000001.jpg exists, and pass root=ROOT (CLI: "
    "--data-dir ROOT)."
)


def file_checksum(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file (``algorithm``: any name :func:`hashlib.new` accepts)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _default_fetch(url: str, out, progress: bool, desc: str) -> None:
    """Stream ``url`` (http, https or file) into the open binary file ``out``."""
    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - fixed URLs
        total = response.headers.get("Content-Length")
        with tqdm(
            total=int(total) if total else None,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=desc,
            disable=not progress,
            leave=False,
        ) as bar:
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                out.write(chunk)
                bar.update(len(chunk))


def fetch_file(
    urls: str | Sequence[str],
    dest: str | os.PathLike,
    checksum: tuple[str, str] | None,
    *,
    progress: bool = True,
    fetch: Callable[..., None] | None = None,
) -> Path:
    """Download the first mirror of ``urls`` that yields a file with ``checksum`` to ``dest``.

    The bytes go to a temporary file in ``dest``'s folder and are renamed to ``dest`` only after
    the checksum ``(algorithm, hexdigest)`` matches (``None`` skips the check). A file already at
    ``dest`` with the right checksum is kept without fetching. ``fetch(url, out_file, progress,
    desc)`` replaces the network call (tests). Raises :class:`ChecksumError` when a mirror served
    wrong bytes and none served right ones, :class:`DatasetError` when none could be reached.
    """
    dest = Path(dest)
    urls = (urls,) if isinstance(urls, str) else tuple(urls)
    fetch = fetch or _default_fetch
    if (
        checksum is not None
        and dest.is_file()
        and file_checksum(dest, checksum[0]) == checksum[1].lower()
    ):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    mismatch = False
    for url in urls:
        try:
            with atomic_path(dest) as tmp:  # renamed onto dest only when it checks out
                with open(tmp, "wb") as out:
                    fetch(url, out, progress, dest.name)
                if checksum is not None:
                    algorithm, expected = checksum
                    got = file_checksum(tmp, algorithm)
                    if got != expected.lower():
                        raise _ChecksumMismatch(f"{algorithm} {got}, expected {expected}")
            return dest
        except _ChecksumMismatch as e:
            mismatch = True
            failures.append(f"{url}: {e}")
        except Exception as e:
            failures.append(f"{url}: {type(e).__name__}: {e}")
    error = ChecksumError if mismatch else DatasetError
    raise error(
        f"could not download {dest.name} to {dest.parent}:\n  "
        + "\n  ".join(failures)
        + "\nNothing was written. Check the network, or fetch the file by hand from one of: "
        + ", ".join(urls)
    )


def _safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive into ``dest`` refusing links and paths that leave ``dest``."""
    dest_resolved = dest.resolve()
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for m in members:
            target = (dest / m.name).resolve()
            if not (m.isfile() or m.isdir()) or not target.is_relative_to(dest_resolved):
                raise DatasetError(f"archive {archive} holds an unsafe member {m.name!r}")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, members=members, filter="data")
        else:  # pragma: no cover - Python < 3.10.12
            tar.extractall(dest, members=members)


def _extract_cifar(archive: Path, root: Path) -> Path:
    target = root / CIFAR10_FOLDER
    with atomic_dir(target) as staged:  # replaces target only once extraction completed
        _safe_extract(archive, staged)
        extracted = staged / CIFAR10_FOLDER
        if not extracted.is_dir():
            raise DatasetError(f"archive {archive} has no {CIFAR10_FOLDER}/ folder")
        for item in list(staged.iterdir()):  # keep only the batches folder's content
            if item != extracted:
                shutil.rmtree(item) if item.is_dir() else item.unlink()
        for item in extracted.iterdir():
            os.replace(item, staged / item.name)
        extracted.rmdir()
    return target


class _ChecksumMismatch(Exception):
    """A downloaded file whose checksum is not the expected one (the next URL is tried)."""


def download(
    name: str,
    root: str | os.PathLike,
    *,
    progress: bool = True,
    fetch: Callable[..., None] | None = None,
) -> Path:
    """Download dataset ``name`` under ``root`` and return the folder its reader will use.

    ``name``: ``"mnist"``, ``"fashion-mnist"`` or ``"cifar10"`` (``"digits"`` is bundled with
    scikit-learn and needs nothing). Files already present with the right checksum are not
    fetched again. ``celeba64`` raises :class:`DatasetError` explaining how to obtain it.
    """
    from .registry import canonical_name

    name = canonical_name(name)
    root = Path(root)
    if name == "digits":
        return root
    if name == "celeba64":
        raise DatasetError(CELEBA_INSTRUCTIONS)
    if name not in RESOURCES:
        raise DatasetError(
            f"no download for dataset {name!r}; downloadable: {', '.join(sorted(RESOURCES))}"
        )
    folder = root / TARGET_FOLDERS[name]
    paths = [
        fetch_file(r.urls, folder / r.filename, r.checksum, progress=progress, fetch=fetch)
        for r in RESOURCES[name]
    ]
    if name == "cifar10":
        return _extract_cifar(paths[0], root)
    return folder
