"""The one mixed-precision path (as nanoGPT's): autocast to a dtype, or nothing for fp32; fp16 alone
adds a GradScaler (the trainer's)."""
from __future__ import annotations

from contextlib import nullcontext

import torch


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """train.amp as a dtype; None = full fp32. auto: bf16 autocast on cuda, fp32 on cpu."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def autocast(dtype: torch.dtype | None, device: torch.device):
    """The one mixed-precision context: autocast to `dtype`, or nothing for fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
