"""Checkpoints: written atomically, loaded with weights_only=True, a corrupt one refused whole."""
from __future__ import annotations

import functools
import re
import subprocess
import time
import warnings
import zipfile
from pathlib import Path

import torch
import torch.distributed as tdist

from dataprep.files import atomic_write
from fastrsb.dist import DistInfo

REQUIRED = ("model", "optimizer", "epoch", "batch_in_epoch", "step", "config")
_NAME = re.compile(r"ckpt_e(\d+)_s(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be loaded (truncated, corrupt, or missing required entries)."""


class NonFiniteState(RuntimeError):
    """A NaN/inf in the training state (the loss, weights, buffers or optimizer state): the run stops and no
    checkpoint is written from it."""


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """git describe of the source tree when available, else the package version."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=here, capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    from importlib.metadata import version

    return version("fastrsb")


def checkpoint_name(epoch: int, step: int) -> str:
    return f"ckpt_e{epoch:04d}_s{step:09d}.pt"


def non_finite_tensors(tree, prefix: str = "") -> list[str]:
    """Dotted names of the floating-point tensors in a nested dict/list (state_dicts, optimizer state) that
    hold a NaN or an inf. One host read for the whole tree, whatever its size: meant for checkpoint time."""
    named: list[tuple[str, torch.Tensor]] = []

    def walk(node, name: str) -> None:
        if isinstance(node, torch.Tensor):
            if node.is_floating_point() and node.numel():
                named.append((name, node))
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{name}.{i}" if name else str(i))

    walk(tree, prefix)
    if not named:
        return []
    finite = torch.stack([torch.isfinite(t).all().to(named[0][1].device) for _, t in named])
    if bool(finite.all()):
        return []
    return [name for (name, _), ok in zip(named, finite.tolist()) if not ok]


def save_atomic(state: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load(path: str | Path, required: tuple[str, ...] = REQUIRED) -> dict:
    """Load a whole checkpoint or raise CheckpointError; nothing is half-loaded."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    # torch.load does not check the zip's CRC-32s: a flipped bit in tensor data would load silently
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a fastrsb checkpoint (truncated?): {e}") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: CRC mismatch in record {bad}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, unsafe type: all mean "do not trust this file"
        raise CheckpointError(f"checkpoint {path} is corrupt or not a fastrsb checkpoint: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or any(k not in state for k in required):
        missing = [k for k in required if not isinstance(state, dict) or k not in state]
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    return state


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoints in the directory, newest (highest step) first."""
    found = [(int(m.group(2)), p) for p in ckpt_dir.glob("ckpt_e*_s*.pt") if (m := _NAME.search(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def latest_loadable(ckpt_dir: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads cleanly; corrupt ones are skipped with a warning."""
    for p in list_checkpoints(ckpt_dir):
        try:
            return p, load(p)
        except CheckpointError as e:
            warnings.warn(f"skipping {e}", stacklevel=2)
    return None


def prune(ckpt_dir: Path, keep: int, metric_of: dict[str, float]) -> None:
    """Keep the newest `keep` checkpoints and the `keep` best by val metric (for averaging)."""
    ckpts = list_checkpoints(ckpt_dir)
    newest = set(ckpts[:keep])
    best = set(sorted((p for p in ckpts if p.name in metric_of), key=lambda p: -metric_of[p.name])[:keep])
    for p in ckpts:
        if p not in newest and p not in best:
            p.unlink(missing_ok=True)


class Checkpointer:
    """A run's checkpoints as a component of its own (as torchtitan's CheckpointManager): when one is due,
    writing one (refusing a non-finite state, rank 0 writes atomically, best-of bookkeeping, pruning) and
    finding the one to resume from. The trainer says *what* the state is and *where* the run is; this decides
    whether that is a moment to save (due) and where the file goes."""

    def __init__(self, ckpt_dir: Path, dist: DistInfo, keep: int, every_minutes: float, every_epochs: int,
                 epochs: int):
        self.dir, self.dist = ckpt_dir, dist
        self.keep, self.every_minutes, self.every_epochs, self.epochs = keep, every_minutes, every_epochs, epochs
        self.best_top1: dict[str, float] = {}  # checkpoint name -> val top-1 (kept by prune, for `average`)
        self._last_save = time.time()
        self._saved: tuple[int, int] | None = None  # (epoch, step) of the state last saved or loaded: not saved twice

    def clock_due(self) -> bool:
        """Whether train.checkpoint_every_minutes have passed since the last save (this process's clock: the
        trainer all-reduces rank 0's answer, so every rank passes the same `clock` to due)."""
        return time.time() - self._last_save >= 60 * self.every_minutes

    def due(self, epoch: int, step: int, epochs_done: int, *, epoch_end: bool = False, window_ends_epoch: bool = False,
            clock: bool = False, forced: bool = False) -> bool:
        """Whether to save the state at (epoch, step), with `epochs_done` epochs behind it: never twice for one state;
        forced (a stop) always; at an epoch's end (after its evaluation) every train.checkpoint_every_epochs epochs
        and the last one; and when the clock says so (a log window closed), unless the window ends an epoch whose own
        checkpoint follows. Every argument is the same on every rank, so every rank answers alike."""
        if (epoch, step) == self._saved:
            return False
        epoch_checkpoint = epochs_done == self.epochs or epochs_done % self.every_epochs == 0
        if forced:
            return True
        if epoch_end:
            return epoch_checkpoint
        return clock and not (window_ends_epoch and epoch_checkpoint)

    def save(self, state: dict, metrics: dict | None = None) -> Path | None:
        """Every rank calls this with its state; rank 0 writes it. A NaN/inf anywhere a resumed run would read
        it (weights and buffers of the model and of the EMA, optimizer state) raises NonFiniteState on every
        rank and nothing is written."""
        bad = non_finite_tensors({k: state[k] for k in ("model", "ema", "optimizer")})
        if self.dist.distributed:  # BN buffers differ per rank: every rank refuses, or none does
            count = torch.tensor([float(len(bad))], device=self.dist.device)
            tdist.all_reduce(count)
            if count.item() and not bad:
                bad = ["tensors on another rank"]
        if bad:
            raise NonFiniteState(f"not finite at step {state['step']}: {', '.join(bad[:4])}"
                                 f"{' ...' if len(bad) > 4 else ''}; refusing to write a checkpoint")
        self._last_save, self._saved = time.time(), (state["epoch"], state["step"])
        if not self.dist.is_main:
            return None
        name = checkpoint_name(state["epoch"], state["step"])
        if metrics and "val_top1" in metrics:
            self.best_top1[name] = metrics["val_top1"]
        path = self.dir / name
        save_atomic({**state, "best_top1": self.best_top1, "metrics": metrics or {}}, path)
        prune(self.dir, self.keep, self.best_top1)
        return path

    def find(self, how: str) -> tuple[Path, dict] | None:
        """'auto': the newest checkpoint in the run's directory that loads (corrupt ones skipped with a
        warning), None when there is none; else a path, which must load. Its best-of record is taken over."""
        found = latest_loadable(self.dir) if how == "auto" else (Path(how), load(how))
        if found is not None:
            self.best_top1 = dict(found[1].get("best_top1", {}))
            self._saved = (found[1]["epoch"], found[1]["step"])
        return found


def average_checkpoints(run_dir: str | Path, best: int, metric: str = "val_top1") -> Path:
    """Average the weights (raw and EMA) of the `best` checkpoints of RUN_DIR ranked by `metric` into
    RUN_DIR/averaged.pt (floating tensors averaged in double; integer buffers, BN step counters, from the
    best one). Only evaluated epoch checkpoints carry a metric; corrupt ones are skipped with a warning."""
    run_dir = Path(run_dir)
    scored = []
    for p in list_checkpoints(run_dir / "checkpoints"):
        try:
            state = load(p)
        except CheckpointError as e:
            warnings.warn(f"skipping {e}", stacklevel=2)
            continue
        value = state.get("metrics", {}).get(metric)
        if value is not None:
            scored.append((value, p, state))
    if len(scored) < best:
        raise ValueError(f"{run_dir}: {len(scored)} checkpoint(s) with {metric}, --best {best} asked "
                         "(train.keep_checkpoints bounds how many best ones are kept)")
    scored.sort(key=lambda s: -s[0])
    chosen = scored[:best]

    def mean_of(key: str):
        if chosen[0][2].get(key) is None:
            return None
        out = {}
        for name, ref in chosen[0][2][key].items():
            if ref.is_floating_point():
                out[name] = sum(s[2][key][name].double() for s in chosen).div(len(chosen)).to(ref.dtype)
            else:
                out[name] = ref
        return out

    avg = {"model": mean_of("model"), "ema": mean_of("ema"), "config": chosen[0][2]["config"],
           "num_classes": chosen[0][2].get("num_classes"),
           "code_version": code_version(), "averaged_by": metric,
           "averaged_from": [str(s[1].name) for s in chosen], "averaged_scores": [s[0] for s in chosen]}
    out = run_dir / "averaged.pt"
    save_atomic(avg, out)
    return out
