"""Evaluation on the val split, one evaluator for the trainer and `fastrsb eval`: the val loader, the eval
batch stage (normalize, no augmentation) and the AMP dtype; the model is the caller's."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as tdist
from timm.utils import accuracy

from fastrsb import checkpoint as ckpt
from fastrsb.augment import BatchAugment
from fastrsb.config import Config, from_dict
from fastrsb.data import create_loader
from fastrsb.data.base import SplitLoader
from fastrsb.dist import DistInfo, init_distributed
from fastrsb.model import create_model
from fastrsb.precision import amp_dtype, autocast


@dataclass
class Evaluator:
    loader: SplitLoader
    augment: BatchAugment
    amp: torch.dtype | None
    flip_tta: bool
    dist: DistInfo

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict:
        """Top-1/top-5 of `model` over the whole val split: each sample once across ranks, counts summed on
        the device and read once at the end."""
        model.eval()
        dev = self.dist.device
        hits = torch.zeros(2, device=dev, dtype=torch.float64)  # correct@1, correct@5
        seen = 0
        self.loader.set_epoch(0)
        for batch in self.loader:
            x, y = self.augment(batch.images, batch.targets)
            with autocast(self.amp, dev):
                logits = model(x).float()
                if self.flip_tta:
                    logits = logits + model(x.flip(3)).float()
            # timm's accuracy gives percentages of the batch; rounding turns them back into exact counts
            top1, top5 = accuracy(logits, y, topk=(1, 5))
            hits += torch.stack([top1, top5]).double().mul_(y.shape[0] / 100).round_()
            seen += y.shape[0]
        counts = torch.cat([hits, hits.new_tensor([seen, len(self.loader.bad_samples.in_pass)])])
        if self.dist.distributed:
            tdist.all_reduce(counts)
        c1, c5, n, bad = counts.tolist()
        # bad: undecodable samples, each counted as the sample of its batch that replaced it (fastrsb.data.bad_samples)
        return {"top1": 100 * c1 / n, "top5": 100 * c5 / n, "num_samples": int(n), "bad_samples": int(bad)}


def create_evaluator(cfg: Config, dist: DistInfo) -> Evaluator:
    """The val loader (data.val_res, data.crop_pct), the eval batch stage and the AMP dtype of train.amp."""
    loader = create_loader(cfg, "val", dist)
    amp = amp_dtype(cfg.train.amp, dist.device)
    augment = BatchAugment(cfg.augment, num_classes=loader.num_classes, label_smoothing=0.0, dtype=amp or torch.float32,
                           train=False, device=dist.device)
    return Evaluator(loader, augment, amp, cfg.train.flip_tta, dist)


def evaluate_checkpoint(checkpoint: str, data: str, res: int | None = None, crop_pct: float | None = None,
                        ema: bool = False, backend: str | None = None, device: str = "auto",
                        batch_size: int | None = None) -> dict:
    """Top-1/top-5 of a checkpoint's raw (or EMA) weights on a converted val split; the val settings
    default to the checkpoint's config."""
    state = ckpt.load(checkpoint, required=("model", "config"))
    weights = state.get("ema") if ema else state["model"]
    if weights is None:
        raise ValueError(f"{checkpoint} holds no EMA weights (train with ema.enabled=true)")
    values = state["config"]
    values["data"].update({k: v for k, v in (("path", data), ("val_res", res), ("crop_pct", crop_pct),
                                             ("backend", backend), ("batch_size", batch_size)) if v is not None})
    values["train"]["device"] = device
    cfg = from_dict(values)
    dist = init_distributed(device, "--device")
    evaluator = create_evaluator(cfg, dist)
    model = create_model(cfg.model, evaluator.loader.num_classes, dist.device)
    model.load_state_dict(weights)
    return evaluator.evaluate(model)
