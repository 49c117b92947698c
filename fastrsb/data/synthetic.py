"""Random uint8 batches made once on the device and replayed: measures the model alone."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from fastrsb.data.base import Batch
from fastrsb.data.common import SplitLoader, nhwc_to_batch


class SyntheticLoader(SplitLoader):
    POOL = 4  # distinct batches kept on the device

    def __init__(self, cfg, split, dist):
        super().__init__(cfg, split, dist, cfg.synthetic_num_samples, cfg.synthetic_num_classes)
        self._pool: list[Batch] = []

    def _make_pool(self, res: int) -> list[Batch]:
        g = torch.Generator(device=self.dist.device).manual_seed(self.cfg.seed + self.dist.rank)
        pool = []
        for _ in range(self.POOL):
            imgs = torch.randint(0, 256, (self.batch_size, res, res, 3), dtype=torch.uint8, device=self.dist.device, generator=g)
            tg = torch.randint(0, self.num_classes, (self.batch_size,), device=self.dist.device, generator=g)
            pool.append(nhwc_to_batch(imgs, tg))
        return pool

    def _epoch(self, indices: np.ndarray) -> Iterator[Batch]:
        res = self.resolution
        if not self._pool or self._pool[0].images.shape[-1] != res:
            self._pool = self._make_pool(res)
        for b in range(len(indices) // self.batch_size if self.train else -(-len(indices) // self.batch_size)):
            full = self._pool[b % self.POOL]
            n = min(self.batch_size, len(indices) - b * self.batch_size)
            yield Batch(full.images[:n], full.targets[:n])
