"""A run's metrics as a component of its own (as torchtitan's MetricsProcessor): the log window that
accumulates on the device between host syncs, what a closed window and an epoch report, and where the
figures go (metrics.jsonl, optionally TensorBoard, the progress bar)."""
from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fastrsb.dist import DistInfo


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class LogWindow:
    """The steps since the last host sync. The loss is summed on the device; the host reads it only
    when the window closes. The sum is in double, where adding float32 losses is exact: so the epoch's
    loss does not depend on where windows close (a checkpoint, a stop, a resume close one early)."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device, dtype=torch.float64)
        self.nonfinite = torch.zeros((), device=device)
        self.steps, self.images, self.wait, self.start = 0, 0, 0.0, time.perf_counter()

    def add(self, loss: torch.Tensor, images: int, wait: float) -> None:
        self.loss += loss
        self.nonfinite += ~torch.isfinite(loss)
        self.steps += 1
        self.images += images
        self.wait += wait


@dataclass(frozen=True)
class WindowStats:
    """A closed log window, as every rank agrees on it (one all-reduce)."""

    steps: int
    at_interval: bool  # closed at a train.log_interval boundary (else: at an epoch's end, a stop or max_steps)
    loss: float  # mean over the window's steps and all ranks
    nonfinite: bool  # a NaN/inf loss on some rank
    stop: bool  # some rank asks the run to stop: a SIGTERM/SIGINT, or too many bad samples
    bad_data: bool  # the stop is for bad samples (fastrsb.data.bad_samples): the run ends with an error
    bad_samples: int  # undecodable samples met in the epoch so far, all ranks
    checkpoint_due: bool  # rank 0's checkpoint clock, at an interval boundary
    images_per_sec: float  # all ranks
    data_stall: float  # time waiting for the next batch / wall time


@dataclass
class EpochTotals:
    """The epoch so far: loss summed over steps and ranks (checkpointed, so a resumed epoch reports the
    mean an uninterrupted one would), and this process's images, data wait and wall clock."""

    loss: float = 0.0
    steps: int = 0
    images: int = 0
    wait: float = 0.0
    bad_samples: int = 0  # all ranks, as of the latest window
    start: float = field(default_factory=time.perf_counter)

    def add(self, window: LogWindow, loss_sum: float, world_size: int, bad_samples: int) -> None:
        self.loss += loss_sum
        self.steps += window.steps * world_size
        self.images += window.images
        self.wait += window.wait
        self.bad_samples = bad_samples

    def figures(self, world_size: int) -> dict:
        elapsed = time.perf_counter() - self.start
        return {"loss": self.loss / max(self.steps, 1), "images_per_sec": self.images * world_size / elapsed,
                "data_stall": self.wait / elapsed, "epoch_time_s": elapsed, "bad_samples": self.bad_samples}


class MetricsLog:
    """Rank 0 writes one JSON line per record to RUN_DIR/metrics.jsonl (and its scalars to TensorBoard with
    train.tensorboard=true) and drives the progress bar; the other ranks' calls do nothing."""

    def __init__(self, run_dir: Path, dist: DistInfo, tensorboard: bool):
        self.path, self.enabled = run_dir / "metrics.jsonl", dist.is_main
        self.bar: tqdm | None = None
        self._tb = None
        if tensorboard and self.enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError(f"train.tensorboard=true needs the tensorboard package: {e}") from e
            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                    self._tb.add_scalar(k, v, record["step"])

    def open_bar(self, total: int, initial: int) -> None:
        if self.enabled:
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc="train")

    def show(self, step: int, window: WindowStats | None = None, lr: float | None = None,
             epoch: str | None = None) -> None:
        if self.bar is None:
            return
        if epoch is not None:
            self.bar.set_description(epoch)
        if window is not None and window.at_interval:
            self.bar.set_postfix(loss=f"{window.loss:.3f}", lr=f"{lr:.2e}", img_s=f"{window.images_per_sec:.0f}",
                                 wait=f"{100 * window.data_stall:.0f}%", refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._tb is not None:
            self._tb.close()


def train_throughput(metrics_path: Path) -> float:
    """Median images/sec over the interval lines of a run's metrics.jsonl."""
    vals = [r["images_per_sec"] for r in map(json.loads, metrics_path.read_text().splitlines())
            if r.get("kind") == "interval"]
    return float(np.median(vals)) if vals else math.nan
