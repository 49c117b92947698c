"""The trainer: channels-last timm ResNets, one AMP path, DDP, EMA, exact checkpoint/resume.

The loop (`train_epoch`) never branches on the loader backend and syncs with the host only when a log
window closes, every `train.log_interval` steps (loss, finiteness and throughput are accumulated on the
device); what a closed window decides (its metrics line, a stop, a timed checkpoint) is `_after_window`'s.
"""
from __future__ import annotations

import signal
import time
import warnings
from contextlib import AbstractContextManager, contextmanager, nullcontext
from itertools import islice
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as tdist
from timm.utils import ModelEmaV3

from fastrsb.augment import BatchAugment
from fastrsb.checkpoint import CheckpointError, Checkpointer, NonFiniteState, code_version
from fastrsb.config import Config, to_dict
from fastrsb.data import create_loader
from fastrsb.data.bad_samples import BadDataError
from fastrsb.data.base import SplitLoader
from fastrsb.dist import DistInfo
from fastrsb.evaluation import Evaluator, create_evaluator
from fastrsb.losses import create_criterion
from fastrsb.metrics import EpochTotals, LogWindow, MetricsLog, WindowStats, peak_memory_mb
from fastrsb.model import create_ema, create_model, wrap_model
from fastrsb.optim import base_lr, create_optimizer, lr_at, resolution_at
from fastrsb.precision import amp_dtype, autocast
from fastrsb.seeding import derive_seed, rng_state, seed_everything, set_rng_state

# the parts of Trainer._train_step, in order (`fastrsb bench step` counts each one's ops)
STEP_PARTS = BATCH_STAGE, FORWARD_BACKWARD, OPTIMIZER_STEP, EMA_UPDATE = ("batch stage", "forward + backward",
                                                                         "optimizer", "EMA")


class StopRequest:
    """Why this process asks the run to stop: a SIGTERM/SIGINT (set by the handler fit() installs), or a loader past
    data.max_bad_samples. Every rank's answer is agreed on by an all-reduce, so all ranks stop after the same step:
    in the one all-reduce of a log window (flags(), Trainer._close), or on its own after an evaluation (agreed)."""

    def __init__(self, loaders: list[SplitLoader]):
        self.signal: int | None = None
        self.loaders = loaders

    @property
    def bad_data(self) -> bool:
        return any(loader.bad_samples.over_limit for loader in self.loaders)

    @property
    def asked_here(self) -> bool:
        return self.signal is not None or self.bad_data

    def flags(self) -> list[float]:
        """[stop, for bad data], as all-reduced sums."""
        return [float(self.asked_here), float(self.bad_data)]

    def agreed(self, dist: DistInfo) -> tuple[bool, bool]:
        """(stop, for bad data) as all ranks agree: a collective under DDP, to call on every rank."""
        flags = torch.tensor(self.flags(), device=dist.device)
        if dist.distributed:
            tdist.all_reduce(flags)
        stop, bad_data = flags.tolist()
        return stop > 0, bad_data > 0

    def bad_data_error(self, data_path: str) -> BadDataError:
        """The error a run stopped for bad samples ends with: this rank's listing, or where to find one."""
        for loader in self.loaders:
            if loader.bad_samples.over_limit:
                return loader.bad_samples.error(data_path)
        return BadDataError("another rank met more undecodable samples than data.max_bad_samples (its log names "
                            f"them); the run was checkpointed. Run `fastrsb verify {data_path}`")


class Trainer:
    """Trains `cfg` on this process's share of the run. `model` is what the step calls (in DDP and/or
    compiled when configured, as nanoGPT's `model`); `raw_model` is the module itself, whose weights the
    EMA, the checkpoints and evaluation use (nanoGPT's `raw_model`)."""

    # components
    dist: DistInfo
    train_loader: SplitLoader
    evaluator: Evaluator
    raw_model: torch.nn.Module
    model: torch.nn.Module
    ema: ModelEmaV3 | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: torch.nn.Module
    train_aug: BatchAugment
    checkpointer: Checkpointer
    metrics: MetricsLog
    # configuration, fixed for the run
    cfg: Config
    run_dir: Path
    amp: torch.dtype | None
    num_classes: int
    steps_per_epoch: int
    global_batch: int
    peak_lr: float
    # state: checkpointed, except the stop request
    epoch: int
    batch_in_epoch: int
    step: int
    totals: EpochTotals
    lr: float
    stop: StopRequest
    # what each of STEP_PARTS runs inside: nothing, unless something counts them
    step_part: Callable[[str], AbstractContextManager] = staticmethod(lambda part: nullcontext())

    def __init__(self, cfg: Config, run_dir: str | Path, dist: DistInfo):
        self.cfg, self.dist, self.run_dir = cfg, dist, Path(run_dir)
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
        self.evaluator = create_evaluator(cfg, dist)
        self.num_classes = self.train_loader.num_classes
        self.amp = amp_dtype(t.amp, dist.device)
        self.raw_model = create_model(cfg.model, self.num_classes, dist.device)
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
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", dist, keep=t.keep_checkpoints,
                                         every_minutes=t.checkpoint_every_minutes,
                                         every_epochs=t.checkpoint_every_epochs, epochs=t.epochs)
        self.metrics = MetricsLog(self.run_dir, dist, t.tensorboard)
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.lr = self._lr_at(0)  # the last step's (set by each step; logged at windows and epochs)
        self.totals = EpochTotals()
        self.stop = StopRequest([self.train_loader, self.evaluator.loader])

    @property
    def ckpt_dir(self) -> Path:
        return self.checkpointer.dir

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        # every rank's random streams (its global RNGs, its RandAugment generator), so a resumed DDP run continues each
        streams = {"rng": rng_state(), "augment": self.train_aug.state_dict()}
        if self.dist.distributed:
            every_rank: list = [None] * self.dist.world_size
            tdist.all_gather_object(every_rank, streams)
        else:
            every_rank = [streams]
        return {
            "model": self.raw_model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step,
            "epoch_loss": [self.totals.loss, self.totals.steps],
            "rng": [s["rng"] for s in every_rank],
            "augment": [s["augment"] for s in every_rank],
            "config": to_dict(self.cfg),
            "code_version": code_version(),
            "world_size": self.dist.world_size,
            "num_classes": self.num_classes,
        }

    def load_state_dict(self, state: dict) -> None:
        self._check_resumable(state)
        self.raw_model.load_state_dict(state["model"])
        if self.ema is not None:  # a run that turns EMA on at resume starts it from the loaded weights
            self.ema.module.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch_in_epoch, self.step = state["epoch"], state["batch_in_epoch"], state["step"]
        self.lr = self._lr_at(max(self.step - 1, 0))
        self.totals = EpochTotals(*state.get("epoch_loss", [0.0, 0]))
        rngs, augment = state["rng"], state["augment"]
        if isinstance(augment, dict):  # written before every rank's was kept: rank 0's
            augment = [augment] * len(rngs)
        if len(rngs) == self.dist.world_size:
            set_rng_state(rngs[self.dist.rank])
            self.train_aug.load_state_dict(augment[self.dist.rank])
        elif self.dist.is_main:
            warnings.warn(f"checkpoint was written by {len(rngs)} process(es), resuming with {self.dist.world_size} at "
                          f"the same global batch ({self.global_batch}): the epoch goes on with exactly the samples and "
                          "crops it had left, but each process's own random streams (Mixup/CutMix and RandAugment "
                          "draws, dropout and drop-path masks) start from the new ranks' seeds, so the run does not "
                          f"repeat bit for bit one that kept {len(rngs)} process(es)", stacklevel=2)

    def _check_resumable(self, state: dict) -> None:
        """A run stopped mid-epoch resumes on any world size at the global batch it had: the sampler deals each global
        step the same samples whatever the world size (fastrsb.data.sampler.epoch_samples). At another global batch
        the rest of the epoch would be other samples: refused, naming the batch to resume with."""
        world = state.get("world_size", 1)
        batch = state["config"]["data"]["batch_size"]
        if state["batch_in_epoch"] and batch * world != self.global_batch:
            raise CheckpointError(
                f"the checkpoint stopped in the middle of epoch {state['epoch']} at a global batch of {batch * world} "
                f"({world} process(es) x data.batch_size={batch}); this run's is {self.global_batch} "
                f"({self.dist.world_size} x {self.cfg.data.batch_size}), with which the rest of the epoch would be other "
                f"samples. Resume with data.batch_size={batch * world / self.dist.world_size:g} (a whole number is "
                "needed), or from a checkpoint taken at an epoch's end")

    def resume(self, how: str) -> Path | None:
        """'auto': newest checkpoint in RUN_DIR that loads (corrupt ones skipped with a warning);
        else a path, which must load."""
        found = self.checkpointer.find(how)
        if found is None:
            return None
        path, state = found
        self.load_state_dict(state)
        return path

    def save_checkpoint(self, metrics: dict | None = None) -> Path | None:
        """Every rank takes part (RNG gather, non-finite agreement); rank 0 writes."""
        return self.checkpointer.save(self.state_dict(), metrics)

    def _checkpoint_if_due(self, metrics: dict | None = None, **moment) -> None:
        """Save when the checkpointer says this moment (Checkpointer.due's keywords) is one to save at."""
        epochs_done = self.epoch + (self.batch_in_epoch == self.steps_per_epoch)
        if self.checkpointer.due(self.epoch, self.step, epochs_done, **moment):
            self.save_checkpoint(metrics)

    def log(self, record: dict) -> None:
        self.metrics.log({"epoch": round(self.epoch + self.batch_in_epoch / self.steps_per_epoch, 4),
                          "step": self.step, **record})

    # ---------------------------------------------------------------- the loop
    def _lr_at(self, step: int) -> float:
        return lr_at(step, self.steps_per_epoch, self.cfg.train.epochs, self.peak_lr, self.cfg.schedule)

    def _train_step(self, batch) -> torch.Tensor:
        """One optimizer step on a batch; returns the loss, left on the device. Nothing in here waits
        for the device: the batch stage sends its decisions in one non-blocking copy, the loss is
        accumulated on the device, and the lr is a host float. fp16's GradScaler is the exception: its
        step() reads the inf check back (bf16, the default on cuda, needs no scaler)."""
        self.lr = self._lr_at(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr
        with self.step_part(BATCH_STAGE):
            x, y = self.train_aug(batch.images, batch.targets)
        with self.step_part(FORWARD_BACKWARD):
            with autocast(self.amp, self.dist.device):
                logits = self.model(x)
                loss = self.criterion(x, logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
        with self.step_part(OPTIMIZER_STEP):
            if self.cfg.optim.clip_grad > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.cfg.optim.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if self.ema is not None:
            with self.step_part(EMA_UPDATE):
                self.ema.update(self.raw_model, step=self.step)
        return loss.detach()

    def train_epoch(self, max_steps: int | None = None, log_interval: int | None = None) -> list[WindowStats]:
        """Train through the rest of the current epoch (or `max_steps` steps of it) and return its closed
        log windows. A window closes every `log_interval` steps (default train.log_interval), at the epoch's
        end, at once when a stop signal reaches a single process (under DDP the ranks agree at the next
        interval) and, partial, after `max_steps`. A stop ends the epoch early, checkpointed: then the last
        window's `stop` is set and the epoch is not over. The caller moves on to the next epoch."""
        remaining = self.steps_per_epoch - self.batch_in_epoch
        if remaining == 0:  # a checkpoint taken after the epoch's last step: nothing left to train
            return []
        interval = log_interval or self.cfg.train.log_interval
        res = resolution_at(self.epoch, self.cfg.progressive, self.cfg.data.train_res)
        self.train_loader.set_resolution(res)
        self.train_loader.set_epoch(self.epoch, self.batch_in_epoch)
        self.model.train()
        if self.batch_in_epoch == 0:
            self.totals = EpochTotals()
        else:  # resumed: the checkpointed loss stays, this process's clock starts now
            self.totals = EpochTotals(self.totals.loss, self.totals.steps)
        # islice starts the loader's epoch (workers, pipelines) here, outside the first window's time
        batches = islice(self.train_loader, min(remaining, max_steps or remaining))
        closed: list[WindowStats] = []
        window = LogWindow(self.dist.device)
        ready = time.perf_counter()
        for batch in batches:
            wait = time.perf_counter() - ready
            window.add(self._train_step(batch), batch.images.shape[0], wait)
            self.step += 1
            self.batch_in_epoch += 1
            at_interval = self.step % interval == 0
            stopping_alone = self.stop.asked_here and not self.dist.distributed
            if at_interval or stopping_alone or self.batch_in_epoch == self.steps_per_epoch:
                closed.append(self._close(window, at_interval))
                if self._after_window(closed[-1], res):
                    return closed
                window = LogWindow(self.dist.device)  # a checkpoint above is not train time
            ready = time.perf_counter()
        if window.steps:  # max_steps ended mid-window (or the loader ran short)
            closed.append(self._close(window, at_interval=False))
            self._after_window(closed[-1], res)
        return closed

    def _close(self, window: LogWindow, at_interval: bool) -> WindowStats:
        """The host sync of a log window. One all-reduce makes every rank agree on the loss (summed
        over ranks), a non-finite loss anywhere, a stop signal anywhere and rank 0's checkpoint clock,
        so all ranks raise, checkpoint or stop after the same step. A non-finite loss stops the run
        (fp16: the scaler skipped those steps instead). The window's loss joins the epoch's."""
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)
        elapsed = time.perf_counter() - window.start
        due = self.dist.is_main and at_interval and self.checkpointer.clock_due()
        flags = torch.tensor([*self.stop.flags(), float(due), len(self.train_loader.bad_samples.in_pass)],
                             dtype=torch.float64)
        v = torch.cat([torch.stack([window.loss, window.nonfinite.double()]), flags.to(self.dist.device)])
        if self.dist.distributed:
            tdist.all_reduce(v)
        loss, bad, stop, bad_data, due, bad_samples = v.tolist()
        if bad and self.amp is not torch.float16:
            raise NonFiniteState(f"loss is not finite at step {self.step} (epoch {self.epoch}); "
                                 "stopping without overwriting the last good checkpoint")
        world = self.dist.world_size
        self.totals.add(window, loss, world, int(bad_samples))
        return WindowStats(window.steps, at_interval, loss / (window.steps * world), bad > 0, stop > 0, bad_data > 0,
                           int(bad_samples), due > 0, window.images * world / elapsed, window.wait / elapsed)

    def _after_window(self, w: WindowStats, res: int) -> bool:
        """Everything a closed window decides, in one place: its metrics line (at an interval), then a stop
        (checkpoint, and the run ends) or a timed checkpoint (unless the epoch's own follows at once).
        Returns whether the run stops."""
        if w.at_interval:
            self.log({"kind": "interval", "loss": w.loss, "lr": self.lr, "res": res, "images_per_sec": w.images_per_sec,
                      "data_stall": w.data_stall, "peak_memory_mb": peak_memory_mb(self.dist.device)})
        self.metrics.show(self.step, w, self.lr)
        self._checkpoint_if_due(forced=w.stop, clock=w.checkpoint_due,
                                window_ends_epoch=self.batch_in_epoch == self.steps_per_epoch)
        return w.stop

    def _next_epoch(self) -> None:
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def run_steps(self, steps: int, log_interval: int | None = None) -> list[WindowStats]:
        """Train `steps` steps from where the run stands, without evaluating (what the benchmarks time):
        train_epoch's windows, crossing into the next epoch if needed (a partial window at each epoch's end)."""
        closed: list[WindowStats] = []
        while steps > 0:
            before = self.step
            closed += self.train_epoch(steps, log_interval)
            steps -= self.step - before
            if self.batch_in_epoch == self.steps_per_epoch:
                self._next_epoch()
        return closed

    def evaluate(self, model: torch.nn.Module | None = None) -> dict:
        """Top-1/top-5 on the val split of `model` (default: the raw model; the EMA's module also)."""
        return self.evaluator.evaluate(self.raw_model if model is None else model)

    def _evaluate_all(self) -> dict:
        m = self.evaluate()
        out = {"val_top1": m["top1"], "val_top5": m["top5"], "val_bad_samples": m["bad_samples"]}
        if self.ema is not None:
            e = self.evaluate(self.ema.module)
            out.update(ema_val_top1=e["top1"], ema_val_top5=e["top5"])
        return out

    @contextmanager
    def _stop_signals(self):
        """SIGTERM/SIGINT ask for a stop: the run finishes its step, checkpoints and returns. A second SIGINT
        (a person pressing Ctrl-C again) does not wait: KeyboardInterrupt, and a checkpoint being written is
        discarded whole (atomic_write). Repeated SIGTERMs change nothing: a scheduler that signals the
        process group and torchrun, which forwards its own SIGTERM, deliver two to every rank."""

        def handler(signum, frame):
            if signum == signal.SIGINT and self.stop.signal is not None:
                raise KeyboardInterrupt
            self.stop.signal = self.stop.signal or signum

        old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _interrupted(self) -> dict:
        return {"interrupted": True, "epoch": self.epoch, "step": self.step}

    def fit(self) -> dict:
        """Train to the configured number of epochs (from wherever the state is). Returns the final
        metrics, or {'interrupted': True, ...} when a signal ended the run after a checkpoint; raises BadDataError
        after a checkpoint when a loader met more undecodable samples than data.max_bad_samples."""
        epochs = self.cfg.train.epochs
        metrics: dict = {}
        self.metrics.open_bar(epochs * self.steps_per_epoch, self.step)
        try:
            with self._stop_signals():
                while self.epoch < epochs:
                    self.metrics.show(self.step, epoch=f"epoch {self.epoch + 1}/{epochs}")
                    windows = self.train_epoch()
                    if windows and windows[-1].stop:
                        if windows[-1].bad_data:
                            raise self.stop.bad_data_error(self.cfg.data.path)
                        return self._interrupted()
                    metrics = {"kind": "epoch", **self.totals.figures(self.dist.world_size),
                               "lr": self.lr,
                               "res": resolution_at(self.epoch, self.cfg.progressive, self.cfg.data.train_res),
                               "peak_memory_mb": peak_memory_mb(self.dist.device)}
                    self._next_epoch()
                    last = self.epoch == epochs
                    if last or self.epoch % self.cfg.train.eval_every_epochs == 0:
                        metrics.update(self._evaluate_all())
                    self.log(metrics)
                    self._checkpoint_if_due(metrics, epoch_end=True)
                    stop, bad_data = self.stop.agreed(self.dist)  # one that arrived during the evaluation
                    if bad_data or (stop and not last):
                        self._checkpoint_if_due(metrics, forced=True)
                        if bad_data:
                            raise self.stop.bad_data_error(self.cfg.data.path)
                        return self._interrupted()
        finally:
            self.metrics.close()
        return metrics
