"""The device-side batch stage applied after any loader:
uint8 batch -> [RandAugment] -> float, normalized, training dtype -> [Mixup/CutMix]."""
from __future__ import annotations

import numpy as np
import torch
from timm.data import Mixup

from fastrsb.config import AugmentConfig


class BatchAugment:
    def __init__(self, cfg: AugmentConfig, num_classes: int, label_smoothing: float, dtype: torch.dtype,
                 train: bool, seed: int = 0):
        self.train, self.dtype = train, dtype
        self.mean = torch.tensor(cfg.mean) * 255
        self.std = torch.tensor(cfg.std) * 255
        self.randaugment = None
        if train and cfg.randaugment:
            from fastrsb.augment.randaugment import RandAugment

            self.randaugment = RandAugment.from_config(cfg.randaugment, seed=seed)
        self.mixup = None
        if train and (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0):
            if cfg.mix_mode not in ("batch", "pair", "elem"):
                raise ValueError(f"augment.mix_mode: expected batch, pair or elem, got {cfg.mix_mode!r}")
            # timm's Mixup draws from numpy's global RNG: the trainer seeds it and checkpoints its state
            self.mixup = Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, prob=cfg.mix_prob,
                               switch_prob=cfg.mix_switch_prob, mode=cfg.mix_mode, label_smoothing=label_smoothing,
                               num_classes=num_classes)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.randaugment is not None:
            images = self.randaugment(images)
        mean = self.mean.to(images.device).view(1, 3, 1, 1)
        std = self.std.to(images.device).view(1, 3, 1, 1)
        x = ((images.float() - mean) / std).to(self.dtype).contiguous(memory_format=torch.channels_last)
        if self.mixup is not None:
            if x.shape[0] % 2:
                raise ValueError(f"mixup/cutmix needs an even batch; got {x.shape[0]} (set data.batch_size even)")
            x, targets = self.mixup(x, targets)
        return x, targets

    def state_dict(self) -> dict:
        return {"randaugment": self.randaugment.state_dict() if self.randaugment is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.randaugment is not None and state.get("randaugment") is not None:
            self.randaugment.load_state_dict(state["randaugment"])


def build_batch_augment(cfg: AugmentConfig, num_classes: int, label_smoothing: float, dtype: torch.dtype,
                        train: bool, seed: int = 0) -> BatchAugment:
    return BatchAugment(cfg, num_classes, label_smoothing, dtype, train, seed)


def numpy_rng_state() -> dict:
    """numpy's global RNG state in a weights_only-loadable form (timm's Mixup draws from it)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "cached": cached}


def set_numpy_rng_state(state: dict) -> None:
    np.random.set_state((state["name"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"], state["cached"]))
