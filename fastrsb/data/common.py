"""What every loader backend shares: the sampler state, the split's facts, and the last step
to the device (pinned memory, non-blocking copies on a side stream, NHWC viewed as NCHW)."""
from __future__ import annotations

import os
from collections import deque
from typing import Iterable, Iterator

import numpy as np
import torch

from fastrsb.config import DataConfig
from fastrsb.data.base import Batch
from fastrsb.data.sampler import epoch_indices, num_batches
from fastrsb.dist import DistInfo


def nhwc_to_batch(images: torch.Tensor, targets: torch.Tensor) -> Batch:
    """(N,H,W,3) uint8 -> the contract's (N,3,H,W) view: channels_last memory, no copy."""
    return Batch(images.permute(0, 3, 1, 2), targets.view(-1).long())


class SplitLoader:
    """Sampler bookkeeping shared by the backends; subclasses implement `_epoch(indices)`."""

    def __init__(self, cfg: DataConfig, split: str, dist: DistInfo, num_samples: int, num_classes: int):
        self.cfg, self.split, self.dist = cfg, split, dist
        self.train = split == "train"
        self.num_samples, self.num_classes = num_samples, num_classes
        self.batch_size = cfg.batch_size
        self.epoch, self.start_batch = 0, 0
        self.resolution = cfg.train_res if self.train else cfg.val_res
        self.workers = cfg.workers or max(1, (os.cpu_count() or 1) // dist.local_world_size)

    def indices(self, epoch: int | None = None, start_batch: int | None = None) -> np.ndarray:
        return epoch_indices(
            self.num_samples, seed=self.cfg.seed, epoch=self.epoch if epoch is None else epoch,
            rank=self.dist.rank, world_size=self.dist.world_size, batch_size=self.batch_size,
            num_repeats=self.cfg.num_repeats if self.train else 1, shuffle=self.train, drop_last=self.train,
            start_batch=self.start_batch if start_batch is None else start_batch)

    @property
    def epoch_length(self) -> int:
        """Samples this rank sees in a whole epoch."""
        return len(self.indices(start_batch=0))

    def __len__(self) -> int:
        return num_batches(self.epoch_length, self.batch_size, self.train)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def set_resolution(self, px: int) -> None:
        if not self.train:
            raise ValueError("set_resolution applies to the train loader; val uses data.val_res")
        self.resolution = px

    def __iter__(self) -> Iterator[Batch]:
        idx = self.indices()
        self.start_batch = 0  # a resume offset applies to one epoch only
        return self._epoch(idx)

    def _epoch(self, indices: np.ndarray) -> Iterator[Batch]:
        raise NotImplementedError


def to_device(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device, prefetch: int) -> Iterator[Batch]:
    """(NHWC uint8, labels) batches -> contract Batches on the device, `prefetch` ahead.

    Host batches on cuda: pinned (the torch backend's DataLoader pins them in its pin-memory thread;
    anything else is pinned here), copied non-blocking on a side stream, and the consumer's stream waits
    on an event recorded after the copy, so copies overlap compute and the consumer never reads a
    half-copied batch; record_stream keeps the caching allocator from reusing a batch's memory while
    the consumer's stream may still read it. Batches already on the device (DALI's "mixed" outputs)
    pass through: torch.from_dlpack hands DALI torch's current stream, and DALI makes that stream wait
    for the decode (its __dlpack__(stream) contract), so they are ordered already. On the CPU the same
    code only views NHWC as NCHW: nothing to copy."""
    if device.type != "cuda":
        for imgs, tg in batches:
            yield nhwc_to_batch(imgs, tg)
        return
    stream = torch.cuda.Stream(device)
    staged: deque = deque()
    it = iter(batches)

    def stage() -> bool:
        try:
            imgs, tg = next(it)
        except StopIteration:
            return False
        if imgs.is_cuda:
            staged.append((imgs, tg.to(device, non_blocking=True), None))
            return True
        imgs, tg = (t if t.is_pinned() else t.pin_memory() for t in (imgs, tg))
        with torch.cuda.stream(stream):
            imgs = imgs.to(device, non_blocking=True)  # contiguous NHWC: one flat copy
            tg = tg.to(device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(stream)
        staged.append((imgs, tg, ev))
        return True

    while len(staged) < max(1, prefetch) and stage():
        pass
    while staged:
        imgs, tg, ev = staged.popleft()
        if ev is not None:
            consumer = torch.cuda.current_stream(device)
            consumer.wait_event(ev)
            imgs.record_stream(consumer)
            tg.record_stream(consumer)
        stage()
        yield nhwc_to_batch(imgs, tg)
