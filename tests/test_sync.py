"""The GPU path never makes the host wait between log intervals.

On this CPU-only machine the batch stands in for device memory (fastrsb.sync_audit.DeviceTensor) and
SyncAudit records every read-back, data-dependent-shape op, host tensor used with a device tensor and
host->device copy. With a GPU the same tests run on cuda, where torch.cuda.set_sync_debug_mode("error")
also raises at every synchronizing call torch knows of.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastrsb.augment import BatchAugment
from fastrsb.augment.randaugment import RAND_INCREASING_TRANSFORMS, RAND_TRANSFORMS, apply_op
from fastrsb.config import AugmentConfig, load_config
from fastrsb.dist import DistInfo
from fastrsb.sync_audit import SyncAudit, to_device_memory

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def on_device(t: torch.Tensor, device: str) -> torch.Tensor:
    return to_device_memory(t) if device == "cpu" else t.to(device)


def audit(device: str) -> SyncAudit:
    return SyncAudit(emulated=device == "cpu")


def device_batch(device: str, n=32, res=24, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, res, res, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)
    return on_device(images, device), on_device(torch.randint(0, classes, (n,), generator=g), device)


# ------------------------------------------------------------------ the audit itself can fail
def test_audit_sees_each_kind_of_sync():
    """What the stage used to do (bincount on the device, per-op parameter copies, a cached host
    constant, a read-back) is caught, each under its own heading."""
    x = to_device_memory(torch.arange(12, dtype=torch.uint8).view(3, 4))
    with SyncAudit() as a:
        torch.bincount(x.view(-1))
        x[x > 3]
        torch.tensor([1.0, 2.0]).to(x.device)
        x + torch.ones(4, dtype=torch.uint8)  # a host constant in a device op: a device mismatch on a GPU
        x.sum().item()
        if x.any():
            pass
        x * torch.tensor(2, dtype=torch.uint8)  # a 0-dim host tensor is a scalar: allowed
        torch.zeros(3, device=x.device) + x.float().mean()  # a factory on the device: no copy
    assert a.data_dependent == ["bincount", "__getitem__ with a boolean mask"]
    assert [c[0] for c in a.host_to_device_copies] == ["to"]
    assert [h[0] for h in a.host_in_device_op] == ["add"]
    assert a.read_backs == ["item", "__bool__"]


# ------------------------------------------------------------------ the batch stage
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_batch_stage_is_one_copy_and_no_sync(device, mode):
    """RandAugment's torch ops (the cuda path) + normalize + Mixup/CutMix: each batch's decisions travel
    in exactly one host->device copy, and nothing reads the device back. Three layers over 64 images
    draw every op of the policy."""
    cfg = AugmentConfig(randaugment="rand-m9-n3-mstd0.5-inc1", randaugment_impl="torch", mixup_alpha=0.8,
                        cutmix_alpha=1.0, mix_mode=mode)
    aug = BatchAugment(cfg, num_classes=10, label_smoothing=0.1, dtype=torch.bfloat16, train=True,
                       device=torch.device(device), seed=1)
    images, targets = device_batch(device, n=64)
    with audit(device) as warm_up:  # device constants (mean, std, fill) are made once, here
        aug(images, targets)
    assert len(warm_up.host_to_device_copies) == 1 + 3 and warm_up.syncs == []
    with audit(device) as a:
        for _ in range(3):
            x, y = aug(images, targets)
    assert a.syncs == []
    assert [c[0] for c in a.host_to_device_copies] == ["copy_"] * 3
    assert x.device == images.device and y.shape == (64, 10)
    d = aug.randaugment.draw(64)  # the generator moved on: draw again to see the ops a batch gets
    assert len(set((d["op"][d["apply"]]).tolist())) >= 12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(set(RAND_TRANSFORMS + RAND_INCREASING_TRANSFORMS)))
def test_every_torch_op_runs_without_sync(device, name):
    images, _ = device_batch(device, n=6, res=17)
    with audit(device) as a:
        apply_op(images, name, 7, impl="torch")
    assert a.syncs == []


# ------------------------------------------------------------------ the training step
def _trainer(tmp_path, device: str, *extra):
    from fastrsb.trainer import Trainer

    cfg = load_config(CONFIGS / "rsb_a1.yaml", [
        "model.name=resnet10t", "data.backend=synthetic", "data.batch_size=8", "data.train_res=32", "data.val_res=32",
        "data.synthetic_num_samples=96", "data.synthetic_num_classes=10", "train.log_interval=3",
        "augment.randaugment_impl=torch", "ema.enabled=true", "optim.clip_grad=1.0", f"train.device={device}",
        "train.checkpoint_every_minutes=1000", *extra])
    tr = Trainer(cfg, tmp_path / "run", DistInfo(device=torch.device(device)))
    if device == "cpu":
        to_device_memory(tr.raw_model)
        to_device_memory(tr.ema.module)
    return tr


def _audited_epoch(tr, device: str, steps: int) -> tuple[SyncAudit, list[int]]:
    """Run `steps` steps of the real loop under an audit; log intervals (the intended sync) are not
    audited. Returns the audit and the copies each batch-stage call made."""
    a = audit(device)
    close, augment = tr._close, tr.train_aug.__call__
    per_batch: list[int] = []

    def paused_close(*args, **kw):
        with a.paused():
            return close(*args, **kw)

    def counted_augment(*args, **kw):
        before = len(a.host_to_device_copies)
        out = augment(*args, **kw)
        per_batch.append(len(a.host_to_device_copies) - before)
        return out

    tr._close, tr.train_aug = paused_close, counted_augment
    with a:
        tr.run_steps(steps)
    return a, per_batch


@pytest.mark.parametrize("device", DEVICES)
def test_train_steps_between_log_intervals_never_wait(tmp_path, device):
    """The RSB A1 recipe's step (RandAugment, Mixup/CutMix, BCE, LAMB, grad clipping, EMA) in bf16, the
    default on cuda: across two log intervals, no read-back, no data-dependent op, no host tensor in a
    device op; one host->device copy per batch in the batch stage, and outside it at most one when the
    loader's epoch starts (the synthetic loader's index list)."""
    tr = _trainer(tmp_path, device, "train.amp=bf16")
    _audited_epoch(tr, device, 3)  # warm-up window: optimizer state, device constants
    a, per_batch = _audited_epoch(tr, device, 6)
    assert a.syncs == [], a.where()
    assert per_batch == [1] * 6
    assert len(a.host_to_device_copies) - sum(per_batch) <= 1  # outside the batch stage: the epoch's start
    assert tr.step == 9


def test_fp16_grad_scaler_reads_back_every_step(tmp_path):
    """What the docs say about train.amp=fp16: the GradScaler checks for infs on the host at each step."""
    tr = _trainer(tmp_path, "cpu", "train.amp=fp16")
    _audited_epoch(tr, "cpu", 3)
    a, _ = _audited_epoch(tr, "cpu", 3)
    assert a.read_backs.count("item") >= 3
