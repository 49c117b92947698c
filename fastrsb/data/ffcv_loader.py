"""FFCV backend: decode + random-resized-crop + flip in FFCV's compiled pipeline, uint8 out,
in the shared sampler's order (a custom TraversalOrder)."""
from __future__ import annotations

from itertools import islice
from typing import Iterator

import numpy as np

from fastrsb.data.base import Batch
from fastrsb.data.common import SplitLoader, nhwc_to_batch
from fastrsb.data.sampler import num_batches

from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
from ffcv.loader import Loader as FfcvLoader
from ffcv.loader import OrderOption
from ffcv.traversal_order.base import TraversalOrder
from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor


class SharedOrder(TraversalOrder):
    """Hands ffcv the shared sampler's indices for whatever epoch the fastrsb loader is on.

    ffcv 1.0.2 takes an instance and calls it with the loader, hence __call__."""

    def __init__(self, owner: "FfcvBackend"):
        self.owner = owner

    def __call__(self, loader) -> "SharedOrder":
        TraversalOrder.__init__(self, loader)
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.owner.pending_indices


class FfcvBackend(SplitLoader):
    def __init__(self, cfg, split, dist, info, num_classes):
        super().__init__(cfg, split, dist, info.num_samples, num_classes)
        self.pending_indices = self.indices(start_batch=0)
        res = self.resolution
        if self.train:
            self.decoder = RandomResizedCropRGBImageDecoder((res, res), scale=tuple(cfg.scale), ratio=tuple(cfg.ratio))
            image = [self.decoder, RandomHorizontalFlip(), ToTensor()]
        else:
            # ffcv's ratio is the side of the centered square over the shorter side: crop_pct
            self.decoder = CenterCropRGBImageDecoder((res, res), ratio=cfg.crop_pct)
            image = [self.decoder, ToTensor()]
        label = [IntDecoder(), ToTensor(), Squeeze()]
        if dist.device.type == "cuda":  # ffcv stages the copies itself, batches_ahead deep
            image.append(ToDevice(dist.device, non_blocking=True))
            label.append(ToDevice(dist.device, non_blocking=True))
        if cfg.ffcv_quasi_random and self.train:
            if dist.world_size > 1 or cfg.num_repeats > 1:
                raise ValueError("data.ffcv_quasi_random: ffcv's QUASI_RANDOM order supports neither distributed runs "
                                 "nor repeated augmentation (data.num_repeats)")
            # memory-friendly order for datasets larger than RAM. It bypasses the shared order: the
            # other backends see other images, and a resumed epoch has the right length, not the same images
            order = OrderOption.QUASI_RANDOM
        else:
            order = SharedOrder(self)
        self.quasi_random = order is OrderOption.QUASI_RANDOM
        self.loader = FfcvLoader(str(info.beton_path), batch_size=self.batch_size, num_workers=self.workers,
                                 os_cache=cfg.ffcv_os_cache, order=order, seed=cfg.seed, drop_last=self.train,
                                 batches_ahead=cfg.ffcv_batches_ahead,
                                 pipelines={"image": image, "label": label})

    def set_resolution(self, px: int) -> None:
        super().set_resolution(px)
        if self.decoder.output_size != (px, px):
            self.decoder.output_size = (px, px)
            self.loader.recompile = True  # buffers are sized at compile time

    def _epoch(self, indices: np.ndarray) -> Iterator[Batch]:
        self.pending_indices = indices
        it = iter(self.loader)
        self.loader.recompile = False
        if self.quasi_random and len(indices) < self.epoch_length:  # resumed: the remaining length, other images
            it = islice(it, num_batches(len(indices), self.batch_size, self.train))
        for images, labels in it:
            yield nhwc_to_batch(images, labels)
