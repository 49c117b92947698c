"""Every place fastrsb reaches into ffcv 1.0.2 beyond its documented API, in one module, with the version it was
written against. Each is here because the API has no way to do what is needed:

- EpochTable + table_rows: the per-sample augmentation keys and decode outcomes travel beside the sample order
  ffcv iterates (a side channel: see table_rows);
- SharedOrder: the shared sampler's order as ffcv's TraversalOrder (an instance ffcv calls with the loader);
- start_epoch / stop_epoch: ffcv's epoch thread watched (a dead thread raises instead of blocking the consumer) and
  stopped without the hang of its own close() + join();
- set_output_size: a new resolution (progressive resizing) by changing the decoder and forcing a recompile;
- store_map: ffcv's own map of the .beton, so that data.order=block can advise and drop its pages;
- IMDECODE: libffcv's TurboJPEG decode, called by address from fastrsb's compiled decoder.

The converter's one intervention (RGBImageField.encode storing JPEG bytes as they are) is in dataprep/convert.py.
A different installed ffcv gets one warning naming what may have changed under these."""
from __future__ import annotations

import ctypes
import queue
import warnings
from importlib.metadata import version

import numba as nb
import numpy as np

from ffcv.libffcv import lib as ffcv_lib
from ffcv.traversal_order.base import TraversalOrder

WRITTEN_FOR = "1.0.2"  # ffcv's package version (its __version__ attribute says 0.0.3rc1)
if version("ffcv") != WRITTEN_FOR:
    warnings.warn(f"fastrsb's ffcv backend reaches into ffcv {WRITTEN_FOR}'s internals (fastrsb/data/ffcv_internals.py: "
                  f"its epoch thread and queue, the order slicing its decoders see, its map of the .beton); ffcv "
                  f"{version('ffcv')} is installed, which the tests have not covered", stacklevel=2)

# The columns of an EpochTable row, int64 each
INDEX, KEY, OUTCOME = 0, 1, 2
ROW_WIDTH = 3
ROW_BYTES = ROW_WIDTH * np.dtype(np.int64).itemsize

# libffcv's imdecode (TurboJPEG, thread-local handles), called by address from the compiled decoder
IMDECODE = ctypes.cast(ffcv_lib.imdecode, ctypes.c_void_p).value


class EpochTable:
    """The epoch ffcv is handed, and the channel between fastrsb and its decoder inside ffcv.

    With keys (fastrsb's decoder), each sample is a row of one int64 table, [index, key, outcome]: ffcv is
    handed the index column, the decoder reads each sample's augmentation key from its row and records
    there what it did (fastrsb.data.ffcv_decode's outcome bits), and the loader reads that back per batch.
    Without keys (ffcv's own decoders, which take none) ffcv is handed the bare indices."""

    def __init__(self, batch_size: int, keyed: bool):
        self.batch_size, self.keyed = batch_size, keyed
        self.rows = np.zeros((0, ROW_WIDTH), np.int64)
        self.order = self.rows[:, INDEX]  # what ffcv iterates next (SharedOrder)

    def start(self, indices: np.ndarray, keys: np.ndarray) -> None:
        """Install an epoch: its samples' indices, in order, and their uint64 augmentation keys."""
        if not self.keyed:
            self.order = indices
            return
        rows = np.zeros((len(indices), ROW_WIDTH), np.int64)
        rows[:, INDEX] = indices
        rows[:, KEY] = keys.view(np.int64)
        self.rows, self.order = rows, rows[:, INDEX]

    def outcomes(self, batch: int) -> np.ndarray:
        """The outcome bits the decoder recorded for batch `batch` of the installed epoch (0: not decoded)."""
        return self.rows[batch * self.batch_size:(batch + 1) * self.batch_size, OUTCOME]


@nb.njit(nogil=True)
def table_rows(batch_indices):
    """The EpochTable rows of a batch, from the batch of indices ffcv hands the decoder.

    A side channel, named as one: it reads memory ffcv does not hand over. The decoder is called with the batch's
    slice of the order it was given (and the dataset's metadata, storage and ffcv's own buffers), nothing per sample
    besides, so there is no channel in ffcv 1.0.2's API for a per-sample key. ffcv slices the order into batches
    without copying, so that slice is a view of the index column (stride ROW_BYTES), and this widens it to the whole
    rows around it: the keys and outcomes next to the indices. The decoder checks the stride first and records
    nothing when the slice is a copy (another ffcv version), which FfcvLoader reports."""
    return np.lib.stride_tricks.as_strided(batch_indices, (len(batch_indices), ROW_WIDTH),
                                           (ROW_BYTES, batch_indices.itemsize))


class SharedOrder(TraversalOrder):
    """The shared sampler's order as ffcv's TraversalOrder: the order of the epoch installed in the table.

    ffcv 1.0.2 takes an instance and calls it with the loader, hence __call__."""

    def __init__(self, table: EpochTable):
        self.table = table

    def __call__(self, loader) -> "SharedOrder":
        TraversalOrder.__init__(self, loader)
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        """ffcv's `epoch` counts its own passes (Loader.__init__ asks for pass 0, then each iter(loader)
        for the next), which is not fastrsb's epoch: set_epoch picks that, may start it mid-way (resume) and
        may repeat it (evaluation). FfcvLoader installs the epoch in the table before each pass, so the
        table's order is the one for the pass ffcv asks about, whatever number it gives it."""
        return self.table.order


def start_epoch(loader):
    """ffcv's iterator over its next pass, its output queue watched (_WatchedQueue); any recompile a new output size
    asked for (set_output_size) happens here, once."""
    epoch = iter(loader)
    epoch.output_queue = _WatchedQueue(epoch.output_queue, epoch)
    loader.recompile = False
    return epoch


def set_output_size(loader, decoder, size: tuple[int, int]) -> None:
    """The decoder's output size for the next pass: ffcv sizes its buffers when it compiles, so it must recompile."""
    if decoder.output_size != size:
        decoder.output_size = size
        loader.recompile = True


class _WatchedQueue:
    """ffcv's batch queue, read by its EpochIterator.__next__ with a get() that waits for good: when the worker
    thread dies (an exception in a pipeline stage, which ffcv prints and then ends the thread on), nothing
    would ever arrive. This get() waits as long, but raises once the thread is gone and the queue is empty."""

    def __init__(self, inner: queue.Queue, worker):
        self.inner, self.worker = inner, worker

    def get(self):  # how EpochIterator.__next__ calls it (ffcv 1.0.2): blocking, no timeout
        while True:
            try:
                return self.inner.get(timeout=0.5)
            except queue.Empty:
                if not self.worker.is_alive() and self.inner.empty():
                    raise RuntimeError("ffcv's worker thread ended without finishing the epoch (its error is "
                                      "printed above)") from None

    def __getattr__(self, name):  # put, get_nowait, ...: the queue's own
        return getattr(self.inner, name)


def stop_epoch(epoch) -> None:
    """End ffcv's worker thread of an epoch that may have been left early (a benchmark window, a test's
    next(), a stop signal). The thread must be gone before going on: it reads loader.code before every
    batch, and after a recompile (set_resolution) it would run the new code on its old, smaller buffers.

    ffcv's own close() + join() can wait forever: the thread ends an epoch with output_queue.put(None),
    which neither times out nor looks at the terminate event, so once it has put the last batch into a
    full queue nobody will read, it blocks. So: ask it to stop, and keep the queue drained until it has
    (a batch in flight finishes within one batch's decode; the queue waits re-check every 0.5 s)."""
    epoch.terminate_event.set()
    while epoch.is_alive():
        try:
            while True:
                epoch.output_queue.get_nowait()
        except queue.Empty:
            pass
        epoch.join(timeout=0.05)
    epoch.close()  # leaves the epoch's memory context, now that no thread reads it


def store_map(loader):
    """ffcv's own map of the .beton (os_cache=true: its OSCacheContext's np.memmap, which it makes when the first
    epoch starts; made here if that is yet to come, so it can be advised before anything is read), or None with
    ffcv's process cache, which reads into memory of its own."""
    context = getattr(loader.memory_manager, "context", None)
    if context is None:
        return None
    if context.mmap is None:
        context.__enter__()  # what ffcv's EpochIterator does first; it makes the map only if there is none
    return context.mmap._mmap
