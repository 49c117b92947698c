"""Optimizers through timm, and the learning rate as a pure function of the step."""
from __future__ import annotations

import math

import numpy as np
import torch
from timm.optim import create_optimizer_v2

from fastrsb.config import OptimConfig, ProgressiveConfig, ScheduleConfig


def base_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The configured lr, scaled linearly to the run's global batch when lr_ref_batch is set."""
    return cfg.lr * global_batch / cfg.lr_ref_batch if cfg.lr_ref_batch else cfg.lr


def create_optimizer(model: torch.nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """timm's factory; filter_bias_and_bn puts every parameter with ndim <= 1 (biases, all norm
    weights, downsample BN included) in a group without weight decay. The multi-tensor (foreach)
    implementation wherever the optimizer has one, on every device (see use_foreach)."""
    name = cfg.name
    kwargs = {}
    if name in ("sgd", "nesterov", "momentum"):
        kwargs["momentum"] = cfg.momentum
    try:
        optimizer = create_optimizer_v2(model, opt=name, lr=lr, weight_decay=cfg.weight_decay,
                                        filter_bias_and_bn=True, **kwargs)
    except (AssertionError, ValueError) as e:
        raise ValueError(f"optim.name={name!r}: {e}") from e
    use_foreach(optimizer)
    # a checkpoint's param groups replace these whole, its foreach included (None in older checkpoints)
    optimizer.register_load_state_dict_post_hook(use_foreach)
    return optimizer


def use_foreach(optimizer: torch.optim.Optimizer) -> None:
    """Ask for the multi-tensor (foreach) implementation in every param group that has the choice
    (torch's and timm's optimizers keep it there). Left at None they take it on cuda only, so the CPU
    (tests, the demo) would run other code than a GPU: on resnet50 a per-tensor LAMB step dispatches 2,215
    ops, a foreach one 42 (benchmarks/bench_optimizer_step.py; on a CPU foreach is the slower of the two)."""
    for group in optimizer.param_groups:
        if "foreach" in group:
            group["foreach"] = True


def _ffcv_step_lr(epoch: int, epochs: int, peak_lr: float, cfg: ScheduleConfig) -> float:
    """ffcv-imagenet get_step_lr: lr * step_ratio ** (epoch // step_epochs), 0 once training is over."""
    return 0.0 if epoch >= epochs else peak_lr * cfg.step_ratio ** (epoch // cfg.step_epochs)


def lr_at(step: float, steps_per_epoch: int, epochs: int, peak_lr: float, cfg: ScheduleConfig) -> float:
    """Learning rate at a (fractional) global step. Pure: resume and tests just call it."""
    epoch = step / steps_per_epoch
    if cfg.kind == "cyclic":  # ffcv-imagenet: linear up to the peak, linear down to 0 at the end
        return float(np.interp(epoch, [0, cfg.peak_epoch, epochs], [1e-4 * peak_lr, peak_lr, 0.0]))
    warm = cfg.warmup_epochs
    if epoch < warm:
        start = peak_lr * cfg.warmup_start
        return start + (peak_lr - start) * epoch / warm
    if cfg.kind == "step":
        # ffcv-imagenet interpolates each epoch linearly between its value and the next epoch's,
        # so the lr ramps down over the epoch before each drop instead of jumping
        e = math.floor(epoch)
        lo, hi = _ffcv_step_lr(e, epochs, peak_lr, cfg), _ffcv_step_lr(e + 1, epochs, peak_lr, cfg)
        return lo + (hi - lo) * (epoch - e)
    decay_end = epochs - cfg.cooldown_epochs
    if epoch >= decay_end:
        return cfg.min_lr
    t = (epoch - warm) / max(decay_end - warm, 1e-12)
    return cfg.min_lr + 0.5 * (peak_lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def resolution_at(epoch: int, cfg: ProgressiveConfig, default: int) -> int:
    """ffcv-imagenet's progressive resizing: min_res up to start_ramp, max_res from end_ramp on,
    in between linear and rounded to a multiple of `step`."""
    if not cfg.enabled:
        return default
    if epoch <= cfg.start_ramp:
        return cfg.min_res
    if epoch >= cfg.end_ramp:
        return cfg.max_res
    res = np.interp(epoch, [cfg.start_ramp, cfg.end_ramp], [cfg.min_res, cfg.max_res])
    return int(np.round(res / cfg.step)) * cfg.step
