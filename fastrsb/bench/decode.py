"""The physical limit of a JPEG data path: decode-only throughput of the stored JPEGs
with libjpeg-turbo (through PIL) on every core, no crop, no resize, no copy to torch.
A loader's fraction of this figure says how much of the machine's decode capacity it uses."""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import time

from PIL import Image

from dataprep.layout import ShardReader, open_dataset

_SHARED: dict = {}


def _init(locations) -> None:
    _SHARED["reader"] = ShardReader(locations)


def _decode_range(bounds: tuple[int, int]) -> int:
    for i in range(*bounds):
        with Image.open(io.BytesIO(_SHARED["reader"].read(i))) as im:
            im.load()
    return bounds[1] - bounds[0]


def decode_throughput(data: str, split: str = "train", workers: int | None = None, passes: int = 1) -> float:
    """Images/sec decoding every stored JPEG of the split `passes` times on `workers` processes."""
    loc = open_dataset(data).split(split).shard_locations()
    n = len(loc.size)
    workers = workers or os.cpu_count() or 1
    step = max(1, n // (workers * 8))
    chunks = [(a, min(n, a + step)) for a in range(0, n, step)] * passes
    with mp.get_context("fork").Pool(workers, initializer=_init, initargs=(loc,)) as pool:
        pool.map(_decode_range, chunks[: workers])  # warm-up: page cache and worker start
        t0 = time.perf_counter()
        done = sum(pool.imap_unordered(_decode_range, chunks))
        return done / (time.perf_counter() - t0)
