"""Models come from timm; fastrsb adds channels-last, optional compile, and local-only teachers."""
from __future__ import annotations

from pathlib import Path

import timm
import torch

from fastrsb.config import ModelConfig


def create_model(cfg: ModelConfig, num_classes: int, device: torch.device) -> torch.nn.Module:
    kwargs = {"num_classes": num_classes, "drop_rate": cfg.drop_rate}
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    if cfg.blurpool:
        from timm.layers import BlurPool2d

        kwargs["aa_layer"] = BlurPool2d
    try:
        model = timm.create_model(cfg.name, pretrained=False, **kwargs)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"model.name={cfg.name!r}: timm cannot build it with {sorted(kwargs)}: {e}") from e
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def load_teacher(path: str, name: str, num_classes: int, device: torch.device) -> torch.nn.Module:
    """A frozen KD teacher from a local file: a fastrsb checkpoint (its EMA weights when present)
    or a plain state_dict. Never downloads."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"loss.kd_teacher: {p} not found (teachers are local files; nothing is downloaded)")
    state = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state:
        state = state.get("ema") or state["model"]
    teacher = timm.create_model(name, pretrained=False, num_classes=num_classes)
    missing, unexpected = teacher.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"loss.kd_teacher {p}: weights do not fit {name} "
                         f"(missing {missing[:3]}..., unexpected {unexpected[:3]}...)")
    teacher.to(device).to(memory_format=torch.channels_last).eval().requires_grad_(False)
    return teacher
