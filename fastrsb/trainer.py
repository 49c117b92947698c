"""The trainer: channels-last timm ResNets, one AMP path, DDP, EMA, exact checkpoint/resume.

The loop never branches on the loader backend and syncs with the host only every
`train.log_interval` steps (loss, finiteness and throughput are accumulated on the device).
"""
from __future__ import annotations

import json
import math
import random
import resource
import signal
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
from tqdm import tqdm

from fastrsb import checkpoint as ckpt
from fastrsb.augment import build_batch_augment
from fastrsb.augment.batch import numpy_rng_state, set_numpy_rng_state
from fastrsb.config import to_dict
from fastrsb.data import create_loader
from fastrsb.dist import DistInfo
from fastrsb.losses import Criterion
from fastrsb.model import create_model, load_teacher
from fastrsb.optim import base_lr, create_optimizer, lr_at, resolution_at


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN/inf; no checkpoint is written from this state."""


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """None = full fp32. auto: bf16 autocast on cuda, fp32 on cpu."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
    if amp not in table:
        raise ValueError(f"train.amp: expected auto, bf16, fp16 or none, got {amp!r}")
    return table[amp]


def autocast(dtype: torch.dtype | None, device: torch.device):
    """The one mixed-precision context: autocast to `dtype`, or nothing for fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": numpy_rng_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    set_numpy_rng_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Meter:
    """Train figures of the current log window (the loss stays on the device until a sync) and of the epoch."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.bad = torch.zeros((), device=device)
        self.epoch_seen, self.epoch_wait, self.epoch_start = 0, 0.0, time.perf_counter()
        self.seen, self.steps, self.wait, self.start = 0, 0, 0.0, self.epoch_start

    def add(self, loss: torch.Tensor, n: int) -> None:
        self.loss += loss
        self.bad += ~torch.isfinite(loss)
        self.seen += n
        self.steps += 1

    def close_window(self) -> None:
        self.epoch_seen += self.seen
        self.epoch_wait += self.wait
        self.loss.zero_()
        self.bad.zero_()
        self.seen, self.steps, self.wait, self.start = 0, 0, 0.0, time.perf_counter()


class Trainer:
    def __init__(self, cfg, run_dir: str | Path, dist: DistInfo):
        self.cfg, self.dist = cfg, dist
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        t = cfg.train
        seed_everything(t.seed * 1000 + dist.rank)
        if dist.device.type == "cuda":
            torch.backends.cudnn.benchmark = t.cudnn_benchmark
        self.amp = amp_dtype(t.amp, dist.device)
        # every check that can fail runs before the first step: loaders, model, optimizer, loss
        self.train_loader = create_loader(cfg, "train", dist)
        self.val_loader = create_loader(cfg, "val", dist)
        self.num_classes = self.train_loader.num_classes
        self.model = create_model(cfg.model, self.num_classes, dist.device)
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise ValueError(f"data.batch_size={cfg.data.batch_size} is larger than this rank's share of the train split")
        self.global_batch = cfg.data.batch_size * dist.world_size
        self.peak_lr = base_lr(cfg.optim, self.global_batch)
        self.optimizer = create_optimizer(self.model, cfg.optim, self.peak_lr)
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=self.amp is torch.float16)
        self.ema = None
        if cfg.ema.enabled:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=cfg.ema.decay, use_warmup=cfg.ema.warmup)
        teacher = None
        if cfg.loss.kd_weight > 0:
            if not cfg.loss.kd_teacher:
                raise ValueError(f"loss.kd_teacher: loss.kd_weight={cfg.loss.kd_weight} distils from a teacher; "
                                 "set loss.kd_teacher to a local checkpoint")
            teacher = load_teacher(cfg.loss.kd_teacher, cfg.loss.kd_teacher_model or cfg.model.name,
                                   self.num_classes, dist.device)
        self.criterion = Criterion(cfg.loss, teacher)
        lr_at(0, self.steps_per_epoch, t.epochs, self.peak_lr, cfg.schedule)  # an unknown schedule fails here
        dtype = self.amp or torch.float32
        self.train_aug = build_batch_augment(cfg.augment, self.num_classes, cfg.loss.label_smoothing, dtype, True,
                                             seed=t.seed * 1000 + dist.rank)
        self.eval_aug = build_batch_augment(cfg.augment, self.num_classes, 0.0, dtype, False)
        self.net = self.model
        if dist.distributed:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
        if cfg.model.compile:
            self.net = torch.compile(self.net)
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        # loss summed over this epoch's steps and ranks so far, and their count: checkpointed, so a
        # resumed epoch reports the same mean as an uninterrupted one
        self.epoch_loss: list = [0.0, 0]
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
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step,
            "epoch_loss": list(self.epoch_loss),
            "rng": all_rng,
            "augment": self.train_aug.state_dict(),
            "best_top1": self.best_top1,
            "config": to_dict(self.cfg),
            "code_version": ckpt.code_version(),
            "world_size": self.dist.world_size,
            "num_classes": self.num_classes,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None:  # a run that turns EMA on at resume starts it from the loaded weights
            self.ema.module.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch_in_epoch, self.step = state["epoch"], state["batch_in_epoch"], state["step"]
        self.epoch_loss = list(state.get("epoch_loss", [0.0, 0]))
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
        """Rank 0 writes; every rank takes part (RNG gather). Refuses non-finite weights."""
        finite = torch.stack([p.detach().float().abs().max() for p in self.model.parameters()]).isfinite().all()
        if not bool(finite):
            raise NonFiniteLoss(f"weights are not finite at step {self.step}; refusing to write a checkpoint")
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
    def _set_lr(self) -> float:
        lr = lr_at(self.step, self.steps_per_epoch, self.cfg.train.epochs, self.peak_lr, self.cfg.schedule)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def _should_stop(self) -> bool:
        """Whether a SIGTERM/SIGINT arrived on any rank (a collective under DDP: call on every rank)."""
        flag = self._stop_signal is not None
        if self.dist.distributed:
            t = torch.tensor([float(flag)], device=self.dist.device)
            tdist.all_reduce(t)
            flag = bool(t.item() > 0)
        return flag

    def _sync(self, loss_sum: torch.Tensor, nonfinite: torch.Tensor) -> tuple[float, bool, bool, bool]:
        """The host sync of a log interval. Under DDP one all_reduce makes every rank agree on the
        loss (summed over ranks), a non-finite loss anywhere, a stop signal anywhere and rank 0's
        checkpoint clock, so all ranks raise, checkpoint or stop after the same step.
        Returns (loss sum, non-finite, stop, checkpoint due)."""
        due = self.dist.is_main and time.time() - self._last_ckpt_time >= 60 * self.cfg.train.checkpoint_every_minutes
        host = torch.tensor([float(self._stop_signal is not None), float(due)], dtype=torch.float64)
        v = torch.cat([torch.stack([loss_sum.double(), nonfinite.double()]), host.to(self.dist.device)])
        if self.dist.distributed:
            tdist.all_reduce(v)
        loss, bad, stop, due = v.tolist()
        return loss, bad > 0, stop > 0, due > 0

    def _flush(self, m: _Meter, lr: float, res: int) -> tuple[dict, bool, bool]:
        """Close a window of steps: sync, stop on a non-finite loss (fp16: the scaler skipped those
        steps), fold the loss into the epoch's (checkpointed) total. Returns the window's metrics
        line, whether to stop and whether a timed checkpoint is due."""
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)
        elapsed = time.perf_counter() - m.start
        loss, bad, stop, due = self._sync(m.loss, m.bad)
        if bad and self.amp is not torch.float16:
            raise NonFiniteLoss(f"loss is not finite at step {self.step} (epoch {self.epoch}); "
                                "stopping without overwriting the last good checkpoint")
        world = self.dist.world_size
        self.epoch_loss[0] += loss
        self.epoch_loss[1] += m.steps * world
        rec = {"kind": "interval", "loss": loss / (m.steps * world), "lr": lr, "res": res,
               "images_per_sec": m.seen * world / elapsed, "data_stall": m.wait / elapsed,
               "peak_memory_mb": peak_memory_mb(self.dist.device)}
        m.close_window()
        return rec, stop, due

    def _epoch_checkpoint(self, epochs_done: int) -> bool:
        t = self.cfg.train
        return epochs_done == t.epochs or epochs_done % t.checkpoint_every_epochs == 0

    def train_epoch(self, bar: tqdm | None = None, max_steps: int | None = None) -> dict | None:
        """One (possibly resumed) epoch, or its first max_steps steps (benchmarks). Returns the
        epoch's train figures, or None when a stop signal ended it (after a checkpoint)."""
        t, dev, world = self.cfg.train, self.dist.device, self.dist.world_size
        res = resolution_at(self.epoch, self.cfg.progressive, self.cfg.data.train_res)
        self.train_loader.set_resolution(res)
        self.net.train()
        if self.batch_in_epoch == 0:
            self.epoch_loss = [0.0, 0]
        # an interval checkpoint taken after the epoch's last step leaves nothing to load
        if self.batch_in_epoch < self.steps_per_epoch:
            self.train_loader.set_epoch(self.epoch, self.batch_in_epoch)
            it = iter(self.train_loader)
        else:
            it = iter(())
        m = _Meter(dev)
        lr = self._set_lr()
        steps_done = 0
        while max_steps is None or steps_done < max_steps:
            t0 = time.perf_counter()
            batch = next(it, None)
            m.wait += time.perf_counter() - t0
            if batch is None:
                break
            lr = self._set_lr()
            x, y = self.train_aug(batch.images, batch.targets)
            with autocast(self.amp, dev):
                logits = self.net(x)
                loss = self.criterion(x, logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.cfg.optim.clip_grad > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update(self.model, step=self.step)
            m.add(loss.detach(), x.shape[0])
            steps_done += 1
            self.step += 1
            self.batch_in_epoch += 1
            if self.step % t.log_interval == 0:
                rec, stop, due = self._flush(m, lr, res)
                self.log(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr:.2e}", img_s=f"{rec['images_per_sec']:.0f}",
                                    wait=f"{100 * rec['data_stall']:.0f}%", refresh=False)
                    bar.update(self.step - bar.n)
                if stop:
                    self.save_checkpoint()
                    return None
                # skipped when the epoch's own checkpoint follows at once
                if due and not (self.batch_in_epoch == self.steps_per_epoch and self._epoch_checkpoint(self.epoch + 1)):
                    self.save_checkpoint()
                    m.start = time.perf_counter()  # checkpoint time is not train time
            elif not self.dist.distributed and self._stop_signal is not None:  # one process: stop at once
                self._flush(m, lr, res)
                self.save_checkpoint()
                return None
        if m.steps:  # the epoch's last, partial window (a stop signal is handled by fit at the epoch's end)
            self._flush(m, lr, res)
        if bar is not None:
            bar.update(self.step - bar.n)
        elapsed = time.perf_counter() - m.epoch_start
        return {"loss": self.epoch_loss[0] / max(self.epoch_loss[1], 1), "lr": lr, "res": res,
                "images_per_sec": m.epoch_seen * world / elapsed, "data_stall": m.epoch_wait / elapsed,
                "peak_memory_mb": peak_memory_mb(dev), "epoch_time_s": elapsed}

    def evaluate(self, model: torch.nn.Module | None = None) -> dict:
        return evaluate(model or self.model, self.val_loader, self.eval_aug, self.amp, self.dist,
                        self.cfg.train.flip_tta)

    def _install_signal_handlers(self):
        def handler(signum, frame):
            if signum == signal.SIGINT and self._stop_signal == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C does not wait for the checkpoint
            self._stop_signal = signum

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
                if self._epoch_checkpoint(self.epoch):
                    self.save_checkpoint(metrics)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if bar is not None:
                bar.close()
            if self._tb is not None:
                self._tb.close()
        return metrics


@torch.no_grad()
def evaluate(model, loader, augment, amp: torch.dtype | None, dist: DistInfo, flip_tta: bool = False) -> dict:
    """Top-1/top-5 over the whole val split: each sample once across ranks, counts all-reduced."""
    model.eval()
    dev = dist.device
    counts = torch.zeros(3, device=dev, dtype=torch.float64)  # correct@1, correct@5, total
    loader.set_epoch(0)
    for batch in loader:
        x, y = augment(batch.images, batch.targets)
        with autocast(amp, dev):
            logits = model(x).float()
            if flip_tta:
                logits = logits + model(x.flip(3)).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top.eq(y.view(-1, 1))
        counts += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), torch.tensor(y.numel(), device=dev)]).double()
    if dist.distributed:
        tdist.all_reduce(counts)
    c1, c5, n = counts.tolist()
    return {"top1": 100 * c1 / n, "top5": 100 * c5 / n, "num_samples": int(n)}


def train_throughput(metrics_path: Path) -> float:
    """Median images/sec over the interval lines of a run's metrics.jsonl."""
    vals = [r["images_per_sec"] for r in map(json.loads, metrics_path.read_text().splitlines())
            if r.get("kind") == "interval"]
    return float(np.median(vals)) if vals else math.nan
