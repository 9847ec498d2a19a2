"""FID, IS and KID against closed forms; streaming statistics against one-shot ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sddpm.evaluation import (
    FeatureStats,
    fid_from_features,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
)


def _commuting_gaussians(d: int = 8, seed: int = 0):
    """Two Gaussians whose covariances share eigenvectors, and their FID in closed form.

    With S1 = Q diag(a) Q^T and S2 = Q diag(b) Q^T, (S1 S2)^(1/2) = Q diag(sqrt(ab)) Q^T, so
    FID = ||mu1 - mu2||^2 + sum(a + b - 2 sqrt(a b)).
    """
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    mu1 = rng.normal(size=d)
    mu2 = mu1 + 0.3
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    closed = float(((mu1 - mu2) ** 2).sum() + (a + b - 2 * np.sqrt(a * b)).sum())
    return mu1, s1, mu2, s2, closed


def test_frechet_distance_closed_form_exact():
    mu1, s1, mu2, s2, closed = _commuting_gaussians()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed, rel=1e-10, abs=1e-12)
    # Diagonal covariances, by hand: D=2, mu diff (1, 2), a=(1, 4), b=(4, 1).
    # 1 + 4 + (1 + 4 - 2*2) + (4 + 1 - 2*2) = 7
    value = frechet_distance([0, 0], np.diag([1.0, 4.0]), [1, 2], np.diag([4.0, 1.0]))
    assert value == pytest.approx(7.0, abs=1e-12)


def test_fid_of_gaussian_samples_matches_closed_form():
    mu1, s1, mu2, s2, closed = _commuting_gaussians()
    rng = np.random.default_rng(1)
    n = 50_000
    x = rng.multivariate_normal(mu1, s1, n)
    y = rng.multivariate_normal(mu2, s2, n)
    # closed form 1.773; sampling error of the estimated statistics is ~0.01 at this N.
    assert fid_from_features(x, y) == pytest.approx(closed, abs=0.05)


def test_fid_of_a_set_against_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 32)) * 3 + 1
    assert abs(fid_from_features(x, x)) < 1e-8


def test_singular_covariances_fall_back_to_offset():
    # 5 samples in 16 dimensions: rank-4 covariances, a singular product.
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 16)), rng.normal(size=(5, 16))
    value = fid_from_features(x, y)
    assert np.isfinite(value) and value > 0
    assert abs(fid_from_features(x, x)) < 1e-4


def test_streaming_and_merged_statistics_equal_one_shot():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1001, 12)) * rng.uniform(0.1, 5, 12) + rng.normal(size=12) * 10
    one_shot_mu, one_shot_sigma = x.mean(axis=0), np.cov(x, rowvar=False)
    first, second = FeatureStats(12), FeatureStats(12)
    for batch in np.array_split(x[:400], 7):  # uneven batches, numpy input
        first.update(batch)
    for batch in torch.from_numpy(x[400:]).split(64):  # torch input
        second.update(batch)
    merged = first.merge(second)
    assert merged.count == 1001
    np.testing.assert_allclose(merged.mu, one_shot_mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merged.sigma, one_shot_sigma, rtol=1e-10, atol=1e-10)
    assert merged.all_reduce() is merged  # not distributed: a no-op


def _all_reduce_worker(rank: int, world: int, init_file: str, x: np.ndarray, out: dict):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        stats = FeatureStats.from_features(x[rank::world])
        stats.all_reduce()
        out[rank] = (stats.count, stats.mu, stats.sigma)
    finally:
        dist.destroy_process_group()


def test_all_reduce_over_two_gloo_ranks(tmp_path):
    x = np.random.default_rng(0).normal(size=(101, 6))
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_all_reduce_worker, args=(2, str(tmp_path / "init"), x, out), nprocs=2, join=True)
        results = dict(out)
    for rank in (0, 1):
        count, mu, sigma = results[rank]
        assert count == 101
        np.testing.assert_allclose(mu, x.mean(axis=0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-10)


def test_fid_needs_two_images_and_matching_dimensions():
    with pytest.raises(ValueError, match="at least 2 images, got 1"):
        fid_from_features(np.zeros((1, 4)), np.zeros((10, 4)))
    with pytest.raises(ValueError, match="D=4 vs D=5"):
        fid_from_features(np.random.rand(10, 4), np.random.rand(10, 5))
    with pytest.raises(ValueError, match="mu1 has D=3, mu2 has D=2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="D=3.*D=4"):
        FeatureStats(3).update(np.zeros((2, 4)))


def test_inception_score_uniform_is_one():
    mean, std = inception_score(np.full((100, 1008), 1 / 1008))
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("k", [1, 7, 10])
def test_inception_score_of_k_evenly_spread_one_hot_classes_is_k(k):
    # 10 splits of 3k consecutive images; image i is class i % k, so every split holds each
    # class 3 times: p(y) uniform over k classes, KL = log k for every image.
    n = 10 * 3 * k
    probs = np.zeros((n, 1008))
    probs[np.arange(n), np.arange(n) % k] = 1.0
    mean, std = inception_score(probs, splits=10)
    assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_matches_published_formula():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(20, 0.3), size=1000)
    scores = []
    for i in range(10):  # the published loop (score/both.py), numpy branch
        part = probs[i * 1000 // 10 : (i + 1) * 1000 // 10]
        kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    mean, std = inception_score(probs)
    assert mean == pytest.approx(np.mean(scores), rel=1e-12)
    assert std == pytest.approx(np.std(scores), rel=1e-9)
    with pytest.raises(ValueError, match="at least splits=10"):
        inception_score(probs[:9])


def test_kid_identical_distributions_near_zero_and_shift_positive():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(2000, 16)), rng.normal(size=(2000, 16))
    shifted = rng.normal(size=(2000, 16)) + 0.5
    same_set, _ = kernel_inception_distance(x, x, num_subsets=10, subset_size=300)
    same_dist, _ = kernel_inception_distance(x, y, num_subsets=10, subset_size=300)
    different, _ = kernel_inception_distance(x, shifted, num_subsets=10, subset_size=300)
    # Measured: same set -0.0065 (the O(1/m) diagonal term), same distribution 0.0043, shift 0.98.
    assert abs(same_set) < 0.02 and abs(same_dist) < 0.02
    assert different > 0.5


def test_kid_matches_torchmetrics_on_whole_sets():
    kid_module = pytest.importorskip("torchmetrics.image.kid")
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(300, 10)), rng.normal(size=(300, 10)) * 1.2 + 0.2
    ours, std = kernel_inception_distance(x, y, num_subsets=1, subset_size=300)
    theirs = kid_module.poly_mmd(torch.from_numpy(x), torch.from_numpy(y)).item()
    assert ours == pytest.approx(theirs, rel=1e-10) and std == 0.0


def test_kid_closed_form_by_hand():
    """Unbiased MMD^2 with k(a, b) = (a.b / D + 1)^3, every term counted by hand (no
    torchmetrics): subsets of m = N = 2 rows are the whole sets, so every draw gives the same
    value and the std is 0."""
    # D = 1: x = {0, 1}, y = {0, -1}. k(0, 1) = 1, k(0, -1) = 1; k over x*y: 1, 1, 1, (1-1)^3 = 0.
    # MMD^2 = k(x1,x2) + k(y1,y2) - 2 mean(kxy) = 1 + 1 - 2 * 3/4 = 0.5
    mean, std = kernel_inception_distance([[0.0], [1.0]], [[0.0], [-1.0]], num_subsets=3)
    assert mean == pytest.approx(0.5, abs=1e-15) and std == 0.0
    # D = 2, gamma = 1/2: x = e1, e2 (x1.x2 = 0: k = 1); y = (1, 1), 0 (y1.y2 = 0: k = 1);
    # x.y = 1, 0, 1, 0 -> k = 1.5^3, 1, 1.5^3, 1; mean 2.1875. MMD^2 = 2 - 4.375 = -2.375
    x, y = [[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [0.0, 0.0]]
    mean, std = kernel_inception_distance(x, y, num_subsets=2)
    assert mean == pytest.approx(-2.375, abs=1e-15) and std == 0.0
    # an explicit gamma, degree and coef0: k = (2 a.b + 0)^2; D = 1, x = {1, 2}, y = {1, 3}
    # kxx(1,2) = 16, kyy(1,3) = 36, kxy = 4, 36, 16, 144 -> mean 50. MMD^2 = 16 + 36 - 100 = -48
    mean, _ = kernel_inception_distance(
        [[1.0], [2.0]], [[1.0], [3.0]], num_subsets=1, gamma=2.0, coef0=0.0, degree=2
    )
    assert mean == pytest.approx(-48.0, abs=1e-12)
