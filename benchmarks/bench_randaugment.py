"""Batched device RandAugment vs timm's per-image PIL RandAugment on the same images.

    python -m benchmarks.bench_randaugment --device cpu --json benchmarks/results/cpu-2core/randaugment.json

Rows: fastrsb's RandAugment on `--device` with torch's intra-op thread count (all cores on a CPU) in
each implementation that runs there (CPU: the numba kernels it uses by default, and the torch ops
that run on cuda; cuda: the torch ops), timm's PIL RandAugment in one process (what one DataLoader
worker does), and timm in one process per core (what a DataLoader with that many workers could do at
best). Every round times each row once, back to back, so load on a shared machine hits all rows alike;
rates are medians over rounds, ratios medians of each round's ratio. The default policy is RSB A1/A2's; with `rand-m9-mstd0.5-inc1`
timm itself fails on Pillow >= 10 whenever the noisy magnitude reaches 10 (PosterizeIncreasing asks
for 0 bits, which Pillow refuses).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import time

import numpy as np
import torch
from PIL import Image

from benchmarks.imagenet_like import _photos
from fastrsb.augment.op_table import IMAGENET_FILL
from fastrsb.augment.randaugment import RandAugment
from fastrsb.bench.report import paired_ratio, print_table, summarize, write_result
from fastrsb.augment.randaugment import resolve_randaugment_impl


def _images(n: int, res: int) -> list[Image.Image]:
    """n crops of real photographs resized to res x res, the same for every caller."""
    rng = np.random.default_rng(0)
    photos, out = _photos(), []
    for i in range(n):
        p = photos[i % len(photos)]
        y, x = rng.integers(0, p.shape[0] - 200), rng.integers(0, p.shape[1] - 200)
        out.append(Image.fromarray(p[y:y + 200, x:x + 200]).resize((res, res)))
    return out


def _timm_transform(config: str, res: int):
    from timm.data.auto_augment import rand_augment_transform

    return rand_augment_transform(config, {"translate_const": int(res * 0.45), "img_mean": IMAGENET_FILL,
                                           "interpolation": Image.BILINEAR})


def _timm_rate(config: str, res: int, batch_size: int, batches: int, seed: int) -> float:
    """images/sec of timm's RandAugment over `batches` passes through a batch of PIL images."""
    random.seed(seed)
    pil, ra = _images(batch_size, res), _timm_transform(config, res)
    for im in pil:  # warm-up
        ra(im)
    t0 = time.perf_counter()
    for _ in range(batches):
        for im in pil:
            ra(im)
    return batches * batch_size / (time.perf_counter() - t0)


def _timm_worker(args: tuple) -> float:
    torch.set_num_threads(1)
    return _timm_rate(*args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="rand-m7-mstd0.5-inc1")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", type=int, default=10, help="batches per measurement")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    pil = _images(args.batch_size, args.res)
    batch = torch.from_numpy(np.stack([np.asarray(im) for im in pil])).permute(0, 3, 1, 2).to(dev)
    batch = batch.contiguous(memory_format=torch.channels_last)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def timer(impl: str):
        ours = RandAugment.from_config(args.config, seed=0, impl=impl, device=dev)

        def time_ours() -> float:
            sync()
            t0 = time.perf_counter()
            for _ in range(args.batches):
                ours(batch)
            sync()
            return args.batches * args.batch_size / (time.perf_counter() - t0)
        return time_ours

    procs = os.cpu_count() or 1
    timm_args = (args.config, args.res, args.batch_size, args.batches)

    def time_timm_one() -> float:
        return _timm_rate(*timm_args, seed=random.randrange(1 << 30))

    # one process per core, run concurrently: the sum of their rates. The pool is started once (spawned,
    # not forked: a fork per round would leave this process's buffers copy-on-write, and the page faults
    # of its next writes would land in the next row's timing)
    pool = mp.get_context("spawn").Pool(procs)

    def time_timm_all() -> float:
        return sum(pool.map(_timm_worker, [timm_args + (random.randrange(1 << 30),) for _ in range(procs)]))

    random.seed(0)
    impls = ["numba", "torch"] if resolve_randaugment_impl("auto", dev.type) == "numba" else ["torch"]
    threads = torch.get_num_threads()
    candidates = [(f"fastrsb {impl} ({dev.type}, {threads} threads)", timer(impl)) for impl in impls]
    candidates += [("timm PIL per image (1 process)", time_timm_one),
                   (f"timm PIL per image ({procs} processes)", time_timm_all)]
    with pool:
        for _, fn in candidates:
            fn()  # warm-up (the numba kernels compile or load from numba's cache here)
        rates: list[list[float]] = [[] for _ in candidates]
        for _ in range(args.repeats):
            for measured, (_, fn) in zip(rates, candidates):
                measured.append(fn())
    rows = []
    for (name, _), measured in zip(candidates, rates):
        s = summarize(measured)
        rows.append({"implementation": name, "images_per_sec": s["median"], "min": s["min"], "max": s["max"],
                     "repeats": s["repeats"], "per_round": measured})
    timm_one, timm_all = rates[-2], rates[-1]
    for row, measured in zip(rows, rates):
        row["vs_timm_1_process"] = paired_ratio(measured, timm_one)
        row[f"vs_timm_{procs}_processes"] = paired_ratio(measured, timm_all)
    print_table(rows, ["implementation", "images_per_sec", "min", "max", "vs_timm_1_process", f"vs_timm_{procs}_processes"])
    if args.json:
        write_result(args.json, "randaugment", rows, {"settings": {
            "config": args.config, "batch_size": args.batch_size, "res": args.res, "batches_per_repeat": args.batches,
            "torch_threads": threads, "timm_processes": procs}})


if __name__ == "__main__":
    main()
