"""The one sampler: a pure function of (dataset size, seed, epoch, rank, world, repeats, start batch).

Hand-written because the order has to be shared by backends that have nothing in common (an
FFCV TraversalOrder, a DALI external source, a torch DataLoader): with one order, backend A/B
comparisons see the same images, and a resumed run sees exactly the batches it had left.
Train order follows torch's DistributedSampler (no repeats) and timm's RepeatAugSampler
(repeats), seeded with torch.randperm exactly as they are, so seed 0 reproduces timm's order.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fastrsb.data.block_order import BlockLayout, block_order
from fastrsb.data.crops import mix64
from fastrsb.seeding import derive_seed


def _permutation(num_samples: int, seed: int, epoch: int, shuffle: bool, blocks: BlockLayout | None) -> np.ndarray:
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    if blocks is not None:
        return block_order(blocks, seed, epoch)
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, epoch))  # seed 0 -> timm's / torch's manual_seed(epoch)
    return torch.randperm(num_samples, generator=g).numpy()


def repeat_aug_length(num_samples: int, world_size: int, num_repeats: int, selected_round: int = 256) -> int:
    """Per-rank samples per epoch under repeated augmentation (timm's RepeatAugSampler):
    about one dataset's worth per epoch in total, rounded down to `selected_round`."""
    per_rank_total = math.ceil(num_samples * num_repeats / world_size)
    if selected_round and num_samples >= selected_round:
        selected = num_samples // selected_round * selected_round // world_size
    else:
        selected = math.ceil(num_samples / world_size)
    return min(selected, per_rank_total)


def epoch_samples(num_samples: int, *, seed: int, epoch: int, rank: int, world_size: int, batch_size: int,
                  num_repeats: int = 1, shuffle: bool = True, drop_last: bool = True, start_batch: int = 0,
                  blocks: BlockLayout | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(indices, copies): this rank's sample indices for the epoch from batch `start_batch` on, and
    which copy of its image each one is (0 .. num_repeats - 1, counted in the epoch's global order;
    a copy that wraps around to pad the epoch counts on from num_repeats).

    Train (shuffle, drop_last): a seeded permutation (or, with `blocks`, the block order of
    fastrsb.data.block_order), sharded across ranks, cut to whole batches.
    With num_repeats > 1 every image appears num_repeats times in a row in the global order and
    the copies are dealt to consecutive ranks, so they land on different ranks.
    Val (shuffle=False, drop_last=False): every sample exactly once across ranks, no padding.
    A copy is the same (image, copy) pair whatever the world size, which is what lets a sample's
    augmentation be keyed on it (augmentation_keys). Position p of the global order goes to rank
    p % world_size as its (p // world_size)-th sample: at a constant global batch, each global step
    takes the same samples whatever the world size.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    if num_repeats < 1:
        raise ValueError(f"num_repeats must be >= 1, got {num_repeats}")
    order = _permutation(num_samples, seed, epoch, shuffle, blocks)
    if num_repeats > 1:
        order = np.repeat(order, num_repeats)
        total = math.ceil(num_samples * num_repeats / world_size) * world_size
        picks = np.arange(rank, total, world_size)[: repeat_aug_length(num_samples, world_size, num_repeats)]
        mine = order[picks % len(order)]  # wraps around to pad, as timm does
        copies = picks // len(order) * num_repeats + picks % len(order) % num_repeats
    elif drop_last:
        mine = order[rank: num_samples - num_samples % world_size: world_size]
        copies = np.zeros(len(mine), np.int64)
    else:
        mine = order[rank::world_size]
        copies = np.zeros(len(mine), np.int64)
    if drop_last:
        keep = len(mine) // batch_size * batch_size
        mine, copies = mine[:keep], copies[:keep]
    return mine[start_batch * batch_size:], copies[start_batch * batch_size:]


def block_steps(blocks: BlockLayout, *, seed: int, epoch: int, world_size: int, batch_size: int, num_repeats: int = 1,
                drop_last: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(first, last), int64 per block: the first and the last of this epoch's steps (batches of every rank) that read
    a sample of it, -1 for a block no step reads. Its pages are wanted from the first and can leave the page cache
    once every rank is past the last."""
    n = epoch_length(blocks.num_samples, rank=0, world_size=world_size, batch_size=batch_size,
                     num_repeats=num_repeats, drop_last=drop_last)
    order = _permutation(blocks.num_samples, seed, epoch, True, blocks)
    if num_repeats > 1:
        order = np.repeat(order, num_repeats)
    positions = np.arange(world_size * n)
    block, step = blocks.block_of(order[positions % len(order)]), positions // world_size // batch_size
    first, last = np.full(blocks.num_blocks, n, np.int64), np.full(blocks.num_blocks, -1, np.int64)
    np.minimum.at(first, block, step)
    np.maximum.at(last, block, step)
    first[last < 0] = -1
    return first, last


def augmentation_keys(seed: int, epoch: int, indices: np.ndarray, copies: np.ndarray) -> np.ndarray:
    """A uint64 key per sample, the run's derive_seed of (epoch, sample index, copy), mixed: the seed
    of that sample's augmentation draws in every backend. It names the sample copy, not its place in
    the epoch, so the same seed gives the same pixels whatever the rank, world size, worker count or
    resume point. Mixed because the draws are counter-based (crops.uniform), which needs keys
    that do not differ by a constant from sample to sample."""
    indices = np.asarray(indices, dtype=np.int64).astype(np.uint64)
    copies = np.asarray(copies, dtype=np.int64).astype(np.uint64)
    return mix64(derive_seed(seed, epoch, indices, copies))


def epoch_length(num_samples: int, *, rank: int, world_size: int, batch_size: int, num_repeats: int = 1,
                 drop_last: bool = True) -> int:
    """len(epoch_samples(...)[0]) for a whole epoch, without drawing the permutation."""
    if num_repeats > 1:
        n = repeat_aug_length(num_samples, world_size, num_repeats)
    elif drop_last:
        n = num_samples // world_size
    else:
        n = len(range(rank, num_samples, world_size))
    return n // batch_size * batch_size if drop_last else n


def num_batches(num_indices: int, batch_size: int, drop_last: bool) -> int:
    return num_indices // batch_size if drop_last else -(-num_indices // batch_size)
