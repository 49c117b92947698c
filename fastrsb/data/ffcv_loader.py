"""FFCV backend: ffcv's Loader (memory-mapped .beton, compiled multi-threaded pipeline) in the
shared sampler's order (a custom TraversalOrder), uint8 out.

The image decoder is fastrsb's (data.ffcv_decoder=fastrsb, the default; fastrsb/data/ffcv_decode.py):
seeded RandomResizedCrop boxes, a decode of only what the box needs (DCT scale, cropped window) and
Pillow's bilinear/bicubic resize with the flip folded in. data.ffcv_decoder=ffcv runs ffcv's own
decoders instead (unseeded crops, cv2 INTER_AREA), for comparison.
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np

from fastrsb.data.bad_samples import NO_FRAME, replace_rows
from fastrsb.data.base import FILTERS, Batch, EpochPlan, SplitLoader
from fastrsb.data.page_cache import StoreExtents
from fastrsb.data.crops import center_crop_geometry, flip_of, random_resized_crop
from fastrsb.data.ffcv_decode import (
    CROPPED, DCT_SHIFT_MASK, DECODE_ERROR, DONE, FALLBACK, decode_into, jpeg_frame_intact,
)
from fastrsb.data.ffcv_internals import (
    IMDECODE, KEY, OUTCOME, ROW_BYTES, EpochTable, SharedOrder, set_output_size, start_epoch, stop_epoch, store_map,
    table_rows,
)
from fastrsb.data.staging import nhwc_to_batch

from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import IMAGE_MODES, CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
from ffcv.loader import Loader as FfcvLibraryLoader
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.pipeline_spec import PipelineSpec
from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor

_JPG = int(IMAGE_MODES["jpg"])
_TURBOJPEG_FAILED = "TurboJPEG reported an error or a corrupt-data warning"


_decode_into = decode_into.ctypes


class FastrsbDecoder(Operation):
    """ffcv decoder for RGBImageField: train = seeded RandomResizedCrop + flip, val = torchvision's
    Resize(res / crop_pct) + CenterCrop(res); both decode only what the box needs and resize with
    Pillow's filter (`interpolation`: a data.interpolation value).

    The batches are views of a keyed EpochTable's order (SharedOrder): each sample's key comes from its row and
    its outcome goes there."""

    def __init__(self, output_size: tuple[int, int], train: bool, interpolation: str, scale=(0.08, 1.0),
                 ratio=(3 / 4, 4 / 3), crop_pct: float = 0.875):
        super().__init__()
        self.output_size, self.train = tuple(output_size), train
        self.bicubic = FILTERS[interpolation]["pillow"] == "BICUBIC"
        self.scale, self.ratio, self.crop_pct = tuple(scale), tuple(ratio), crop_pct

    def declare_state_and_memory(self, previous_state):
        shape = (*self.output_size, 3)
        return replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("u1")), \
            AllocationQuery(shape, np.dtype("u1"))

    def generate_code(self):
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        train, bicubic = self.train, self.bicubic
        out_h, out_w = self.output_size
        scale_lo, scale_hi = float(self.scale[0]), float(self.scale[1])
        log_ratio_lo, log_ratio_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        crop_pct = float(self.crop_pct)
        jpg, imdecode = _JPG, IMDECODE

        def decode(batch_indices, destination, metadata, storage_state):
            if batch_indices.strides[0] != ROW_BYTES:  # not a view of the table: decode and record nothing,
                return destination[:len(batch_indices)]  # which FfcvLoader reports
            rows = table_rows(batch_indices)
            for k in my_range(len(batch_indices)):
                field = metadata[batch_indices[k]]
                data = mem_read(field["data_ptr"], storage_state)
                height, width = np.int64(field["height"]), np.int64(field["width"])
                if train:
                    key = rows[k, KEY]
                    top, left, h, w = random_resized_crop(height, width, scale_lo, scale_hi, log_ratio_lo, log_ratio_hi,
                                                          np.uint64(key))
                    x_in0, x_scale, x_offset = float(left), w / out_w, 0.0
                    y_in0, y_scale, y_offset = float(top), h / out_h, 0.0
                    flip = flip_of(np.uint64(key))
                else:
                    y_scale, y_offset, x_scale, x_offset = center_crop_geometry(height, width, out_h, crop_pct)
                    x_in0 = y_in0 = 0.0
                    flip = False
                out = destination[k]
                outcome = _decode_into(imdecode, np.intp(data.ctypes.data), data.size, field["mode"] == jpg, height,
                                       width, x_in0, x_scale, x_offset, y_in0, y_scale, y_offset, bicubic, flip,
                                       np.intp(out.ctypes.data), out_h, out_w)
                rows[k, OUTCOME] = outcome
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class FrameCheck(Operation):
    """With ffcv's own image decoders, which ignore TurboJPEG's return code: a second pipeline over the image field
    that gives 1 per sample whose stored JPEG starts with its SOI marker and reaches a frame header (a raw image:
    1), else 0, so the loader can replace what ffcv's decoder would make of it. A header walk, microseconds a
    sample; damage inside the entropy-coded data goes unseen (fastrsb's decoder sees TurboJPEG's errors)."""

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=True, shape=(1,), dtype=np.dtype("u1")), \
            AllocationQuery((1,), np.dtype("u1"))

    def generate_code(self):
        mem_read = self.memory_read
        jpg = _JPG

        def check(batch_indices, destination, metadata, storage_state):
            for k in range(len(batch_indices)):
                field = metadata[batch_indices[k]]
                data = mem_read(field["data_ptr"], storage_state)
                destination[k, 0] = field["mode"] != jpg or jpeg_frame_intact(np.intp(data.ctypes.data), data.size)
            return destination[:len(batch_indices)]

        return check


class DecodeStats:
    """How the epoch's images were decoded, from the outcomes the decoder records in the EpochTable."""

    def __init__(self):
        self.by_scale = np.zeros(4, np.int64)  # whole, 1/2, 1/4, 1/8
        self.cropped = self.fallback = self.decode_errors = 0

    def add(self, outcomes: np.ndarray) -> None:
        self.by_scale += np.bincount(outcomes & DCT_SHIFT_MASK, minlength=4)[:4]
        self.cropped += int(np.count_nonzero(outcomes & CROPPED))
        self.fallback += int(np.count_nonzero(outcomes & FALLBACK))
        self.decode_errors += int(np.count_nonzero(outcomes & DECODE_ERROR))

    def as_dict(self) -> dict:
        n = int(self.by_scale.sum())
        return {"images": n, "fraction_at_scale": {f"1/{1 << s}": (float(c) / n if n else 0.0)
                                                   for s, c in enumerate(self.by_scale)},
                "fraction_cropped": self.cropped / n if n else 0.0, "crop_fallbacks": self.fallback,
                "decode_errors": self.decode_errors}


def beton_extents(path: Path, mapped) -> StoreExtents:
    """Each sample's JPEG bytes in a .beton: its data pointer and the size of its allocation there (ffcv's Reader:
    the metadata and allocation table)."""
    from ffcv.reader import Reader

    reader = Reader(str(path))
    pointers = np.asarray(reader.metadata[f"f{reader.field_names.index('image')}"]["data_ptr"], np.int64)
    table = np.sort(reader.alloc_table, order="ptr")
    sizes = np.asarray(table["size"], np.int64)[np.searchsorted(table["ptr"], pointers)]
    return StoreExtents([path], np.zeros(len(pointers), np.int32), pointers, sizes, mapped=mapped)


class FfcvLoader(SplitLoader):
    def __init__(self, cfg, split, dist, info, num_classes):
        super().__init__(cfg, split, dist, info.num_samples, num_classes, info.describe_sample,
                         beton_extents(info.beton_path, mapped=lambda: store_map(self.loader)))
        self.uses_fastrsb_decoder = cfg.ffcv_decoder == "fastrsb"
        self.decode_stats = DecodeStats()
        # fastrsb's decoder: keys and outcomes travel in the epoch table
        self.epoch_table = EpochTable(self.batch_size, keyed=self.uses_fastrsb_decoder)
        # A whole epoch is installed before ffcv's Loader is built: its __init__ asks the order for
        # pass 0 (Loader.first_traversal_order) and keeps that array's length as len(loader) for good;
        # each pass is then cut to len(loader) * batch_size, so an empty order here would empty them all.
        plan = self.plan(0, 0)
        self.epoch_table.start(plan.indices, plan.keys)
        order = SharedOrder(self.epoch_table)
        res = self.resolution
        if self.uses_fastrsb_decoder:
            self.decoder = FastrsbDecoder((res, res), self.train, cfg.interpolation, cfg.scale, cfg.ratio, cfg.crop_pct)
            image = [ToTensor()]
        elif self.train:
            self.decoder = RandomResizedCropRGBImageDecoder((res, res), scale=tuple(cfg.scale), ratio=tuple(cfg.ratio))
            image = [self.decoder, RandomHorizontalFlip(), ToTensor()]
        else:
            # ffcv's ratio is the side of the centered square over the shorter side: crop_pct
            self.decoder = CenterCropRGBImageDecoder((res, res), ratio=cfg.crop_pct)
            image = [self.decoder, ToTensor()]
        label = [IntDecoder(), ToTensor(), Squeeze()]
        if dist.device.type == "cuda":
            # ffcv stages the copies itself, batches_ahead deep, and orders them: its host buffers are pinned
            # (allocate_query), each batch slot is copied non-blocking on the slot's own stream, the
            # consumer's current stream waits on that stream before EpochIterator.__next__ hands the batch
            # out, and an event recorded on the consumer's stream guards the slot before it is refilled
            image.append(ToDevice(dist.device, non_blocking=True))
            label.append(ToDevice(dist.device, non_blocking=True))
        image_pipeline = PipelineSpec("image", self.decoder, image) if self.uses_fastrsb_decoder else image
        pipelines = {"image": image_pipeline, "label": label}
        if not self.uses_fastrsb_decoder:  # its outputs come after the fields': (images, labels, intact)
            pipelines["intact"] = PipelineSpec("image", FrameCheck())
        self.loader = FfcvLibraryLoader(str(info.beton_path), batch_size=self.batch_size, num_workers=self.workers,
                                        os_cache=cfg.ffcv_os_cache, order=order, seed=cfg.seed, drop_last=self.train,
                                        batches_ahead=cfg.ffcv_batches_ahead,
                                        pipelines=pipelines)

    @property
    def decoder_name(self) -> str:
        return "fastrsb's ffcv decoder (TurboJPEG)" if self.uses_fastrsb_decoder else "ffcv's own decoders"

    def set_resolution(self, px: int) -> None:
        super().set_resolution(px)
        set_output_size(self.loader, self.decoder, (px, px))

    def _epoch(self, plan: EpochPlan) -> Iterator[Batch]:
        table = self.epoch_table
        table.start(plan.indices, plan.keys)
        epoch = start_epoch(self.loader)
        try:
            for b, (images, labels, *intact) in enumerate(epoch):
                first = b * self.batch_size
                failed: dict[int, str] = {}
                if self.uses_fastrsb_decoder:
                    outcomes = table.outcomes(b)
                    if not np.all(outcomes & DONE):
                        raise RuntimeError("fastrsb's ffcv decoder did not receive the keyed sample order (ffcv copied "
                                           "it?): crops cannot be seeded; this ffcv version is not supported "
                                           "(use data.ffcv_decoder=ffcv)")
                    self.decode_stats.add(outcomes)
                    failed = dict.fromkeys(np.flatnonzero(outcomes & DECODE_ERROR).tolist(), _TURBOJPEG_FAILED)
                elif intact:
                    failed = dict.fromkeys(np.flatnonzero(intact[0][:, 0] == 0).tolist(), NO_FRAME)
                if failed:  # ffcv's buffers, on the host or (ToDevice) on the device: replaced in place
                    src = self.bad_samples.replace(plan.indices[first:first + len(images)], failed)
                    replace_rows(src, images, labels)
                yield nhwc_to_batch(images, labels)
        finally:
            stop_epoch(epoch)


