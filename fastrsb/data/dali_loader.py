"""DALI backend: JPEG bytes read from the tar shards in the shared sampler's order through an
external source, decoded by nvjpeg ("mixed", ROI decode of the random crop) on a GPU or by
DALI's CPU decoder without one. Same pipeline code for both; device is a parameter."""
from __future__ import annotations

import os
from enum import Enum
from typing import Iterator

import numpy as np

from fastrsb.data.base import FILTERS, Batch, SplitLoader
from fastrsb.data.staging import to_device
from fastrsb.seeding import derive_seed

from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy



class ShardSource:
    """Batch source for fn.external_source: the JPEG bytes and labels of one epoch, in order.

    Reading is a few pread calls per batch (decode happens in DALI's threads), so it runs in
    the main process, where set_epoch can change the order without rebuilding the pipeline."""

    def __init__(self, locations, labels: np.ndarray, batch_size: int):
        self.loc, self.labels, self.batch_size = locations, labels, batch_size
        self.fds = [os.open(p, os.O_RDONLY) for p in locations.tar_paths]
        self.order = np.zeros(0, np.int64)
        self.pos = 0

    def start(self, order: np.ndarray) -> None:
        self.order, self.pos = order, 0

    def __call__(self):
        if self.pos >= len(self.order):
            raise StopIteration
        idx = self.order[self.pos:self.pos + self.batch_size]
        self.pos += len(idx)
        jpegs = [np.frombuffer(os.pread(self.fds[self.loc.shard[i]], int(self.loc.size[i]), int(self.loc.offset[i])),
                               np.uint8) for i in idx]
        return jpegs, [np.array([self.labels[i]], np.int32) for i in idx]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class PipelineState(Enum):
    IDLE = "the source ran dry, the pipeline is empty"
    RUNNING = "an epoch was started and may be unfinished (its prefetched batches sit in the pipeline)"
    PRIMED = "the next epoch's first batches are already being decoded"


class DaliLoader(SplitLoader):
    def __init__(self, cfg, split, dist, info, num_classes):
        super().__init__(cfg, split, dist, info.num_samples, num_classes)
        decode = cfg.dali_decode
        if decode == "auto":
            decode = "mixed" if dist.device.type == "cuda" else "cpu"
        if decode == "mixed" and dist.device.type != "cuda":  # train.device=auto found no GPU
            raise ValueError("data.dali_decode=mixed needs a cuda device; this run is on the cpu")
        self.decode = decode
        self.device_id = dist.device.index if dist.device.type == "cuda" else None
        self.source = ShardSource(info.shard_locations(), info.labels, self.batch_size)
        self._pipe_res: int | None = None
        self._iter: DALIGenericIterator | None = None
        self._state = PipelineState.IDLE
        self._primed: np.ndarray | None = None  # PRIMED: the indices whose first batches are under way

    def _build(self, res: int) -> DALIGenericIterator:
        cfg, train = self.cfg, self.train
        dev_out = "gpu" if self.decode == "mixed" else "cpu"
        interp = getattr(types, FILTERS[cfg.interpolation]["dali"])

        @pipeline_def(batch_size=self.batch_size, num_threads=self.workers, device_id=self.device_id,
                      seed=derive_seed(cfg.seed, "dali", self.dist.rank), prefetch_queue_depth=max(1, cfg.prefetch),
                      exec_dynamic=True)
        def pipe():
            jpegs, labels = fn.external_source(source=self.source, num_outputs=2, batch=True, dtype=[types.UINT8, types.INT32])
            if train:
                images = fn.decoders.image_random_crop(jpegs, device=self.decode, output_type=types.RGB,
                                                       random_area=list(cfg.scale), random_aspect_ratio=list(cfg.ratio))
                # the flip rides on the resize (a ROI whose x end precedes its start is mirrored): one pass
                # over the output instead of two
                flip = fn.cast(fn.random.coin_flip(), dtype=types.FLOAT)
                images = fn.resize(images, device=dev_out, resize_x=res, resize_y=res, interp_type=interp,
                                   antialias=True, roi_relative=True, roi_start=fn.stack(0.0, flip),
                                   roi_end=fn.stack(1.0, 1.0 - flip))
            else:
                images = fn.decoders.image(jpegs, device=self.decode, output_type=types.RGB)
                images = fn.resize(images, device=dev_out, resize_shorter=float(int(res / cfg.crop_pct)),
                                   interp_type=interp, antialias=True)
                images = fn.crop(images, device=dev_out, crop=(res, res))
            if dev_out == "gpu":
                labels = labels.gpu()
            return images, labels

        p = pipe()
        p.build()
        return DALIGenericIterator([p], ["images", "labels"], last_batch_policy=LastBatchPolicy.PARTIAL,
                                   auto_reset=False, prepare_first_batch=False)

    def _epoch(self, indices: np.ndarray) -> Iterator[Batch]:
        same_res = self._iter is not None and self._pipe_res == self.resolution
        if same_res and self._state is PipelineState.PRIMED and np.array_equal(self._primed, indices):
            pass  # the run-ahead guessed this epoch: its first batches are ready or under way
        elif same_res and self._state is PipelineState.IDLE:
            self.source.start(indices)  # before reset: resetting starts prefetching from the source
            self._iter.reset()
        else:  # first epoch, new resolution, or batches of another order left in the pipeline
            self.source.start(indices)
            self._iter = None  # free the old pipeline's threads and buffers first
            self._iter = self._build(self.resolution)
            self._pipe_res = self.resolution
        self._state, self._primed = PipelineState.RUNNING, None
        return to_device(self._outputs(), self.dist.device, self.cfg.prefetch)

    def _outputs(self):
        # With exec_dynamic the iterator wraps DALI's outputs with torch.from_dlpack, which passes torch's
        # current stream to DALI's __dlpack__; DALI makes that stream wait for its work (on a GPU: the
        # nvjpeg decode and resize), so the consumer reads finished batches, and the dynamic executor lets
        # us keep outputs for as long as we like (to_device holds `prefetch` of them).
        for out in self._iter:
            yield out[0]["images"], out[0]["labels"]
        self._state = PipelineState.IDLE
        # Run ahead into the next epoch as DALI's own readers do, so its first batches decode
        # while the trainer validates or checkpoints instead of after. The sampler is a pure
        # function, so the guess is exact unless the caller picks another epoch or resolution;
        # then _epoch rebuilds, and the epoch is still exact.
        nxt = self.indices(epoch=self.epoch + 1, start_batch=0)
        if len(nxt):
            self.source.start(nxt)
            self._iter.reset()
            self._state, self._primed = PipelineState.PRIMED, nxt
