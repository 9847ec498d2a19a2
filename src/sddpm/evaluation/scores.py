"""Features and probabilities of image sets, streamed batch by batch; shards merged.

:func:`generate_and_score` generates the images ``shard_indices(num, rank, world_size)`` of a
model (image ``i`` depends only on ``(seed, i)``) batch by batch and accumulates their feature
statistics and probabilities into :class:`SampleScores` without keeping the images;
:func:`score_dataset` does the same for a dataset. :meth:`SampleScores.merge` combines shards in
one process, :meth:`SampleScores.gather` across DDP ranks; both order the rows by image index,
so the result equals the single-process one. Non-finite features stop the run
(:class:`~sddpm.finite.NonFiniteError`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..diffusion import SamplingOptions
from ..distributed import all_gather_rows, shard_indices
from ..finite import check_finite
from .features import FeatureNetwork
from .metrics import FeatureStats

if TYPE_CHECKING:
    from ..generation import SamplingSetup

__all__ = ["SampleScores", "generate_and_score", "score_dataset"]


@dataclass
class SampleScores:
    """Features of a set of images (a shard, or the whole set after :meth:`gather`).

    ``stats``: streaming ``mu`` / ``sigma`` statistics; ``indices`` ``[n]`` the global image
    indices, ascending; ``probs`` ``[n, K]`` float32 class probabilities in index order (IS);
    ``features`` ``[n, D]`` float32 in index order, kept only when asked (KID).
    """

    stats: FeatureStats
    indices: Tensor
    probs: Tensor
    features: Tensor | None = None

    @property
    def count(self) -> int:
        return self.stats.count

    def _sorted(self) -> SampleScores:
        order = torch.argsort(self.indices)
        return SampleScores(
            self.stats,
            self.indices[order],
            self.probs[order],
            None if self.features is None else self.features[order],
        )

    def merge(self, *others: SampleScores) -> SampleScores:
        """These scores and those of disjoint shards, as one set (a new object)."""
        stats = FeatureStats(self.stats.dim, device=self.stats.device)
        for s in (self, *others):
            stats.merge(s.stats)
        keep = all(s.features is not None for s in (self, *others))
        merged = SampleScores(
            stats,
            torch.cat([s.indices for s in (self, *others)]),
            torch.cat([s.probs for s in (self, *others)]),
            torch.cat([s.features for s in (self, *others)]) if keep else None,
        )
        return merged._sorted()

    def gather(self) -> SampleScores:
        """Every rank's scores on every rank (a collective); ``self`` when not distributed."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        device = self.stats.device
        stats = FeatureStats(self.stats.dim, device=device).merge(self.stats).all_reduce()
        gathered = SampleScores(
            stats,
            all_gather_rows(self.indices, device),
            all_gather_rows(self.probs, device),
            None if self.features is None else all_gather_rows(self.features, device),
        )
        return gathered._sorted()


def _empty_scores(net: FeatureNetwork, keep_features: bool) -> SampleScores:
    return SampleScores(
        FeatureStats(net.dim, device=net.device),
        torch.empty(0, dtype=torch.int64),
        torch.empty(0, net.num_classes),
        torch.empty(0, net.dim) if keep_features else None,
    )


def _new_parts(net: FeatureNetwork, keep_features: bool) -> dict[str, Any]:
    return {
        "stats": FeatureStats(net.dim, device=net.device),
        "indices": [],
        "probs": [],
        "features": [] if keep_features else None,
    }


def _accumulate(
    net: FeatureNetwork, images01: Tensor, index: Sequence[int], parts: dict[str, list]
) -> None:
    feats, probs = net(images01)
    where = f"{net.name} features of images {index[0]}..{index[-1]}"
    check_finite(feats, where)
    check_finite(probs, f"{net.name} class probabilities of images {index[0]}..{index[-1]}")
    parts["stats"].update(feats)
    parts["indices"].append(torch.as_tensor(list(index), dtype=torch.int64))
    parts["probs"].append(probs.detach().float().cpu())
    if parts["features"] is not None:
        parts["features"].append(feats.detach().float().cpu())


def _finish(net: FeatureNetwork, parts: dict[str, list], keep_features: bool) -> SampleScores:
    if not parts["indices"]:
        return _empty_scores(net, keep_features)
    return SampleScores(
        parts["stats"],
        torch.cat(parts["indices"]),
        torch.cat(parts["probs"]),
        torch.cat(parts["features"]) if keep_features else None,
    )._sorted()


def _to_unit(images: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1], clamped (what both feature networks take)."""
    return ((images.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def generate_and_score(
    setup: SamplingSetup,
    num: int,
    net: FeatureNetwork,
    options: SamplingOptions | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    keep_features: bool = False,
    progress: bool = True,
    desc: str | None = None,
    **changes: Any,
) -> SampleScores:
    """Generate this rank's images of ``range(num)`` and score them (not gathered).

    ``setup`` is a :class:`~sddpm.generation.SamplingSetup` (``load_for_sampling``);
    ``options`` (with keyword ``changes`` applied) how to sample, see
    :func:`sddpm.generation.generate_batches` (``bf16`` autocasts the U-Net, never the feature
    network). Images are mapped from [-1, 1] to [0, 1] and fed to ``net``; only features and
    probabilities are kept. A tqdm bar (images/s, ETA) runs on rank 0.
    """
    from ..generation import generate_batches

    opts = SamplingOptions.build(options, **changes)
    cfg = setup.model.config
    shape = (cfg.image_channels, cfg.image_size, cfg.image_size)
    net.check_images(cfg.image_channels)
    parts = _new_parts(net, keep_features)
    batches = generate_batches(
        setup.model,
        shard_indices(num, rank, world_size),
        shape,
        opts,
        schedule=setup.schedule,
        prediction=setup.prediction,
        progress=progress and rank == 0,
        desc=desc or f"{opts.sampler} {opts.steps or ''}".strip(),
    )
    for chunk, images in batches:
        _accumulate(net, _to_unit(images), chunk, parts)
    return _finish(net, parts, keep_features)


@torch.no_grad()
def score_dataset(
    dataset: torch.utils.data.Dataset,
    net: FeatureNetwork,
    *,
    num: int | None = None,
    batch_size: int = 256,
    rank: int = 0,
    world_size: int = 1,
    keep_features: bool = False,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "dataset features",
) -> SampleScores:
    """Score this rank's share of the first ``num`` items (default all) of a dataset of
    ``[C, H, W]`` images in [-1, 1] (not gathered)."""
    from tqdm.auto import tqdm

    total = len(dataset) if num is None else int(num)
    if total > len(dataset):
        raise ValueError(f"{total} images asked for, but the dataset has {len(dataset)}")
    if total < 1:
        raise ValueError(f"need at least 1 image, got num={total}")
    idx = shard_indices(total, rank, world_size)
    subset = torch.utils.data.Subset(dataset, idx)
    loader = torch.utils.data.DataLoader(
        subset, batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    parts = _new_parts(net, keep_features)
    pos = 0
    with tqdm(total=len(idx), unit="img", desc=desc, disable=not progress or rank != 0) as bar:
        for batch in loader:
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
            if pos == 0:
                net.check_images(images.shape[1])
            n = images.shape[0]
            _accumulate(net, _to_unit(images), idx[pos : pos + n], parts)
            pos += n
            bar.update(n)
    return _finish(net, parts, keep_features)
