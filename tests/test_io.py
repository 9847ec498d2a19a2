"""The one atomic-write helper and the safe torch reader."""

import os

import pytest
import torch

from sddpm import io


def test_atomic_path_fsyncs_the_file_before_the_rename_and_the_directory_after(
    tmp_path, monkeypatch
):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(a, b):
        events.append(("rename", None))
        real_replace(a, b)

    monkeypatch.setattr(io.os, "fsync", fsync)
    monkeypatch.setattr(io.os, "replace", replace)
    target = tmp_path / "out.txt"
    with io.atomic_path(target) as tmp:
        tmp.write_text("new")
    assert events == [("fsync", False), ("rename", None), ("fsync", True)]
    assert target.read_text() == "new"
    with pytest.raises(RuntimeError), io.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed while writing")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_garbage_and_truncated_torch_files_are_reported_as_corrupt(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x02garbage" * 50)
    with pytest.raises(io.UnreadableFileError, match="garbage.pt is corrupt") as err:
        io.load_torch_file(garbage)
    assert "pickled" not in str(err.value) and err.value.path == garbage
    whole = tmp_path / "whole.pt"
    torch.save({"w": torch.arange(1000)}, whole)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(whole.read_bytes()[:700])
    with pytest.raises(io.UnreadableFileError, match="truncated.pt is truncated or corrupt"):
        io.load_torch_file(truncated)
    assert torch.equal(io.load_torch_file(whole)["w"], torch.arange(1000))


def test_pickled_objects_are_told_apart_from_corruption(tmp_path):
    import argparse

    path = tmp_path / "args.pt"
    torch.save({"args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(io.PickledObjectsError, match="pickled Python objects"):
        io.load_torch_file(path)


def test_atomic_dir_replaces_a_directory_whole_or_not_at_all(tmp_path):
    target = tmp_path / "ckpt"
    with io.atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".ckpt.")
        (tmp / "a").write_text("1")
    assert [p.name for p in target.iterdir()] == ["a"]
    with pytest.raises(OSError), io.atomic_dir(target) as tmp:
        (tmp / "b").write_text("2")
        raise OSError(28, "No space left on device")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary left
    assert [p.name for p in target.iterdir()] == ["a"]  # the old content, untouched
    with io.atomic_dir(target) as tmp:
        (tmp / "c").write_text("3")
    assert [p.name for p in target.iterdir()] == ["c"]
