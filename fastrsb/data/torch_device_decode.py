"""data.torch_decode=device: the torch backend's GPU data path without DALI (the lent GPU machine has no DALI
and no ffcv). A reader thread preads each batch's JPEG bytes from the tar shards and decodes them as one batch
on the run's device: nvjpeg's batched decode on cuda, libjpeg-turbo on the CPU (the twin the tests run), through
torchcodec where it is installed and works, else torchvision (`JpegDecoder`). Crops and flips come from the one crop program (fastrsb.data.crops), and the
whole batch is cropped, resized and flipped on the device by Pillow's resampling as two batched matmuls
(fastrsb.data.device_resize), so the images are those of data.torch_decode=workers within the decoders'
arithmetic, in the contract's uint8 NHWC.

Ordering on cuda: the thread issues all of a batch's work (the labels' pinned copy included) on its own
stream and records an event after the last launch; the consumer's stream waits on that event before it reads
the batch, and record_stream marks the batch as used by the consumer, so the caching allocator does not hand
its memory back to the decode stream until the consumer's work on it is done. The thread never waits on the
device; the host only learns shapes, which decode_jpeg returns as host metadata."""
from __future__ import annotations

import contextlib
import functools
import io
import queue
import re
import threading
import warnings
from typing import Callable, Generator

import numpy as np
import torch

from fastrsb.data.base import Batch, EpochPlan, SplitLoader, shard_extents
from fastrsb.data.crops import crop_boxes
from fastrsb.data.device_resize import resize_batch, resize_params
from fastrsb.data.staging import nhwc_to_batch
from fastrsb.data.torch_loader import ShardDataset

_END = object()  # the reader thread's last item of an epoch


class JpegDecoder:
    """One library's batched JPEG decode: (a list of) 1-D uint8 host tensors of JPEG bytes -> (a list of) (3, H, W)
    uint8 RGB tensors on `device`, raising RuntimeError on a JPEG it cannot decode. torchcodec and torchvision run
    the same libjpeg-turbo on the CPU and nvjpeg on cuda, and decode the same pixels (tests/test_device_decode.py);
    torchvision 0.29 deprecates its image decoders for torchcodec, which the lent GPU machine's torchvision 0.26
    predates, hence both."""

    def __init__(self, library: str, version: str, decode: Callable):
        self.library, self.version, self._decode = library, version, decode
        self.name = f"{library} {version}"

    def __call__(self, data, device: torch.device):
        return self._decode(data, device)


def _torchcodec() -> JpegDecoder:
    import torchcodec
    from torchcodec.decoders import decode_jpeg

    return JpegDecoder("torchcodec", torchcodec.__version__, lambda data, device: decode_jpeg(data, mode="RGB",
                                                                                                device=device))


def _torchvision() -> JpegDecoder:
    import torchvision
    from torchvision.io import ImageReadMode, decode_jpeg

    return JpegDecoder("torchvision", torchvision.__version__,
                       lambda data, device: decode_jpeg(data, mode=ImageReadMode.RGB, device=device))


@functools.cache
def _probe_jpeg() -> torch.Tensor:
    """A 16x8 JPEG: what a decoder must decode on the run's device before it is chosen."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 40, 40)).save(buf, format="JPEG")
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def choose_jpeg_decoder(preference: str, device: torch.device) -> JpegDecoder:
    """data.torch_device_decoder: 'torchcodec' or 'torchvision' as asked (a torchcodec that cannot decode here is
    a ValueError saying why); 'auto': torchcodec when it is installed and decodes a probe batch on `device`, else
    torchvision, with one warning naming why when torchcodec is installed but unusable (a build for another torch,
    missing FFmpeg or CUDA libraries): never a crash at the first batch."""
    if preference == "torchvision":
        return _torchvision()
    try:
        decoder = _torchcodec()
        decoded = decoder([_probe_jpeg()], device)
        if len(decoded) != 1 or tuple(decoded[0].shape) != (3, 8, 16):
            raise RuntimeError(f"the probe JPEG (16x8) decoded to {[tuple(d.shape) for d in decoded]}")
        return decoder
    except Exception as e:  # anything the import or the probe raises means: not usable here
        if isinstance(e, ModuleNotFoundError) and e.name == "torchcodec":  # not installed
            if preference == "torchcodec":
                raise ValueError("data.torch_device_decoder=torchcodec: torchcodec is not installed "
                                 "(pip install -e '.[torchcodec]')") from e
            return _torchvision()
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if preference == "torchcodec":
            raise ValueError(f"data.torch_device_decoder=torchcodec cannot decode on {device}: {why}") from e
        fallback = _torchvision()
        warnings.warn(f"torchcodec is installed but cannot decode JPEGs on {device} ({why}); "
                      f"data.torch_decode=device decodes with {fallback.name} instead", stacklevel=2)
        return fallback


class DeviceDecodeStats:
    """How the epoch's images were decoded, and by which library: `fallbacks` are JPEGs the batched device decode
    refused and that were decoded one by one on the host instead (never a crash mid-epoch)."""

    def __init__(self, decoder: str):
        self.decoder = decoder
        self.images = self.fallbacks = 0

    def as_dict(self) -> dict:
        return {"decoder": self.decoder, "images": self.images, "fallbacks": self.fallbacks,
                "fraction_fallback": self.fallbacks / self.images if self.images else 0.0}


class TorchDeviceLoader(SplitLoader):
    def __init__(self, cfg, split, dist, info, num_classes):
        loc = info.shard_locations()
        super().__init__(cfg, split, dist, info.num_samples, num_classes, info.describe_sample, shard_extents(loc))
        self.device = dist.device
        self.shards = ShardDataset(info, cfg, self.train, loc)  # reads by offset, size records checked here
        # float16 on cuda: uint8 levels are exact in it and tensor cores accumulate in float32
        self.matmul_dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.jpeg_decoder = choose_jpeg_decoder(cfg.torch_device_decoder, self.device)
        self.decode_stats = DeviceDecodeStats(self.jpeg_decoder.name)

    @property
    def decoder_name(self) -> str:
        return f"{self.jpeg_decoder.name} on {self.device}"

    # ---- the per-batch steps, run by the reader thread (public: benchmarks/bench_device_decode.py times each)
    def decode(self, indices: np.ndarray) -> tuple[list[torch.Tensor | None], dict[int, str]]:
        """(3, h, w) uint8 RGB on the device per sample, and {position: why} of those that cannot be decoded (None
        in the list). A batch the device decoder refuses is decoded one by one, and what it still refuses is decoded
        on the host and copied over; what the host refuses too is damaged."""
        data = [torch.frombuffer(bytearray(self.shards.reader.read(int(i))), dtype=torch.uint8) for i in indices]
        self.decode_stats.images += len(data)
        failed: dict[int, str] = {}
        try:
            images = self.jpeg_decoder(data, self.device)
        except RuntimeError:
            images = [self._decode_one(k, d, failed) for k, d in enumerate(data)]
        for i, im in zip(indices, images):
            h, w = (int(v) for v in self.shards.sizes[i])
            if im is not None and tuple(im.shape[1:]) != (h, w):
                raise self.shards.info.size_mismatch(int(i), int(im.shape[1]), int(im.shape[2]))
        return images, failed

    def _decode_one(self, k: int, data: torch.Tensor, failed: dict[int, str]) -> torch.Tensor | None:
        try:
            return self.jpeg_decoder(data, self.device)
        except RuntimeError:
            pass
        try:
            host = self.jpeg_decoder(data, torch.device("cpu"))
        except RuntimeError as e:
            said = re.sub(r"^\w+, \S+:\d+, ", "", str(e).strip())  # "function, file.cpp:line, what libjpeg said"
            failed[k] = f"{self.jpeg_decoder.library}: {said}"
            return None
        self.decode_stats.fallbacks += 1
        return host.to(self.device, non_blocking=False)

    def to_device(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(array)
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    def _batch(self, plan: EpochPlan, sel: slice, res: int) -> tuple[torch.Tensor, torch.Tensor]:
        indices, keys = plan.indices[sel], plan.keys[sel]
        decoded, failed = self.decode(indices)
        if failed:  # each replaced by another sample of the batch, with its crop and label
            src = self.bad_samples.replace(indices, failed)
            indices, keys, decoded = indices[src], keys[src], [decoded[j] for j in src.tolist()]
        sizes = self.shards.sizes[indices]
        boxes = flips = None
        if self.train:
            boxes, flips = crop_boxes(sizes, keys, self.cfg.scale, self.cfg.ratio)
        params = self.to_device(resize_params(sizes, boxes, flips, res, self.cfg.crop_pct))
        images = resize_batch(decoded, params, res, self.cfg.interpolation, self.matmul_dtype)
        return images, self.to_device(self.shards.labels[indices].astype(np.int64))

    def _read_ahead(self, plan: EpochPlan, res: int, ready: queue.Queue, stop: threading.Event) -> None:
        """The reader thread: every batch of the epoch into `ready` (at most `prefetch` ahead), then _END; an error
        is handed over as the item. Returns as soon as `stop` is set."""
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    pass
            return False

        try:
            for start in range(0, len(plan.indices), self.batch_size):
                if stop.is_set():
                    return
                with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
                    images, labels = self._batch(plan, slice(start, start + self.batch_size), res)
                    event = None
                    if self.stream is not None:
                        event = torch.cuda.Event()
                        event.record(self.stream)
                if not put((images, labels, event)):
                    return
            put(_END)
        except BaseException as e:  # raised again in the consumer, which names the batch's samples
            put(e)

    def _epoch(self, plan: EpochPlan) -> Generator[Batch, None, None]:
        ready: queue.Queue = queue.Queue(maxsize=max(1, self.cfg.prefetch))
        stop = threading.Event()
        thread = threading.Thread(target=self._read_ahead, args=(plan, self.resolution, ready, stop), daemon=True,
                                  name="fastrsb device decode")
        thread.start()
        try:
            while True:
                item = ready.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                images, labels, event = item
                if event is not None:
                    consumer = torch.cuda.current_stream(self.device)
                    consumer.wait_event(event)
                    images.record_stream(consumer)
                    labels.record_stream(consumer)
                yield nhwc_to_batch(images, labels)
        finally:  # left early or finished: the thread sees `stop` within one put timeout or one batch
            stop.set()
            thread.join()

