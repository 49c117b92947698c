"""The reference a user would otherwise run: a torch Dataset over the same shards, PIL decode in DataLoader
workers; train: the crop program's box (fastrsb.data.crops) resized with Pillow's antialiased filter, and
its flip; val: torchvision's Resize + CenterCrop."""
from __future__ import annotations

import atexit
import io
import signal
import weakref
from typing import Iterator, NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from dataprep.layout import ShardLocations, ShardReader
from fastrsb.data.bad_samples import replacement_sources
from fastrsb.data.base import FILTERS, Batch, EpochPlan, SplitLoader, shard_extents
from fastrsb.data.crops import crop_boxes, val_resize_side
from fastrsb.data.staging import to_device


class Item(NamedTuple):
    """What a worker is handed per sample: the sample, its train crop (top, left, h, w) and flip, and the
    resolution (persistent workers hold their own copy of the dataset, so it travels with the item)."""

    index: int
    box: tuple[int, int, int, int] | None  # None: val
    flip: bool
    res: int


class ShardDataset(Dataset):
    """(HWC uint8 tensor, label) for an Item, its JPEG bytes read by offset from the DALI shards."""

    def __init__(self, info, cfg, train: bool, loc: ShardLocations):
        self.info, self.cfg, self.train = info, cfg, train
        self.loc, self.labels = loc, info.labels
        self.sizes = info.image_sizes()  # checked here, before any work: the crops are placed by them
        self.filter = getattr(Image.Resampling, FILTERS[cfg.interpolation]["pillow"])
        self.reader = ShardReader(loc, read_ahead=not (train and cfg.order == "block"))  # fds per worker process
        self._val_transforms: dict[int, T.Compose] = {}  # per worker process: resolution -> transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: Item):
        """(HWC uint8 image, label, None), or (None, label, why) when the stored JPEG cannot be decoded."""
        try:
            return self._decode(item), int(self.labels[item.index]), None
        except UnidentifiedImageError:
            return None, int(self.labels[item.index]), "PIL identifies no image format in it"
        except (OSError, SyntaxError, ValueError) as e:  # PIL's errors on damaged data
            return None, int(self.labels[item.index]), f"PIL: {type(e).__name__}: {e}"

    def _decode(self, item: Item) -> torch.Tensor:
        i, box, flip, res = item
        with Image.open(io.BytesIO(self.reader.read(i))) as im:
            h, w = (int(v) for v in self.sizes[i])
            if im.size != (w, h):
                raise self.info.size_mismatch(i, im.height, im.width)
            im = im.convert("RGB")
            if box is None:
                img = self._val_transform(res)(im)
            else:
                top, left, bh, bw = box
                img = im.resize((res, res), self.filter, box=(left, top, left + bw, top + bh))
                if flip:
                    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())

    def _val_transform(self, res: int) -> T.Compose:
        tf = self._val_transforms.get(res)
        if tf is None:
            interp = T.InterpolationMode[FILTERS[self.cfg.interpolation]["torchvision"]]
            tf = self._val_transforms[res] = T.Compose([T.Resize(val_resize_side(res, self.cfg.crop_pct), interpolation=interp),
                                                        T.CenterCrop(res)])
        return tf


def collate_replacing_bad(samples: list) -> tuple[torch.Tensor, torch.Tensor, dict[int, str]]:
    """A worker's batch: (images, labels, {position: why} of the samples that could not be decoded), each of those
    replaced by another sample of the batch (fastrsb.data.bad_samples)."""
    failed = {k: why for k, (_, _, why) in enumerate(samples) if why is not None}
    src = replacement_sources(np.array([why is not None for _, _, why in samples]))
    images = torch.stack([samples[j][0] for j in src.tolist()])
    labels = torch.tensor([samples[j][1] for j in src.tolist()], dtype=torch.int64)
    return images, labels, failed


class _EpochBatches:
    """batch_sampler of a persistent DataLoader: iterated in the main process at each epoch's
    start, so it hands out whatever batches the loader set for that epoch."""

    def __init__(self):
        self.batches: list[list[Item]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _ignore_stop_signals(_worker_id: int) -> None:
    """Workers leave SIGTERM/SIGINT to the trainer, which finishes its step and checkpoints;
    a scheduler signalling the whole process group must not kill the loader under it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# Every DataLoader with persistent workers, not every TorchLoader: an epoch's generator holds the DataLoader
# (and so its workers) and may outlive the TorchLoader that made it (a traceback, a reference cycle).
_LIVE: "weakref.WeakSet[DataLoader]" = weakref.WeakSet()
# A DataLoader's workers must be stopped while its queues are whole. When the garbage collector frees a
# DataLoader in a reference cycle (a TorchLoader in a traceback's frames, after an error), the queues'
# finalizers run first and stop their feeder threads, so the stop message the iterator's __del__ then sends
# never reaches the workers: they wait for good, ignore multiprocessing's SIGTERM at exit, and the process
# never exits. Each TorchLoader's finalizer holds its DataLoader, keeping it whole until the workers are
# stopped (tests/test_no_hangs.py::test_a_torch_loader_freed_by_the_garbage_collector_stops_its_workers).


def _shutdown_workers(loader: DataLoader) -> None:
    it = loader._iterator
    if it is not None:
        it._shutdown_workers()
        loader._iterator = None


@atexit.register
def _stop_workers() -> None:
    """Persistent workers ignore SIGTERM, so multiprocessing's exit hook (terminate, then join)
    would wait for them forever: shut them down in order first. This module imports after
    multiprocessing registers its hook, so this one runs before it."""
    for loader in list(_LIVE):
        _shutdown_workers(loader)


class TorchLoader(SplitLoader):
    def __init__(self, cfg, split, dist, info, num_classes):
        loc = info.shard_locations()
        super().__init__(cfg, split, dist, info.num_samples, num_classes, info.describe_sample, shard_extents(loc))
        self.dataset = ShardDataset(info, cfg, self.train, loc)
        self.batch_sampler = _EpochBatches()
        # persistent workers, as timm's loader uses: no process start-up at every epoch
        self.loader = DataLoader(self.dataset, batch_sampler=self.batch_sampler, num_workers=self.workers,
                                 collate_fn=collate_replacing_bad,
                                 worker_init_fn=_ignore_stop_signals, pin_memory=dist.device.type == "cuda",
                                 persistent_workers=self.workers > 0, prefetch_factor=4 if self.workers else None)
        _LIVE.add(self.loader)
        weakref.finalize(self, _shutdown_workers, self.loader).atexit = False  # at exit: _stop_workers

    @property
    def decoder_name(self) -> str:
        import PIL

        return f"PIL {PIL.__version__} in {self.workers} worker process(es)"

    def close(self) -> None:
        """Stop the persistent workers (they come back at the next epoch)."""
        _shutdown_workers(self.loader)

    def _epoch(self, plan: EpochPlan) -> Iterator[Batch]:
        bs, res = self.batch_size, self.resolution
        if self.train:
            boxes, flips = crop_boxes(self.dataset.sizes[plan.indices], plan.keys, self.cfg.scale, self.cfg.ratio)
            items = [Item(int(i), tuple(box.tolist()), bool(f), res) for i, box, f in zip(plan.indices, boxes, flips)]
        else:
            items = [Item(int(i), None, False, res) for i in plan.indices]
        self.batch_sampler.batches = [items[k:k + bs] for k in range(0, len(items), bs)]
        return to_device(self._recorded(plan), self.dist.device, self.cfg.prefetch)

    def _recorded(self, plan: EpochPlan):
        """The DataLoader's batches, in order, their undecodable samples (already replaced) recorded."""
        for b, (images, labels, failed) in enumerate(self.loader):
            if failed:
                first = b * self.batch_size
                self.bad_samples.replace(plan.indices[first:first + len(images)], failed)
            yield images, labels
