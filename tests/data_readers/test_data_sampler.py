"""The infinite sharded sampler, the batch iterator, and reproducible flips across resumes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from sddpm.data import BatchIterator, ShardedInfiniteSampler, TensorImageDataset, build_dataset


def epoch_of(sampler: ShardedInfiniteSampler, epoch: int) -> list[int]:
    return [int(i) for i in sampler.epoch_indices(epoch)]


@pytest.mark.parametrize("n", [10, 11])
def test_two_ranks_disjoint_and_covering(n):
    for drop_last in (False, True):
        for epoch in range(3):
            r0 = epoch_of(
                ShardedInfiniteSampler(n, seed=5, rank=0, world_size=2, drop_last=drop_last), epoch
            )
            r1 = epoch_of(
                ShardedInfiniteSampler(n, seed=5, rank=1, world_size=2, drop_last=drop_last), epoch
            )
            assert len(r0) == len(r1)
            if n % 2 == 0 or drop_last:
                assert set(r0).isdisjoint(r1)
                assert len(set(r0) | set(r1)) == len(r0) + len(r1)
            if drop_last:
                assert len(r0) == n // 2
            else:
                assert set(r0) | set(r1) == set(range(n))  # every item is seen every epoch
                assert len(r0) == -(-n // 2)
                assert (
                    len(r0) + len(r1) - len(set(r0) | set(r1)) == (-n) % 2
                )  # only the pad repeats


def test_epochs_are_different_permutations_and_reproducible():
    s = ShardedInfiniteSampler(50, seed=1)
    e0, e1 = epoch_of(s, 0), epoch_of(s, 1)
    assert sorted(e0) == list(range(50)) and sorted(e1) == list(range(50))
    assert e0 != e1 and e0 != list(range(50))
    assert e0 == epoch_of(ShardedInfiniteSampler(50, seed=1), 0)
    assert e0 != epoch_of(ShardedInfiniteSampler(50, seed=2), 0)
    assert epoch_of(ShardedInfiniteSampler(5, shuffle=False), 3) == [0, 1, 2, 3, 4]


def test_iteration_crosses_epochs_and_state_is_exact():
    s = ShardedInfiniteSampler(7, seed=3, rank=1, world_size=2)  # 4 per epoch per rank
    assert s.samples_per_epoch == 4
    first = list(itertools.islice(iter(s), 10))
    assert first == epoch_of(s, 0) + epoch_of(s, 1) + epoch_of(s, 2)[:2]
    assert s.state_dict()["epoch"] == 2 and s.state_dict()["offset"] == 2 and s.position == 10
    state = s.state_dict()
    following = list(itertools.islice(iter(s), 5))
    resumed = ShardedInfiniteSampler(7, seed=3, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert list(itertools.islice(iter(resumed), 5)) == following
    # every rank can resume from rank 1's state: positions are rank-independent
    r0 = ShardedInfiniteSampler(7, seed=3, rank=0, world_size=2)
    r0.load_state_dict(state)
    assert next(iter(r0)) == epoch_of(r0, 2)[2]


def test_load_state_rejects_a_different_order():
    state = ShardedInfiniteSampler(7, seed=3).state_dict()
    with pytest.raises(ValueError, match="seed"):
        ShardedInfiniteSampler(7, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="num_items"):
        ShardedInfiniteSampler(8, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        ShardedInfiniteSampler(7, seed=3, rank=0, world_size=2).load_state_dict(state)


def test_bad_arguments():
    with pytest.raises(ValueError):
        ShardedInfiniteSampler(0)
    with pytest.raises(ValueError):
        ShardedInfiniteSampler(4, rank=2, world_size=2)
    with pytest.raises(ValueError):
        ShardedInfiniteSampler(1, rank=0, world_size=2, drop_last=True)
    # padding works even with fewer items than ranks
    s = ShardedInfiniteSampler(1, rank=1, world_size=3)
    assert epoch_of(s, 0) == [0]


def _ramp_dataset(n=9, hflip=True, seed=0):
    # image i: a 3x3 ramp offset by 20 i, so a batch reveals both the index and a flip
    images = np.zeros((n, 1, 3, 3), np.uint8)
    for i in range(n):
        images[i, 0] = np.arange(9).reshape(3, 3) + 20 * i
    return TensorImageDataset(images, name="ramp", hflip=hflip, seed=seed)


def test_batch_iterator_order_flips_and_resume():
    ds = _ramp_dataset()
    sampler = ShardedInfiniteSampler(len(ds), seed=11)
    it = BatchIterator(ds, 4, sampler)
    batches = [next(it) for _ in range(5)]  # 20 items: crosses two epoch boundaries
    assert all(b.shape == (4, 1, 3, 3) and b.dtype == torch.float32 for b in batches)
    keys = list(itertools.islice(ShardedInfiniteSampler(9, seed=11).stream(), 20))
    got = torch.cat(batches)
    for k, (index, epoch) in enumerate(keys):
        expected = (torch.arange(9.0).reshape(3, 3) + 20 * index) / 255 * 2 - 1
        if ds.is_flipped(index, epoch):
            expected = expected.flip(-1)
        assert torch.allclose(got[k, 0], expected, atol=1e-6)
    # the same item is flipped in some epochs and not in others
    flips = {ds.is_flipped(0, e) for e in range(8)}
    assert flips == {True, False}

    state = it.state_dict()
    assert (state["epoch"], state["offset"]) == (2, 2)
    nxt = [next(it) for _ in range(3)]
    fresh = BatchIterator(build_like(ds), 4, ShardedInfiniteSampler(9, seed=11))
    fresh.load_state_dict(state)
    for a in nxt:
        assert torch.equal(next(fresh), a)


def build_like(ds: TensorImageDataset) -> TensorImageDataset:
    return TensorImageDataset(ds.images.clone(), name=ds.name, hflip=ds.hflip, seed=ds.seed)


def test_set_epoch_and_tuple_keys_agree():
    ds = build_dataset("digits", hflip=True, seed=4)
    for epoch in (0, 3):
        ds.set_epoch(epoch)
        for i in range(20):
            assert torch.equal(ds[i], ds[(i, epoch)])
            if ds.is_flipped(i):
                assert torch.equal(ds[i], ds.images[i].flip(-1))
            else:
                assert torch.equal(ds[i], ds.images[i])


def test_two_rank_batches_cover_an_epoch():
    ds = _ramp_dataset(n=8, hflip=False)
    its = [
        BatchIterator(ds, 2, ShardedInfiniteSampler(8, seed=0, rank=r, world_size=2))
        for r in (0, 1)
    ]
    seen = []
    for it in its:
        for _ in range(2):
            b = next(it)
            seen += [int(round(((v + 1) / 2 * 255).item())) // 20 for v in b[:, 0, 0, 0]]
    assert sorted(seen) == list(range(8))


def test_dataloader_workers_give_the_same_batches_and_resume():
    ds = _ramp_dataset()
    ref = BatchIterator(ds, 4, ShardedInfiniteSampler(9, seed=2))
    expected = [next(ref) for _ in range(6)]
    it = BatchIterator(ds, 4, ShardedInfiniteSampler(9, seed=2), num_workers=1, prefetch_factor=4)
    got = [next(it) for _ in range(3)]
    state = it.state_dict()  # position of the returned batches, not of what was prefetched
    assert state["epoch"] * 9 + state["offset"] == 12
    it.close()
    resumed = BatchIterator(ds, 4, ShardedInfiniteSampler(9, seed=2), num_workers=1)
    resumed.load_state_dict(state)
    got += [next(resumed) for _ in range(3)]
    resumed.close()
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_batch_iterator_rejects_mismatched_sampler():
    with pytest.raises(ValueError, match="sampler covers"):
        BatchIterator(_ramp_dataset(n=9), 2, ShardedInfiniteSampler(10))
