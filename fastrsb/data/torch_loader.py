"""The reference a user would otherwise run: a torch Dataset over the same shards, PIL decode,
torchvision's RandomResizedCrop + flip (val: resize + center crop), a DataLoader with workers."""
from __future__ import annotations

import io
import math
import os
import signal
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from fastrsb.data.base import Batch
from fastrsb.data.common import SplitLoader, to_device

_INTERP = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}


class ShardDataset(Dataset):
    """(HWC uint8 tensor, label) for sample i, its JPEG bytes read by offset from the DALI shards."""

    def __init__(self, locations, labels: np.ndarray, transform):
        self.loc, self.labels, self.transform = locations, labels, transform
        self._fds: dict[int, int] = {}  # per worker process: shard -> open fd

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, i: int) -> bytes:
        j = int(self.loc.shard[i])
        fd = self._fds.get(j)
        if fd is None:
            fd = self._fds[j] = os.open(self.loc.tar_paths[j], os.O_RDONLY)
        return os.pread(fd, int(self.loc.size[i]), int(self.loc.offset[i]))

    def __getitem__(self, item: tuple[int, int]):
        """item = (sample index, augmentation seed). Seeding each sample makes the augmentation a
        pure function of (seed, epoch, rank, position in epoch): independent of the worker count,
        and exact when a run resumes mid-epoch."""
        i, seed = item
        torch.manual_seed(seed)
        with Image.open(io.BytesIO(self.read(i))) as im:
            img = self.transform(im.convert("RGB"))
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()), int(self.labels[i])


def _ignore_stop_signals(_worker_id: int) -> None:
    """Workers leave SIGTERM/SIGINT to the trainer, which finishes its step and checkpoints;
    a scheduler signalling the whole process group must not kill the loader under it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _transform(train: bool, res: int, cfg) -> T.Compose:
    interp = _INTERP[cfg.interpolation]
    if train:
        return T.Compose([T.RandomResizedCrop(res, scale=cfg.scale, ratio=cfg.ratio, interpolation=interp),
                          T.RandomHorizontalFlip()])
    return T.Compose([T.Resize(math.floor(res / cfg.crop_pct), interpolation=interp), T.CenterCrop(res)])


class TorchLoader(SplitLoader):
    def __init__(self, cfg, split, dist, info, num_classes):
        super().__init__(cfg, split, dist, info.num_samples, num_classes)
        if cfg.interpolation not in _INTERP:
            raise ValueError(f"data.interpolation: expected one of {sorted(_INTERP)}, got {cfg.interpolation!r}")
        self.dataset = ShardDataset(info.shard_locations(), info.labels, _transform(self.train, self.resolution, cfg))

    def set_resolution(self, px: int) -> None:
        super().set_resolution(px)
        self.dataset.transform = _transform(True, px, self.cfg)

    def _epoch(self, indices: np.ndarray) -> Iterator[Batch]:
        bs = self.batch_size
        first = self.epoch_length - len(indices)  # position of indices[0] in the whole epoch (resume)
        base = (self.cfg.seed * 1_000_003 + self.epoch) * 1_000_003 + self.dist.rank * 100_003
        items = [(int(i), base + first + k) for k, i in enumerate(indices)]
        batches = [items[k:k + bs] for k in range(0, len(items), bs)]
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.workers,
                            worker_init_fn=_ignore_stop_signals,
                            pin_memory=self.dist.device.type == "cuda", prefetch_factor=4 if self.workers else None)
        return to_device(loader, self.dist.device, self.cfg.prefetch)
