"""Dataset readers: every item is a float32 image tensor ``[C, H, W]`` with values in [-1, 1].

Formats are read directly (no torchvision): scikit-learn's bundled 8x8 digits, the MNIST /
Fashion-MNIST idx files, the CIFAR-10 python pickle batches, and folders of image files
(CelebA's ``img_align_celeba`` or any other). The preprocessing follows the published training
script; see :mod:`sddpm.data.transforms`.

Random horizontal flips are a pure function of ``(seed, epoch, index)``: index a dataset with an
``int`` (the epoch set by :meth:`ImageDataset.set_epoch` is used) or with an ``(index, epoch)``
pair, which is what :class:`sddpm.data.BatchIterator` passes, so data-loader workers never need
to be told the epoch.

Class labels (for class-conditional models): every dataset but CelebA has them.
:attr:`ImageDataset.labels` (int64 ``[N]``), :attr:`~ImageDataset.class_names` (label ``k`` is
``class_names[k]``) and :attr:`~ImageDataset.num_classes` read them on first use; after
:meth:`ImageDataset.with_labels` items are ``(image, label)`` pairs. Unconditional callers see
no change: images only, and no label file is opened.
"""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .errors import DatasetError
from .transforms import (
    center_crop,
    center_crop_square,
    flip_decision,
    mirror,
    pil_to_array,
    resize,
    resize_uint8,
    uint8_to_signed,
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ImageDataset(torch.utils.data.Dataset):
    """Base class: a map-style dataset of images ``[C, H, W]`` float32 in [-1, 1].

    Subclasses implement ``__len__`` and ``_load(index, flip) -> Tensor``, and, when the data
    has classes, ``_read_labels() -> (labels [N], class_names, source)``.

    Attributes:
        name: registry name (``"mnist"``, ...).
        channels, image_size: the shape of every item, ``[channels, image_size, image_size]``.
        hflip: whether items are randomly mirrored (decided by ``(seed, epoch, index)``).
        seed: the seed of the flip decisions.
        epoch: the epoch used when the dataset is indexed with a plain ``int``.
        yields_labels: whether items are ``(image, label)`` pairs (see :meth:`with_labels`).
    """

    name: str = "images"

    def __init__(self, *, channels: int, image_size: int, hflip: bool, seed: int) -> None:
        self.channels = int(channels)
        self.image_size = int(image_size)
        self.hflip = bool(hflip)
        self.seed = int(seed)
        self.epoch = 0
        self.yields_labels = False
        self._label_info: tuple[torch.Tensor, tuple[str, ...]] | None = None

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _load(self, index: int, flip: bool) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read_labels(self) -> tuple[np.ndarray | torch.Tensor, Sequence[str], str]:
        """``(labels [N] integers, class names, where they came from)``; raises
        :class:`DatasetError` when the data has no classes."""
        raise DatasetError(
            f"{self.name} has no class labels: train it unconditionally (num_classes=0), or use "
            "a labelled dataset (digits, mnist, fashion-mnist, cifar10, or a folder with one "
            "subfolder per class)"
        )

    def _labelled(self) -> tuple[torch.Tensor, tuple[str, ...]]:
        if self._label_info is None:
            labels, names, source = self._read_labels()
            labels = torch.as_tensor(np.asarray(labels))
            names = tuple(str(n) for n in names)
            if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.ndim != 1:
                raise DatasetError(
                    f"{source}: labels must be 1-D integers, got {labels.dtype} "
                    f"{tuple(labels.shape)}"
                )
            if labels.shape[0] != len(self):
                raise DatasetError(
                    f"{source} holds {labels.shape[0]} labels for {len(self)} images; the label "
                    f"and image files do not belong together"
                )
            labels = labels.to(torch.int64)
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(names)):
                raise DatasetError(
                    f"{source} holds labels {int(labels.min())}..{int(labels.max())}, expected "
                    f"0..{len(names) - 1} ({len(names)} classes); the file is corrupt"
                )
            self._label_info = (labels, names)
        return self._label_info

    @property
    def labels(self) -> torch.Tensor:
        """The class of every image, int64 ``[N]`` in ``0..num_classes - 1`` (read on first
        use). Raises :class:`DatasetError` if the data has no classes or the labels are
        missing or corrupt."""
        return self._labelled()[0]

    @property
    def class_names(self) -> tuple[str, ...]:
        """The name of every class: label ``k`` is ``class_names[k]``."""
        return self._labelled()[1]

    @property
    def num_classes(self) -> int:
        """The number of classes (a model for this data takes ``num_classes`` of them)."""
        return len(self.class_names)

    @property
    def class_to_index(self) -> dict[str, int]:
        """``{class name: label}``, e.g. for a run config to record the mapping."""
        return {n: i for i, n in enumerate(self.class_names)}

    def with_labels(self, enabled: bool = True) -> ImageDataset:
        """Make items ``(image, label)`` pairs (``label`` a 0-dim int64 tensor), or back to
        images with ``enabled=False``; returns the dataset. Reads and checks the labels now,
        so a dataset without classes fails here, before any training."""
        if enabled:
            self._labelled()
        self.yields_labels = bool(enabled)
        return self

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch whose flip decisions plain ``int`` indexing uses."""
        self.epoch = int(epoch)

    def is_flipped(self, index: int, epoch: int | None = None) -> bool:
        """Whether item ``index`` is mirrored in ``epoch`` (default: the current epoch)."""
        if not self.hflip:
            return False
        return flip_decision(self.seed, self.epoch if epoch is None else int(epoch), int(index))

    def __getitem__(
        self, key: int | tuple[int, int]
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``dataset[i]`` or ``dataset[(i, epoch)]`` -> float32 ``[C, H, W]`` in [-1, 1]
        (``(image, label)`` after :meth:`with_labels`)."""
        if isinstance(key, tuple):
            index, epoch = key
        else:
            index, epoch = key, None
        n = len(self)
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {key} out of range for {self.name} dataset of {n} images")
        image = self._load(index, self.is_flipped(index, epoch))
        if self.yields_labels:
            return image, self.labels[index]
        return image

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, len={len(self)}, "
            f"shape=[{self.channels}, {self.image_size}, {self.image_size}], hflip={self.hflip})"
        )


class TensorImageDataset(ImageDataset):
    """Images held in memory as a uint8 tensor ``[N, C, H, W]``, already resized; optionally
    with their ``labels [N]`` and ``class_names``."""

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        *,
        name: str,
        hflip: bool,
        seed: int,
        labels: np.ndarray | torch.Tensor | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != images.shape[-2]:
            raise ValueError(
                f"expected uint8 [N, C, S, S] images, got {images.dtype} {tuple(images.shape)}"
            )
        super().__init__(
            channels=images.shape[1], image_size=images.shape[-1], hflip=hflip, seed=seed
        )
        self.name = name
        self.images = images
        if (labels is None) != (class_names is None):
            raise ValueError("give both labels and class_names, or neither")
        self._given_labels = None if labels is None else (labels, tuple(class_names))

    def __len__(self) -> int:
        return self.images.shape[0]

    def _load(self, index: int, flip: bool) -> torch.Tensor:
        x = uint8_to_signed(self.images[index])
        return mirror(x) if flip else x

    def _read_labels(self):
        if self._given_labels is None:
            return super()._read_labels()
        labels, names = self._given_labels
        return labels, names, f"{self.name} labels"


# ----------------------------------------------------------------------------------------------
# digits


DIGIT_CLASSES = tuple(str(d) for d in range(10))


class DigitsDataset(ImageDataset):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 1 channel), no download.

    Pixel values 0..16 map linearly to [-1, 1] (``x / 8 - 1``). At another ``image_size`` the
    images are resized bilinearly (antialiased) in float. The set has no train/test split, so
    ``train`` is ignored: both give all 1,797 images.
    """

    name = "digits"

    def __init__(self, image_size: int = 8, hflip: bool = False, seed: int = 0) -> None:
        from sklearn.datasets import load_digits

        super().__init__(channels=1, image_size=image_size, hflip=hflip, seed=seed)
        digits = load_digits()
        raw = digits.images  # float64 [1797, 8, 8], values 0..16
        self.targets = np.asarray(digits.target)  # the digit 0..9 of every image
        x = torch.from_numpy(raw).to(torch.float32).div(8.0).sub(1.0).unsqueeze(1)
        if self.image_size != 8:
            x = F.interpolate(
                x,
                size=(self.image_size,) * 2,
                mode="bilinear",
                align_corners=False,
                antialias=True,
            ).clamp(-1.0, 1.0)
        self.images = x.contiguous()

    def __len__(self) -> int:
        return self.images.shape[0]

    def _load(self, index: int, flip: bool) -> torch.Tensor:
        x = self.images[index].clone()
        return mirror(x) if flip else x

    def _read_labels(self):
        return self.targets, DIGIT_CLASSES, "sklearn digits targets"


# ----------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST idx files

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension

_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as f:
            return f.read()
    return path.read_bytes()


def read_idx(path: str | os.PathLike, expect_magic: int | None = None) -> np.ndarray:
    """Read an idx file (plain or ``.gz``) into a numpy array of its shape and dtype.

    Raises :class:`DatasetError` naming the file when it is truncated, has a bad magic number
    (``expect_magic``: 2051 for images, 2049 for labels) or is not valid gzip.
    """
    path = Path(path)
    fix = f"Delete {path} and download it again (download=True; CLI: --download)."
    try:
        data = _read_bytes(path)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DatasetError(f"cannot read idx file {path}: {e}. {fix}") from e
    if len(data) < 4:
        raise DatasetError(f"idx file {path} is truncated ({len(data)} bytes). {fix}")
    magic = int.from_bytes(data[:4], "big")
    if expect_magic is not None and magic != expect_magic:
        raise DatasetError(
            f"idx file {path} has magic number {magic}, expected {expect_magic}; "
            f"the file is corrupt or not an idx file of this kind. {fix}"
        )
    zero, code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or code not in _IDX_DTYPES:
        raise DatasetError(f"idx file {path} has an invalid header (magic {magic}). {fix}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"idx file {path} is truncated inside its header. {fix}")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise DatasetError(
            f"idx file {path} holds {len(data) - header} data bytes, expected {expected} for "
            f"shape {dims}; the file is truncated or corrupt. {fix}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


FASHION_MNIST_CLASSES = tuple(
    "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot".split(",")
)


def find_file(names: Sequence[str], folders: Sequence[Path]) -> Path | None:
    """The first existing ``folder / name`` (folders outer, names inner), else ``None``."""
    for folder in folders:
        for name in names:
            p = folder / name
            if p.is_file():
                return p
    return None


def _fmt_folders(folders: Sequence[Path]) -> str:
    return ", ".join(str(f) for f in dict.fromkeys(folders))


class IdxDataset(TensorImageDataset):
    """MNIST or Fashion-MNIST from the standard idx files, resized as the paper does.

    Looks for ``train-images-idx3-ubyte`` (``t10k-images-idx3-ubyte`` when ``train=False``),
    plain or ``.gz``, in ``root/<folder>``, ``root``, and torchvision's ``root/<Name>/raw``.
    Images (28x28 uint8) are resized to ``image_size`` (default 32) with PIL bilinear, the
    published ``Resize((32, 32))``; no flips by default. The labels come from the matching
    ``train-labels-idx1-ubyte`` / ``t10k-labels-idx1-ubyte`` (plain or ``.gz``, beside the
    images first), read only when asked for.
    """

    CLASSES = {
        "mnist": DIGIT_CLASSES,
        "fashion-mnist": FASHION_MNIST_CLASSES,
    }

    FOLDERS = {
        "mnist": ("mnist", "MNIST/raw"),
        "fashion-mnist": ("fashion-mnist", "FashionMNIST/raw"),
    }
    URLS = {
        "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    }

    def __init__(
        self,
        root: str | os.PathLike,
        name: str = "mnist",
        image_size: int = 32,
        train: bool = True,
        hflip: bool = False,
        seed: int = 0,
    ) -> None:
        if name not in self.FOLDERS:
            raise ValueError(f"unknown idx dataset {name!r}; choose from {sorted(self.FOLDERS)}")
        root = Path(root)
        stem = "train-images-idx3-ubyte" if train else "t10k-images-idx3-ubyte"
        folders = [root / sub for sub in self.FOLDERS[name]] + [root]
        names = [stem, stem + ".gz"]
        path = find_file(names, folders)
        if path is None:
            raise DatasetError(
                f"{name}: expected {stem} or {stem}.gz (and the matching labels file) in one of: "
                f"{_fmt_folders(folders)}; none found. Pass download=True (CLI: --download) or "
                f"call sddpm.data.download({name!r}, {str(root)!r}), or fetch the .gz files from "
                f"{self.URLS[name]} into {folders[0]}."
            )
        raw = read_idx(path, expect_magic=IDX_IMAGES_MAGIC)
        if raw.dtype != np.uint8:
            raise DatasetError(f"idx file {path} holds {raw.dtype}, expected unsigned bytes")
        images = resize_uint8(raw[:, None], int(image_size))
        super().__init__(images, name=name, hflip=hflip, seed=seed)
        self.path = path
        self.label_stem = stem.replace("images-idx3", "labels-idx1")
        self.label_folders = list(dict.fromkeys([path.parent, *folders]))

    def _read_labels(self):
        stem = self.label_stem
        path = find_file([stem, stem + ".gz"], self.label_folders)
        if path is None:
            raise DatasetError(
                f"{self.name}: the labels file {stem} (or {stem}.gz) is missing from "
                f"{_fmt_folders(self.label_folders)}; it is needed for class labels. Pass "
                f"download=True (CLI: --download), or fetch {stem}.gz from "
                f"{self.URLS[self.name]} into {self.path.parent}."
            )
        # magic 2049: unsigned bytes, 1-D (read_idx refuses anything else)
        labels = read_idx(path, expect_magic=IDX_LABELS_MAGIC)
        return labels, self.CLASSES[self.name], str(path)


# ----------------------------------------------------------------------------------------------
# CIFAR-10 python batches

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCHES = ("test_batch",)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


CIFAR10_CLASSES = tuple("airplane automobile bird cat deer dog frog horse ship truck".split())


def read_cifar_batch(path: str | os.PathLike) -> np.ndarray:
    """One CIFAR python batch -> uint8 ``[N, 3, 32, 32]`` (from ``b'data'``, rows R, G, B planes).

    The batches are Python pickles: only read files you trust (the official archive is
    checksum-verified by :func:`sddpm.data.download`).
    """
    return read_cifar_batch_with_labels(path)[0]


def read_cifar_batch_with_labels(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """One CIFAR python batch -> (uint8 ``[N, 3, 32, 32]``, int64 labels ``[N]`` from
    ``b'labels'``, or ``None`` when the batch has no such entry)."""
    path = Path(path)
    fix = f"Delete {path.parent} and fetch it again (download=True; CLI: --download)."
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as e:  # any unpickling failure means a corrupt file
        raise DatasetError(f"cannot read CIFAR batch {path}: {type(e).__name__}: {e}. {fix}") from e
    if not isinstance(batch, dict):
        raise DatasetError(
            f"CIFAR batch {path} is a {type(batch).__name__}, expected a dict. {fix}"
        )
    data = batch.get(b"data", batch.get("data"))
    if data is None:
        raise DatasetError(f"CIFAR batch {path} has no b'data' entry (keys {list(batch)}). {fix}")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(
            f"CIFAR batch {path}: b'data' is {data.dtype} {data.shape}, expected uint8 "
            f"[N, 3072]. {fix}"
        )
    labels = batch.get(b"labels", batch.get("labels"))
    if labels is not None:
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu" or labels.shape != (data.shape[0],):
            raise DatasetError(
                f"CIFAR batch {path}: b'labels' is {labels.dtype} {labels.shape}, expected "
                f"{data.shape[0]} integers. {fix}"
            )
        labels = labels.astype(np.int64)
    return data.reshape(-1, 3, 32, 32), labels


class Cifar10Dataset(TensorImageDataset):
    """CIFAR-10 from the python pickle batches (``cifar-10-batches-py/data_batch_1..5``,
    ``test_batch``), 3x32x32, random horizontal flips by default (the published recipe).

    ``root`` may be the folder holding ``cifar-10-batches-py`` or that folder itself.
    """

    name = "cifar10"

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int = 32,
        train: bool = True,
        hflip: bool = True,
        seed: int = 0,
    ) -> None:
        root = Path(root)
        names = CIFAR10_TRAIN_BATCHES if train else CIFAR10_TEST_BATCHES
        folders = [root / CIFAR10_FOLDER, root]
        folder = next((f for f in folders if all((f / n).is_file() for n in names)), None)
        if folder is None:
            missing = [n for n in names if not (folders[0] / n).is_file()]
            raise DatasetError(
                f"cifar10: expected {', '.join(names)} in one of: {_fmt_folders(folders)}; "
                f"missing {', '.join(missing)} in {folders[0]}. Pass download=True (CLI: "
                f"--download) or call sddpm.data.download('cifar10', {str(root)!r}), or download "
                f"{CIFAR10_URL} and extract it in {root}."
            )
        batches = [read_cifar_batch_with_labels(folder / n) for n in names]
        images = resize_uint8(np.concatenate([b[0] for b in batches]), int(image_size))
        super().__init__(images, name=self.name, hflip=hflip, seed=seed)
        self.folder = folder
        self._batch_labels = [(folder / n, b[1]) for n, b in zip(names, batches, strict=True)]

    def _read_labels(self):
        missing = [str(p) for p, labels in self._batch_labels if labels is None]
        if missing:
            raise DatasetError(
                f"cifar10: {', '.join(missing)} has no b'labels' entry, so there are no class "
                f"labels; delete {self.folder} and fetch it again (download=True; CLI: "
                "--download)."
            )
        labels = np.concatenate([labels for _, labels in self._batch_labels])
        return labels, CIFAR10_CLASSES, str(self.folder)


# ----------------------------------------------------------------------------------------------
# image folders (CelebA and any other)


def list_image_files(
    folder: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> list[Path]:
    """Every file under ``folder`` (recursively, following no hidden folders) whose suffix is in
    ``extensions`` (case-insensitive), sorted by relative path so the order is reproducible."""
    folder = Path(folder)
    exts = {e.lower() for e in extensions}
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, folder)
        for fn in filenames:
            if not fn.startswith(".") and os.path.splitext(fn)[1].lower() in exts:
                found.append(fn if rel == "." else os.path.join(rel, fn))
    return [folder / f for f in sorted(found)]


class ImageFolderDataset(ImageDataset):
    """Every image under a folder (recursively; png/jpg/jpeg/webp/bmp), decoded on access.

    Each image is converted to RGB (``channels=3``) or grayscale (``channels=1``), optionally
    mirrored, centre-cropped (to ``crop``, or to the largest square when ``crop`` is None) and
    resized to ``image_size`` with PIL bilinear.

    Class labels (asked for only by a conditional model): one subfolder of ``root`` per class,
    holding that class's images (at any depth); labels follow the sorted folder names
    (:attr:`class_names`, :attr:`class_to_index`).
    """

    name = "folder"

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int = 64,
        channels: int = 3,
        hflip: bool = False,
        seed: int = 0,
        crop: int | None = None,
        files: Sequence[Path] | None = None,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        super().__init__(channels=channels, image_size=image_size, hflip=hflip, seed=seed)
        self.root = Path(root)
        self.crop = crop
        if files is None:
            if not self.root.is_dir():
                raise DatasetError(
                    f"folder: {self.root} is not a directory; pass the folder that holds the "
                    f"images ({', '.join(IMAGE_EXTENSIONS)}, searched recursively)."
                )
            files = list_image_files(self.root)
            if not files:
                raise DatasetError(
                    f"folder: no image files ({', '.join(IMAGE_EXTENSIONS)}) found under "
                    f"{self.root} (searched recursively)."
                )
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def _read_labels(self):
        layout = (
            f"class labels of a folder dataset need one subfolder of {self.root} per class "
            "(e.g. root/cat/*.png, root/dog/*.png)"
        )
        class_of: list[str] = []
        for f in self.files:
            parts = Path(f).relative_to(self.root).parts
            if len(parts) < 2:
                raise DatasetError(f"{layout}; {f} is not inside a class subfolder. Move it.")
            class_of.append(parts[0])
        folders = sorted(
            d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith(".")
        )
        empty = sorted(set(folders) - set(class_of))
        if empty:
            raise DatasetError(
                f"{layout}; the class folder(s) {', '.join(empty)} hold no images "
                f"({', '.join(IMAGE_EXTENSIONS)}). Add images or remove the folder(s)."
            )
        index = {name: i for i, name in enumerate(folders)}
        return np.array([index[c] for c in class_of], dtype=np.int64), folders, str(self.root)

    def _load(self, index: int, flip: bool) -> torch.Tensor:
        path = self.files[index]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB" if self.channels == 3 else "L")
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DatasetError(
                f"{self.name}: cannot decode image {path}: {e}. Remove or replace the file."
            ) from e
        # The published order: RandomHorizontalFlip, then CenterCrop, then Resize. Flipping
        # first keeps the pixels identical when the crop offsets are asymmetric.
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        img = center_crop_square(img) if self.crop is None else center_crop(img, self.crop)
        img = resize(img, self.image_size)
        return uint8_to_signed(pil_to_array(img))


CELEBA_FOLDER = "img_align_celeba"
CELEBA_CROP = 148
CELEBA_URL = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"


class CelebA64Dataset(ImageFolderDataset):
    """Aligned CelebA (``img_align_celeba/*.jpg``): centre crop 148 then resize to 64, random
    horizontal flips, RGB. All images are used (the published code reads the whole folder), so
    ``train`` is ignored.

    ``root`` may be ``img_align_celeba`` itself or a folder holding it (also ``root/celeba/``).
    CelebA's license forbids redistribution, so there is no download.
    """

    name = "celeba64"

    def __init__(
        self, root: str | os.PathLike, image_size: int = 64, hflip: bool = True, seed: int = 0
    ) -> None:
        root = Path(root)
        folders = [root / CELEBA_FOLDER, root / "celeba" / CELEBA_FOLDER]
        if root.name == CELEBA_FOLDER:
            folders.insert(0, root)
        files: list[Path] = []
        for folder in folders:
            if folder.is_dir():
                files = list_image_files(folder)
                if files:
                    break
        if not files:
            raise DatasetError(
                f"celeba64: expected the aligned CelebA images {CELEBA_FOLDER}/*.jpg "
                f"(000001.jpg ... 202599.jpg) in one of: {_fmt_folders(folders)}; none found. "
                "CelebA's license forbids redistribution, so download=True (CLI: --download) "
                "cannot fetch it: request 'Align&Cropped Images' (img_align_celeba.zip) from "
                f"{CELEBA_URL} and unzip it in {root}."
            )
        super().__init__(
            folder,
            image_size=image_size,
            channels=3,
            hflip=hflip,
            seed=seed,
            crop=CELEBA_CROP,
            files=files,
        )

    def _read_labels(self):
        raise DatasetError(
            "celeba64 has no class labels (CelebA's annotations are 40 binary attributes and "
            "identities, not classes): train it unconditionally (num_classes=0)"
        )
