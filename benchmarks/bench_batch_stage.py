"""What the batch stage (RandAugment's torch ops + normalize + Mixup/CutMix) costs the host per batch.

    python -m benchmarks.bench_batch_stage --json benchmarks/results/cpu-2core/batch_stage.json

Two figures per setting, on the torch ops (the cuda path):
- host->device copies and syncs (read-backs, data-dependent-shape ops, host tensors in device ops) per
  batch, counted by fastrsb.sync_audit with the batch standing in for device memory;
- host CPU time per batch with images so small (4 px) that the ops' own arithmetic is negligible: the
  Python, draw and launch overhead a GPU would see, which the host must keep below the GPU's step time.
  (On this CPU the real 224-px time is dominated by the arithmetic a GPU does instead; --res shows it.)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastrsb.augment.batch import BatchAugment
from fastrsb.bench.report import print_table, write_result
from fastrsb.config import AugmentConfig
from fastrsb.sync_audit import SyncAudit, to_device_memory


def stage(config: str, mix_mode: str) -> BatchAugment:
    cfg = AugmentConfig(randaugment=config, randaugment_impl="torch", mixup_alpha=0.1, cutmix_alpha=1.0,
                        mix_mode=mix_mode)  # the torch ops: what runs on cuda
    return BatchAugment(cfg, num_classes=1000, label_smoothing=0.1, dtype=torch.bfloat16, train=True,
                        device=torch.device("cpu"), seed=0)


def batch(n: int, res: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, res, res, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)
    return images, torch.randint(0, 1000, (n,), generator=g)


def audit_counts(config: str, mix_mode: str, n: int, res: int, batches: int) -> dict:
    aug = stage(config, mix_mode)
    images, targets = (to_device_memory(t) for t in batch(n, res))
    with SyncAudit():  # first call: device constants
        aug(images, targets)
    with SyncAudit() as a:
        for _ in range(batches):
            aug(images, targets)
    return {"h2d_copies_per_batch": len(a.host_to_device_copies) / batches,
            "read_backs_per_batch": len(a.read_backs) / batches,
            "data_dependent_ops_per_batch": len(a.data_dependent) / batches,
            "host_tensors_in_device_ops_per_batch": len(a.host_in_device_op) / batches}


def host_ms(config: str, mix_mode: str, n: int, res: int, batches: int, repeats: int) -> list[float]:
    aug = stage(config, mix_mode)
    images, targets = batch(n, res)
    aug(images, targets)
    out = []
    for _ in range(repeats):
        t0 = time.process_time()
        for _ in range(batches):
            aug(images, targets)
        out.append(1000 * (time.process_time() - t0) / batches)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="rand-m7-mstd0.5-inc1")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--res", type=int, default=4, help="image side for the host-time figure (tiny: overhead only)")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)  # host time of one thread, as the training process's main thread spends it
    rows = []
    for mode in ("batch", "elem"):
        ms = host_ms(args.config, mode, args.batch_size, args.res, args.batches, args.repeats)
        rows.append({"mix_mode": mode, **audit_counts(args.config, mode, args.batch_size, 224, 2),
                     "host_ms_per_batch": statistics.median(ms), "min": min(ms), "max": max(ms)})
    print_table(rows, list(rows[0]))
    if args.json:
        write_result(args.json, "batch_stage", rows, {"settings": {
            "config": args.config, "batch_size": args.batch_size, "host_time_res": args.res, "audit_res": 224,
            "batches": args.batches, "repeats": args.repeats, "threads": 1}})


if __name__ == "__main__":
    main()
