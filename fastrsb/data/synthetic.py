"""Random uint8 images made once on the device: measures the model alone.

Sample i is pool[i % pool size] (image and label), the pool being a function of data.seed and the
resolution only. So the sampler alone decides what a step sees: a resumed epoch replays exactly the
batches it had left, and ranks of a DDP run together see the samples a 1-process run sees at the same
global batch. The epoch's indices reach the device once per epoch; each batch is a gather there.
"""
from __future__ import annotations

from typing import Iterator

import torch

from fastrsb.data.base import Batch, EpochPlan, SplitLoader
from fastrsb.data.sampler import num_batches
from fastrsb.data.staging import nhwc_to_batch
from fastrsb.seeding import derive_seed


class SyntheticLoader(SplitLoader):
    MAX_POOL = 256  # distinct images kept on the device (38 MB at 224 px)

    def __init__(self, cfg, split, dist):
        super().__init__(cfg, split, dist, cfg.synthetic_num_samples, cfg.synthetic_num_classes)
        self._images: torch.Tensor | None = None  # (pool, res, res, 3) uint8
        self._labels: torch.Tensor | None = None  # (pool,) int64

    @property
    def decoder_name(self) -> str:
        return "random images, nothing decoded"

    def _make_pool(self, res: int) -> None:
        dev = self.dist.device
        size = min(self.num_samples, self.MAX_POOL)
        g = torch.Generator(device=dev).manual_seed(derive_seed(self.cfg.seed, "synthetic"))
        self._labels = torch.randint(0, self.num_classes, (size,), device=dev, generator=g)
        self._images = torch.randint(0, 256, (size, res, res, 3), dtype=torch.uint8, device=dev, generator=g)

    def _epoch(self, plan: EpochPlan) -> Iterator[Batch]:
        indices = plan.indices
        res = self.resolution
        if self._images is None or self._images.shape[1] != res:
            self._make_pool(res)
        pool_index = torch.from_numpy(indices % len(self._labels)).to(self.dist.device)
        for b in range(num_batches(len(indices), self.batch_size, self.train)):
            sel = pool_index[b * self.batch_size:(b + 1) * self.batch_size]
            yield nhwc_to_batch(self._images.index_select(0, sel), self._labels.index_select(0, sel))
