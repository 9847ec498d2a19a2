"""Downloads with checksum checks, through file:// URLs and a fake fetch: never the network."""

from __future__ import annotations

import hashlib
import io
import tarfile

import numpy as np
import pytest
import torch

import sddpm.data.downloads as dl
from sddpm.data import (
    RESOURCES,
    ChecksumError,
    DatasetError,
    Resource,
    build_dataset,
    download,
    fetch_file,
    file_checksum,
)


def no_network(*args, **kwargs):
    raise AssertionError("the network must not be used")


def test_fetch_file_url_with_md5_and_sha256(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"hello sddpm" * 100)
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    assert file_checksum(src, "md5") == md5 and file_checksum(src) == sha
    dest = tmp_path / "out" / "a.bin"
    assert fetch_file(src.as_uri(), dest, ("md5", md5), progress=False) == dest
    assert dest.read_bytes() == src.read_bytes()
    dest2 = tmp_path / "out" / "b.bin"
    fetch_file([src.as_uri()], dest2, ("sha256", sha.upper()), progress=False)
    assert dest2.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["a.bin", "b.bin"]  # no temp files
    # already there with the right checksum: not fetched again
    fetch_file(["http://unreachable.invalid/a.bin"], dest, ("md5", md5), fetch=no_network)


def test_checksum_mismatch_deletes_temp_and_raises(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"tampered bytes")
    out = tmp_path / "out"
    with pytest.raises(ChecksumError) as err:
        fetch_file(src.as_uri(), out / "x.gz", ("sha256", "0" * 64), progress=False)
    assert "expected " + "0" * 64 in str(err.value) and src.as_uri() in str(err.value)
    assert isinstance(err.value, DatasetError)
    assert list(out.iterdir()) == []  # neither the destination nor a temp file


def test_bad_existing_file_is_replaced_and_mirrors_are_tried(tmp_path):
    good = tmp_path / "good.bin"
    good.write_bytes(b"good")
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"bad")
    dest = tmp_path / "out" / "f.bin"
    dest.parent.mkdir()
    dest.write_bytes(b"stale")
    md5 = hashlib.md5(b"good").hexdigest()
    missing = (tmp_path / "missing.bin").as_uri()
    fetch_file([missing, bad.as_uri(), good.as_uri()], dest, ("md5", md5), progress=False)
    assert dest.read_bytes() == b"good"
    assert [p.name for p in dest.parent.iterdir()] == ["f.bin"]


def test_unreachable_raises_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="could not download") as err:
        fetch_file((tmp_path / "nothing").as_uri(), tmp_path / "o" / "f", None, progress=False)
    assert not isinstance(err.value, ChecksumError)
    assert list((tmp_path / "o").iterdir()) == []


def test_download_mnist_then_read(tmp_path, monkeypatch, write_idx):
    mirror = tmp_path / "mirror"
    images = np.full((3, 28, 28), 255, np.uint8)
    resources = []
    for name, arr, magic in [
        ("train-images-idx3-ubyte.gz", images, 2051),
        ("train-labels-idx1-ubyte.gz", np.array([1, 2, 3], np.uint8), 2049),
    ]:
        p = write_idx(mirror / name, arr, magic=magic, gz=True)
        resources.append(Resource(name, (p.as_uri(),), ("md5", file_checksum(p, "md5"))))
    monkeypatch.setitem(RESOURCES, "mnist", tuple(resources))
    root = tmp_path / "data"
    with pytest.raises(DatasetError):
        build_dataset("mnist", root=root)
    ds = build_dataset("mnist", root=root, download=True)
    assert sorted(p.name for p in (root / "mnist").iterdir()) == [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
    ]
    assert len(ds) == 3 and torch.all(ds[2] == 1.0)
    # a second call verifies the files and fetches nothing
    assert download("mnist", root, fetch=no_network, progress=False) == root / "mnist"


def test_download_cifar_tarball_extracts(tmp_path, monkeypatch, write_cifar_batch):
    staging = tmp_path / "staging"
    for i in range(1, 6):
        write_cifar_batch(
            staging / "cifar-10-batches-py" / f"data_batch_{i}",
            np.full((1, 3, 32, 32), i, np.uint8),
        )
    write_cifar_batch(
        staging / "cifar-10-batches-py" / "test_batch", np.zeros((1, 3, 32, 32), np.uint8)
    )
    archive = tmp_path / "mirror" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    res = Resource(archive.name, (archive.as_uri(),), ("md5", file_checksum(archive, "md5")))
    monkeypatch.setitem(RESOURCES, "cifar10", (res,))
    root = tmp_path / "data"
    folder = download("cifar10", root, progress=False)
    assert folder == root / "cifar-10-batches-py"
    assert (root / "cifar-10-python.tar.gz").is_file()  # kept for re-verification
    ds = build_dataset("cifar10", root=root, hflip=False)
    assert len(ds) == 5 and ds[4][0, 0, 0].item() == pytest.approx(5 / 255 * 2 - 1)
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_unsafe_tar_member_is_refused(tmp_path, monkeypatch):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    res = Resource(
        "cifar-10-python.tar.gz", (archive.as_uri(),), ("md5", file_checksum(archive, "md5"))
    )
    monkeypatch.setitem(RESOURCES, "cifar10", (res,))
    with pytest.raises(DatasetError, match="unsafe member"):
        download("cifar10", tmp_path / "data", progress=False)
    assert not (tmp_path / "escape.txt").exists()


def test_download_with_a_fake_fetch_and_wrong_bytes(tmp_path, monkeypatch):
    def fake_fetch(url, out, progress, desc):
        out.write(b"not the published file")

    with pytest.raises(ChecksumError) as err:
        download("fashion-mnist", tmp_path, fetch=fake_fetch, progress=False)
    assert "8d4fb7e6c68d591d4c3dfef9ec88bf0d" in str(err.value)  # the published MD5
    assert list((tmp_path / "fashion-mnist").iterdir()) == []


def test_celeba_and_unknown_are_refused(tmp_path):
    with pytest.raises(DatasetError, match="license forbids redistribution") as err:
        download("celeba", tmp_path, fetch=no_network)
    assert "pass root=ROOT (CLI: --data-dir ROOT)" in str(err.value)
    with pytest.raises(DatasetError, match="no download"):
        download("folder", tmp_path, fetch=no_network)
    assert download("digits", tmp_path, fetch=no_network) == tmp_path


def test_published_resources_are_well_formed():
    assert set(RESOURCES) == {"mnist", "fashion-mnist", "cifar10"}
    for name, resources in RESOURCES.items():
        for r in resources:
            algorithm, digest = r.checksum
            assert algorithm == "md5" and len(digest) == 32, name
            assert all(
                u.startswith(("https://", "http://")) and u.endswith(r.filename) for u in r.urls
            )
    assert dl.RESOURCES["cifar10"][0].urls == (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    )
