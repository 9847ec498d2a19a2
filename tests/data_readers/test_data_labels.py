"""Class labels of every dataset, read from small files in the real formats."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sddpm.data import (
    BatchIterator,
    DatasetError,
    ShardedInfiniteSampler,
    TensorImageDataset,
    build_dataset,
    check_num_classes,
    dataset_info,
)


def pairs_match_images(ds, labels):
    """``with_labels`` items are (the same image, labels[i])."""
    plain = [ds.with_labels(False)[i] for i in range(len(ds))]
    ds.with_labels()
    for i in range(len(ds)):
        image, label = ds[i]
        assert torch.equal(image, plain[i])
        assert label.dtype == torch.int64 and label.dim() == 0 and int(label) == labels[i]


# ---------------------------------------------------------------------------------------------
# digits


def test_digits_labels_are_the_sklearn_targets():
    from sklearn.datasets import load_digits

    ds = build_dataset("digits", with_labels=True)
    target = load_digits().target
    assert torch.equal(ds.labels, torch.from_numpy(target).to(torch.int64))
    assert ds.class_names == tuple("0123456789") and ds.num_classes == 10
    image, label = ds[1796]
    assert image.shape == (1, 8, 8) and int(label) == target[1796]
    assert torch.equal(image, build_dataset("digits")[1796])


# ---------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_idx_labels_from_the_matching_file(tmp_path, write_idx, gz, train):
    split = "train" if train else "t10k"
    suffix = ".gz" if gz else ""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    labels = np.array([3, 0, 9, 9, 1, 7], np.uint8)
    folder = tmp_path / "mnist"
    write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images, magic=2051, gz=gz)
    write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels, magic=2049, gz=gz)
    # the other split's labels must not be picked up
    other = "t10k" if train else "train"
    write_idx(folder / f"{other}-labels-idx1-ubyte", np.zeros(6, np.uint8), magic=2049)
    ds = build_dataset("mnist", root=tmp_path, train=train)
    assert ds.labels.tolist() == labels.tolist() and ds.num_classes == 10
    pairs_match_images(ds, labels)


def test_fashion_mnist_class_names(tmp_path, write_idx):
    write_idx(tmp_path / "FashionMNIST/raw/train-images-idx3-ubyte", np.zeros((2, 28, 28)))
    write_idx(tmp_path / "FashionMNIST/raw/train-labels-idx1-ubyte.gz", np.array([9, 0]), gz=True)
    ds = build_dataset("fashion-mnist", root=tmp_path, with_labels=True)
    assert [ds.class_names[int(y)] for _, y in (ds[0], ds[1])] == ["Ankle boot", "T-shirt/top"]
    assert ds.class_to_index["Sneaker"] == 7 and ds.num_classes == 10


def test_idx_labels_are_read_only_when_asked(tmp_path, write_idx):
    write_idx(tmp_path / "mnist" / "train-images-idx3-ubyte", np.zeros((2, 28, 28)), magic=2051)
    ds = build_dataset("mnist", root=tmp_path)  # unconditional: no labels file needed
    assert ds[0].shape == (1, 32, 32)
    fix = r"download=True \(CLI: --download\)"
    with pytest.raises(DatasetError, match=rf"train-labels-idx1-ubyte .*missing.*{fix}"):
        _ = ds.labels
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte"):
        build_dataset("mnist", root=tmp_path, with_labels=True)


@pytest.mark.parametrize(
    "labels, magic, message",
    [
        (np.zeros(2, np.uint8), 2051, "magic number 2051, expected 2049"),
        (np.zeros(3, np.uint8), 2049, "3 labels for 2 images"),
        (np.array([1, 10], np.uint8), 2049, r"labels 1\.\.10, expected 0\.\.9"),
        (np.zeros((2, 1), np.uint8), 2050, "magic number 2050, expected 2049"),  # 2-D
    ],
)
def test_idx_bad_labels_file(tmp_path, write_idx, labels, magic, message):
    write_idx(tmp_path / "mnist" / "train-images-idx3-ubyte", np.zeros((2, 28, 28)), magic=2051)
    write_idx(tmp_path / "mnist" / "train-labels-idx1-ubyte", labels, magic=magic)
    with pytest.raises(DatasetError, match=message):
        build_dataset("mnist", root=tmp_path, with_labels=True)


# ---------------------------------------------------------------------------------------------
# CIFAR-10


def test_cifar_labels_from_every_batch_in_order(tmp_path, write_cifar_batch):
    folder = tmp_path / "cifar-10-batches-py"
    expected = []
    for b in range(1, 6):
        labels = [(3 * b + i) % 10 for i in range(2)]
        expected += labels
        write_cifar_batch(folder / f"data_batch_{b}", np.full((2, 3, 32, 32), b, np.uint8), labels)
    write_cifar_batch(folder / "test_batch", np.zeros((3, 3, 32, 32), np.uint8), [8, 1, 4])
    ds = build_dataset("cifar10", root=tmp_path, hflip=False)
    assert ds.labels.tolist() == expected and ds.class_names[3] == "cat"
    pairs_match_images(ds, expected)
    assert build_dataset("cifar10", root=tmp_path, train=False).labels.tolist() == [8, 1, 4]


def test_cifar_without_labels_only_fails_when_asked(tmp_path, write_cifar_batch):
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_batch(folder / "test_batch", np.zeros((2, 3, 32, 32), np.uint8))
    with open(folder / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    del batch[b"labels"]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch, f)
    ds = build_dataset("cifar10", root=tmp_path, train=False)
    assert len(ds) == 2
    with pytest.raises(DatasetError, match=r"test_batch has no b'labels' entry.*\(download=True;"):
        ds.with_labels()
    batch[b"labels"] = [0.5, 1.0]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch, f)
    with pytest.raises(DatasetError, match="b'labels' is float64"):
        build_dataset("cifar10", root=tmp_path, train=False)


# ---------------------------------------------------------------------------------------------
# image folders, CelebA


def test_folder_one_class_per_sorted_subfolder(tmp_path, write_image):
    root = tmp_path / "pets"
    for rel, v in [
        ("dog/1.png", 10),
        ("cat/b.png", 20),
        ("cat/a.jpg", 30),
        ("emu/deep/x.png", 40),  # nested inside a class folder: still that class
        ("cat/.hidden.png", 50),
    ]:
        write_image(root / rel, np.full((4, 4, 3), v, np.uint8))
    ds = build_dataset("folder", root=root, image_size=4, with_labels=True)
    assert ds.class_names == ("cat", "dog", "emu")
    assert ds.class_to_index == {"cat": 0, "dog": 1, "emu": 2}
    names = [f.relative_to(root).as_posix() for f in ds.files]
    assert names == ["cat/a.jpg", "cat/b.png", "dog/1.png", "emu/deep/x.png"]
    assert ds.labels.tolist() == [0, 0, 1, 2]
    image, label = ds[2]
    assert int(label) == 1 and torch.equal(
        image, build_dataset("folder", root=root, image_size=4)[2]
    )


def test_folder_layout_errors(tmp_path, write_image):
    root = tmp_path / "imgs"
    write_image(root / "a" / "1.png", np.zeros((4, 4), np.uint8))
    write_image(root / "loose.png", np.zeros((4, 4), np.uint8))
    ds = build_dataset("folder", root=root, image_size=4)
    assert len(ds) == 2  # unconditional: the layout does not matter
    with pytest.raises(DatasetError, match="loose.png is not inside a class subfolder"):
        ds.with_labels()
    (root / "loose.png").unlink()
    (root / "empty").mkdir()
    with pytest.raises(DatasetError, match="class folder.* empty hold no images"):
        build_dataset("folder", root=root, image_size=4, with_labels=True)


def test_celeba_has_no_class_labels(tmp_path, write_image):
    write_image(tmp_path / "img_align_celeba" / "000001.jpg", np.zeros((218, 178, 3), np.uint8))
    ds = build_dataset("celeba64", root=tmp_path)
    assert ds[0].shape == (3, 64, 64)
    with pytest.raises(DatasetError, match="celeba64 has no class labels"):
        _ = ds.num_classes
    with pytest.raises(DatasetError, match="celeba64 has no class labels.*num_classes=0"):
        build_dataset("celeba64", root=tmp_path, with_labels=True)
    check_num_classes(ds, 0)
    with pytest.raises(DatasetError, match="no class labels"):
        check_num_classes(ds, 10)


# ---------------------------------------------------------------------------------------------
# the class count, the registry and batches


def test_check_num_classes_against_the_data():
    ds = build_dataset("digits")
    check_num_classes(ds, 10)
    check_num_classes(ds, 0)
    with pytest.raises(DatasetError, match=r"num_classes=12 does not match the 10 classes of "
                       r"digits \(0, 1, .*, 9\); set num_classes=10"):  # fmt: skip
        check_num_classes(ds, 12)
    counts = {name: dataset_info(name).num_classes for name in ("digits", "mnist", "cifar10")}
    assert counts == {"digits": 10, "mnist": 10, "cifar10": 10}
    assert dataset_info("celeba").num_classes == 0 and dataset_info("folder").num_classes is None


@pytest.mark.parametrize("workers", [0, 1])
def test_batches_carry_the_labels(workers):
    images = torch.arange(7, dtype=torch.uint8).view(7, 1, 1, 1).expand(7, 1, 2, 2).contiguous()
    labels = torch.tensor([4, 0, 1, 3, 2, 1, 0])
    ds = TensorImageDataset(
        images, name="t", hflip=False, seed=0, labels=labels, class_names="abcde"
    ).with_labels()
    sampler = ShardedInfiniteSampler(7, seed=3)
    order = [i for i, _ in ShardedInfiniteSampler(7, seed=3).take(9)]
    it = BatchIterator(ds, 3, sampler, num_workers=workers)
    for b in range(3):
        x, y = next(it)
        idx = order[3 * b : 3 * b + 3]
        assert x.shape == (3, 1, 2, 2) and y.dtype == torch.int64
        assert torch.equal(y, labels[idx])
        assert torch.equal(x[:, 0, 0, 0], images[idx, 0, 0, 0].float() / 255 * 2 - 1)
    it.close()
    plain = BatchIterator(ds.with_labels(False), 3, ShardedInfiniteSampler(7, seed=3))
    assert isinstance(next(plain), torch.Tensor)  # unconditional: images only, as before
