"""Where a split's samples lie in its files, and what of them the OS page cache holds: the pieces that keep a store
larger than RAM from filling memory under data.order=block, and that measure it.

`posix_fadvise(POSIX_FADV_DONTNEED)` drops a file range's clean pages without root; `mincore` over a read-only map
counts a file's resident pages (what util-linux's `fincore` prints). Python exposes the first; the second goes
through ctypes, as nothing else in the standard library or the dependencies asks the kernel for it."""
from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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

    def chunk_schedule(self, sample_done: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per file, (chunks, steps): the CHUNK-sized pieces of the file that hold samples read this epoch, and the
        step after which none of them is needed any more, both sorted by that step. sample_done: int64 per sample,
        the step after which it is done (-1: not read this epoch). A chunk is done when every sample in it that is
        read is; bytes of no sample (tar headers) go with their chunk."""
        out = []
        for f in range(len(self.paths)):
            mine = np.flatnonzero(self.file == f)
            first = self.offset[mine] // CHUNK
            last = (self.offset[mine] + np.maximum(self.size[mine], 1) - 1) // CHUNK
            done = np.full(int(last.max(initial=-1)) + 1, -1, np.int64)
            for k in range(int((last - first).max(initial=-1)) + 1):  # samples span a chunk or a few
                spans = last - first >= k
                np.maximum.at(done, first[spans] + k, sample_done[mine][spans])
            chunks = np.flatnonzero(done >= 0)
            order = np.argsort(done[chunks], kind="stable")
            out.append((chunks[order], done[chunks][order]))
        return out

    def drop_chunks(self, f: int, chunks: np.ndarray) -> None:
        """Drop the file's page-cache pages in these chunks (consecutive chunks in one call)."""
        if not len(chunks):
            return
        chunks = np.sort(chunks)
        breaks = np.flatnonzero(np.diff(chunks) != 1) + 1
        self._drop(f, [(int(run[0]) * CHUNK, len(run) * CHUNK) for run in np.split(chunks, breaks)])

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
