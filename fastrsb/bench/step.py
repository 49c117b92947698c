"""`fastrsb bench step`: the aten ops one train step of a recipe dispatches, by part (the trainer's
STEP_PARTS: batch stage, forward + backward, optimizer, EMA), on the code paths cuda runs.

A GPU step whose kernels are short is bound by the host's dispatch of them, so ops per step is a figure
to read before renting a GPU, and to divide a GPU's step time by. It counts on any device, the CPU
included: the recipe's own step (`Trainer._train_step`) on small synthetic batches.
"""
from __future__ import annotations

import statistics
import tempfile
from itertools import count as epochs_from, islice
from pathlib import Path

import torch

from fastrsb.augment.randaugment import resolve_randaugment_impl
from fastrsb.config import load_config, merge
from fastrsb.data.base import Batch
from fastrsb.data.staging import nhwc_to_batch
from fastrsb.dist import init_distributed
from fastrsb.op_count import OUTSIDE, OpCount
from fastrsb.precision import resolve_amp


def _batches(loader):
    """The loader's batches, epoch after epoch."""
    for epoch in epochs_from():
        loader.set_epoch(epoch)
        yield from loader


def _write_random_teacher(recipe) -> None:
    """A KD recipe's teacher (loss.kd_teacher_model) with random weights, at loss.kd_teacher: its op count
    does not depend on its weights."""
    from fastrsb.config import ModelConfig
    from fastrsb.model import create_model

    name = recipe.loss.kd_teacher_model or recipe.model.name
    model = create_model(ModelConfig(name=name), recipe.data.synthetic_num_classes, torch.device("cpu"))
    torch.save(model.state_dict(), recipe.loss.kd_teacher)


def _uint8_batch(n: int, res: int, num_classes: int, device: torch.device) -> Batch:
    """A random batch as a loader delivers it (uint8, channels-last, on the device)."""
    g = torch.Generator().manual_seed(0)
    return nhwc_to_batch(torch.randint(0, 256, (n, res, res, 3), dtype=torch.uint8, generator=g).to(device),
                         torch.randint(0, num_classes, (n,), generator=g).to(device))


def bench_step(config: str, overrides: list[str], batch_size: int, res: int, steps: int, device: str = "auto") -> dict:
    """Ops per step of `config` (with `overrides`) by part: the median over `steps` steps after a warm-up
    step (which makes the optimizer's state and the batch stage's device constants). Whatever the device,
    the settings are cuda's (bf16 autocast unless train.amp says otherwise, RandAugment's torch ops); the
    optimizer and EMA take their multi-tensor paths as everywhere. The step runs on batches of
    `batch_size` at `res` px (its forward, backward, optimizer and EMA counts depend on neither, above 32 px:
    there a ResNet's last feature map is 1x1 and its backward dispatches a few ops fewer); the batch stage is
    counted on a batch of the recipe's data.batch_size, as RandAugment dispatches ops per op group that a
    batch's draws form, and small batches form fewer."""
    from fastrsb.trainer import BATCH_STAGE, STEP_PARTS, Trainer

    dist = init_distributed(device, "--device")
    with tempfile.TemporaryDirectory() as tmp:
        teacher = {"loss": {"kd_teacher": str(Path(tmp) / "teacher.pt")}}  # written below if the recipe distils
        recipe = load_config(config, overrides, teacher)
        if recipe.loss.kd_weight > 0:
            _write_random_teacher(recipe)
        cfg = load_config(config, overrides, merge(teacher, {
            "data": {"backend": "synthetic", "train_res": res, "batch_size": batch_size},
            "train": {"device": device, "amp": resolve_amp(recipe.train.amp, "cuda")},
            "augment": {"randaugment_impl": resolve_randaugment_impl(recipe.augment.randaugment_impl, "cuda")}}))
        trainer = Trainer(cfg, Path(tmp) / "run", dist)
        trainer.train_loader.set_resolution(res)
        trainer.model.train()
        recipe_batch = _uint8_batch(recipe.data.batch_size, res, trainer.num_classes, dist.device)
        per_step, top_ops = [], {}
        for i, batch in enumerate(islice(_batches(trainer.train_loader), steps + 1)):
            with OpCount() as ops:
                trainer.step_part = ops.part
                trainer._train_step(batch)
            with OpCount() as stage:
                trainer.train_aug(recipe_batch.images, recipe_batch.targets)
            ops.ops[BATCH_STAGE] = stage.ops[OUTSIDE]
            trainer.step += 1
            if i:  # the first step is the warm-up
                per_step.append({part: ops.total(part) for part in (*STEP_PARTS, OUTSIDE)})
                top_ops = {part: dict(ops.ops[part].most_common(5)) for part in STEP_PARTS}
    totals = [sum(s.values()) for s in per_step]
    return {"config": Path(config).name, "model": cfg.model.name, "optim": cfg.optim.name,
            "batch_size": recipe.data.batch_size, "step_batch_size": batch_size, "res": res, "amp": cfg.train.amp,
            "randaugment_impl": cfg.augment.randaugment_impl, "device": str(dist.device), "steps": steps,
            **{part: statistics.median(s[part] for s in per_step) for part in (*STEP_PARTS, OUTSIDE)},
            "total": statistics.median(totals), "min": min(totals), "max": max(totals), "per_step": per_step,
            "top_ops": top_ops}
