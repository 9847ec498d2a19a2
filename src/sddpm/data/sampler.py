"""An infinite, resumable, DDP-sharded index stream and a batch iterator over it.

Training runs count steps, not epochs, so the sampler is an endless stream of epochs. Epoch
``e`` is a permutation of ``range(num_items)`` drawn from ``(seed, e)`` alone; rank ``r`` of
``world_size`` takes every ``world_size``-th entry starting at ``r`` (after the permutation is
trimmed or padded to a multiple of ``world_size``), so within an epoch the ranks' indices are
disjoint and together cover the dataset. Every rank gets the same number of indices per epoch,
so the position ``(epoch, offset)`` is the same on every rank and one rank's
:meth:`~ShardedInfiniteSampler.state_dict` resumes them all exactly.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .datasets import ImageDataset


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardedInfiniteSampler:
    """Endless indices for one rank, epoch after epoch, resumable at any item.

    Args:
        num_items: dataset length.
        seed: permutation seed; epoch ``e``'s order depends only on ``(seed, e)``.
        rank, world_size: this process's shard (default: from ``torch.distributed`` if it is
            initialised, else 0 and 1).
        shuffle: permute each epoch (else ``0, 1, 2, ...``).
        drop_last: trim each epoch's permutation to a multiple of ``world_size`` (the dropped
            tail differs per epoch when shuffling), keeping ranks disjoint; otherwise pad it by
            wrapping around, so every item is seen each epoch and ``pad`` items twice.

    ``samples_per_epoch`` indices are yielded per rank per epoch. Iterating yields ``int``
    indices and advances the position; :meth:`stream` yields ``(index, epoch)`` pairs from a
    position without changing it.
    """

    def __init__(
        self,
        num_items: int,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        if rank is None or world_size is None:
            r, w = _dist_rank_world()
            rank = r if rank is None else rank
            world_size = w if world_size is None else world_size
        if num_items < 1:
            raise ValueError(f"num_items must be positive, got {num_items}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        if drop_last and num_items < world_size:
            raise ValueError(
                f"drop_last with {num_items} items and world_size {world_size} leaves nothing"
            )
        self.num_items = int(num_items)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        if self.drop_last:
            self.samples_per_epoch = self.num_items // self.world_size
        else:
            self.samples_per_epoch = -(-self.num_items // self.world_size)
        self.epoch = 0
        self.offset = 0
        self._cache: tuple[int, np.ndarray] | None = None

    # -- the order ------------------------------------------------------------------------------

    def permutation(self, epoch: int) -> np.ndarray:
        """The whole epoch's order (all ranks), before trimming or padding."""
        if not self.shuffle:
            return np.arange(self.num_items, dtype=np.int64)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, int(epoch)])))
        return rng.permutation(self.num_items).astype(np.int64)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's ``samples_per_epoch`` indices for ``epoch``, in order."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        perm = self.permutation(epoch)
        total = self.samples_per_epoch * self.world_size
        perm = perm[:total] if self.drop_last else np.resize(perm, total)  # resize wraps around
        mine = perm[self.rank :: self.world_size]
        self._cache = (epoch, mine)
        return mine

    # -- position -------------------------------------------------------------------------------

    @property
    def position(self) -> int:
        """Items this rank has consumed since epoch 0: ``epoch * samples_per_epoch + offset``."""
        return self.epoch * self.samples_per_epoch + self.offset

    def set_position(self, epoch: int, offset: int = 0) -> None:
        """Move to item ``offset`` of ``epoch`` (normalised so ``offset < samples_per_epoch``)."""
        if epoch < 0 or offset < 0:
            raise ValueError(f"position must be non-negative, got epoch={epoch}, offset={offset}")
        total = int(epoch) * self.samples_per_epoch + int(offset)
        self.epoch, self.offset = divmod(total, self.samples_per_epoch)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first item (``torch`` ``DistributedSampler`` habit)."""
        self.set_position(epoch, 0)

    def advance(self, n: int) -> None:
        """Skip ``n`` items (what a consumer calls after using them)."""
        self.set_position(self.epoch, self.offset + int(n))

    def state_dict(self) -> dict[str, Any]:
        """The position and the settings that define the order (the same on every rank)."""
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "seed": self.seed,
            "num_items": self.num_items,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``'s position. The order settings must match this sampler's: a
        different seed, dataset length, world size, shuffle or drop_last would not continue the
        same sequence, so it raises ``ValueError``."""
        for key in ("seed", "num_items", "world_size", "shuffle", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]!r} but this sampler has "
                    f"{key}={getattr(self, key)!r}; the resumed order would differ"
                )
        self.set_position(int(state["epoch"]), int(state["offset"]))

    # -- iteration ------------------------------------------------------------------------------

    def stream(
        self, epoch: int | None = None, offset: int | None = None
    ) -> Iterator[tuple[int, int]]:
        """Endless ``(index, epoch)`` pairs from a position (default: the current one); does not
        move the sampler."""
        e = self.epoch if epoch is None else int(epoch)
        o = self.offset if offset is None else int(offset)
        e, o = divmod(e * self.samples_per_epoch + o, self.samples_per_epoch)
        while True:
            idx = self.epoch_indices(e)
            for i in range(o, len(idx)):
                yield int(idx[i]), e
            e, o = e + 1, 0

    def __iter__(self) -> Iterator[int]:
        """Endless indices from the current position, advancing it one by one."""
        while True:
            idx = self.epoch_indices(self.epoch)
            while self.offset < len(idx):
                i = int(idx[self.offset])
                self.advance(1)
                yield i
                if self.offset == 0:  # advance() rolled into the next epoch
                    break

    def take(self, n: int) -> list[tuple[int, int]]:
        """The next ``n`` ``(index, epoch)`` pairs, advancing the position by ``n``."""
        out = list(itertools.islice(self.stream(), n))
        self.advance(n)
        return out


class _BatchStream(torch.utils.data.Sampler):
    """Endless lists of keys for a ``DataLoader``'s ``batch_sampler``."""

    def __init__(self, sampler: ShardedInfiniteSampler, batch_size: int, epoch_keys: bool) -> None:
        self.sampler, self.batch_size, self.epoch_keys = sampler, batch_size, epoch_keys
        self.start = (sampler.epoch, sampler.offset)

    def __iter__(self):
        batch: list = []
        for index, epoch in self.sampler.stream(*self.start):
            batch.append((index, epoch) if self.epoch_keys else index)
            if len(batch) == self.batch_size:
                yield batch
                batch = []


class BatchIterator:
    """Endless batches ``[B, C, H, W]`` of a dataset in the order of a sampler, resumable; for a
    dataset whose items are ``(image, label)`` pairs (:meth:`ImageDataset.with_labels`), batches
    are ``(images [B, C, H, W], labels [B] int64)``.

    Each item is fetched as ``dataset[(index, epoch)]`` for :class:`ImageDataset` (so flips are
    decided by ``(seed, epoch, index)`` in any worker), else ``dataset[index]``. Batches run
    across epoch boundaries; every batch is full.

    With ``num_workers=0`` items are read in this process. With ``num_workers > 0`` a
    ``torch.utils.data.DataLoader`` reads them in worker processes, in the same order.

    :meth:`state_dict` is the sampler's position after the last batch *returned* (not after what
    workers prefetched), so loading it into a fresh iterator continues with the same next batch.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        sampler: ShardedInfiniteSampler | None = None,
        *,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.sampler = (
            sampler if sampler is not None else ShardedInfiniteSampler(len(dataset), seed)
        )
        if self.sampler.num_items != len(dataset):
            raise ValueError(
                f"sampler covers {self.sampler.num_items} items but the dataset has {len(dataset)}"
            )
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.prefetch_factor = prefetch_factor
        self._epoch_keys = isinstance(dataset, ImageDataset)
        self._loader_iter: Iterator | None = None

    def _key(self, index: int, epoch: int):
        return (index, epoch) if self._epoch_keys else index

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.num_workers == 0:
            keys = self.sampler.take(self.batch_size)
            items = [self.dataset[self._key(i, e)] for i, e in keys]
            if isinstance(items[0], tuple):  # (image, label) pairs
                batch = tuple(torch.stack(column) for column in zip(*items, strict=True))
                return tuple(b.pin_memory() for b in batch) if self.pin_memory else batch
            batch = torch.stack(items)
            return batch.pin_memory() if self.pin_memory else batch
        if self._loader_iter is None:
            self._loader_iter = iter(self._make_loader())
        batch = next(self._loader_iter)
        self.sampler.advance(self.batch_size)
        return tuple(batch) if isinstance(batch, list) else batch  # default collate: a list

    def _make_loader(self) -> torch.utils.data.DataLoader:
        kwargs: dict[str, Any] = {}
        if self.prefetch_factor is not None:
            kwargs["prefetch_factor"] = self.prefetch_factor
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=_BatchStream(self.sampler, self.batch_size, self._epoch_keys),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            **kwargs,
        )

    @property
    def epoch(self) -> int:
        """The epoch of the next item."""
        return self.sampler.epoch

    def state_dict(self) -> dict[str, Any]:
        """The sampler position after the last returned batch (see the class docstring)."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; any prefetched batches are discarded."""
        self.close()
        self.sampler.load_state_dict(state)

    def close(self) -> None:
        """Stop the worker processes, if any (a new iteration restarts them)."""
        self._loader_iter = None
