"""The device-side batch stage applied after any loader:
uint8 batch -> [RandAugment] -> float, normalized, training dtype -> [Mixup/CutMix].

Every random decision of a batch is drawn on the host and travels to the device in one parcel
(fastrsb.augment.parcel): one non-blocking copy per batch, no read-back, no data-dependent shapes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from timm.data import Mixup
from timm.data.mixup import cutmix_bbox_and_lam, mixup_target

from fastrsb.augment.parcel import Parcel
from fastrsb.config import AugmentConfig


@dataclass(frozen=True)
class MixDecisions:
    """A batch's mixing decisions, as BatchMixup.prepare put them in the parcel."""

    mixing: slice  # per sample: weight of itself, weight of its partner, cut box y0, y1, x0, x1
    sample_lam: slice | None  # 'elem'/'pair' modes: each sample's target lambda
    batch_lam: float | None  # 'batch' mode: one Python float for every target, as timm mixes them


class BatchMixup(Mixup):
    """timm's Mixup/CutMix with its own decisions (`_params_per_batch`/`_params_per_elem` and
    `cutmix_bbox_and_lam`, drawn from numpy's global RNG, which the trainer seeds and checkpoints),
    applied to the whole batch at once. timm applies 'elem' and 'pair' modes one sample at a time and
    sends the per-sample lambdas with a pageable copy; here every sample's weights and box travel in
    the batch's parcel and one masked blend does all samples, in every mode. The arithmetic is timm's:
    x * lam and partner * (1 - lam), each rounded to x's dtype, then added; the partner of sample i is
    sample n-1-i (timm's flip); cut boxes copy the partner's pixels."""

    def prepare(self, shape: torch.Size, parcel: Parcel) -> MixDecisions:
        """Draw the batch's mixing on the host into `parcel`."""
        n = shape[0]
        if n % 2:
            raise ValueError(f"mixup/cutmix needs an even batch; got {n} (set data.batch_size even)")
        own, other = np.ones(n), np.zeros(n)
        boxes = np.zeros((n, 4))  # y0, y1, x0, x1: empty unless cut
        if self.mode == "batch":
            lam, use_cutmix = self._params_per_batch()
            if lam != 1.0 and use_cutmix:
                box, lam = cutmix_bbox_and_lam(shape, lam, ratio_minmax=self.cutmix_minmax, correct_lam=self.correct_lam)
                boxes[:] = box
            elif lam != 1.0:
                own[:], other[:] = lam, 1.0 - lam
            return MixDecisions(parcel.add(np.concatenate([own[:, None], other[:, None], boxes], 1)), None, lam)
        pairs = n // 2 if self.mode == "pair" else n
        lam, use_cutmix = self._params_per_elem(pairs)  # float32, as timm keeps them
        for i in range(pairs):
            j = n - i - 1
            if lam[i] == 1.0:
                continue
            if use_cutmix[i]:
                box, lam[i] = cutmix_bbox_and_lam(shape[1:], lam[i], ratio_minmax=self.cutmix_minmax,
                                                  correct_lam=self.correct_lam)
                boxes[i] = box
                if self.mode == "pair":
                    boxes[j] = box
            else:
                # timm multiplies by the float32 lambda and by (1 - lambda) computed in float32
                own[i], other[i] = lam[i], np.float32(1) - lam[i]
                if self.mode == "pair":
                    own[j], other[j] = own[i], other[i]
        target_lam = np.concatenate([lam, lam[::-1]]) if self.mode == "pair" else lam
        return MixDecisions(parcel.add(np.concatenate([own[:, None], other[:, None], boxes], 1)), parcel.add(target_lam), None)

    def apply(self, x: torch.Tensor, targets: torch.Tensor, decisions: MixDecisions, sent: torch.Tensor):
        """Mix a normalized float batch and make the soft targets, with the decisions in `sent`."""
        n, _, h, w = x.shape
        p = sent[decisions.mixing].view(n, 6)
        own, other = p[:, 0].float().view(n, 1, 1, 1), p[:, 1].float().view(n, 1, 1, 1)
        y0, y1, x0, x1 = (p[:, k].view(n, 1, 1, 1) for k in range(2, 6))
        rows = torch.arange(h, device=x.device, dtype=torch.float64).view(1, 1, h, 1)
        cols = torch.arange(w, device=x.device, dtype=torch.float64).view(1, 1, 1, w)
        cut = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
        partner = x.flip(0)
        mixed = torch.where(cut, partner, (x * own).to(x.dtype) + (partner * other).to(x.dtype))
        # timm: a Python float in batch mode, else the per-sample lambdas in the images' dtype
        lam = decisions.batch_lam if decisions.sample_lam is None else sent[decisions.sample_lam].to(x.dtype).unsqueeze(1)
        return mixed, mixup_target(targets, self.num_classes, lam, self.label_smoothing)


class BatchAugment:
    """The batch stage for batches on `device` (RandAugment's implementation is chosen for it, once)."""

    def __init__(self, cfg: AugmentConfig, num_classes: int, label_smoothing: float, dtype: torch.dtype,
                 train: bool, device: torch.device, seed: int = 0):
        self.train, self.dtype = train, dtype
        self.mean255, self.std255 = [m * 255 for m in cfg.mean], [s * 255 for s in cfg.std]
        self._norm: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # mean, std once per device
        self.randaugment = None
        if train and cfg.randaugment:
            from fastrsb.augment.randaugment import RandAugment

            self.randaugment = RandAugment.from_config(cfg.randaugment, seed=seed, impl=cfg.randaugment_impl,
                                                       device=device)
        self.mixup = None
        if train and (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0):
            self.mixup = BatchMixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, prob=cfg.mix_prob,
                                    switch_prob=cfg.mix_switch_prob, mode=cfg.mix_mode,
                                    label_smoothing=label_smoothing, num_classes=num_classes)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parcel = Parcel()
        augment = self.randaugment.prepare(images, parcel) if self.randaugment is not None else None
        mix = self.mixup.prepare(images.shape, parcel) if self.mixup is not None else None
        sent = parcel.send(images) if len(parcel) else None  # the batch's one host->device copy
        if augment is not None:
            images = self.randaugment.apply(images, augment, sent)
        x = self.normalize(images)
        if mix is not None:
            x, targets = self.mixup.apply(x, targets, mix, sent)
        return x, targets

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 -> (x - mean) / std in the training dtype, channels-last."""
        norm = self._norm.get(images.device)
        if norm is None:  # constants live on the device once, not copied with every batch
            norm = self._norm[images.device] = tuple(torch.tensor(v, device=images.device).view(1, 3, 1, 1)
                                                     for v in (self.mean255, self.std255))
        mean, std = norm
        return ((images.float() - mean) / std).to(self.dtype).contiguous(memory_format=torch.channels_last)

    def state_dict(self) -> dict:
        return {"randaugment": self.randaugment.state_dict() if self.randaugment is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.randaugment is not None and state.get("randaugment") is not None:
            self.randaugment.load_state_dict(state["randaugment"])

