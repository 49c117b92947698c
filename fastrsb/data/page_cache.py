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

    def chunk_schedule(self, sample_first: np.ndarray, sample_last: np.ndarray) -> list[ChunkSchedule]:
        """Per file, when each CHUNK-sized piece that holds samples read this epoch is first wanted and when it is
        done with. sample_first, sample_last: int64 per sample, the first and last step that reads it (-1: none this
        epoch). A chunk is wanted at the first step any of its samples is, and done when every one that is read
        is; bytes of no sample (tar headers) go with their chunk."""
        out = []
        for f in range(len(self.paths)):
            mine = np.flatnonzero((self.file == f) & (sample_last >= 0))
            lo = self.offset[mine] // CHUNK
            hi = (self.offset[mine] + np.maximum(self.size[mine], 1) - 1) // CHUNK
            n = int(hi.max(initial=-1)) + 1
            first, last = np.full(n, np.iinfo(np.int64).max), np.full(n, -1, np.int64)
            for k in range(int((hi - lo).max(initial=-1)) + 1):  # samples span a chunk or a few
                spans = hi - lo >= k
                np.minimum.at(first, lo[spans] + k, sample_first[mine][spans])
                np.maximum.at(last, lo[spans] + k, sample_last[mine][spans])
            chunks = np.flatnonzero(last >= 0)
            by_first, by_last = (chunks[np.argsort(when[chunks], kind="stable")] for when in (first, last))
            out.append(ChunkSchedule(by_first, first[by_first], by_last, last[by_last]))
        return out

    def fetch_chunks(self, f: int, chunks: np.ndarray) -> None:
        """Ask the kernel to read these chunks of the file into the page cache now, in the background
        (POSIX_FADV_WILLNEED): a block arrives in a few large reads, not sample by sample."""
        for start, length in _runs(chunks):
            fd = os.open(self.paths[f], os.O_RDONLY)
            try:
                os.posix_fadvise(fd, start, length, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def drop_chunks(self, f: int, chunks: np.ndarray) -> None:
        """Drop the file's page-cache pages in these chunks (consecutive chunks in one call)."""
        self._drop(f, _runs(chunks))

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
    """One file's chunks read this epoch, in the order they are first wanted and in the order they are done with."""

    by_first: np.ndarray
    first: np.ndarray  # the step at which by_first[i] is first wanted (ascending)
    by_last: np.ndarray
    last: np.ndarray  # the step after which by_last[i] is done with (ascending)


def _runs(chunks: np.ndarray) -> list[tuple[int, int]]:
    """(offset, length) of the runs of consecutive chunks among these."""
    if not len(chunks):
        return []
    chunks = np.sort(chunks)
    runs = np.split(chunks, np.flatnonzero(np.diff(chunks) != 1) + 1)
    return [(int(run[0]) * CHUNK, len(run) * CHUNK) for run in runs]


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
