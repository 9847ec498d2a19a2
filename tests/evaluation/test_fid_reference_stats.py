"""Reference statistics files: the published ``mu`` / ``sigma`` npz format, atomic writes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from sddpm.evaluation import (
    FeatureNetwork,
    InceptionOutput,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    load_fid_stats,
    metrics_from_scores,
    save_fid_stats,
    score_dataset,
    write_stats_file,
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
        load_fid_stats(path, dim=3)


class _FakeInception(torch.nn.Module):
    """Stands in for FIDInceptionV3: pool = first 6 pixel values, prob = softmax of them."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 6)

    def forward(self, images):
        pool = images.flatten(1)[:, :6]
        return InceptionOutput(pool=pool, prob=pool.softmax(dim=1))


def test_scoring_pipeline_then_fid_against_the_file(tmp_path):
    """The one FID pipeline (score_dataset -> write_stats_file -> load_fid_stats -> metrics)
    against numbers computed in one shot from the same features."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(40, 3, 2, 2, generator=g) * 2 - 1  # a dataset yields [-1, 1]
    net = FeatureNetwork.inception(_FakeInception())
    scores = score_dataset(
        TensorDataset(images), net, batch_size=7, keep_features=True, progress=False
    )
    feats = ((images + 1) / 2).clamp(0, 1).flatten(1)[:, :6]  # what the network is fed
    assert scores.count == 40 and scores.indices.tolist() == list(range(40))
    x = feats.double().numpy()
    np.testing.assert_allclose(scores.stats.mu, x.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(scores.stats.sigma, np.cov(x, rowvar=False), rtol=1e-10)
    assert torch.equal(scores.features, feats) and torch.equal(scores.probs, feats.softmax(1))

    path = write_stats_file(tmp_path / "ref.npz", scores)
    mu, sigma = load_fid_stats(path, dim=6)
    m = metrics_from_scores(scores, net, mu, sigma, is_splits=4, kid_features=x)
    assert m["fid"] == pytest.approx(0.0, abs=1e-9)
    assert m["inception_score"] == inception_score(feats.softmax(dim=1), splits=4)
    assert m["kid"] == kernel_inception_distance(x, x)
    other = score_dataset(TensorDataset(images.flip(0)[:32] * 0.5), net, progress=False)
    m_other = metrics_from_scores(other, net, mu, sigma, is_splits=4)
    assert m_other["fid"] == pytest.approx(frechet_distance(*other.stats.mu_sigma(), mu, sigma))
    assert m_other["fid"] > 0.01
    with pytest.raises(ValueError, match=r"ref\.npz holds statistics of D=6.*features have D=5"):
        load_fid_stats(path, dim=5)
