"""Each reader on small files in the real formats: shapes, ranges and exact pixel values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sddpm.data import (
    DATASETS,
    DatasetError,
    build_dataset,
    canonical_name,
    dataset_info,
    read_idx,
)


def level(v: int) -> float:
    """The float32 value a uint8 pixel ``v`` maps to."""
    return float(np.float32(v) / np.float32(255) * np.float32(2) - np.float32(1))


# ---------------------------------------------------------------------------------------------
# digits


def test_digits_count_range_and_values():
    from sklearn.datasets import load_digits

    ds = build_dataset("digits")
    assert len(ds) == 1797
    x = ds[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    raw = load_digits().images
    # 0..16 -> [-1, 1] linearly: x / 8 - 1
    np.testing.assert_allclose(x[0].numpy(), raw[0] / 8.0 - 1.0, atol=1e-7)
    allx = torch.stack([ds[i] for i in range(0, 1797, 7)])
    assert allx.min().item() == -1.0 and allx.max().item() == 1.0
    assert ds[-1].shape == (1, 8, 8)
    with pytest.raises(IndexError):
        ds[1797]


def test_digits_resized():
    ds = build_dataset("digits", image_size=16)
    assert ds[3].shape == (1, 16, 16)
    assert -1.0 <= ds[3].min().item() and ds[3].max().item() <= 1.0


# ---------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST


@pytest.mark.parametrize("gz", [False, True])
def test_idx_constant_images_map_to_constants(tmp_path, write_idx, gz):
    images = np.stack([np.full((28, 28), v, np.uint8) for v in (0, 255, 128, 7)])
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    write_idx(tmp_path / "mnist" / name, images, magic=2051, gz=gz)
    ds = build_dataset("mnist", root=tmp_path)
    assert len(ds) == 4 and ds.channels == 1 and ds.image_size == 32
    for i, v in enumerate((0, 255, 128, 7)):
        x = ds[i]
        assert x.shape == (1, 32, 32) and x.dtype == torch.float32
        assert torch.all(x == level(v)), (v, x.unique())
    assert ds[0][0, 0, 0].item() == -1.0 and ds[1][0, 0, 0].item() == 1.0


def test_idx_resize_matches_pil_bilinear_and_an_independent_interpolation(tmp_path, write_idx):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "fashion-mnist" / "t10k-images-idx3-ubyte.gz", images, gz=True)
    ds = build_dataset("fashion-mnist", root=tmp_path, train=False)
    for i in range(3):
        pil = np.asarray(Image.fromarray(images[i]).resize((32, 32), Image.BILINEAR))
        expected = torch.from_numpy(pil.astype(np.float32) / 255 * 2 - 1)
        assert torch.equal(ds[i][0], expected)
        # Upsampling 28 -> 32 is plain bilinear (align_corners=False): within one grey level.
        t = torch.from_numpy(images[i].astype(np.float32))[None, None]
        ref = F.interpolate(t, size=(32, 32), mode="bilinear", align_corners=False)[0, 0]
        assert (torch.from_numpy(pil.astype(np.float32)) - ref).abs().max().item() <= 1.0


def test_idx_native_size_is_exact(tmp_path, write_idx):
    images = np.arange(2 * 28 * 28, dtype=np.int64).reshape(2, 28, 28) % 256
    write_idx(tmp_path / "train-images-idx3-ubyte", images.astype(np.uint8))  # directly in root
    ds = build_dataset("mnist", root=tmp_path, image_size=28)
    expected = torch.from_numpy(images[1].astype(np.float32)) / 255 * 2 - 1
    assert torch.equal(ds[1][0], expected)


def test_idx_torchvision_layout(tmp_path, write_idx):
    write_idx(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte", np.zeros((2, 28, 28)))
    assert len(build_dataset("mnist", root=tmp_path)) == 2


def test_read_idx_labels_and_header(tmp_path, write_idx):
    p = write_idx(tmp_path / "labels", np.array([3, 1, 4], np.uint8), magic=2049)
    np.testing.assert_array_equal(read_idx(p, expect_magic=2049), [3, 1, 4])
    assert p.read_bytes()[:8] == bytes([0, 0, 8, 1, 0, 0, 0, 3])


def test_idx_missing_names_files_folders_and_download(tmp_path):
    with pytest.raises(DatasetError) as err:
        build_dataset("mnist", root=tmp_path)
    msg = str(err.value)
    assert "train-images-idx3-ubyte" in msg and "train-images-idx3-ubyte.gz" in msg
    assert str(tmp_path / "mnist") in msg and str(tmp_path) in msg
    assert "download=True (CLI: --download)" in msg and "https://" in msg
    assert f"sddpm.data.download('mnist', {str(tmp_path)!r})" in msg
    assert isinstance(err.value, ValueError)


def test_idx_wrong_magic(tmp_path, write_idx):
    # a labels file saved under the images name
    write_idx(tmp_path / "mnist" / "train-images-idx3-ubyte", np.zeros(5), magic=2049)
    with pytest.raises(DatasetError, match=r"magic number 2049, expected 2051") as err:
        build_dataset("mnist", root=tmp_path)
    assert "train-images-idx3-ubyte" in str(err.value)


def test_idx_truncated(tmp_path, write_idx):
    p = write_idx(tmp_path / "mnist" / "train-images-idx3-ubyte", np.zeros((4, 28, 28)))
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(DatasetError, match="truncated or corrupt") as err:
        build_dataset("mnist", root=tmp_path)
    assert str(p) in str(err.value) and "(download=True; CLI: --download)" in str(err.value)


def test_idx_bad_gzip(tmp_path):
    p = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    p.parent.mkdir()
    p.write_bytes(b"this is not gzip at all")
    with pytest.raises(DatasetError, match="cannot read idx file") as err:
        build_dataset("mnist", root=tmp_path)
    assert str(p) in str(err.value)


def test_idx_truncated_gzip(tmp_path, write_idx):
    p = write_idx(tmp_path / "mnist" / "train-images-idx3-ubyte.gz", np.zeros((4, 28, 28)), gz=True)
    p.write_bytes(p.read_bytes()[:-12])
    with pytest.raises(DatasetError, match=str(p.name)):
        build_dataset("mnist", root=tmp_path)


# ---------------------------------------------------------------------------------------------
# CIFAR-10


def _cifar_folder(tmp_path, write_cifar_batch, n=2):
    folder = tmp_path / "cifar-10-batches-py"
    batches = []
    for b in range(5):
        imgs = np.zeros((n, 3, 32, 32), np.uint8)
        imgs[:, 0], imgs[:, 1], imgs[:, 2] = 10 + b, 20 + b, 30 + b  # R, G, B planes
        imgs[0, 0, 1, 2] = 250  # one red pixel at row 1, column 2 of each batch's first image
        write_cifar_batch(folder / f"data_batch_{b + 1}", imgs)
        batches.append(imgs)
    test = np.full((3, 3, 32, 32), 99, np.uint8)
    write_cifar_batch(folder / "test_batch", test)
    return folder, batches


def test_cifar_layout_channels_and_order(tmp_path, write_cifar_batch):
    _, batches = _cifar_folder(tmp_path, write_cifar_batch)
    ds = build_dataset("cifar10", root=tmp_path, hflip=False)
    assert len(ds) == 10 and ds.channels == 3 and ds.image_size == 32
    for b in range(5):
        x = ds[2 * b]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert x[0, 1, 2].item() == level(250)  # the marked pixel: R plane, row 1, col 2
        assert x[0, 0, 0].item() == level(10 + b)
        assert torch.all(x[1] == level(20 + b)) and torch.all(x[2] == level(30 + b))
        assert torch.equal(ds[2 * b + 1], torch.from_numpy(batches[b][1]).float() / 255 * 2 - 1)
    test = build_dataset("cifar10", root=tmp_path / "cifar-10-batches-py", train=False)
    assert len(test) == 3 and torch.all(test[2] == level(99))


def test_cifar_flips_by_default(tmp_path, write_cifar_batch):
    _cifar_folder(tmp_path, write_cifar_batch)
    ds = build_dataset("cifar10", root=tmp_path, seed=3)
    assert ds.hflip
    flipped = [i for i in range(10) if ds.is_flipped(i)]
    assert flipped, "with 10 items and p=1/2 some should flip for this seed"
    for i in range(0, 10, 2):
        marker = (0, 1, 31 - 2) if ds.is_flipped(i) else (0, 1, 2)
        assert ds[i][marker].item() == level(250)


def test_cifar_missing_batch_names_it(tmp_path, write_cifar_batch):
    folder, _ = _cifar_folder(tmp_path, write_cifar_batch)
    (folder / "data_batch_4").unlink()
    with pytest.raises(DatasetError) as err:
        build_dataset("cifar10", root=tmp_path)
    msg = str(err.value)
    assert "missing data_batch_4" in msg and str(folder) in msg
    assert "download=True (CLI: --download)" in msg and "cifar-10-python.tar.gz" in msg


def test_cifar_corrupt_batches(tmp_path, write_cifar_batch):
    folder, _ = _cifar_folder(tmp_path, write_cifar_batch)
    (folder / "data_batch_2").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DatasetError, match=r"data_batch_2.*\(download=True; CLI: --download\)"):
        build_dataset("cifar10", root=tmp_path)
    write_cifar_batch(folder / "data_batch_2", np.zeros((2, 3, 16, 16), np.uint8))  # wrong size
    with pytest.raises(DatasetError, match=r"expected uint8 \[N, 3072\]"):
        build_dataset("cifar10", root=tmp_path)


# ---------------------------------------------------------------------------------------------
# CelebA and image folders


def test_celeba_crop_148_then_resize_64(tmp_path, write_image):
    folder = tmp_path / "img_align_celeba"
    # 178x218 image: 0 outside the 148x148 centre crop at x 15..162, y 35..182, 200 inside
    a = np.zeros((218, 178, 3), np.uint8)
    a[35:183, 15:163] = 200
    write_image(folder / "000002.png", a)
    # a uniform JPEG decodes exactly to its grey level
    write_image(folder / "000001.jpg", np.full((218, 178, 3), 120, np.uint8), quality=95)
    ds = build_dataset("celeba64", root=tmp_path, hflip=False)
    assert len(ds) == 2 and ds.files[0].name == "000001.jpg"
    x = ds[1]
    assert x.shape == (3, 64, 64)
    assert torch.all(x == level(200)), "the crop must be exactly the 148x148 centre"
    assert torch.allclose(ds[0], torch.full((3, 64, 64), level(120)), atol=2 / 255)


def test_celeba_flip_before_crop_matches_published_order(tmp_path, write_image):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, size=(218, 179, 3), dtype=np.uint8)  # odd width: asymmetric crop
    write_image(tmp_path / "img_align_celeba" / "a.png", a)
    ds = build_dataset("celeba64", root=tmp_path / "img_align_celeba", seed=0)
    epoch = next(e for e in range(64) if ds.is_flipped(0, e))
    img = Image.fromarray(a).transpose(Image.FLIP_LEFT_RIGHT)
    box = (int(round(31 / 2)), 35, int(round(31 / 2)) + 148, 183)
    ref = np.array(img.crop(box).resize((64, 64), Image.BILINEAR)).transpose(2, 0, 1).copy()
    assert torch.equal(ds[(0, epoch)], torch.from_numpy(ref).float() / 255 * 2 - 1)


def test_celeba_missing_explains_license(tmp_path):
    with pytest.raises(DatasetError) as err:
        build_dataset("celeba64", root=tmp_path, download=True)
    msg = str(err.value)
    assert "img_align_celeba" in msg and str(tmp_path) in msg
    assert "license" in msg and "https://" in msg
    assert "download=True (CLI: --download) cannot fetch it" in msg


def test_folder_recursive_square_crop_and_grayscale(tmp_path, write_image):
    # 30 wide, 20 high: the centre square is x 5..24; left of it red, right of it blue
    a = np.zeros((20, 30, 3), np.uint8)
    a[:, :5] = (255, 0, 0)
    a[:, 25:] = (0, 0, 255)
    a[:, 5:25] = (40, 80, 160)
    write_image(tmp_path / "b" / "deep" / "x.png", a)
    write_image(tmp_path / "a.bmp", np.full((8, 8, 3), 255, np.uint8))
    write_image(tmp_path / "c.webp", np.full((12, 12, 3), 0, np.uint8), lossless=True)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = build_dataset("folder", root=tmp_path, image_size=10)
    assert [p.relative_to(tmp_path).as_posix() for p in ds.files] == [
        "a.bmp",
        "b/deep/x.png",
        "c.webp",
    ]
    x = ds[1]
    assert x.shape == (3, 10, 10)
    for c, v in enumerate((40, 80, 160)):
        assert torch.all(x[c] == level(v))
    assert torch.all(ds[0] == 1.0) and torch.all(ds[2] == -1.0)
    gray = build_dataset("folder", root=tmp_path, image_size=10, channels=1)
    g = gray[1]
    assert g.shape == (1, 10, 10)
    luma = (
        Image.fromarray(np.full((1, 1, 3), (40, 80, 160), np.uint8)).convert("L").getpixel((0, 0))
    )
    assert torch.all(g == level(luma))


def test_folder_errors(tmp_path, write_image):
    with pytest.raises(DatasetError, match="no image files"):
        build_dataset("folder", root=tmp_path)
    with pytest.raises(DatasetError, match="not a directory"):
        build_dataset("folder", root=tmp_path / "nope")
    with pytest.raises(DatasetError, match="needs a root"):
        build_dataset("folder")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    ds = build_dataset("folder", root=tmp_path, image_size=4)
    with pytest.raises(DatasetError, match="broken.jpg"):
        ds[0]


# ---------------------------------------------------------------------------------------------
# registry


def test_registry_entries():
    expected = {
        "digits": (1, 8, False),
        "mnist": (1, 32, False),
        "fashion-mnist": (1, 32, False),
        "cifar10": (3, 32, True),
        "celeba64": (3, 64, True),
        "folder": (3, 64, False),
    }
    assert {k: (v.channels, v.image_size, v.hflip) for k, v in DATASETS.items()} == expected
    assert canonical_name("Fashion_MNIST") == "fashion-mnist"
    assert canonical_name("celeba") == "celeba64"
    assert dataset_info("CIFAR-10").name == "cifar10"
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("imagenet")
    with pytest.raises(ValueError, match="channel"):
        build_dataset("digits", channels=3)


def test_default_root_from_environment(tmp_path, monkeypatch, write_idx):
    write_idx(tmp_path / "mnist" / "t10k-images-idx3-ubyte", np.zeros((1, 28, 28)))
    monkeypatch.setenv("SDDPM_DATA_ROOT", str(tmp_path))
    assert len(build_dataset("mnist", train=False)) == 1
