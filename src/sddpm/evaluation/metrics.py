"""FID, Inception Score and KID, computed from features we extract ourselves.

- :class:`FeatureStats` accumulates feature statistics (count, sum, sum of outer products) in
  float64, batch by batch, and merges across batches, workers and DDP ranks; its ``mu`` and
  ``sigma`` are what FID needs (``sigma`` is the unbiased covariance, as ``np.cov``).
- :func:`frechet_distance` is the FID formula
  ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` in float64, with pytorch-fid's handling
  of singular products and tiny imaginary parts.
- :func:`inception_score` is the published IS (10 splits, mean and std over the splits).
- :func:`kernel_inception_distance` is KID (cubic polynomial kernel, unbiased MMD^2, subsets).

Everything here takes plain ``[N, D]`` arrays or tensors, so it works with any feature network
(the FID Inception, or the digits proxy network of :mod:`sddpm.evaluation.digits_features`);
:mod:`.scores` feeds them from generated or dataset images.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import scipy.linalg
import scipy.special
import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "FeatureStats",
    "fid_from_features",
    "frechet_distance",
    "inception_score",
    "kernel_inception_distance",
]

ArrayLike = np.ndarray | Tensor | Sequence


def _as_float64_2d(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D], got shape {arr.shape}")
    return arr


class FeatureStats:
    """Running count, sum and sum of outer products of ``D``-dimensional features, in float64.

    Exact to merge: statistics of disjoint sets add. ``update`` takes ``[N, D]`` batches (torch
    tensors stay on their device; the accumulators live on ``device``). ``all_reduce`` sums the
    statistics over all DDP ranks so every rank then holds the statistics of the whole set.

    Float64 makes the one-pass covariance ``(sum xx^T - N mu mu^T) / (N - 1)`` accurate to
    about 1e-12 relative for features of Inception scale, well below anything FID can resolve.
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        if dim < 1:
            raise ValueError(f"feature dimension must be positive, got {dim}")
        self.dim = int(dim)
        self.device = torch.device(device)
        self.count = 0
        self.sum = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        self.outer = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)
        self._reduced = False

    @classmethod
    def from_features(cls, features: ArrayLike) -> FeatureStats:
        """Statistics of a whole ``[N, D]`` feature set at once."""
        if not isinstance(features, Tensor):
            features = torch.as_tensor(_as_float64_2d(features, "features"))
        stats = cls(features.shape[-1], device=features.device)
        stats.update(features)
        return stats

    def update(self, features: ArrayLike) -> FeatureStats:
        """Add a batch of ``[N, D]`` features. Returns ``self``."""
        if not isinstance(features, Tensor):
            features = torch.as_tensor(_as_float64_2d(features, "features"))
        if features.ndim != 2:
            raise ValueError(f"features must be [N, D], got shape {tuple(features.shape)}")
        if features.shape[1] != self.dim:
            raise ValueError(
                f"feature dimension mismatch: these statistics have D={self.dim}, "
                f"the batch has D={features.shape[1]}"
            )
        x = features.detach().to(device=self.device, dtype=torch.float64)
        self.count += x.shape[0]
        self.sum += x.sum(dim=0)
        self.outer += x.T @ x
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add the statistics of a disjoint feature set (in place). Returns ``self``."""
        if other.dim != self.dim:
            raise ValueError(
                f"feature dimension mismatch: cannot merge D={other.dim} into D={self.dim}"
            )
        self.count += other.count
        self.sum += other.sum.to(self.device)
        self.outer += other.outer.to(self.device)
        return self

    def all_reduce(self) -> FeatureStats:
        """Sum over all ranks of the default process group; a no-op when not distributed.

        Call it once, after the last ``update`` on every rank (it is a collective: every rank
        must call it). The accumulators must be on a device the backend supports (CUDA for NCCL).
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        if self._reduced:
            raise RuntimeError("FeatureStats.all_reduce() was already called on these statistics")
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.device)
        for t in (count, self.sum, self.outer):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        self.count = int(round(count.item()))
        self._reduced = True
        return self

    @property
    def mu(self) -> np.ndarray:
        """``[D]`` float64 mean."""
        if self.count < 1:
            raise ValueError("no features were added to these statistics")
        return (self.sum / self.count).cpu().numpy()

    @property
    def sigma(self) -> np.ndarray:
        """``[D, D]`` float64 unbiased covariance (``np.cov(x, rowvar=False)``)."""
        if self.count < 2:
            raise ValueError(f"a covariance (and so FID) needs at least 2 images, got {self.count}")
        n = self.count
        mean = self.sum / n
        cov = (self.outer - n * torch.outer(mean, mean)) / (n - 1)
        cov = 0.5 * (cov + cov.T)  # exact symmetry; rounding can break it by ~1e-16
        return cov.cpu().numpy()

    def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
        return self.mu, self.sigma


def frechet_distance(
    mu1: ArrayLike,
    sigma1: ArrayLike,
    mu2: ArrayLike,
    sigma2: ArrayLike,
    eps: float = 1e-6,
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 @ sigma2))``.

    As pytorch-fid: if ``sqrtm`` of the product is not finite (a singular product, e.g. fewer
    images than dimensions), ``eps * I`` is added to both covariances and it is retried; an
    imaginary part from rounding is dropped if the diagonal's is below 1e-3, else it is an error.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(
            f"feature dimension mismatch: mu1 has D={mu1.shape[-1]}, mu2 has D={mu2.shape[-1]}"
        )
    d = mu1.shape[0]
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (d, d):
            raise ValueError(f"{name} must be [{d}, {d}] to match mu, got {list(s.shape)}")

    def _sqrtm(a: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            # Singular products warn; non-finite results are handled below, like pytorch-fid.
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            return scipy.linalg.sqrtm(a)

    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(d) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3:
            raise ValueError(f"sqrtm(sigma1 @ sigma2) has an imaginary component of {imag:.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    return float(value)


def fid_from_features(features1: ArrayLike, features2: ArrayLike) -> float:
    """FID between two ``[N, D]`` feature sets (each needs N >= 2)."""
    a = FeatureStats.from_features(features1)
    b = FeatureStats.from_features(features2)
    if a.dim != b.dim:
        raise ValueError(f"feature dimension mismatch: D={a.dim} vs D={b.dim}")
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def inception_score(probs: ArrayLike, splits: int = 10) -> tuple[float, float]:
    """Inception Score of ``[N, K]`` class probabilities: ``(mean, std)`` over ``splits``.

    As published (Salimans et al.; the SDDPM / pytorch-ddpm code): the images, in order, are cut
    into ``splits`` parts ``[i N // splits, (i + 1) N // splits)``; each part scores
    ``exp(mean_x KL(p(y|x) || p(y)))`` with ``p(y)`` the part's mean; std is ``np.std`` (ddof 0).
    Terms with ``p(y|x) = 0`` contribute 0 (``0 log 0 = 0``).
    """
    p = _as_float64_2d(probs, "probs")
    n = p.shape[0]
    if splits < 1 or n < splits:
        raise ValueError(f"inception_score needs at least splits={splits} images, got {n}")
    scores = []
    for i in range(splits):
        part = p[i * n // splits : (i + 1) * n // splits]
        py = part.mean(axis=0, keepdims=True)
        # xlogy(p, p) - xlogy(p, py): zero where p is zero, whatever py is.
        kl = scipy.special.xlogy(part, part) - scipy.special.xlogy(part, py)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    scores = np.asarray(scores)
    return float(scores.mean()), float(scores.std())


def kernel_inception_distance(
    features1: ArrayLike,
    features2: ArrayLike,
    *,
    num_subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """KID between two ``[N, D]`` feature sets: ``(mean, std)`` of the unbiased MMD^2 estimate.

    Kernel ``k(x, y) = (gamma x.y + coef0)^degree`` with ``gamma = 1 / D`` by default (Binkowski
    et al. 2018; the defaults of torch-fidelity and torchmetrics). Each of ``num_subsets`` draws
    takes ``m = min(subset_size, N1, N2)`` rows of each set without replacement (numpy generator
    seeded with ``seed``). std is over subsets (ddof 0).
    """
    x = _as_float64_2d(features1, "features1")
    y = _as_float64_2d(features2, "features2")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimension mismatch: D={x.shape[1]} vs D={y.shape[1]}")
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError(
            f"KID needs at least 2 samples in each set, got {x.shape[0]}, {y.shape[0]}"
        )
    g = 1.0 / x.shape[1] if gamma is None else gamma
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for i in range(num_subsets):
        a = x[rng.choice(x.shape[0], m, replace=False)]
        b = y[rng.choice(y.shape[0], m, replace=False)]
        kxx = (g * a @ a.T + coef0) ** degree
        kyy = (g * b @ b.T + coef0) ** degree
        kxy = (g * a @ b.T + coef0) ** degree
        off_diag = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values[i] = off_diag - 2.0 * kxy.mean()
    return float(values.mean()), float(values.std())
