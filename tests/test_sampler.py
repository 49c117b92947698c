"""The shared sampler: sharding, drop-last, val coverage, resume, and timm's repeated augmentation."""
from __future__ import annotations

import numpy as np
import pytest
from timm.data.distributed_sampler import RepeatAugSampler

from fastrsb.data.sampler import epoch_samples, epoch_length, repeat_aug_length


def _all_ranks(n, world, **kw):
    return [epoch_samples(n, rank=r, world_size=world, **kw)[0] for r in range(world)]


@pytest.mark.parametrize("n,world,bs", [(100, 1, 8), (101, 2, 8), (1000, 4, 32), (7, 2, 2)])
def test_train_shards_are_disjoint_whole_batches(n, world, bs):
    parts = _all_ranks(n, world, seed=3, epoch=5, batch_size=bs)
    flat = np.concatenate(parts)
    assert len(set(flat.tolist())) == len(flat)  # no sample twice in an epoch, across ranks
    assert all(len(p) == len(parts[0]) and len(p) % bs == 0 for p in parts)
    assert len(parts[0]) == (n // world) // bs * bs


@pytest.mark.parametrize("n,world,bs", [(100, 1, 8), (101, 2, 8), (5, 4, 2), (3, 4, 2)])
def test_val_covers_every_sample_exactly_once_without_padding(n, world, bs):
    parts = _all_ranks(n, world, seed=0, epoch=0, batch_size=bs, shuffle=False, drop_last=False)
    flat = np.sort(np.concatenate(parts))
    assert flat.tolist() == list(range(n))


def test_seeded_shuffle_changes_with_epoch_and_seed_only():
    a = epoch_samples(500, seed=1, epoch=0, rank=0, world_size=1, batch_size=10)[0]
    assert np.array_equal(a, epoch_samples(500, seed=1, epoch=0, rank=0, world_size=1, batch_size=10)[0])
    assert not np.array_equal(a, epoch_samples(500, seed=1, epoch=1, rank=0, world_size=1, batch_size=10)[0])
    assert not np.array_equal(a, epoch_samples(500, seed=2, epoch=0, rank=0, world_size=1, batch_size=10)[0])


def test_seed_zero_is_torchs_distributed_sampler_order():
    from torch.utils.data import DistributedSampler

    for rank in range(3):
        s = DistributedSampler(range(100), num_replicas=3, rank=rank, shuffle=True, seed=0, drop_last=True)
        s.set_epoch(4)
        ours = epoch_samples(100, seed=0, epoch=4, rank=rank, world_size=3, batch_size=1)[0]
        assert ours.tolist() == list(s)


@pytest.mark.parametrize("n,world,repeats", [(1000, 1, 3), (1000, 2, 3), (1000, 8, 3), (300, 4, 2), (100, 2, 3), (4099, 8, 3)])
def test_repeated_augmentation_matches_timm(n, world, repeats):
    for epoch in (0, 3):
        for rank in range(world):
            timm_s = RepeatAugSampler(range(n), num_replicas=world, rank=rank, shuffle=True, num_repeats=repeats)
            timm_s.set_epoch(epoch)
            ref = list(timm_s)
            ours = epoch_samples(n, seed=0, epoch=epoch, rank=rank, world_size=world, batch_size=1, num_repeats=repeats)[0]
            assert ours.tolist() == ref
            assert len(timm_s) == repeat_aug_length(n, world, repeats)


def test_repeated_copies_land_on_different_ranks():
    world, repeats, n = 4, 3, 2048
    parts = _all_ranks(n, world, seed=0, epoch=1, batch_size=1, num_repeats=repeats)
    ranks_of: dict[int, list[int]] = {}
    for r, p in enumerate(parts):
        for i in p.tolist():
            ranks_of.setdefault(i, []).append(r)
    assert all(len(rs) == len(set(rs)) for rs in ranks_of.values())  # never twice on one rank
    counts = np.bincount([len(rs) for rs in ranks_of.values()])
    assert counts[repeats] > 0.25 * n / repeats  # most selected images appear with all their copies


@pytest.mark.parametrize("repeats", [1, 3])
def test_start_batch_resumes_exactly(repeats):
    full = epoch_samples(1000, seed=7, epoch=2, rank=1, world_size=2, batch_size=16, num_repeats=repeats)[0]
    for k in (0, 1, 5, len(full) // 16):
        rest = epoch_samples(1000, seed=7, epoch=2, rank=1, world_size=2, batch_size=16, num_repeats=repeats, start_batch=k)[0]
        assert rest.tolist() == full[k * 16:].tolist()


def test_epoch_length_is_the_length_of_the_epoch_without_drawing_it():
    for n in (1, 3, 7, 100, 255, 256, 1000, 1031):
        for world in (1, 2, 3, 8):
            for bs in (1, 2, 16):
                for repeats in (1, 3):
                    for drop_last in (True, False):
                        kw = dict(world_size=world, batch_size=bs, num_repeats=repeats, drop_last=drop_last)
                        for rank in range(world):
                            drawn = epoch_samples(n, seed=1, epoch=0, rank=rank, shuffle=drop_last, **kw)[0]
                            assert epoch_length(n, rank=rank, **kw) == len(drawn), (n, rank, kw)


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="rank"):
        epoch_samples(10, seed=0, epoch=0, rank=2, world_size=2, batch_size=1)[0]
    with pytest.raises(ValueError, match="num_repeats"):
        epoch_samples(10, seed=0, epoch=0, rank=0, world_size=1, batch_size=1, num_repeats=0)[0]
