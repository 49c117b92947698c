"""The reference a user would otherwise run: a torch Dataset over the same shards, PIL decode,
torchvision's RandomResizedCrop + flip (val: resize + center crop), a DataLoader with workers."""
from __future__ import annotations

import atexit
import io
import math
import os
import signal
import weakref
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from fastrsb.data.base import FILTERS, Batch, SplitLoader
from fastrsb.data.staging import to_device


class ShardDataset(Dataset):
    """(HWC uint8 tensor, label) for sample i, its JPEG bytes read by offset from the DALI shards."""

    def __init__(self, locations, labels: np.ndarray, cfg, train: bool):
        self.loc, self.labels, self.cfg, self.train = locations, labels, cfg, train
        self._fds: dict[int, int] = {}  # per worker process: shard -> open fd
        self._transforms: dict[int, T.Compose] = {}  # per worker process: resolution -> transform

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, i: int) -> bytes:
        j = int(self.loc.shard[i])
        fd = self._fds.get(j)
        if fd is None:
            fd = self._fds[j] = os.open(self.loc.tar_paths[j], os.O_RDONLY)
        return os.pread(fd, int(self.loc.size[i]), int(self.loc.offset[i]))

    def __getitem__(self, item: tuple[int, int, int]):
        """item = (sample index, augmentation seed, resolution). Each sample is seeded with its key
        (sampler.augmentation_keys: seed, epoch, sample index, copy), so its augmentation is the
        same whatever the worker count, rank or world size, and when a run resumes mid-epoch. The
        resolution travels with the item because persistent workers hold their own copy of the dataset."""
        i, seed, res = item
        tf = self._transforms.get(res)
        if tf is None:
            tf = self._transforms[res] = _transform(self.train, res, self.cfg)
        torch.manual_seed(seed)
        with Image.open(io.BytesIO(self.read(i))) as im:
            img = tf(im.convert("RGB"))
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()), int(self.labels[i])


class _EpochBatches:
    """batch_sampler of a persistent DataLoader: iterated in the main process at each epoch's
    start, so it hands out whatever batches the loader set for that epoch."""

    def __init__(self):
        self.batches: list[list[tuple[int, int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _ignore_stop_signals(_worker_id: int) -> None:
    """Workers leave SIGTERM/SIGINT to the trainer, which finishes its step and checkpoints;
    a scheduler signalling the whole process group must not kill the loader under it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


_LIVE: "weakref.WeakSet[TorchLoader]" = weakref.WeakSet()


@atexit.register
def _stop_workers() -> None:
    """Persistent workers ignore SIGTERM, so multiprocessing's exit hook (terminate, then join)
    would wait for them forever: shut them down in order first. This module imports after
    multiprocessing registers its hook, so this one runs before it."""
    for loader in list(_LIVE):
        loader.close()


def _transform(train: bool, res: int, cfg) -> T.Compose:
    interp = T.InterpolationMode[FILTERS[cfg.interpolation]["torchvision"]]
    if train:
        return T.Compose([T.RandomResizedCrop(res, scale=cfg.scale, ratio=cfg.ratio, interpolation=interp),
                          T.RandomHorizontalFlip()])
    return T.Compose([T.Resize(math.floor(res / cfg.crop_pct), interpolation=interp), T.CenterCrop(res)])


class TorchLoader(SplitLoader):
    def __init__(self, cfg, split, dist, info, num_classes):
        super().__init__(cfg, split, dist, info.num_samples, num_classes)
        self.dataset = ShardDataset(info.shard_locations(), info.labels, cfg, self.train)
        self.batch_sampler = _EpochBatches()
        # persistent workers, as timm's loader uses: no process start-up at every epoch
        self.loader = DataLoader(self.dataset, batch_sampler=self.batch_sampler, num_workers=self.workers,
                                 worker_init_fn=_ignore_stop_signals, pin_memory=dist.device.type == "cuda",
                                 persistent_workers=self.workers > 0, prefetch_factor=4 if self.workers else None)
        _LIVE.add(self)

    def close(self) -> None:
        """Stop the persistent workers (they come back at the next epoch)."""
        it = self.loader._iterator
        if it is not None:
            it._shutdown_workers()
            self.loader._iterator = None

    def _epoch(self, indices: np.ndarray) -> Iterator[Batch]:
        bs, res = self.batch_size, self.resolution
        items = [(int(i), int(key), res) for i, key in zip(indices, self.augmentation_keys(indices))]
        self.batch_sampler.batches = [items[k:k + bs] for k in range(0, len(items), bs)]
        return to_device(self.loader, self.dist.device, self.cfg.prefetch)
