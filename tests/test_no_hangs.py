"""Nothing hangs: an epoch left at any position returns at once, leaks nothing, and the next epoch is whole.

Each potentially blocking call runs under a watchdog that fails the test naming what hung, so a regression
is a red test, not a CI timeout."""
from __future__ import annotations

import gc
import os
import threading

import pytest

from fastrsb.data import parse_backend_spec
from fastrsb.data import create_loader
from fastrsb.dist import DistInfo
from tests.datagen import sample_ids
from tests.test_loaders import batched, make_cfg

pytestmark = pytest.mark.timeout(300)
WATCHDOG_S = 20
# backend[:decoder]: ffcv's own decoders run through the same epoch iterator; torch:device is data.torch_decode=device
BACKENDS = ["ffcv", "ffcv:ffcv", "dali", "torch", "torch:device", "synthetic"]


def guarded(what: str, fn):
    """fn() in a daemon thread; fails the test naming `what` when it has not returned in WATCHDOG_S."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as e:  # re-raised in the test's thread
            result["error"] = e

    t = threading.Thread(target=target, daemon=True, name=f"watchdog: {what}")
    t.start()
    t.join(WATCHDOG_S)
    if t.is_alive():
        pytest.fail(f"hung: {what} did not return within {WATCHDOG_S} s")
    if "error" in result:
        raise result["error"]
    return result.get("value")


def loader_for(data, spec: str, split: str = "train"):
    backend, decoder = parse_backend_spec(spec)
    return create_loader(make_cfg(data, backend, **decoder), split, DistInfo())


def abandon(loader, epoch: int, taken: int) -> None:
    """Start epoch `epoch`, take `taken` batches, and close the iterator (without seeing StopIteration)."""
    loader.set_epoch(epoch)
    it = iter(loader)
    for _ in range(taken):
        next(it)
    it.close()


def positions(loader) -> list[int]:
    """Batch 1 and each of the last batches_ahead + 2 positions, the whole epoch taken included. ffcv 1.0.2's
    worker blocks for good when an epoch is left with its last batches_ahead batches in the queue (the put of
    its end marker into the full queue has no timeout); which positions meet that depends on timing."""
    n = len(loader)
    return sorted({1, *range(max(1, n - (loader.cfg.ffcv_batches_ahead + 2)), n + 1)})


@pytest.mark.parametrize("spec", BACKENDS)
def test_leaving_an_epoch_at_any_position_returns_and_the_next_epoch_is_whole(coded_dataset, spec):
    loader = loader_for(coded_dataset, spec)
    for taken in positions(loader):
        guarded(f"{spec}: closing an epoch after {taken} of {len(loader)} batches", lambda: abandon(loader, 0, taken))
    held = iter(loader)  # an epoch its caller still holds, unfinished, when the next one starts
    guarded(f"{spec}: the first batch of a held epoch", lambda: next(held))
    loader.set_epoch(1)
    images = guarded(f"{spec}: the whole epoch after the abandoned ones", lambda: [b.images.clone() for b in loader])
    assert len(images) == len(loader)
    assert next(held, None) is None  # the held epoch was ended when the next one started
    if spec != "synthetic":  # the whole epoch, in the sampler's order: nothing of the left epochs came along
        assert sample_ids(coded_dataset, "train", images) == batched(loader.plan().indices, loader.batch_size)


@pytest.mark.parametrize("spec", ["ffcv", "dali", "torch", "torch:device"])
def test_leaving_a_val_epoch_early_returns(coded_dataset, spec):
    loader = loader_for(coded_dataset, spec, "val")
    for taken in positions(loader):
        guarded(f"{spec} val: closing after {taken} of {len(loader)} batches", lambda: abandon(loader, 0, taken))
    images = guarded(f"{spec} val: a whole epoch", lambda: [b.images.clone() for b in loader])
    assert sum(len(x) for x in images) == loader.num_samples


def resources() -> dict[str, int]:
    """Threads (native ones included: DALI's and numba's are not Python threads), open file descriptors and
    child processes of this process."""
    gc.collect()
    with open("/proc/self/status") as f:
        threads = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
    children = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                children += int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass
    return {"threads": threads, "fds": len(os.listdir("/proc/self/fd")), "children": children}


@pytest.mark.parametrize("spec", ["ffcv", "dali", "torch", "torch:device"])
def test_abandoned_epochs_leak_nothing(coded_dataset, spec):
    """30 epochs left at batch 1, one before the end and at the end. A leak grows with the epochs; what comes
    and goes is the torch backend's batches in flight (each shared with the workers by a file descriptor), so
    each count is the least of five readings, after epochs 5-9 and after epochs 25-29."""
    loader = loader_for(coded_dataset, spec)
    n = len(loader)
    readings = []
    for epoch in range(30):
        taken = (1, n - 1, n)[epoch % 3]
        guarded(f"{spec}: epoch {epoch} left after {taken} batches", lambda: abandon(loader, epoch, taken))
        readings.append(resources())
    before, after = ({k: min(r[k] for r in rs) for k in rs[0]} for rs in (readings[5:10], readings[25:30]))
    assert after == before, f"{spec}: 20 more abandoned epochs left {before} -> {after}"


# the injected error ends ffcv's worker thread, as a real one would: pytest's report of that thread is expected
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_error_in_ffcvs_worker_thread_raises_instead_of_hanging(coded_dataset, monkeypatch):
    """A pipeline stage that raises in ffcv's worker thread ends the thread (ffcv prints the error); the batch
    that never comes is an error in the training process, not a wait for good."""
    from ffcv.loader.epoch_iterator import EpochIterator

    loader = loader_for(coded_dataset, "ffcv")
    run_pipeline = EpochIterator.run_pipeline

    def fails_at_batch_2(self, b_ix, *args):
        if b_ix == 2:
            raise OSError("injected: a read error in the decoder")
        return run_pipeline(self, b_ix, *args)

    monkeypatch.setattr(EpochIterator, "run_pipeline", fails_at_batch_2)
    loader.set_epoch(0)
    with pytest.raises(RuntimeError, match="worker thread ended"):
        guarded("ffcv: an epoch whose worker thread died", lambda: [b.images.clone() for b in loader])
    monkeypatch.setattr(EpochIterator, "run_pipeline", run_pipeline)
    loader.set_epoch(1)
    assert len(guarded("ffcv: the next epoch", lambda: list(loader))) == len(loader)


def test_a_torch_loader_freed_by_the_garbage_collector_stops_its_workers(coded_dataset, tmp_path):
    """A TorchLoader whose epoch failed stays in a reference cycle (the error's traceback holds the frames that
    hold it) until the garbage collector frees it. Its persistent workers must be stopped then: left waiting,
    they ignore multiprocessing's SIGTERM at exit, and the process never exits (a CI timeout, not a red test)."""
    import shutil

    import numpy as np

    from dataprep.layout import DatasetError
    from tests.conftest import live_children

    data = tmp_path / "data"
    shutil.copytree(coded_dataset, data)
    np.save(data / "train.sizes.npy", np.load(data / "train.sizes.npy") * 2)  # every worker raises DatasetError
    before = set(live_children())

    def failed_epoch() -> DatasetError:
        loader = loader_for(data, "torch")
        loader.set_epoch(0)
        try:
            list(loader)
        except DatasetError as e:
            return e  # e -> its traceback -> this frame -> e: a cycle that holds the loader
        pytest.fail("the wrong size records were not noticed")

    error = failed_epoch()
    started = set(live_children()) - before
    assert len(started) == 2, "the loader's two workers"
    del error
    guarded("the garbage collector freeing a TorchLoader with live workers", gc.collect)
    left = started & set(live_children())
    assert not left, f"worker processes {sorted(left)} outlived their collected TorchLoader"
