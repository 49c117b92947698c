"""Where a split's samples lie in its files, and what of them the OS page cache holds: the pieces that keep a store
larger than RAM from filling memory under data.order=block, and that measure it.

`posix_fadvise(POSIX_FADV_DONTNEED)` drops a file range's clean pages without root; `mincore` over a read-only map
counts a file's resident pages (what util-linux's `fincore` prints). Python exposes the first; the second goes
through ctypes, as nothing else in the standard library or the dependencies asks the kernel for it."""
from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

PAGE = os.sysconf("SC_PAGE_SIZE")


class StoreExtents(NamedTuple):
    """Each sample's bytes: which file (an index into `paths`), at what offset, how many."""

    paths: list[Path]
    file: np.ndarray  # int32 (num_samples,)
    offset: np.ndarray  # int64
    size: np.ndarray  # int64

    @property
    def total_bytes(self) -> int:
        return int(self.size.sum())

    def drop(self, samples: np.ndarray) -> None:
        """Drop the page-cache pages that hold only these samples' bytes (ranges merged per file; the kernel drops
        the whole pages inside each range, so a page shared with a sample still in use stays)."""
        samples = np.asarray(samples)
        if not len(samples):
            return
        for f in np.unique(self.file[samples]).tolist():
            mine = samples[self.file[samples] == f]
            order = np.argsort(self.offset[mine])
            starts, ends = self.offset[mine][order], (self.offset + self.size)[mine][order]
            fd = os.open(self.paths[f], os.O_RDONLY)
            try:
                for start, end in _merged(starts, ends):
                    os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _merged(starts: np.ndarray, ends: np.ndarray):
    """Sorted byte ranges with touching or overlapping ones joined."""
    lo, hi = int(starts[0]), int(ends[0])
    for s, e in zip(starts[1:].tolist(), ends[1:].tolist()):
        if s <= hi:
            hi = max(hi, e)
        else:
            yield lo, hi
            lo, hi = s, e
    yield lo, hi


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
