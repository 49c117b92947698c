"""The trainer: channels-last timm ResNets, one AMP path, DDP, EMA, exact checkpoint/resume.

The loop never branches on the loader backend and syncs with the host only every
`train.log_interval` steps (loss, finiteness and throughput are accumulated on the device).
"""
from __future__ import annotations

import json
import math
import resource
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as tdist
from tqdm import tqdm

from fastrsb import checkpoint as ckpt
from fastrsb.augment import BatchAugment
from fastrsb.config import to_dict
from fastrsb.data import create_loader
from fastrsb.dist import DistInfo
from fastrsb.evaluation import build_eval_stack
from fastrsb.losses import create_criterion
from fastrsb.model import create_ema, wrap_model
from fastrsb.optim import base_lr, create_optimizer, lr_at, resolution_at
from fastrsb.precision import autocast
from fastrsb.seeding import derive_seed, rng_state, seed_everything, set_rng_state


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN/inf; no checkpoint is written from this state."""


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass(frozen=True)
class WindowStats:
    """A closed log window, as every rank agrees on it (one all-reduce)."""

    steps: int
    loss: float  # mean over the window's steps and all ranks
    nonfinite: bool  # a NaN/inf loss on some rank
    stop: bool  # a SIGTERM/SIGINT arrived on some rank
    checkpoint_due: bool  # rank 0's checkpoint clock
    images_per_sec: float  # all ranks
    data_stall: float  # time waiting for the next batch / wall time


class LogWindow:
    """The steps since the last log interval. The loss is summed on the device; the host reads it only
    when the window closes."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.nonfinite = torch.zeros((), device=device)
        self.steps, self.images, self.wait, self.start = 0, 0, 0.0, time.perf_counter()

    def add(self, loss: torch.Tensor, images: int, wait: float) -> None:
        self.loss += loss
        self.nonfinite += ~torch.isfinite(loss)
        self.steps += 1
        self.images += images
        self.wait += wait


@dataclass
class EpochTotals:
    """The epoch so far: loss summed over steps and ranks (checkpointed, so a resumed epoch reports the
    mean an uninterrupted one would), and this process's images, data wait and wall clock."""

    loss: float = 0.0
    steps: int = 0
    images: int = 0
    wait: float = 0.0
    start: float = field(default_factory=time.perf_counter)


class Trainer:
    """Trains `cfg` on this process's share of the run. `model` is what the step calls (in DDP and/or
    compiled when configured, as nanoGPT's `model`); `raw_model` is the module itself, whose weights the
    EMA, the checkpoints and evaluation use (nanoGPT's `raw_model`)."""

    def __init__(self, cfg, run_dir: str | Path, dist: DistInfo):
        self.cfg, self.dist = cfg, dist
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        t = cfg.train
        seed_everything(derive_seed(t.seed, "process", dist.rank))
        if dist.device.type == "cuda":
            torch.backends.cudnn.benchmark = t.cudnn_benchmark
        # every check that can fail runs here, before the first step
        self.train_loader = create_loader(cfg, "train", dist)
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise ValueError(f"data.batch_size={cfg.data.batch_size} is larger than this rank's share of the train split")
        self.eval_stack = build_eval_stack(cfg, dist)
        self.raw_model, self.amp = self.eval_stack.model, self.eval_stack.amp
        self.num_classes = self.eval_stack.loader.num_classes
        self.global_batch = cfg.data.batch_size * dist.world_size
        self.peak_lr = base_lr(cfg.optim, self.global_batch)
        self.optimizer = create_optimizer(self.raw_model, cfg.optim, self.peak_lr)
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=self.amp is torch.float16)
        self.ema = create_ema(self.raw_model, cfg.ema)
        self.criterion = create_criterion(cfg.loss, cfg.model.name, self.num_classes, dist.device)
        self.train_aug = BatchAugment(cfg.augment, num_classes=self.num_classes,
                                      label_smoothing=cfg.loss.label_smoothing, dtype=self.amp or torch.float32,
                                      train=True, device=dist.device, seed=derive_seed(t.seed, "randaugment", dist.rank))
        self.model = wrap_model(self.raw_model, cfg.model, dist)
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.totals = EpochTotals()
        self.lr = self.peak_lr  # of the latest step
        self.best_top1: dict[str, float] = {}  # checkpoint name -> val top-1 (for pruning/averaging)
        self._stop_signal: int | None = None
        self._last_ckpt_time = time.time()
        self._tb = None
        if t.tensorboard and dist.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError(f"train.tensorboard=true needs the tensorboard package: {e}") from e
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        rng = rng_state()
        if self.dist.distributed:  # every rank's RNG, so a resumed DDP run continues each stream
            all_rng: list = [None] * self.dist.world_size
            tdist.all_gather_object(all_rng, rng)
        else:
            all_rng = [rng]
        return {
            "model": self.raw_model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step,
            "epoch_loss": [self.totals.loss, self.totals.steps],
            "rng": all_rng,
            "augment": self.train_aug.state_dict(),
            "best_top1": self.best_top1,
            "config": to_dict(self.cfg),
            "code_version": ckpt.code_version(),
            "world_size": self.dist.world_size,
            "num_classes": self.num_classes,
        }

    def load_state_dict(self, state: dict) -> None:
        self.raw_model.load_state_dict(state["model"])
        if self.ema is not None:  # a run that turns EMA on at resume starts it from the loaded weights
            self.ema.module.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch_in_epoch, self.step = state["epoch"], state["batch_in_epoch"], state["step"]
        self.totals = EpochTotals(*state.get("epoch_loss", [0.0, 0]))
        self.best_top1 = dict(state.get("best_top1", {}))
        rngs = state["rng"]
        if len(rngs) == self.dist.world_size:
            set_rng_state(rngs[self.dist.rank])
        elif self.dist.is_main:  # the sampler re-deals the epoch over the new ranks: not the same run
            warnings.warn(f"checkpoint was written by {len(rngs)} process(es), resuming with {self.dist.world_size}: "
                          "random streams restart and the mid-epoch sample split differs", stacklevel=2)
        self.train_aug.load_state_dict(state["augment"])

    def resume(self, how: str) -> Path | None:
        """'auto': newest checkpoint in RUN_DIR that loads (corrupt ones skipped with a warning);
        else a path, which must load."""
        if how == "auto":
            found = ckpt.latest_loadable(self.ckpt_dir)
            if found is None:
                return None
            path, state = found
        else:
            path, state = Path(how), ckpt.load(how)
        self.load_state_dict(state)
        return path

    def save_checkpoint(self, metrics: dict | None = None) -> Path | None:
        """Rank 0 writes; every rank takes part (RNG gather). Refuses a state with a NaN/inf anywhere a resumed
        run would read it: weights and buffers (BN statistics) of the model and of the EMA, optimizer state."""
        bad = ckpt.non_finite_tensors({"model": self.raw_model.state_dict(),
                                       "ema": self.ema.module.state_dict() if self.ema is not None else None,
                                       "optimizer": self.optimizer.state_dict()["state"]})
        if self.dist.distributed:  # BN buffers differ per rank: every rank refuses, or none does
            count = torch.tensor([float(len(bad))], device=self.dist.device)
            tdist.all_reduce(count)
            if count.item() and not bad:
                bad = ["tensors on another rank"]
        if bad:
            raise NonFiniteLoss(f"not finite at step {self.step}: {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}; "
                                "refusing to write a checkpoint")
        state = self.state_dict()
        self._last_ckpt_time = time.time()
        if not self.dist.is_main:
            return None
        name = ckpt.checkpoint_name(self.epoch, self.step)
        if metrics and "val_top1" in metrics:
            self.best_top1[name] = metrics["val_top1"]
            state["best_top1"] = self.best_top1
        state["metrics"] = metrics or {}
        path = self.ckpt_dir / name
        ckpt.save_atomic(state, path)
        ckpt.prune(self.ckpt_dir, self.cfg.train.keep_checkpoints, self.best_top1)
        return path

    # ---------------------------------------------------------------- logging
    def log(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        record = {"epoch": round(self.epoch + self.batch_in_epoch / self.steps_per_epoch, 4), "step": self.step,
                  **record}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                    self._tb.add_scalar(k, v, self.step)

    # ---------------------------------------------------------------- loops
    def _set_lr(self) -> None:
        """The lr of the coming step (a host float: setting it costs the device nothing)."""
        self.lr = lr_at(self.step, self.steps_per_epoch, self.cfg.train.epochs, self.peak_lr, self.cfg.schedule)
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr

    def _should_stop(self) -> bool:
        """Whether a SIGTERM/SIGINT arrived on any rank (a collective under DDP: call on every rank)."""
        flag = self._stop_signal is not None
        if self.dist.distributed:
            t = torch.tensor([float(flag)], device=self.dist.device)
            tdist.all_reduce(t)
            flag = bool(t.item() > 0)
        return flag

    def _close(self, window: LogWindow) -> WindowStats:
        """The host sync of a log interval. One all-reduce makes every rank agree on the loss (summed
        over ranks), a non-finite loss anywhere, a stop signal anywhere and rank 0's checkpoint clock,
        so all ranks raise, checkpoint or stop after the same step. A non-finite loss stops the run
        (fp16: the scaler skipped those steps instead). The window's loss joins the epoch's."""
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)
        elapsed = time.perf_counter() - window.start
        due = self.dist.is_main and time.time() - self._last_ckpt_time >= 60 * self.cfg.train.checkpoint_every_minutes
        flags = torch.tensor([float(self._stop_signal is not None), float(due)], dtype=torch.float64)
        v = torch.cat([torch.stack([window.loss.double(), window.nonfinite.double()]), flags.to(self.dist.device)])
        if self.dist.distributed:
            tdist.all_reduce(v)
        loss, bad, stop, due = v.tolist()
        if bad and self.amp is not torch.float16:
            raise NonFiniteLoss(f"loss is not finite at step {self.step} (epoch {self.epoch}); "
                                "stopping without overwriting the last good checkpoint")
        world = self.dist.world_size
        self.totals.loss += loss
        self.totals.steps += window.steps * world
        self.totals.images += window.images
        self.totals.wait += window.wait
        return WindowStats(window.steps, loss / (window.steps * world), bad > 0, stop > 0, due > 0,
                           window.images * world / elapsed, window.wait / elapsed)

    def _epoch_checkpoint(self, epochs_done: int) -> bool:
        t = self.cfg.train
        return epochs_done == t.epochs or epochs_done % t.checkpoint_every_epochs == 0

    def _train_step(self, batch) -> torch.Tensor:
        """One optimizer step on a batch; returns the loss, left on the device. Nothing in here waits
        for the device: the batch stage sends its decisions in one non-blocking copy, the loss is
        accumulated on the device, and the lr is a host float. fp16's GradScaler is the exception: its
        step() reads the inf check back (bf16, the default on cuda, needs no scaler)."""
        x, y = self.train_aug(batch.images, batch.targets)
        with autocast(self.amp, self.dist.device):
            logits = self.model(x)
            loss = self.criterion(x, logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.optim.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.cfg.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.raw_model, step=self.step)
        return loss.detach()

    def _begin_epoch(self) -> int:
        """Set up the current epoch (or its resumed rest); returns its train resolution."""
        res = resolution_at(self.epoch, self.cfg.progressive, self.cfg.data.train_res)
        self.train_loader.set_resolution(res)
        self.model.train()
        self._set_lr()
        if self.batch_in_epoch == 0:
            self.totals = EpochTotals()
        else:  # resumed: the checkpointed loss stays, this process's clock starts now
            self.totals = EpochTotals(self.totals.loss, self.totals.steps)
        return res

    def _windows(self, max_steps: int | None = None) -> Iterator[WindowStats]:
        """Train through the rest of the current epoch (or `max_steps` steps of it), yielding each log
        window as it closes: every train.log_interval steps, at once when a stop signal reaches a single
        process (under DDP ranks agree at the next interval), and the partial window at the end."""
        # an interval checkpoint taken after the epoch's last step leaves nothing to load
        if self.batch_in_epoch >= self.steps_per_epoch:
            return
        self.train_loader.set_epoch(self.epoch, self.batch_in_epoch)
        batches = iter(self.train_loader)
        window = LogWindow(self.dist.device)
        for _ in range(self.steps_per_epoch - self.batch_in_epoch if max_steps is None else max_steps):
            t0 = time.perf_counter()
            batch = next(batches, None)
            wait = time.perf_counter() - t0
            if batch is None:
                break
            self._set_lr()
            window.add(self._train_step(batch), batch.images.shape[0], wait)
            self.step += 1
            self.batch_in_epoch += 1
            if self.step % self.cfg.train.log_interval == 0 or (self._stop_signal and not self.dist.distributed):
                yield self._close(window)
                window = LogWindow(self.dist.device)  # a checkpoint after the yield is not train time
        if window.steps:
            yield self._close(window)

    def train_epoch(self, bar: tqdm | None = None) -> dict | None:
        """One (possibly resumed) epoch: a metrics line per log window, a timed checkpoint when due.
        Returns the epoch's train figures, or None when a stop signal ended it (after a checkpoint)."""
        res = self._begin_epoch()
        for w in self._windows():
            at_interval = self.step % self.cfg.train.log_interval == 0
            if at_interval:
                record = {"kind": "interval", "loss": w.loss, "lr": self.lr, "res": res,
                          "images_per_sec": w.images_per_sec, "data_stall": w.data_stall,
                          "peak_memory_mb": peak_memory_mb(self.dist.device)}
                self.log(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{w.loss:.3f}", lr=f"{self.lr:.2e}", img_s=f"{w.images_per_sec:.0f}",
                                    wait=f"{100 * w.data_stall:.0f}%", refresh=False)
            if bar is not None:
                bar.update(self.step - bar.n)
            if w.stop and (at_interval or not self.dist.distributed):  # at an epoch's end fit() decides
                self.save_checkpoint()
                return None
            epoch_end_checkpoint = self.batch_in_epoch == self.steps_per_epoch and self._epoch_checkpoint(self.epoch + 1)
            if w.checkpoint_due and at_interval and not epoch_end_checkpoint:
                self.save_checkpoint()
        elapsed = time.perf_counter() - self.totals.start
        world = self.dist.world_size
        return {"loss": self.totals.loss / max(self.totals.steps, 1), "lr": self.lr, "res": res,
                "images_per_sec": self.totals.images * world / elapsed, "data_stall": self.totals.wait / elapsed,
                "peak_memory_mb": peak_memory_mb(self.dist.device), "epoch_time_s": elapsed}

    def run_steps(self, steps: int) -> list[WindowStats]:
        """Train `steps` steps from where the run stands, without evaluating or checkpointing (what the
        benchmarks time): log windows of train.log_interval steps out of one running loader iterator, so
        its pipeline stays full from one window to the next, crossing into the next epoch if needed.
        Returns the closed windows (a partial one at each epoch's end)."""
        out: list[WindowStats] = []
        while steps > 0:
            self._begin_epoch()
            before = self.step
            out.extend(self._windows(steps))
            steps -= self.step - before
            if self.batch_in_epoch >= self.steps_per_epoch:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        return out

    def evaluate(self, model: torch.nn.Module | None = None) -> dict:
        """Top-1/top-5 on the val split of `model` (default: the raw model; the EMA's module also)."""
        return self.eval_stack.evaluate(model)

    def _install_signal_handlers(self):
        """SIGTERM/SIGINT ask for a stop: the run finishes its step, checkpoints and returns. A second SIGINT
        (a person pressing Ctrl-C again) does not wait: KeyboardInterrupt, and a checkpoint being written is
        discarded whole (atomic_write). Repeated SIGTERMs change nothing: a scheduler that signals the
        process group and torchrun, which forwards its own SIGTERM, deliver two to every rank."""

        def handler(signum, frame):
            if signum == signal.SIGINT and self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = self._stop_signal or signum

        return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def fit(self) -> dict:
        """Train to the configured number of epochs (from wherever the state is). Returns the final
        metrics, or {'interrupted': True, ...} when a signal ended the run after a checkpoint."""
        t = self.cfg.train
        old = self._install_signal_handlers()
        total = t.epochs * self.steps_per_epoch
        bar = tqdm(total=total, initial=self.step, unit="step", dynamic_ncols=True, desc="train") \
            if self.dist.is_main else None
        metrics: dict = {}
        try:
            while self.epoch < t.epochs:
                if bar is not None:
                    bar.set_description(f"epoch {self.epoch + 1}/{t.epochs}")
                train = self.train_epoch(bar)
                if train is None:
                    return {"interrupted": True, "epoch": self.epoch, "step": self.step}
                self.epoch += 1
                self.batch_in_epoch = 0
                last = self.epoch == t.epochs
                # checkpoint before an evaluation can outlast the grace period (the last one runs anyway)
                if not last and self._should_stop():
                    self.save_checkpoint()
                    return {"interrupted": True, "epoch": self.epoch, "step": self.step}
                metrics = {"kind": "epoch", **train}
                if last or self.epoch % t.eval_every_epochs == 0:
                    m = self.evaluate()
                    metrics.update(val_top1=m["top1"], val_top5=m["top5"])
                    if self.ema is not None:
                        e = self.evaluate(self.ema.module)
                        metrics.update(ema_val_top1=e["top1"], ema_val_top5=e["top5"])
                self.log(metrics)
                checkpointed = self._epoch_checkpoint(self.epoch)
                if checkpointed:
                    self.save_checkpoint(metrics)
                if not last and self._should_stop():  # a stop that arrived during the evaluation
                    if not checkpointed:
                        self.save_checkpoint(metrics)
                    return {"interrupted": True, "epoch": self.epoch, "step": self.step}
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if bar is not None:
                bar.close()
            if self._tb is not None:
                self._tb.close()
        return metrics


def train_throughput(metrics_path: Path) -> float:
    """Median images/sec over the interval lines of a run's metrics.jsonl."""
    vals = [r["images_per_sec"] for r in map(json.loads, metrics_path.read_text().splitlines())
            if r.get("kind") == "interval"]
    return float(np.median(vals)) if vals else math.nan
