"""Datasets for SDDPM: every item is a float32 image ``[C, H, W]`` with values in [-1, 1].

- :func:`build_dataset` builds any registered dataset (:data:`DATASETS`): ``digits`` (bundled,
  8x8), ``mnist`` and ``fashion-mnist`` (idx files, resized to 32), ``cifar10`` (python batches),
  ``celeba64`` (aligned CelebA, crop 148, resize 64) and ``folder`` (any image folder).
- Labels for class-conditional models: ``build_dataset(..., with_labels=True)`` yields
  ``(image, label)`` pairs; :attr:`ImageDataset.labels`, ``class_names`` and ``num_classes``;
  :func:`check_num_classes` checks a model's class count against the data (CelebA has none).
- :func:`download` fetches MNIST, Fashion-MNIST and CIFAR-10 with checksum checks.
- :class:`ShardedInfiniteSampler` and :class:`BatchIterator` feed the training loop an endless,
  DDP-sharded stream of batches ``[B, C, H, W]``: one global order of epoch permutations,
  each rank taking every ``world_size``-th entry, exactly resumable on any number of ranks.

Random horizontal flips depend only on ``(seed, epoch, index)`` (:func:`flip_decision`).
"""

from .datasets import (
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    IMAGE_EXTENSIONS,
    CelebA64Dataset,
    Cifar10Dataset,
    DigitsDataset,
    IdxDataset,
    ImageDataset,
    ImageFolderDataset,
    TensorImageDataset,
    list_image_files,
    read_cifar_batch,
    read_cifar_batch_with_labels,
    read_idx,
)
from .downloads import RESOURCES, Resource, download, fetch_file, file_checksum
from .errors import ChecksumError, DatasetError
from .registry import (
    DATASETS,
    DatasetInfo,
    build_dataset,
    canonical_name,
    check_num_classes,
    dataset_info,
    default_data_root,
    list_datasets,
)
from .sampler import BatchIterator, ShardedInfiniteSampler
from .transforms import center_crop, center_crop_box, flip_decision, resize, uint8_to_signed

__all__ = [
    "DATASETS",
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "IMAGE_EXTENSIONS",
    "RESOURCES",
    "BatchIterator",
    "CelebA64Dataset",
    "ChecksumError",
    "Cifar10Dataset",
    "DatasetError",
    "DatasetInfo",
    "DigitsDataset",
    "IdxDataset",
    "ImageDataset",
    "ImageFolderDataset",
    "Resource",
    "ShardedInfiniteSampler",
    "TensorImageDataset",
    "build_dataset",
    "canonical_name",
    "check_num_classes",
    "center_crop",
    "center_crop_box",
    "dataset_info",
    "default_data_root",
    "download",
    "fetch_file",
    "file_checksum",
    "flip_decision",
    "list_datasets",
    "list_image_files",
    "read_cifar_batch",
    "read_cifar_batch_with_labels",
    "read_idx",
    "resize",
    "uint8_to_signed",
]
