"""The loader contract: what a batch is, and what every backend (FfcvLoader, DaliLoader, TorchLoader,
TorchDeviceLoader, SyntheticLoader) is, so that the trainer never branches on the backend."""
from __future__ import annotations

import atexit
import os
import weakref
from typing import Callable, Generator, Iterator, NamedTuple

import numpy as np
import torch

from fastrsb.config import DataConfig
from fastrsb.data import sampler
from fastrsb.data.bad_samples import BadSamples, default_limit
from fastrsb.data.block_order import BlockLayout, block_layout, check_layout
from fastrsb.data.page_cache import StoreExtents
from fastrsb.data.sampler import epoch_samples, num_batches
from fastrsb.dist import DistInfo


class Batch(NamedTuple):
    """images: (N,3,H,W) uint8 on the run's device, channels_last memory (NHWC viewed as NCHW).
    targets: (N,) int64 on the same device. After the augment stage images are normalized floats
    and targets may be soft (N, num_classes)."""

    images: torch.Tensor
    targets: torch.Tensor


# data.interpolation (config.DataConfig's allowed values) -> each library's name for the filter: the one table
FILTERS = {
    "bilinear": {"torchvision": "BILINEAR", "dali": "INTERP_LINEAR", "pillow": "BILINEAR"},
    "bicubic": {"torchvision": "BICUBIC", "dali": "INTERP_CUBIC", "pillow": "BICUBIC"},
}


class EpochPlan(NamedTuple):
    """What one epoch (or its rest after a resume offset) is on this rank, computed once per epoch."""

    epoch: int
    indices: np.ndarray  # int64: the dataset samples, in order
    keys: np.ndarray  # uint64: each one's augmentation key (sampler.augmentation_keys)
    start_batch: int = 0  # the batch of the whole epoch that indices start at


def shard_extents(loc) -> StoreExtents:
    """A split's samples in its tar shards (SplitInfo.shard_locations)."""
    return StoreExtents(loc.tar_paths, loc.shard, loc.offset, loc.size)


def default_workers(dist: DistInfo) -> int:
    """data.workers=0: this node's cores shared among its ranks."""
    return max(1, (os.cpu_count() or 1) // dist.local_world_size)


# Every loader, so that the epochs still running at exit end first. A backend's epoch runs threads that sit in
# native code (ffcv's compiled pipeline, a JPEG decoder); when the interpreter finalises under them, such a
# thread is unwound by pthread_exit and the process dies "terminate called without an active exception" (exit
# 134). Closing the epoch stops them as leaving it early does (tests/test_exit.py).
_LOADERS: "weakref.WeakSet[SplitLoader]" = weakref.WeakSet()


@atexit.register
def _end_running_epochs() -> None:
    """atexit runs before finalisation stops daemon threads; the torch backend's hook that stops its persistent
    workers was registered later, so it runs before this one."""
    for loader in list(_LOADERS):
        loader.end_epoch()


class SplitLoader:
    """What every backend is: one split (train or val) of one dataset on this rank, iterated an epoch at a
    time in the shared sampler's order. The trainer, evaluation and benchmarks use exactly this:

        len(loader)                  batches per epoch on this rank
        iter(loader)                 the epoch's Batches, from the resume offset on
        loader.set_epoch(e, b=0)     select epoch e's order; skip the b batches an interrupted run consumed
        loader.set_resolution(px)    train crops' side from the next epoch on (progressive resizing)
        num_classes, num_samples     of the split (num_samples: before sharding and repeats)
        batch_size                   per process
        decoder_name                 what decodes the images (library, version, where)
        bad_samples                  the stored samples it could not decode (fastrsb.data.bad_samples: each is
                                     replaced by another of its batch, named, counted)
        blocks                       train under data.order=block: how the split is cut into blocks
                                     (fastrsb.data.block_order); the pages of blocks every rank is done with
                                     leave the page cache
        store                        where its samples' bytes are (fastrsb.data.page_cache.StoreExtents)

    A backend implements `_epoch(plan)`: the epoch's EpochPlan (this rank's samples, their keys) -> a generator of
    Batches whose close() (at any position) returns promptly and leaves the backend ready for the next
    epoch (tests/test_no_hangs.py)."""

    def __init__(self, cfg: DataConfig, split: str, dist: DistInfo, num_samples: int, num_classes: int,
                 describe_sample: Callable[[int], str] | None = None, store: StoreExtents | None = None):
        """describe_sample: SplitInfo.describe_sample of a stored split; store: where its samples' bytes are in the
        files this backend reads (None: nothing stored, the synthetic backend)."""
        self.cfg, self.split, self.dist = cfg, split, dist
        self.train = split == "train"
        self.num_samples, self.num_classes = num_samples, num_classes
        self.batch_size = cfg.batch_size
        self.num_repeats = cfg.num_repeats if self.train else 1
        self.epoch, self.start_batch = 0, 0
        self._running: Generator[Batch, None, None] | None = None  # the latest epoch's batches
        self.resolution = cfg.train_res if self.train else cfg.val_res
        self.workers = cfg.workers or default_workers(dist)
        limit = default_limit(num_samples) if cfg.max_bad_samples is None else cfg.max_bad_samples
        self.bad_samples = BadSamples(split, limit, describe_sample or f"{split} sample {{}}".format)
        self.store = store
        self.blocks: BlockLayout | None = None
        if self.train and cfg.order == "block":
            # the samples' own bytes, the same in the .beton and the shards, so every backend cuts the same blocks; no
            # store (synthetic): its uint8 images'
            per_sample = store.total_bytes / num_samples if store is not None else 3 * self.resolution ** 2
            self.blocks = block_layout(num_samples, per_sample, cfg.block_mb, cfg.window_blocks)
            check_layout(self.blocks, dist.world_size, self.batch_size * dist.world_size, cfg.block_mb)
        _LOADERS.add(self)

    @property
    def decoder_name(self) -> str:
        """What decodes this loader's images, for the run's first line and benchmark rows."""
        raise NotImplementedError

    def _sampler_args(self, epoch: int, start_batch: int) -> dict:
        return dict(seed=self.cfg.seed, epoch=epoch, rank=self.dist.rank, world_size=self.dist.world_size,
                    batch_size=self.batch_size, num_repeats=self.num_repeats, shuffle=self.train,
                    drop_last=self.train, start_batch=start_batch, blocks=self.blocks)

    def plan(self, epoch: int | None = None, start_batch: int | None = None) -> EpochPlan:
        """This rank's samples of an epoch (default: the current one, from its resume offset on) and their keys."""
        epoch = self.epoch if epoch is None else epoch
        start_batch = self.start_batch if start_batch is None else start_batch
        indices, copies = epoch_samples(self.num_samples, **self._sampler_args(epoch, start_batch))
        return EpochPlan(epoch, indices, sampler.augmentation_keys(self.cfg.seed, epoch, indices, copies), start_batch)

    @property
    def epoch_length(self) -> int:
        """Samples this rank sees in a whole epoch."""
        return sampler.epoch_length(self.num_samples, rank=self.dist.rank, world_size=self.dist.world_size,
                                    batch_size=self.batch_size, num_repeats=self.num_repeats, drop_last=self.train)

    def __len__(self) -> int:
        return num_batches(self.epoch_length, self.batch_size, self.train)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def set_resolution(self, px: int) -> None:
        if not self.train:
            raise ValueError("set_resolution applies to the train loader; val uses data.val_res")
        self.resolution = px

    def __iter__(self) -> Iterator[Batch]:
        """The current epoch's batches from its resume offset on; the offset then goes back to 0 (set_epoch
        sets it for one epoch only)."""
        self.end_epoch()  # an epoch still held open by its caller ends before the next starts
        self.bad_samples.start_pass()
        plan = self.plan()
        self.start_batch = 0
        self._running = self._epoch(plan)
        if self.blocks is not None and self.store is not None:
            self._running = self._paging(self._running, plan, self.store)
        return self._running

    # Blocks a rank is done with stay in the page cache this many steps longer: the other ranks may be a step behind
    # (DDP keeps them within one), and what the loaders read ahead is for later steps, never earlier ones.
    DROP_LAG = 2

    def _paging(self, batches: Generator[Batch, None, None], plan: EpochPlan,
                extents: StoreExtents) -> Generator[Batch, None, None]:
        """The epoch's batches, with the store's page cache kept to what the window needs: the chunks the next steps
        (data.prefetch + DROP_LAG ahead) first want are read in the background (fetch_chunks: a block in large reads),
        the chunks only samples done DROP_LAG steps ago use leave the cache after each step (posix_fadvise), and at
        the epoch's end all the epoch read does. So a store's resident pages stay near the window's, whatever its
        size (tests/test_block_order.py)."""
        args = self._sampler_args(plan.epoch, 0)
        first, last = sampler.block_steps(self.blocks, **{k: args[k] for k in (
            "seed", "epoch", "world_size", "batch_size", "num_repeats", "drop_last")})
        block = self.blocks.block_of(np.arange(self.num_samples))
        s = extents.chunk_schedule(first[block], last[block])
        ahead = self.cfg.prefetch + self.DROP_LAG
        fetched, dropped = 0, int(np.searchsorted(s.last, plan.start_batch - self.DROP_LAG))

        def page(step: int) -> None:  # before step + 1: fetch what is wanted soon, drop what is done with
            nonlocal fetched, dropped
            upto = int(np.searchsorted(s.first, step + 1 + ahead, side="right"))
            wanted = s.last_of_first[fetched:upto] > step  # a resumed epoch's done chunks are not fetched
            extents.fetch_chunks(s.by_first[fetched:upto][wanted], s.stride)
            fetched = upto
            upto = int(np.searchsorted(s.last, step - self.DROP_LAG, side="right"))
            extents.drop_chunks(s.by_last[dropped:upto], s.stride)
            dropped = upto

        extents.read_at_random()  # before the backend's epoch starts reading
        page(plan.start_batch - 1)
        try:
            for step, batch in enumerate(batches, start=plan.start_batch):
                yield batch
                page(step)
            extents.drop_all()
        finally:
            batches.close()

    def end_epoch(self) -> None:
        """End the running epoch, if any, as its caller's close() would: its threads and workers stop."""
        running, self._running = self._running, None
        if running is not None:
            running.close()

    def _epoch(self, plan: EpochPlan) -> Generator[Batch, None, None]:
        raise NotImplementedError
