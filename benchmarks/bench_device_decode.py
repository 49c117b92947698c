"""Where data.torch_decode=device spends the host's time, per batch: reading the JPEG bytes, the crop program, the
decode call (which reads the bytes again itself), the batched crop + resize (fastrsb.data.device_resize), the
resize's dispatch alone (on meta tensors: what the host spends launching it on a GPU), and how many aten ops it
dispatches (views included). On cuda it also counts the host-device syncs of a whole epoch
(torch.cuda.set_sync_debug_mode("warn")); on the CPU the decode and resize times are the work itself.

    python -m benchmarks.bench_device_decode --data DATA --batch-size 256 --res 224 --batches 10 --json OUT.json
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastrsb.bench.report import summarize, write_result
from fastrsb.config import load_config
from fastrsb.data import create_loader
from fastrsb.data.crops import crop_boxes
from fastrsb.data.device_resize import resize_batch, resize_params
from fastrsb.dist import init_distributed


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dist = init_distributed(args.device, "--device")
    cfg = load_config(None, [f"data.path={args.data}", "data.backend=torch", "data.torch_decode=device",
                             f"data.batch_size={args.batch_size}", f"data.train_res={args.res}"])
    loader = create_loader(cfg, "train", dist)
    plan = loader.plan()
    cuda = dist.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times: dict[str, list[float]] = {"read": [], "crop_program": [], "decode": [], "resize": [], "resize_dispatch": []}
    ops, jpeg_bytes = [], []
    n = min(args.batches + 1, len(plan.indices) // args.batch_size)
    for b in range(n):
        sel = slice(b * args.batch_size, (b + 1) * args.batch_size)
        idx = plan.indices[sel]
        sync()
        t0 = time.perf_counter()
        jpeg_bytes.append(sum(len(loader.shards.reader.read(int(i))) for i in idx) / len(idx))
        t1 = time.perf_counter()
        sizes = loader.shards.sizes[idx]
        boxes, flips = crop_boxes(sizes, plan.keys[sel], cfg.data.scale, cfg.data.ratio)
        params = loader.to_device(resize_params(sizes, boxes, flips, args.res, cfg.data.crop_pct))
        t2 = time.perf_counter()
        images, _ = loader.decode(idx)
        t3 = time.perf_counter()
        counter = _CountOps()
        with counter:
            resize_batch(images, params, args.res, cfg.data.interpolation, loader.matmul_dtype)
        t4 = time.perf_counter()
        sync()
        # the same resize on meta tensors: torch's dispatch alone, the host time a GPU would see on its launch path
        meta = [torch.empty(im.shape, dtype=im.dtype, device="meta") for im in images]
        t5 = time.perf_counter()
        resize_batch(meta, params.to("meta"), args.res, cfg.data.interpolation, loader.matmul_dtype)
        t6 = time.perf_counter()
        if b == 0:
            continue  # warm-up
        for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t6 - t5)):
            times[k].append(v)
        ops.append(counter.ops)
    row = {"device": str(dist.device), "batch_size": args.batch_size, "res": args.res, "batches": len(ops),
           "mean_jpeg_kb": round(float(np.mean(jpeg_bytes)) / 1024, 1),
           "resize_aten_ops_per_batch": int(np.median(ops)),
           **{f"host_ms_{k}": summarize([1e3 * x for x in v]) for k, v in times.items()}}
    if cuda:  # syncs of a whole loader epoch: what decode_jpeg and the loader force
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in loader:
                pass
        torch.cuda.set_sync_debug_mode(0)
        syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
        row["syncs_per_batch"] = len(syncs) / max(1, len(loader))
        row["sync_messages"] = sorted(set(syncs))[:10]
    print(row)
    if args.json:
        write_result(args.json, "device_decode_host_time", [row], {"settings": vars(args)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
