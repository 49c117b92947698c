"""Losses: timm's BCE (RSB) and soft-target/label-smoothed CE, plus knowledge distillation."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from fastrsb.config import LossConfig
from fastrsb.model import load_teacher


class TaskLoss(torch.nn.Module):
    """CE or BCE over hard (int64) or soft (mixup/cutmix) targets, timm's semantics."""

    def __init__(self, cfg: LossConfig):
        super().__init__()
        if cfg.kind == "bce":
            # timm's semantics: hard targets are smoothed here, soft (mixup) ones arrive smoothed by
            # Mixup; both are then binarised at target_threshold (RSB: 0.2)
            self.hard = self.soft = BinaryCrossEntropy(smoothing=cfg.label_smoothing, target_threshold=cfg.bce_target_threshold)
        else:
            self.hard = LabelSmoothingCrossEntropy(cfg.label_smoothing) if cfg.label_smoothing else torch.nn.CrossEntropyLoss()
            self.soft = SoftTargetCrossEntropy()  # mixup targets already carry the smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (self.soft if targets.ndim == 2 else self.hard)(logits.float(), targets)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened distributions, scaled by T^2 (Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, dim=-1), F.log_softmax(teacher_logits.float() / t, dim=-1),
                    reduction="batchmean", log_target=True) * (t * t)


class Criterion(torch.nn.Module):
    """The training objective: task loss, or kd_weight * KD + (1 - kd_weight) * task loss."""

    def __init__(self, cfg: LossConfig, teacher: torch.nn.Module | None = None):
        super().__init__()
        if (cfg.kd_weight > 0) != (teacher is not None):
            raise ValueError("loss.kd_teacher: knowledge distillation needs both loss.kd_weight > 0 and a teacher "
                             f"(kd_weight={cfg.kd_weight}, teacher {'given' if teacher is not None else 'missing'})")
        self.task = TaskLoss(cfg)
        self.teacher = teacher
        self.kd_weight, self.temperature = cfg.kd_weight, cfg.kd_temperature

    def forward(self, images: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = self.task(logits, targets)
        if self.teacher is None:
            return loss
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        return self.kd_weight * kd_loss(logits, teacher_logits, self.temperature) + (1 - self.kd_weight) * loss


def create_criterion(cfg: LossConfig, model_name: str, num_classes: int, device: torch.device) -> Criterion:
    """The training objective; with loss.kd_weight > 0 its teacher comes from loss.kd_teacher, a local
    file (its architecture loss.kd_teacher_model, default the student's)."""
    teacher = None
    if cfg.kd_weight > 0:
        teacher = load_teacher(cfg.kd_teacher, cfg.kd_teacher_model or model_name, num_classes, device)
    return Criterion(cfg, teacher)
