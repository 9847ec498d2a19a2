"""An infinite, resumable, DDP-sharded index stream and a batch iterator over it.

Training runs count steps, not epochs, so the data order is one endless **global stream**:
the concatenation of epoch permutations, epoch ``e``'s a permutation of ``range(num_items)``
drawn from ``(seed, e)`` alone, with no padding or trimming (stream entry ``n`` is image
``permutation(n // num_items)[n % num_items]`` of epoch ``n // num_items``). Every image
appears exactly once per epoch of the stream, and epoch boundaries fall wherever they fall,
also inside a batch.

The stream is consumed ``B`` entries at a time (a global batch), whatever the process layout:
from a global position ``P``, rank ``r`` of ``world_size`` ``W`` takes the entries
``P + r, P + r + W, P + r + 2W, ...``, so row ``i`` of its batch of ``B / W`` is the image at
global position ``i W + r`` of the global batch (the layout
:func:`sddpm.training.loop.rank_batch_positions` gives). The images of a global batch, and
the epoch (hence the flip) of each, therefore depend on ``(seed, P)`` alone: a run on ``W``
processes reads what one process reads.

The sampler's state is that global position (stream entries consumed, the same on every
rank), so a run resumes exactly on any number of processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .datasets import ImageDataset

STATE_VERSION = 2  # the global position; version 1 (no "version" key) was per-rank
_CHUNK = 1024  # stream entries computed at once by stream() and iteration


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardedInfiniteSampler:
    """One rank's share of the endless global stream (see the module docstring), resumable at
    any entry on any number of processes.

    Args:
        num_items: dataset length.
        seed: permutation seed; epoch ``e``'s order depends only on ``(seed, e)``.
        rank, world_size: this process's share (default: from ``torch.distributed`` if it is
            initialised, else 0 and 1): entries ``position + rank + k world_size``.
        shuffle: permute each epoch (else ``0, 1, 2, ...``).
        drop_last: accepted for compatibility, only ``False``. The stream is not cut into
            per-rank epochs any more (nothing is padded, so nothing is dropped); ``True``
            raises ``ValueError``. The trainer never set it.

    :attr:`position` counts the global stream entries consumed; every rank holds the same
    value when all have taken the same number of items, and :meth:`advance` (``n`` items of
    this rank) moves it by ``n * world_size``. Iterating yields ``int`` indices and advances;
    :meth:`stream` yields ``(index, epoch)`` pairs from a position without moving;
    :meth:`take` returns the next ``n`` pairs and advances.
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
        if drop_last:
            raise ValueError(
                "drop_last=True is not supported: the ranks share one global stream of whole "
                "epoch permutations (rank r takes every world_size-th entry), so nothing is "
                "padded and there is nothing to drop"
            )
        self.num_items = int(num_items)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = bool(shuffle)
        self.drop_last = False
        self.position = 0
        self._cache: dict[int, np.ndarray] = {}

    # -- the order ------------------------------------------------------------------------------

    def permutation(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s order of the whole dataset: stream entries
        ``epoch * num_items`` to ``(epoch + 1) * num_items - 1``."""
        epoch = int(epoch)
        cached = self._cache.get(epoch)
        if cached is not None:
            return cached
        if not self.shuffle:
            perm = np.arange(self.num_items, dtype=np.int64)
        else:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            perm = rng.permutation(self.num_items).astype(np.int64)
        perm.flags.writeable = False  # cached and shared
        if len(self._cache) >= 2:  # a batch spans at most a few epochs: keep the latest two
            self._cache.pop(next(iter(self._cache)))
        self._cache[epoch] = perm
        return perm

    def entries(self, start: int, count: int, step: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Global stream entries ``start, start + step, ...`` (``count`` of them): their image
        indices and their epochs, two int64 arrays (slices of the epoch permutations)."""
        if start < 0 or count < 0 or step < 1:
            raise ValueError(
                f"need start >= 0, count >= 0, step >= 1; got {start}, {count}, {step}"
            )
        n = int(start) + np.arange(int(count), dtype=np.int64) * int(step)
        epochs = n // self.num_items
        indices = np.empty_like(n)
        if count:
            first, last = int(epochs[0]), int(epochs[-1])
            bounds = np.searchsorted(epochs, np.arange(first, last + 2))
            for e in range(first, last + 1):
                a, b = bounds[e - first], bounds[e - first + 1]
                if a < b:
                    indices[a:b] = self.permutation(e)[n[a:b] - e * self.num_items]
        return indices, epochs

    # -- position -------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """The epoch of the global stream at :attr:`position` (of the next global batch)."""
        return self.position // self.num_items

    def set_position(self, position: int) -> None:
        """Move to global stream entry ``position`` (entries consumed by all ranks together)."""
        if position < 0:
            raise ValueError(f"position must be non-negative, got {position}")
        self.position = int(position)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first entry (``torch`` ``DistributedSampler`` habit)."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self.set_position(int(epoch) * self.num_items)

    def advance(self, n: int) -> None:
        """Skip ``n`` items of every rank (what a consumer calls after using them): the global
        position moves by ``n * world_size``."""
        self.set_position(self.position + int(n) * self.world_size)

    def state_dict(self) -> dict[str, Any]:
        """The global position and the settings that define the order (the same on every rank,
        and independent of the world size)."""
        return {
            "version": STATE_VERSION,
            "position": self.position,
            "seed": self.seed,
            "num_items": self.num_items,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``'s position, on any world size. The order settings must match
        this sampler's: a different seed, dataset length or shuffle would not continue the same
        stream, so it raises ``ValueError``.

        Also takes the per-rank state of version 1 (``epoch``, ``offset``, ``world_size``,
        ``drop_last``; see :func:`position_of_v1_state`)."""
        for key in ("seed", "num_items", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]!r} but this sampler has "
                    f"{key}={getattr(self, key)!r}; the resumed order would differ"
                )
        if "position" in state:
            self.set_position(int(state["position"]))
        elif "epoch" in state and "offset" in state:
            self.set_position(position_of_v1_state(state, self.num_items))
        else:
            raise ValueError(f"not a sampler state (no position): keys {sorted(state)}")

    # -- iteration ------------------------------------------------------------------------------

    def stream(self, position: int | None = None) -> Iterator[tuple[int, int]]:
        """Endless ``(index, epoch)`` pairs of this rank from global position ``position``
        (default: the current one); does not move the sampler."""
        n = self.position if position is None else int(position)
        n += self.rank
        while True:
            indices, epochs = self.entries(n, _CHUNK, self.world_size)
            yield from zip(indices.tolist(), epochs.tolist(), strict=True)
            n += _CHUNK * self.world_size

    def __iter__(self) -> Iterator[int]:
        """Endless indices from the current position, advancing it one by one."""
        while True:
            pos = self.position
            indices, _ = self.entries(pos + self.rank, _CHUNK, self.world_size)
            for i in indices.tolist():
                if self.position != pos:  # moved from outside (load_state_dict): start again
                    break
                pos += self.world_size
                self.position = pos
                yield i

    def take(self, n: int) -> list[tuple[int, int]]:
        """The next ``n`` ``(index, epoch)`` pairs of this rank, advancing the position."""
        indices, epochs = self.entries(self.position + self.rank, n, self.world_size)
        self.advance(n)
        return list(zip(indices.tolist(), epochs.tolist(), strict=True))


def position_of_v1_state(state: dict[str, Any], num_items: int) -> int:
    """The global position that continues a version-1 (per-rank) sampler state.

    Version 1 cut each epoch's permutation to ``spe * W`` entries (padded by wrapping around,
    or trimmed with ``drop_last``; ``spe`` = ``ceil(N / W)`` or ``N // W``, ``W`` the state's
    world size) and gave rank ``r`` every ``W``-th; its position ``(epoch e, offset o)`` was per
    rank. Since ``o < spe``, ``o W < N``: the ranks had consumed every epoch before ``e`` and
    exactly the first ``o W`` entries of epoch ``e``'s permutation, so the position is
    ``e N + o W``. From there rank ``r`` (of ``W``) gets ``perm_e[o W + r + k W]``, exactly what
    version 1 would have given, to the end of epoch ``e``. When ``W`` divides ``N`` (no padding,
    always so for one process) that holds for every later epoch too: the conversion is exact.
    Otherwise version 1 would have padded each epoch and started the next one on rank 0 again;
    the global stream does not, so from epoch ``e + 1`` on the ranks' shares differ from what
    version 1 would have read (every image still once per epoch, flips still by its epoch).
    Resuming on a different world size continues the global stream from that position."""
    world = int(state.get("world_size", 1))
    if world < 1:
        raise ValueError(f"sampler state has world_size={world}")
    if state.get("drop_last", False):
        per_epoch = num_items // world
    else:
        per_epoch = -(-num_items // world)
    if per_epoch < 1:
        raise ValueError(f"sampler state has drop_last with {num_items} items and {world} ranks")
    epoch, offset = int(state["epoch"]), int(state["offset"])
    if epoch < 0 or offset < 0:
        raise ValueError(f"sampler state has epoch={epoch}, offset={offset}")
    epoch, offset = divmod(epoch * per_epoch + offset, per_epoch)
    return epoch * num_items + offset * world


class _BatchStream(torch.utils.data.Sampler):
    """Endless lists of keys for a ``DataLoader``'s ``batch_sampler``."""

    def __init__(self, sampler: ShardedInfiniteSampler, batch_size: int, epoch_keys: bool) -> None:
        self.sampler, self.batch_size, self.epoch_keys = sampler, batch_size, epoch_keys
        self.start = sampler.position

    def __iter__(self):
        batch: list = []
        for index, epoch in self.sampler.stream(self.start):
            batch.append((index, epoch) if self.epoch_keys else index)
            if len(batch) == self.batch_size:
                yield batch
                batch = []


class BatchIterator:
    """Endless batches ``[B, C, H, W]`` of a dataset in the order of a sampler, resumable; for a
    dataset whose items are ``(image, label)`` pairs (:meth:`ImageDataset.with_labels`), batches
    are ``(images [B, C, H, W], labels [B] int64)``.

    Each item is fetched as ``dataset[(index, epoch)]`` for :class:`ImageDataset`, ``epoch``
    being the epoch of its global stream entry (so flips are decided by ``(seed, epoch,
    index)`` in any worker and whatever the world size), else ``dataset[index]``. Batches run
    across epoch boundaries; every batch is full. ``batch_size`` is this rank's share of the
    global batch (``B / world_size``): row ``i`` is global position ``i world_size + rank``.

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
        """The epoch of the global stream at the next batch's first entry."""
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
