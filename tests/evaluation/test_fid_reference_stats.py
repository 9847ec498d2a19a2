"""Reference statistics files: the published ``mu`` / ``sigma`` npz format, atomic writes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from sddpm.evaluation import (
    FeatureStats,
    compute_fid_stats,
    fid_against_stats_file,
    load_fid_stats,
    save_fid_stats,
)


def _stats(d=5, seed=0):
    x = np.random.default_rng(seed).normal(size=(50, d))
    return x.mean(axis=0), np.cov(x, rowvar=False)


def test_round_trip_in_published_format(tmp_path):
    mu, sigma = _stats()
    path = save_fid_stats(tmp_path / "sub" / "cifar10.train.npz", mu, sigma)
    assert sorted(os.listdir(path.parent)) == ["cifar10.train.npz"]  # no temp file left
    with np.load(path) as raw:  # what the published code does: f['mu'][:], f['sigma'][:]
        assert sorted(raw.files) == ["mu", "sigma"]
        np.testing.assert_array_equal(raw["mu"], mu)
    mu2, sigma2 = load_fid_stats(path, dim=5)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    assert mu2.dtype == sigma2.dtype == np.float64


def test_path_is_used_as_given(tmp_path):
    path = save_fid_stats(tmp_path / "stats", *_stats())
    assert path.name == "stats" and path.is_file()  # np.savez would have added .npz


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = save_fid_stats(tmp_path / "s.npz", *_stats(seed=0))
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_fid_stats(path, *_stats(seed=1))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["s.npz"]


def test_validation_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_fid_stats(tmp_path / "missing.npz")
    np.savez(tmp_path / "nokey.npz", mean=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ValueError, match=r"nokey\.npz.*missing key\(s\) \['mu'\]"):
        load_fid_stats(tmp_path / "nokey.npz")
    np.savez(tmp_path / "shape.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match=r"'sigma' must be \[3, 3\].*got shape \[4, 4\]"):
        load_fid_stats(tmp_path / "shape.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz"):
        load_fid_stats(tmp_path / "junk.npz")
    with pytest.raises(ValueError, match="'sigma' must be"):
        save_fid_stats(tmp_path / "bad.npz", np.zeros(3), np.eye(2))
    assert not (tmp_path / "bad.npz").exists()


def test_dimension_mismatch_names_both_sizes(tmp_path):
    path = save_fid_stats(tmp_path / "s.npz", *_stats(d=5))
    with pytest.raises(ValueError, match=r"s\.npz holds statistics of D=5.*features have D=2048"):
        load_fid_stats(path, dim=2048)
    with pytest.raises(ValueError, match="D=5.*D=3"):
        fid_against_stats_file(FeatureStats(3).update(np.random.rand(4, 3)), path)


def test_compute_stats_then_fid_against_file(tmp_path):
    class Pool(torch.nn.Module):  # a stand-in feature network: mean colour per channel
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, images):
            return images.mean(dim=(2, 3))

    images = torch.rand(64, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    stats = compute_fid_stats(images.split(10), Pool(), progress=False)
    assert stats.count == 64 and stats.dim == 3
    path = save_fid_stats(tmp_path / "ref.npz", *stats.mu_sigma())
    assert fid_against_stats_file(stats, path) == pytest.approx(0.0, abs=1e-10)
    other = compute_fid_stats([images.flip(0)[:32] * 0.5], Pool(), progress=False)
    assert fid_against_stats_file(other, path) > 0.01
