"""The one mixed-precision path (as nanoGPT's): autocast to a dtype, or nothing for fp32; fp16 alone
adds a GradScaler (the trainer's)."""
from __future__ import annotations

from contextlib import nullcontext

import torch


def resolve_amp(amp: str, device_type: str) -> str:
    """train.amp for a device type: auto is bf16 autocast on cuda, none (fp32) elsewhere."""
    if amp == "auto":
        return "bf16" if device_type == "cuda" else "none"
    return amp


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """train.amp as a dtype; None = full fp32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[resolve_amp(amp, device.type)]


def autocast(dtype: torch.dtype | None, device: torch.device):
    """The one mixed-precision context: autocast to `dtype`, or nothing for fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
