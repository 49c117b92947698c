"""Batched device RandAugment vs timm's per-image PIL RandAugment on the same images.

    python -m benchmarks.bench_randaugment --device cpu --json benchmarks/results/cpu-2core/randaugment.json
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from benchmarks.imagenet_like import _photos
from fastrsb.augment.randaugment import IMAGENET_FILL, RandAugment
from fastrsb.bench.report import print_table, summarize, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="rand-m9-mstd0.5-inc1")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from timm.data.auto_augment import rand_augment_transform

    rng = np.random.default_rng(0)
    photos = _photos()
    pil = []
    for i in range(args.batch_size):
        p = photos[i % len(photos)]
        y, x = rng.integers(0, p.shape[0] - 200), rng.integers(0, p.shape[1] - 200)
        pil.append(Image.fromarray(p[y:y + 200, x:x + 200]).resize((args.res, args.res)))
    dev = torch.device(args.device)
    batch = torch.from_numpy(np.stack([np.asarray(im) for im in pil])).permute(0, 3, 1, 2).to(dev)
    batch = batch.contiguous(memory_format=torch.channels_last)
    ours = RandAugment.from_config(args.config, seed=0)
    timm_ra = rand_augment_transform(args.config, {"translate_const": int(args.res * 0.45), "img_mean": IMAGENET_FILL,
                                                   "interpolation": Image.BILINEAR})

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def time_ours() -> float:
        sync()
        t0 = time.perf_counter()
        ours(batch)
        sync()
        return args.batch_size / (time.perf_counter() - t0)

    def time_timm() -> float:
        t0 = time.perf_counter()
        for im in pil:
            timm_ra(im)
        return args.batch_size / (time.perf_counter() - t0)

    rows = []
    for name, fn in (("fastrsb batched (" + dev.type + ")", time_ours), ("timm PIL per image (cpu, 1 process)", time_timm)):
        fn()  # warm-up
        s = summarize([fn() for _ in range(args.repeats)])
        rows.append({"implementation": name, "images_per_sec": s["median"], "min": s["min"], "max": s["max"],
                     "repeats": s["repeats"]})
    rows[0]["speedup_vs_timm"] = rows[0]["images_per_sec"] / rows[1]["images_per_sec"]
    print_table(rows, ["implementation", "images_per_sec", "min", "max", "speedup_vs_timm"])
    if args.json:
        write_result(args.json, "randaugment", rows, {"settings": {"config": args.config, "batch_size": args.batch_size,
                                                                   "res": args.res, "torch_threads": torch.get_num_threads()}})


if __name__ == "__main__":
    main()
