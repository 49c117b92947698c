"""data.order=block: an epoch order that reads a store larger than RAM sequentially enough to stream it.

The store's samples are cut into blocks of consecutive dataset indices (consecutive bytes in the shards and, at
the granularity of ffcv's writer chunks, in the .beton), about data.block_mb each. An epoch visits the blocks in a
seeded random order through a sliding window of data.window_blocks blocks: each position of the order takes the
next sample (in a seeded shuffle of its block) of a block drawn at random among those open; a block that runs out
is replaced by the next one. So at any time only the window's blocks are being read, each block is read once per
epoch, and what is done with can leave the page cache (fastrsb.data.page_cache). ffcv's QUASI_RANDOM does the same
over ffcv's pages (a window of 2 x batch size pages, one process); MosaicML Streaming's block shuffles over shards.

The order is then dealt to ranks, repeated and cut exactly as the random order (fastrsb.data.sampler), so a global
batch is the same set of (sample, copy) pairs whatever the world size, and each sample keeps its augmentation key.

Its cost in randomness: the samples of a window are a few blocks, so a batch holds runs of the store's order. On a
store in random order (the hub routes' source order, or `fastrsb convert --store-order shuffled`) a block is a
random subset and a batch is nearly an i.i.d. draw; on a store sorted by label (the folder route's default) a
window covers a handful of classes, which training does not survive (docs/data.md, "Block order").

Hand-written (numba) because it is one pass with a data-dependent draw per position, over 1.28M positions per epoch.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numba as nb
import numpy as np

from fastrsb.data.crops import mix64, uniform
from fastrsb.seeding import derive_seed


class BlockLayout(NamedTuple):
    """How a split is cut into blocks: `block_samples` consecutive dataset indices each (the last one shorter), and
    how many are open at once."""

    num_samples: int
    block_samples: int
    window_blocks: int

    @property
    def num_blocks(self) -> int:
        return -(-self.num_samples // self.block_samples)

    def block_of(self, indices: np.ndarray) -> np.ndarray:
        return np.asarray(indices) // self.block_samples


def block_layout(num_samples: int, mean_sample_bytes: float, block_mb: float, window_blocks: int) -> BlockLayout:
    """Blocks of about block_mb of stored bytes (at least one sample each)."""
    block_samples = max(1, int(block_mb * 2 ** 20 / max(mean_sample_bytes, 1.0)))
    return BlockLayout(num_samples, block_samples, window_blocks)


@nb.njit(nogil=True, cache=True)
def _shuffle(values, key, counter: int) -> int:
    """Fisher-Yates over values in place with the counter-based draws of `key` from `counter` on; returns the next
    counter."""
    for i in range(len(values) - 1, 0, -1):
        j = int(uniform(key, counter) * (i + 1))
        counter += 1
        values[i], values[j] = values[j], values[i]
    return counter


@nb.njit(nogil=True, cache=True)
def _block_order(num_samples: int, block_samples: int, window_blocks: int, key, out) -> None:
    num_blocks = (num_samples + block_samples - 1) // block_samples
    blocks = np.arange(num_blocks)
    counter = _shuffle(blocks, key, 0)
    members = np.arange(num_samples)  # each block's samples, shuffled when the block opens
    open_blocks = np.empty(window_blocks, np.int64)
    taken = np.zeros(window_blocks, np.int64)
    n_open, next_block = 0, 0
    for pos in range(num_samples):
        while n_open < window_blocks and next_block < num_blocks:
            b = blocks[next_block]
            counter = _shuffle(members[b * block_samples:min((b + 1) * block_samples, num_samples)], key, counter)
            open_blocks[n_open], taken[n_open] = b, 0
            n_open += 1
            next_block += 1
        slot = int(uniform(key, counter) * n_open)
        counter += 1
        b = open_blocks[slot]
        out[pos] = members[b * block_samples + taken[slot]]
        taken[slot] += 1
        if b * block_samples + taken[slot] >= min((b + 1) * block_samples, num_samples):  # ran out: close the slot
            n_open -= 1
            open_blocks[slot], taken[slot] = open_blocks[n_open], taken[n_open]


def block_order(layout: BlockLayout, seed: int, epoch: int) -> np.ndarray:
    """The epoch's order of all samples (int64), a pure function of (layout, seed, epoch)."""
    out = np.empty(layout.num_samples, np.int64)
    key = np.uint64(mix64(np.uint64(derive_seed(seed, epoch, "block order"))))  # numba hands back a Python int
    _block_order(layout.num_samples, layout.block_samples, layout.window_blocks, key, out)
    return out


def check_layout(layout: BlockLayout, world_size: int, global_batch: int, block_mb: float) -> None:
    """What block order cannot do, as a ValueError naming the key and its limit (raised before any work)."""
    share = layout.num_samples // world_size
    if layout.block_samples > max(share, 1):
        raise ValueError(f"data.block_mb={block_mb:g} makes blocks of {layout.block_samples} samples, more than a "
                         f"rank's share of the split ({share} of {layout.num_samples} over {world_size} rank(s)): "
                         f"at most {block_mb * share / layout.block_samples:.3g}")
    if layout.window_blocks > layout.num_blocks:
        raise ValueError(f"data.window_blocks={layout.window_blocks} is more than the split's {layout.num_blocks} "
                         f"blocks of data.block_mb={block_mb:g}: at most {layout.num_blocks}")
    window = layout.window_blocks * layout.block_samples
    if window < global_batch:
        need = math.ceil(global_batch / layout.block_samples)
        raise ValueError(f"data.window_blocks={layout.window_blocks} x {layout.block_samples} samples per block is "
                         f"less than a global batch ({global_batch}): a batch could not mix blocks; at least {need}")
