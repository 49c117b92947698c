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
        # timm's placement (blur after the strided conv's stride-1 twin, and in the stem), not
        # ffcv-imagenet's (a blur in front of every strided conv with >= 16 input channels)
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


_WEIGHT_KEYS = ("ema", "state_dict_ema", "model_ema", "model", "state_dict")  # fastrsb, then timm train.py


def load_teacher(path: str, name: str, num_classes: int, device: torch.device) -> torch.nn.Module:
    """A frozen KD teacher from a local file: a fastrsb or timm checkpoint (its EMA weights when
    present) or a plain state_dict. Never downloads."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"loss.kd_teacher: {p} not found (teachers are local files; nothing is downloaded)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"loss.kd_teacher {p}: cannot be read as weights: {type(e).__name__}: {e}") from None
    if isinstance(state, dict):
        state = next((state[k] for k in _WEIGHT_KEYS if isinstance(state.get(k), dict) and state[k]), state)
    # DDP and torch.compile prefixes from other trainers
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    teacher = timm.create_model(name, pretrained=False, num_classes=num_classes)
    try:
        missing, unexpected = teacher.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"loss.kd_teacher {p}: weights do not fit {name} with {num_classes} classes: {e}") from None
    if missing or unexpected:
        raise ValueError(f"loss.kd_teacher {p}: weights do not fit {name} with {num_classes} classes "
                         f"(missing {missing[:3]}..., unexpected {unexpected[:3]}...)")
    teacher.to(device).to(memory_format=torch.channels_last).eval().requires_grad_(False)
    return teacher
