"""The dataset registry and the ``build_dataset`` factory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .datasets import (
    CelebA64Dataset,
    Cifar10Dataset,
    DigitsDataset,
    IdxDataset,
    ImageDataset,
    ImageFolderDataset,
)
from .errors import DatasetError

DATA_ROOT_ENV = "SDDPM_DATA_ROOT"


@dataclass(frozen=True)
class DatasetInfo:
    """What a registered dataset yields by default.

    Attributes:
        name: the registry name.
        channels: image channels (``folder``: 3, or 1 with ``channels=1``).
        image_size: default side length of the square images.
        hflip: whether random horizontal flips are on by default (the published recipe).
        downloadable: whether :func:`sddpm.data.download` can fetch it.
        needs_root: whether a data folder is required (``digits`` is bundled).
        description: one line for ``--help`` and listings.
        num_classes: its number of classes; 0: no class labels (CelebA); ``None``: depends on
            the data (``folder``: one class per subfolder).
    """

    name: str
    channels: int
    image_size: int
    hflip: bool
    downloadable: bool
    needs_root: bool
    description: str
    num_classes: int | None


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "digits",
            1,
            8,
            False,
            False,
            False,
            "scikit-learn's bundled 8x8 digits, 1,797 images, no download",
            num_classes=10,
        ),
        DatasetInfo(
            "mnist",
            1,
            32,
            False,
            True,
            True,
            "MNIST idx files, 28x28 resized to 32x32 (bilinear)",
            num_classes=10,
        ),
        DatasetInfo(
            "fashion-mnist",
            1,
            32,
            False,
            True,
            True,
            "Fashion-MNIST idx files, 28x28 resized to 32x32 (bilinear)",
            num_classes=10,
        ),
        DatasetInfo(
            "cifar10",
            3,
            32,
            True,
            True,
            True,
            "CIFAR-10 python batches, 32x32, random horizontal flips",
            num_classes=10,
        ),
        DatasetInfo(
            "celeba64",
            3,
            64,
            True,
            False,
            True,
            "aligned CelebA, centre crop 148 then resize 64, random horizontal flips",
            num_classes=0,
        ),
        DatasetInfo(
            "folder",
            3,
            64,
            False,
            False,
            True,
            "any folder of png/jpg/jpeg/webp/bmp images, centre square crop + resize",
            num_classes=None,
        ),
    )
}

_ALIASES = {
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "celeba": "celeba64",
    "celeba-64": "celeba64",
    "imagefolder": "folder",
    "image-folder": "folder",
}


def canonical_name(name: str) -> str:
    """Registry name for ``name`` (case-insensitive; ``_`` = ``-``; a few aliases such as
    ``fashion_mnist``, ``celeba``, ``cifar-10``). Raises ``ValueError`` for an unknown name."""
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return key


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name`` (aliases accepted)."""
    return DATASETS[canonical_name(name)]


def list_datasets() -> list[DatasetInfo]:
    """Every registered dataset, in registry order."""
    return list(DATASETS.values())


def default_data_root() -> Path:
    """``$SDDPM_DATA_ROOT`` if set, else ``./data``."""
    return Path(os.environ.get(DATA_ROOT_ENV, "data"))


def build_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    image_size: int | None = None,
    train: bool = True,
    hflip: bool | None = None,
    download: bool = False,
    seed: int = 0,
    channels: int | None = None,
    with_labels: bool = False,
) -> ImageDataset:
    """Build a registered dataset: items are float32 ``[C, image_size, image_size]`` in [-1, 1].

    Args:
        name: a registry name (see :data:`DATASETS`) or alias.
        root: the data folder (default :func:`default_data_root`; ``folder`` requires it; the
            image folder itself for ``folder``; ignored by ``digits``).
        image_size: side length (default: the registry's).
        train: training split (``False``: the test split of MNIST, Fashion-MNIST, CIFAR-10;
            ``digits``, ``celeba64`` and ``folder`` have a single set).
        hflip: random horizontal flips, ``None`` for the registry default.
        download: fetch the files first when the reader cannot find them (MNIST,
            Fashion-MNIST, CIFAR-10).
        seed: the seed of the flip decisions (use the training seed).
        channels: ``folder`` only: 3 (RGB) or 1 (grayscale); for the others, if given, it must
            match the registry.
        with_labels: items are ``(image, label)`` pairs (see
            :meth:`ImageDataset.with_labels`); the labels are read and checked now. CelebA
            has none: a :class:`DatasetError` says so.

    Raises:
        DatasetError: files missing or corrupt (the message says which and how to fix it).
        ValueError: an unknown name or an inconsistent option.
    """
    info = dataset_info(name)
    name = info.name
    size = int(image_size) if image_size is not None else info.image_size
    if size < 1:
        raise ValueError(f"image_size must be positive, got {size}")
    flip = info.hflip if hflip is None else bool(hflip)
    if channels is not None and name != "folder" and channels != info.channels:
        raise ValueError(
            f"{name} has {info.channels} channel(s); channels={channels} is not possible"
        )
    if name == "folder" and root is None:
        raise DatasetError("dataset 'folder' needs a root: the folder of images to train on")
    data_root = Path(root) if root is not None else default_data_root()

    def make() -> ImageDataset:
        if name == "digits":
            return DigitsDataset(image_size=size, hflip=flip, seed=seed)
        if name in ("mnist", "fashion-mnist"):
            return IdxDataset(
                data_root, name=name, image_size=size, train=train, hflip=flip, seed=seed
            )
        if name == "cifar10":
            return Cifar10Dataset(data_root, image_size=size, train=train, hflip=flip, seed=seed)
        if name == "celeba64":
            return CelebA64Dataset(data_root, image_size=size, hflip=flip, seed=seed)
        return ImageFolderDataset(
            data_root, image_size=size, channels=channels or info.channels, hflip=flip, seed=seed
        )

    if download and info.downloadable:
        try:
            return make().with_labels(with_labels)
        except DatasetError:
            from .downloads import download as fetch

            fetch(name, data_root)
    return make().with_labels(with_labels)


def check_num_classes(dataset: ImageDataset, num_classes: int) -> None:
    """Raise :class:`DatasetError` unless a model of ``num_classes`` classes fits ``dataset``.

    ``num_classes=0`` (unconditional) fits every dataset; ``N > 0`` needs a dataset with labels
    and exactly ``N`` classes. Call it before training (it reads the labels)."""
    if num_classes == 0:
        return
    found = dataset.num_classes  # raises for a dataset without classes
    if found != num_classes:
        raise DatasetError(
            f"num_classes={num_classes} does not match the {found} classes of {dataset.name} "
            f"({', '.join(dataset.class_names[:10])}{', ...' if found > 10 else ''}); "
            f"set num_classes={found}"
        )
