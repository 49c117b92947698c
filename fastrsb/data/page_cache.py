"""Where a split's samples lie in its files, and what of them the OS page cache holds: the pieces that keep a store
larger than RAM from filling memory under data.order=block, and that measure it.

`posix_fadvise(POSIX_FADV_DONTNEED)` drops a file range's clean pages without root; `mincore` over a read-only map
counts a file's resident pages (what util-linux's `fincore` prints). Python exposes the first; the second goes
through ctypes, as nothing else in the standard library or the dependencies asks the kernel for it."""
from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

PAGE = os.sysconf("SC_PAGE_SIZE")


CHUNK = 1 << 16  # the page cache is dropped in 64 KiB chunks: fine enough, and 2M entries for a 140 GB store


@dataclass(frozen=True)
class StoreExtents:
    """Each sample's bytes: which file (an index into `paths`), at what offset, how many. `mapped`: for a store its
    reader maps into memory (ffcv with os_cache), that map of paths[0] once it exists; pages mapped there stay in
    the page cache until they are unmapped, so dropping them takes a madvise first."""

    paths: list[Path]
    file: np.ndarray  # int32 (num_samples,)
    offset: np.ndarray  # int64
    size: np.ndarray  # int64
    mapped: Callable[[], mmap.mmap | None] | None = None

    @property
    def total_bytes(self) -> int:
        return int(self.size.sum())

    def chunk_schedule(self, sample_first: np.ndarray, sample_last: np.ndarray) -> ChunkSchedule:
        """When each CHUNK-sized piece of the store that holds samples read this epoch is first wanted and when it is
        done with. sample_first, sample_last: int64 per sample, the first and the last step that reads it (-1: none
        this epoch). A chunk is wanted at the first step any of its samples is, and done when every one that is read
        is; bytes of no sample (tar headers) go with their chunk. Vectorised over the whole store (one sort)."""
        read = np.flatnonzero(sample_last >= 0)
        lo = self.offset[read] // CHUNK
        hi = (self.offset[read] + np.maximum(self.size[read], 1) - 1) // CHUNK
        stride = int(hi.max(initial=0)) + 1  # a chunk's id: file * stride + its number in the file
        keys, firsts, lasts = [], [], []
        for k in range(int((hi - lo).max(initial=-1)) + 1):  # samples span a chunk or a few
            spans = hi - lo >= k
            keys.append(self.file[read][spans].astype(np.int64) * stride + lo[spans] + k)
            firsts.append(sample_first[read][spans])
            lasts.append(sample_last[read][spans])
        chunk_ids, which = np.unique(np.concatenate(keys or [np.zeros(0, np.int64)]), return_inverse=True)
        first = np.full(len(chunk_ids), np.iinfo(np.int64).max)
        last = np.full(len(chunk_ids), -1, np.int64)
        if len(chunk_ids):
            np.minimum.at(first, which, np.concatenate(firsts))
            np.maximum.at(last, which, np.concatenate(lasts))
        by_first, by_last = np.argsort(first, kind="stable"), np.argsort(last, kind="stable")
        return ChunkSchedule(chunk_ids[by_first], first[by_first], last[by_first], chunk_ids[by_last], last[by_last],
                             stride)

    def fetch_chunks(self, chunk_ids: np.ndarray, stride: int) -> None:
        """Ask the kernel to read these chunks (ids: file * stride + chunk) into the page cache now, in the background
        (POSIX_FADV_WILLNEED): a block arrives in a few large reads, not sample by sample."""
        for f, ranges in _runs_by_file(chunk_ids, stride):
            fd = os.open(self.paths[f], os.O_RDONLY)
            try:
                for start, length in ranges:
                    os.posix_fadvise(fd, start, length, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def drop_chunks(self, chunk_ids: np.ndarray, stride: int) -> None:
        """Drop the page-cache pages of these chunks (ids: file * stride + chunk)."""
        for f, ranges in _runs_by_file(chunk_ids, stride):
            self._drop(f, ranges)

    def drop_all(self) -> None:
        """Drop every page of the store's files: what the readers' read-ahead brought in around the blocks too."""
        for f, path in enumerate(self.paths):
            self._drop(f, [(0, os.path.getsize(path))])

    def read_at_random(self) -> None:
        """Tell the kernel not to read ahead in the map (a reader of its own file descriptors says it when it opens
        them: dataprep.layout.ShardReader): read-ahead past a block brings back pages of blocks already done, which
        nothing drops again."""
        m = self.mapped() if self.mapped is not None else None
        if m is not None:
            m.madvise(mmap.MADV_RANDOM)

    def _drop(self, f: int, ranges: list[tuple[int, int]]) -> None:
        m = self.mapped() if self.mapped is not None and f == 0 else None
        fd = os.open(self.paths[f], os.O_RDONLY)
        try:
            for start, length in ranges:
                if m is not None and start < len(m):
                    m.madvise(mmap.MADV_DONTNEED, start, min(length, len(m) - start))
                os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class ChunkSchedule(NamedTuple):
    """The store's chunks read this epoch (ids: file * stride + chunk), in the order they are first wanted and in the
    order they are done with."""

    by_first: np.ndarray
    first: np.ndarray  # the step at which by_first[i] is first wanted (ascending)
    last_of_first: np.ndarray  # the step after which by_first[i] is done with
    by_last: np.ndarray
    last: np.ndarray  # the step after which by_last[i] is done with (ascending)
    stride: int


def _runs_by_file(chunk_ids: np.ndarray, stride: int):
    """(file, [(offset, length) of each run of consecutive chunks]) for these chunk ids."""
    chunk_ids = np.sort(chunk_ids)
    files = chunk_ids // stride
    for f in np.unique(files).tolist():
        chunks = chunk_ids[files == f] % stride
        runs = np.split(chunks, np.flatnonzero(np.diff(chunks) != 1) + 1)
        yield f, [(int(run[0]) * CHUNK, len(run) * CHUNK) for run in runs]


def evict(paths) -> None:
    """Drop every clean page of these files from the page cache: the store as a cold disk would hand it over."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]


def resident_bytes(path: str | Path) -> int:
    """How many bytes of the file the page cache holds now (whole pages)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
        pages = (size + PAGE - 1) // PAGE
        vec = (ctypes.c_ubyte * pages)()
        mapped = np.frombuffer(m, np.uint8)  # for its address; released before the map closes
        rc = _libc.mincore(ctypes.c_void_p(mapped.ctypes.data), size, vec)
        del mapped
        if rc != 0:
            raise OSError(ctypes.get_errno(), f"mincore({path})")
        return int(np.count_nonzero(np.frombuffer(vec, np.uint8) & 1)) * PAGE


class ResidentPeak:
    """`with ResidentPeak(paths) as watch: ...`: the most of these files the page cache held at once while the block
    ran (watch.peak, bytes), sampled every `interval` seconds from a thread of its own."""

    def __init__(self, paths, interval: float = 0.005):
        self.paths, self.interval, self.peak = list(paths), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="fastrsb resident pages")

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(resident_bytes(p) for p in self.paths))
            time.sleep(self.interval)

    def __enter__(self) -> "ResidentPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
