"""The reference a user would otherwise run: a torch Dataset over the same shards, PIL decode,
torchvision's RandomResizedCrop + flip (val: resize + center crop), a DataLoader with workers."""
from __future__ import annotations

import io
import math
import os
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

    def __getitem__(self, i: int):
        with Image.open(io.BytesIO(self.read(i))) as im:
            img = self.transform(im.convert("RGB"))
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()), int(self.labels[i])


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
        batches = [indices[i:i + bs].tolist() for i in range(0, len(indices), bs)]
        g = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.epoch * 31 + self.dist.rank)
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.workers, generator=g,
                            pin_memory=self.dist.device.type == "cuda", prefetch_factor=4 if self.workers else None)
        return to_device(loader, self.dist.device, self.cfg.prefetch)
