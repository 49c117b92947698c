"""One host->device copy per batch for every random decision of the batch stage.

RandAugment's ops, magnitudes, signs and gather orders and Mixup/CutMix's weights and boxes are all
drawn on the host (seeded, checkpointed generators), where group sizes are known without asking the
device. A `Parcel` collects them as float64 arrays, packs them into one buffer and sends it with one
non-blocking copy; the device side reads slices of it. A GPU step then never waits on the host: no
pageable copy (the buffer is pinned on cuda), no read-back. Integers ride as float64 (exact below 2**53).
"""
from __future__ import annotations

import numpy as np
import torch


class Parcel:
    def __init__(self):
        self._parts: list[np.ndarray] = []
        self._size = 0

    def add(self, values) -> slice:
        """Queue values (any shape, flattened); returns where they will sit in the sent buffer."""
        part = np.asarray(values, dtype=np.float64).reshape(-1)
        self._parts.append(part)
        self._size += part.size
        return slice(self._size - part.size, self._size)

    def __len__(self) -> int:
        return self._size

    def send(self, like: torch.Tensor) -> torch.Tensor:
        """The packed values as a float64 tensor on `like`'s device, after one non-blocking copy.

        On cuda the host buffer is pinned: a non-blocking copy from pageable memory would still make
        the host wait. A fresh pinned buffer per batch is safe: torch's caching host allocator does not
        hand a pinned block out again until the copies recorded on it have finished."""
        host = torch.empty(self._size, dtype=torch.float64, pin_memory=like.is_cuda)
        if self._size:
            np.concatenate(self._parts, out=host.numpy())
        return like.new_empty(self._size, dtype=torch.float64).copy_(host, non_blocking=True)
