"""DALI backend: JPEG bytes read from the tar shards in the shared sampler's order through an
external source, decoded by nvjpeg ("mixed") on a GPU or by DALI's CPU decoder without one. Same
pipeline code for both; device is a parameter. Train crops come from the one crop program
(fastrsb.data.crops), computed on the host per batch and fed to a ROI decode, so nvjpeg decodes only the
window, and every backend crops alike."""
from __future__ import annotations

from collections import deque
from enum import Enum
from typing import Iterator

import numpy as np

from dataprep.images import BadImage, load_rgb
from dataprep.layout import DatasetError, ShardLocations, ShardReader
from fastrsb.data.bad_samples import NO_FRAME, replacement_sources
from fastrsb.data.base import FILTERS, Batch, EpochPlan, SplitLoader, shard_extents
from fastrsb.data.crops import crop_boxes, val_resize_side
from fastrsb.data.ffcv_decode import jpeg_frame_intact
from fastrsb.data.staging import to_device

from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy



class ShardSource:
    """Batch source for fn.external_source: one epoch's JPEG bytes and labels, in order, and for train
    each sample's crop window (anchor (y, x), shape (h, w)) and flip from the crop program.

    Reading is a few pread calls per batch (decode happens in DALI's threads) and the windows a compiled
    loop over the batch, so it runs in the main process, where an epoch can change without a rebuild.

    DALI cannot skip a sample it fails to decode: it raises and its pipeline is unusable, or (decoders.image on the
    CPU, DALI 2.4, a JPEG whose start marker is gone) the process dies. So each sample is checked for its JPEG start
    and frame header here first (a header walk), and the samples found undecodable, by that check or by DaliLoader
    after a failure (`undecodable`), are replaced here, before DALI sees them, by another sample of their batch
    with its window, flip and label (fastrsb.data.bad_samples). They are recorded when their batch is handed out
    (`fed`: what each batch fed replaced), not when fed: DALI runs ahead into the next pass."""

    def __init__(self, info, batch_size: int, cfg, train: bool, loc: ShardLocations):
        self.info, self.batch_size, self.cfg, self.train = info, batch_size, cfg, train
        self.loc, self.labels = loc, info.labels
        self.sizes = info.image_sizes()  # checked here, before any work: the windows are placed by them
        self.reader = ShardReader(loc, read_ahead=not (train and cfg.order == "block"))
        self.undecodable: dict[int, str] = {}  # sample index -> why, for good: the stored bytes do not change
        self.fed: deque[tuple[np.ndarray, dict[int, str]]] = deque()  # per batch fed: its samples, those replaced
        self.plan: EpochPlan | None = None
        self.pos = 0

    def start(self, plan: EpochPlan, pos: int = 0) -> None:
        """Feed `plan` from sample position `pos` (a batch boundary) on; what was fed before is dropped."""
        self.plan, self.pos = plan, pos
        self.fed.clear()

    def __call__(self):
        if self.plan is None or self.pos >= len(self.plan.indices):
            raise StopIteration
        sel = slice(self.pos, self.pos + self.batch_size)
        idx, keys = self.plan.indices[sel], self.plan.keys[sel]
        self.pos += len(idx)
        jpegs = [np.frombuffer(self.reader.read(i), np.uint8) for i in idx]
        for i, jpeg in zip(idx.tolist(), jpegs):
            if i not in self.undecodable and not jpeg_frame_intact(jpeg.ctypes.data, jpeg.size):
                self.undecodable[i] = NO_FRAME
        failed = {k: self.undecodable[i] for k, i in enumerate(idx.tolist()) if i in self.undecodable}
        self.fed.append((idx, failed))
        if failed:
            src = replacement_sources(np.isin(idx, list(self.undecodable)))
            idx, keys, jpegs = idx[src], keys[src], [jpegs[j] for j in src.tolist()]
        labels = [np.array([self.labels[i]], np.int32) for i in idx]
        if not self.train:
            return jpegs, labels
        boxes, flips = crop_boxes(self.sizes[idx], keys, self.cfg.scale, self.cfg.ratio)
        windows = boxes.astype(np.float32)
        return jpegs, labels, list(windows[:, :2]), list(windows[:, 2:]), list(flips.astype(np.float32))

    def diagnose(self, start: int, stop: int) -> tuple[dict[int, str], list[str]]:
        """What may have failed DALI among the samples fed at positions start..stop of the epoch: those the host
        cannot decode either (index -> why; PIL's full decode, as verify does), and those whose JPEG disagrees with
        the size record (a window outside its image)."""
        undecodable, mismatched = {}, []
        for i in self.plan.indices[max(0, start):stop].tolist():
            if i in self.undecodable:
                continue
            try:
                image = load_rgb(self.reader.read(i))
            except BadImage as e:
                undecodable[i] = f"DALI's decoder failed on it; PIL: {e}"
                continue
            if image.shape[:2] != tuple(self.sizes[i]):
                mismatched.append(str(self.info.size_mismatch(i, *image.shape[:2])))
        return undecodable, mismatched

    def close(self) -> None:
        self.reader.close()


class PipelineState(Enum):
    IDLE = "the source ran dry, the pipeline is empty"
    RUNNING = "an epoch was started and may be unfinished (its prefetched batches sit in the pipeline)"
    PRIMED = "the next epoch's first batches are already being decoded"


class DaliLoader(SplitLoader):
    def __init__(self, cfg, split, dist, info, num_classes):
        loc = info.shard_locations()
        super().__init__(cfg, split, dist, info.num_samples, num_classes, info.describe_sample, shard_extents(loc))
        decode = cfg.dali_decode
        if decode == "auto":
            decode = "mixed" if dist.device.type == "cuda" else "cpu"
        if decode == "mixed" and dist.device.type != "cuda":  # train.device=auto found no GPU
            raise ValueError("data.dali_decode=mixed needs a cuda device; this run is on the cpu")
        self.decode = decode
        self.device_id = dist.device.index if dist.device.type == "cuda" else None
        self.source = ShardSource(info, self.batch_size, cfg, self.train, loc)
        self._pipe_res: int | None = None
        self._iter: DALIGenericIterator | None = None
        self._state = PipelineState.IDLE
        self._primed: EpochPlan | None = None  # PRIMED: the epoch whose first batches are under way

    @property
    def decoder_name(self) -> str:
        import nvidia.dali

        return f"DALI {nvidia.dali.__version__} {self.decode} decode"

    def _build(self, res: int) -> DALIGenericIterator:
        cfg, train = self.cfg, self.train
        dev_out = "gpu" if self.decode == "mixed" else "cpu"
        interp = getattr(types, FILTERS[cfg.interpolation]["dali"])

        @pipeline_def(batch_size=self.batch_size, num_threads=self.workers, device_id=self.device_id,
                      prefetch_queue_depth=max(1, cfg.prefetch),
                      exec_dynamic=True)
        def pipe():
            if train:
                jpegs, labels, anchors, shapes, flips = fn.external_source(
                    source=self.source, num_outputs=5, batch=True,
                    dtype=[types.UINT8, types.INT32, types.FLOAT, types.FLOAT, types.FLOAT])
                images = fn.decoders.image_slice(jpegs, anchors, shapes, device=self.decode, output_type=types.RGB,
                                                 normalized_anchor=False, normalized_shape=False, axis_names="HW")
                # the flip rides on the resize (a ROI whose x end precedes its start is mirrored): one pass
                # over the output instead of two
                images = fn.resize(images, device=dev_out, resize_x=res, resize_y=res, interp_type=interp,
                                   antialias=True, roi_relative=True, roi_start=fn.stack(0.0, flips),
                                   roi_end=fn.stack(1.0, 1.0 - flips))
            else:
                jpegs, labels = fn.external_source(source=self.source, num_outputs=2, batch=True,
                                                   dtype=[types.UINT8, types.INT32])
                images = fn.decoders.image(jpegs, device=self.decode, output_type=types.RGB)
                images = fn.resize(images, device=dev_out, resize_shorter=float(val_resize_side(res, cfg.crop_pct)),
                                   interp_type=interp, antialias=True)
                images = fn.crop(images, device=dev_out, crop=(res, res))
            if dev_out == "gpu":
                labels = labels.gpu()
            return images, labels

        p = pipe()
        p.build()
        return DALIGenericIterator([p], ["images", "labels"], last_batch_policy=LastBatchPolicy.PARTIAL,
                                   auto_reset=False, prepare_first_batch=False)

    def _epoch(self, plan: EpochPlan) -> Iterator[Batch]:
        same_res = self._iter is not None and self._pipe_res == self.resolution
        primed = self._primed
        if same_res and self._state is PipelineState.PRIMED and primed.epoch == plan.epoch \
                and np.array_equal(primed.indices, plan.indices):
            pass  # the run-ahead guessed this epoch: its first batches are ready or under way
        elif same_res and self._state is PipelineState.IDLE:
            self.source.start(plan)  # before reset: resetting starts prefetching from the source
            self._iter.reset()
        else:  # first epoch, new resolution, or batches of another order left in the pipeline
            self.source.start(plan)
            self._iter = None  # free the old pipeline's threads and buffers first
            self._iter = self._build(self.resolution)
            self._pipe_res = self.resolution
        self._state, self._primed = PipelineState.RUNNING, None
        return to_device(self._outputs(), self.dist.device, self.cfg.prefetch)

    def _recover(self, error: RuntimeError, delivered: int) -> None:
        """After DALI failed a batch: the samples fed since the last batch handed out that the host cannot decode
        either are undecodable (replaced from now on); the pipeline, unusable after a failure, is rebuilt and fed
        again from the first batch not handed out. Nothing to blame: a size record that disagrees with its JPEG is
        a DatasetError naming it, anything else DALI's own error."""
        start = delivered * self.batch_size
        undecodable, mismatched = self.source.diagnose(start, self.source.pos)
        if not undecodable:
            if mismatched:
                raise DatasetError("; ".join(mismatched[:3])) from error
            raise error
        self.source.undecodable.update(undecodable)
        self.source.start(self.source.plan, start)
        self._iter = None  # free the failed pipeline's threads and buffers first
        self._iter = self._build(self._pipe_res)

    def _outputs(self):
        # With exec_dynamic the iterator wraps DALI's outputs with torch.from_dlpack, which passes torch's
        # current stream to DALI's __dlpack__; DALI makes that stream wait for its work (on a GPU: the
        # nvjpeg decode and resize), so the consumer reads finished batches, and the dynamic executor lets
        # us keep outputs for as long as we like (to_device holds `prefetch` of them).
        it = iter(self._iter)
        delivered = 0  # batches of this epoch handed out
        while True:
            try:
                out = next(it)
            except StopIteration:
                break
            except RuntimeError as e:  # DALI failed a batch in flight: blame its samples, or raise
                self._recover(e, delivered)
                it = iter(self._iter)
                continue
            delivered += 1
            self.bad_samples.record_batch(*self.source.fed.popleft())
            yield out[0]["images"], out[0]["labels"]
        self._state = PipelineState.IDLE
        # Run ahead into the next epoch as DALI's own readers do, so its first batches decode
        # while the trainer validates or checkpoints instead of after. The sampler is a pure
        # function, so the guess is exact unless the caller picks another epoch or resolution;
        # then _epoch rebuilds, and the epoch is still exact.
        nxt = self.plan(epoch=self.epoch + 1, start_batch=0)
        if len(nxt.indices):
            self.source.start(nxt)
            self._iter.reset()
            self._state, self._primed = PipelineState.PRIMED, nxt
