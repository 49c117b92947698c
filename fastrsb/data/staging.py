"""The last step of every backend: host batches to the run's device and the contract's layout
(pinned memory, non-blocking copies on a side stream, NHWC viewed as NCHW)."""
from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator

import torch

from fastrsb.data.base import Batch


def nhwc_to_batch(images: torch.Tensor, targets: torch.Tensor) -> Batch:
    """(N,H,W,3) uint8 -> the contract's (N,3,H,W) view: channels_last memory, no copy."""
    return Batch(images.permute(0, 3, 1, 2), targets.view(-1).long())


def to_device(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device, prefetch: int) -> Iterator[Batch]:
    """(NHWC uint8, labels) batches -> contract Batches on the device, `prefetch` ahead.

    Host batches on cuda: pinned (the torch backend's DataLoader pins them in its pin-memory thread;
    anything else is pinned here), copied non-blocking on a side stream, and the consumer's stream waits
    on an event recorded after the copy, so copies overlap compute and the consumer never reads a
    half-copied batch; record_stream keeps the caching allocator from reusing a batch's memory while
    the consumer's stream may still read it. Batches already on the device (DALI's "mixed" outputs)
    pass through: torch.from_dlpack hands DALI torch's current stream, and DALI makes that stream wait
    for the decode (its __dlpack__(stream) contract), so they are ordered already. On the CPU the same
    code only views NHWC as NCHW: nothing to copy."""
    if device.type != "cuda":
        for imgs, tg in batches:
            yield nhwc_to_batch(imgs, tg)
        return
    stream = torch.cuda.Stream(device)
    staged: deque = deque()
    it = iter(batches)

    def stage() -> bool:
        try:
            imgs, tg = next(it)
        except StopIteration:
            return False
        if imgs.is_cuda:
            staged.append((imgs, tg.to(device, non_blocking=True), None))
            return True
        imgs, tg = (t if t.is_pinned() else t.pin_memory() for t in (imgs, tg))
        with torch.cuda.stream(stream):
            imgs = imgs.to(device, non_blocking=True)  # contiguous NHWC: one flat copy
            tg = tg.to(device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(stream)
        staged.append((imgs, tg, ev))
        return True

    while len(staged) < max(1, prefetch) and stage():
        pass
    while staged:
        imgs, tg, ev = staged.popleft()
        if ev is not None:
            consumer = torch.cuda.current_stream(device)
            consumer.wait_event(ev)
            imgs.record_stream(consumer)
            tg.record_stream(consumer)
        stage()
        yield nhwc_to_batch(imgs, tg)
