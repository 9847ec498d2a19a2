"""The infinite sharded sampler, the batch iterator, and reproducible flips across resumes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from sddpm.data import BatchIterator, ShardedInfiniteSampler, TensorImageDataset, build_dataset


def permutation(n: int, seed: int, epoch: int) -> list[int]:
    """Epoch ``epoch``'s order, built here as the sampler documents it (unchanged since v1)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    return [int(i) for i in rng.permutation(n)]


def global_stream(n: int, seed: int, epochs: int) -> list[tuple[int, int]]:
    """The first ``epochs`` epochs of the global stream: ``(index, epoch)`` pairs."""
    return [(i, e) for e in range(epochs) for i in permutation(n, seed, e)]


def global_batches(n, seed, world, batch, steps, start=None):
    """``steps`` global batches of ``batch`` keys read by ``world`` ranks (each taking
    ``batch / world`` per step), each arranged by global position: rank r's row i at i W + r.
    ``start``: a state to load into every rank first."""
    ranks = [ShardedInfiniteSampler(n, seed=seed, rank=r, world_size=world) for r in range(world)]
    if start is not None:
        for s in ranks:
            s.load_state_dict(start)
    out = []
    for _ in range(steps):
        rows = [s.take(batch // world) for s in ranks]
        merged = [None] * batch
        for r, keys in enumerate(rows):
            for i, key in enumerate(keys):
                merged[i * world + r] = key
        out.append(merged)
    states = [s.state_dict() for s in ranks]
    assert all(st == states[0] for st in states)  # the position is the same on every rank
    return out, states[0]


def test_the_stream_is_the_epoch_permutations_concatenated():
    s = ShardedInfiniteSampler(37, seed=5)
    keys = s.take(37 * 3 + 5)
    assert keys == global_stream(37, 5, 4)[: 37 * 3 + 5]
    for e in range(3):  # every image exactly once per epoch of the stream
        epoch = keys[37 * e : 37 * (e + 1)]
        assert sorted(i for i, _ in epoch) == list(range(37)) and {k[1] for k in epoch} == {e}
    assert s.position == 37 * 3 + 5 and s.epoch == 3
    assert [int(i) for i in s.permutation(2)] == permutation(37, 5, 2)
    indices, epochs = s.entries(30, 10, 3)  # entries 30, 33, ..., 57: two epochs
    pairs = list(zip(indices.tolist(), epochs.tolist(), strict=True))
    assert pairs == global_stream(37, 5, 2)[30:58:3]


@pytest.mark.parametrize("n", [37, 36])
def test_global_batches_do_not_depend_on_the_world_size(n):
    """Step s's global batch is stream entries s B .. s B + B - 1 in order, for 1, 2 or 3 ranks,
    also when W does not divide the dataset length (37) and epochs end inside a batch."""
    batch, steps = 12, 8  # 96 entries: two epoch boundaries, inside batches 3 and 6
    stream = global_stream(n, 7, 3)
    expected = [stream[s * batch : (s + 1) * batch] for s in range(steps)]
    runs = {world: global_batches(n, 7, world, batch, steps) for world in (1, 2, 3)}
    for world, (got, _) in runs.items():
        assert got == expected, world
    assert all(state["position"] == steps * batch for _, state in runs.values())


def test_a_stream_position_resumes_on_any_world_size():
    stream = global_stream(37, 2, 4)
    for before, after in ((2, 3), (3, 1), (1, 2)):
        first, state = global_batches(37, 2, before, 12, 4)
        assert "world_size" not in state and state["position"] == 48
        rest, _ = global_batches(37, 2, after, 12, 5, start=state)
        assert first + rest == [stream[s * 12 : (s + 1) * 12] for s in range(9)], (before, after)


def v1_rank_order(n, seed, rank, world, epochs, drop_last=False):
    """What the version-1 sampler gave rank ``rank``: each epoch's permutation padded by
    wrapping around (or trimmed) to a multiple of ``world``, then every ``world``-th entry."""
    per_epoch = n // world if drop_last else -(-n // world)
    out = []
    for e in range(epochs):
        perm = np.resize(np.array(permutation(n, seed, e)), per_epoch * world)
        out += [(int(i), e) for i in perm[rank::world]]
    return out, per_epoch


def test_a_version_1_state_resumes():
    """A per-rank (epoch, offset, world_size) state of the version-1 sampler (checkpoints
    written before the global stream) resumes on its world size: exactly the version-1 order
    when the world size divides the dataset length, else to the end of the current epoch."""
    # 36 images on 2 ranks: no padding, the version-1 order is the global stream's forever
    per_epoch = -(-36 // 2)
    state = {"epoch": 1, "offset": 7, "seed": 4, "num_items": 36, "world_size": 2,
             "shuffle": True, "drop_last": False}  # fmt: skip
    for rank in (0, 1):
        s = ShardedInfiniteSampler(36, seed=4, rank=rank, world_size=2)
        s.load_state_dict(state)
        assert s.position == 36 + 14
        done = per_epoch + 7
        assert s.take(40) == v1_rank_order(36, 4, rank, 2, 4)[0][done : done + 40], rank
    # 37 images on 2 ranks: version 1 padded epoch 1 with perm_1[0] on rank 1
    state = {**state, "num_items": 37}
    for rank in (0, 1):
        old, per_epoch = v1_rank_order(37, 4, rank, 2, 3)
        s = ShardedInfiniteSampler(37, seed=4, rank=rank, world_size=2)
        s.load_state_dict(state)
        assert s.position == 37 + 14 and s.state_dict()["version"] == 2
        left = (37 - 14 - rank + 1) // 2  # rank r's real entries left in epoch 1: 14 + r + 2k
        assert left == (12 if rank == 0 else 11)
        assert s.take(left) == old[per_epoch + 7 : per_epoch + 7 + left], rank
        assert s.take(1)[0][1] == 2  # then epoch 2, with no padded repeat
    # one process: always exact; an offset at the epoch's end rolls over
    old, _ = v1_rank_order(37, 4, 0, 1, 3)
    s = ShardedInfiniteSampler(37, seed=4)
    s.load_state_dict({**state, "world_size": 1, "epoch": 0, "offset": 37 + 5})
    assert s.position == 42 and s.take(20) == old[42:62]
    # drop_last (never used by the trainer): version 1 had consumed o W of the epoch too
    s = ShardedInfiniteSampler(37, seed=4, rank=1, world_size=2)
    s.load_state_dict({**state, "drop_last": True, "epoch": 1, "offset": 18 + 3})  # = (2, 3)
    assert s.position == 2 * 37 + 6
    old, per_epoch = v1_rank_order(37, 4, 1, 2, 3, drop_last=True)
    assert s.take(5) == old[2 * per_epoch + 3 : 2 * per_epoch + 8]
    # and a version-1 state can also move to another world size (the same global position)
    s = ShardedInfiniteSampler(37, seed=4, rank=0, world_size=3)
    s.load_state_dict(state)
    assert s.position == 37 + 14


def test_epochs_are_different_permutations_and_reproducible():
    s = ShardedInfiniteSampler(50, seed=1)
    e0, e1 = list(s.permutation(0)), list(s.permutation(1))
    assert sorted(e0) == list(range(50)) and sorted(e1) == list(range(50))
    assert e0 != e1 and e0 != list(range(50))
    assert e0 == list(ShardedInfiniteSampler(50, seed=1).permutation(0))
    assert e0 != list(ShardedInfiniteSampler(50, seed=2).permutation(0))
    assert list(ShardedInfiniteSampler(5, shuffle=False).permutation(3)) == [0, 1, 2, 3, 4]
    assert [i for i, _ in ShardedInfiniteSampler(5, shuffle=False).take(7)] == [0, 1, 2, 3, 4, 0, 1]


def test_iteration_crosses_epochs_and_state_is_exact():
    s = ShardedInfiniteSampler(7, seed=3, rank=1, world_size=2)
    first = list(itertools.islice(iter(s), 10))
    assert first == [i for i, _ in global_stream(7, 3, 4)[1:20:2]]
    assert s.position == 20 and s.epoch == 2
    state = s.state_dict()
    following = list(itertools.islice(iter(s), 5))
    resumed = ShardedInfiniteSampler(7, seed=3, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert list(itertools.islice(iter(resumed), 5)) == following
    # every rank can resume from rank 1's state: positions are rank-independent
    r0 = ShardedInfiniteSampler(7, seed=3, rank=0, world_size=2)
    r0.load_state_dict(state)
    assert next(iter(r0)) == global_stream(7, 3, 3)[20][0]
    # an iterator follows a position loaded while it is running
    it = iter(r0)
    next(it)
    r0.load_state_dict(state)
    assert next(it) == global_stream(7, 3, 3)[20][0]
    assert list(itertools.islice(r0.stream(3), 2)) == global_stream(7, 3, 1)[3:6:2]


def test_load_state_rejects_a_different_order():
    state = ShardedInfiniteSampler(7, seed=3).state_dict()
    with pytest.raises(ValueError, match="seed"):
        ShardedInfiniteSampler(7, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="num_items"):
        ShardedInfiniteSampler(8, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="shuffle"):
        ShardedInfiniteSampler(7, seed=3, shuffle=False).load_state_dict(state)
    with pytest.raises(ValueError, match="no position"):
        ShardedInfiniteSampler(7, seed=3).load_state_dict({"seed": 3})
    ShardedInfiniteSampler(7, seed=3, rank=0, world_size=2).load_state_dict(state)  # any W


def test_bad_arguments():
    with pytest.raises(ValueError):
        ShardedInfiniteSampler(0)
    with pytest.raises(ValueError):
        ShardedInfiniteSampler(4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="drop_last=True is not supported"):
        ShardedInfiniteSampler(10, rank=0, world_size=2, drop_last=True)
    ShardedInfiniteSampler(10, drop_last=False)  # still accepted
    # fewer items than ranks: the stream goes on into the next epochs
    s = ShardedInfiniteSampler(1, rank=1, world_size=3)
    assert s.take(2) == [(0, 1), (0, 4)]


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
    keys = global_stream(9, 11, 3)[:20]
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
    assert state["position"] == 20
    nxt = [next(it) for _ in range(3)]
    fresh = BatchIterator(build_like(ds), 4, ShardedInfiniteSampler(9, seed=11))
    fresh.load_state_dict(state)
    for a in nxt:
        assert torch.equal(next(fresh), a)


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (3, 0), (2, 1)])
def test_flips_follow_the_stream_entry_whatever_the_world_size(world, workers):
    """The ranks' batches, arranged by global position, are the same images with the same
    flips for any world size: each image is flipped by the epoch of its stream entry (here the
    epochs end inside batches 3 and 6), not by a per-rank epoch."""
    n, batch, steps = 37, 12, 8
    images = np.zeros((n, 1, 3, 3), np.uint8)
    images[:, 0, :, 0] = np.arange(n)[:, None]  # left column: the index; right: 255
    images[:, 0, :, 2] = 255
    ds = TensorImageDataset(images, name="marked", hflip=True, seed=1)
    its = [
        BatchIterator(
            ds, batch // world, ShardedInfiniteSampler(n, seed=6, rank=r, world_size=world),
            num_workers=workers,
        )
        for r in range(world)
    ]  # fmt: skip
    stream = global_stream(n, 6, 3)
    flipped = set()
    for step in range(steps):
        merged = torch.empty(batch, 1, 3, 3)
        for r, it in enumerate(its):
            merged[r::world] = next(it)  # rank r's row i is global position i W + r
        for g in range(batch):
            index, epoch = stream[step * batch + g]
            expected = torch.from_numpy(images[index]).float() / 255 * 2 - 1
            if ds.is_flipped(index, epoch):
                expected = expected.flip(-1)
                flipped.add((index, epoch))
            assert torch.equal(merged[g], expected), (step, g)
    for it in its:
        it.close()
    assert flipped and {e for _, e in flipped} == {0, 1, 2}
    # some image is flipped in one epoch and not the other: the epoch of the entry matters
    seen = {}
    for index, epoch in stream[: steps * batch]:
        seen.setdefault(index, set()).add(ds.is_flipped(index, epoch))
    assert any(len(v) == 2 for v in seen.values())


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
    assert state["position"] == 12
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
