"""The batch contract every loader backend honours, so the trainer never branches on the backend."""
from __future__ import annotations

from typing import Iterator, NamedTuple, Protocol

import torch


class Batch(NamedTuple):
    """images: (N,3,H,W) uint8 on the run's device, channels_last memory (NHWC viewed as NCHW).
    targets: (N,) int64 on the same device. After the augment stage images are normalized floats
    and targets may be soft (N, num_classes)."""

    images: torch.Tensor
    targets: torch.Tensor


class Loader(Protocol):
    def __iter__(self) -> Iterator[Batch]: ...

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order; start_batch skips the batches an interrupted run already consumed."""
        ...

    def set_resolution(self, px: int) -> None:
        """Output side length of train crops from the next epoch on (progressive resizing)."""
        ...
