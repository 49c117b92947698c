"""The benchmark suite: loader-only, model-only, end-to-end and scaling throughput.

Every measurement excludes warm-up, repeats at least three times and reports min/median/max;
results carry the machine, versions and command (fastrsb.bench.report).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fastrsb.bench.report import paired_ratio, summarize
from fastrsb.config import load_config
from fastrsb.data import DECODER_KEY, parse_backend_spec
from fastrsb.data.base import default_workers
from fastrsb.dist import DistInfo, init_distributed

# forward + backward of ResNet-50 at 224 px, per image (3x the 4.1 GFLOP forward; multiply-add = 2 FLOP)
RN50_TRAIN_GFLOP_224 = 24.7
# dense bf16 tensor-core peaks (TFLOP/s) of GPUs we may meet, to report achieved fraction
GPU_PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


def _loader_cfg(data: str, backend: str, batch_size: int, res: int, workers: int, extra=()):
    return load_config(None, [f"data.path={data}", f"data.backend={backend}", f"data.batch_size={batch_size}",
                              f"data.train_res={res}", f"data.workers={workers}", *extra])


def _time_round_robin(factories: list[tuple[str, object]], repeats: int, epochs: int, sync) -> dict[str, list[float]]:
    """images/sec over blocks of `epochs` consecutive epochs, one block per candidate and round,
    rounds interleaved so drift on a shared machine hits all candidates alike. Each candidate
    first runs one epoch to warm up (compilation, page cache), and every block is preceded by an
    untimed lead-in epoch: a pipeline that decodes ahead while it waits its turn (DALI's queue)
    gets no head start, and the block measures the loader as a training run meets it, epoch
    boundaries included."""
    def run(factory, first: int, count: int) -> int:
        n = 0
        for e in range(first, first + count):
            for images in factory(e):
                n += images.shape[0]
        sync()
        return n

    for _, factory in factories:
        run(factory, 0, 1)
    out: dict[str, list[float]] = {name: [] for name, _ in factories}
    for r in range(repeats):
        first = 1 + r * (epochs + 1)
        for name, factory in factories:
            run(factory, first, 1)
            t0 = time.perf_counter()
            n = run(factory, first + 1, epochs)
            out[name].append(n / (time.perf_counter() - t0))
    return out


def bare_ffcv(data: str, batch_size: int, res: int, workers: int, device: torch.device):
    """A plain ffcv Loader doing the same work as the fastrsb ffcv backend (RRC + flip, uint8 out)."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor

    from dataprep.layout import open_dataset

    image = [RandomResizedCropRGBImageDecoder((res, res)), RandomHorizontalFlip(), ToTensor()]
    label = [IntDecoder(), ToTensor(), Squeeze()]
    if device.type == "cuda":
        image.append(ToDevice(device, non_blocking=True))
        label.append(ToDevice(device, non_blocking=True))
    loader = Loader(str(open_dataset(data).split("train").beton_path), batch_size=batch_size, num_workers=workers,
                    order=OrderOption.RANDOM, drop_last=True, pipelines={"image": image, "label": label})
    return lambda _i: (imgs for imgs, _ in loader)


def bare_dali(data: str, batch_size: int, res: int, workers: int, device: torch.device, prefetch: int):
    """A plain DALI pipeline doing the same work: its own webdataset reader, ROI decode, resize,
    flip, with the fastrsb backend's queue depth."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    from dataprep.layout import open_dataset

    split = open_dataset(data).split("train")
    on_gpu = device.type == "cuda"

    @pipeline_def(batch_size=batch_size, num_threads=workers, device_id=device.index if on_gpu else None, seed=0,
                  prefetch_queue_depth=prefetch)
    def pipe():
        jpg, cls = fn.readers.webdataset(paths=[str(split.root / s["tar"]) for s in split.shards],
                                         index_paths=[str(split.root / s["index"]) for s in split.shards],
                                         ext=["jpg", "cls"], random_shuffle=True, pad_last_batch=True, name="reader")
        img = fn.decoders.image_random_crop(jpg, device="mixed" if on_gpu else "cpu", output_type=types.RGB)
        dev = "gpu" if on_gpu else "cpu"
        img = fn.resize(img, device=dev, resize_x=res, resize_y=res, antialias=True)
        return fn.flip(img, device=dev, horizontal=fn.random.coin_flip()), cls

    p = pipe()
    p.build()
    it = DALIGenericIterator([p], ["images", "labels"], reader_name="reader", auto_reset=True,
                             last_batch_policy=LastBatchPolicy.DROP)
    return lambda _i: (out[0]["images"] for out in it)


def imagefolder_reference(src: str, batch_size: int, res: int, workers: int, device: torch.device):
    """What a user runs without fastrsb (timm's train.py, torchvision's reference scripts): ImageFolder
    over the original JPEG tree, PIL decode, RandomResizedCrop + flip in persistent DataLoader workers."""
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision import transforms as T

    root = Path(src) / "train" if (Path(src) / "train").is_dir() else Path(src)
    tf = T.Compose([T.RandomResizedCrop(res), T.RandomHorizontalFlip(), T.PILToTensor()])
    loader = DataLoader(datasets.ImageFolder(str(root), transform=tf), batch_size=batch_size, shuffle=True,
                        num_workers=workers, drop_last=True, persistent_workers=workers > 0,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
    return lambda _i: (images.to(device, non_blocking=True) for images, _ in loader)


IMAGEFOLDER = "torchvision ImageFolder (original JPEGs)"


def bench_loader(data: str, backends: list[str], batch_size: int, res: int, workers: int, repeats: int,
                 device: str = "auto", bare: bool = True, decode_limit: bool = True, epochs: int = 2,
                 reference: str | None = None, overrides=()) -> list[dict]:
    """images/sec of each backend (and the bare libraries) producing uint8 train batches on the device;
    with `reference` (the class-folder tree DATA was converted from), also torchvision's ImageFolder
    reading those originals, the loader fastrsb replaces."""
    from fastrsb.bench.decode import decode_throughput
    from fastrsb.data import create_loader

    dist = init_distributed(device, "--device")
    dev = dist.device
    workers = workers or default_workers(dist)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    factories, loaders = [], {}
    for backend in backends:  # BACKEND[:DECODE]: torch:device is data.torch_decode=device, ffcv:ffcv ffcv's decoders
        try:
            name, decoder = parse_backend_spec(backend)
        except ValueError as e:
            raise ValueError(f"--backends {e}") from None
        cfg = _loader_cfg(data, name, batch_size, res, workers, [*(f"data.{k}={v}" for k, v in decoder.items()),
                                                                *overrides])
        loader = loaders[backend] = create_loader(cfg, "train", dist)

        def epoch(i, loader=loader):
            loader.set_epoch(i)
            return (b.images for b in loader)

        factories.append((backend, epoch))
        if bare and backend in ("ffcv", "dali"):  # bare rows for the plain backends only
            factories.append((f"bare {backend}", bare_ffcv(data, batch_size, res, workers, dev) if backend == "ffcv"
                              else bare_dali(data, batch_size, res, workers, dev, cfg.data.prefetch)))
    if reference:
        factories.append((IMAGEFOLDER, imagefolder_reference(reference, batch_size, res, workers, dev)))
    timed = _time_round_robin(factories, repeats, epochs, sync)
    rows = [{"backend": name, **_summary(values), "per_round": [round(v, 1) for v in values]}
            for name, values in timed.items()]
    for r in rows:  # what decoded; fastrsb's ffcv decoder: the share of images decoded at each DCT scale, ...
        loader = loaders.get(r["backend"])
        if loader is not None:
            r["decoder"] = loader.decoder_name
        stats = getattr(loader, "decode_stats", None)
        if stats is not None:
            r["decode"] = stats.as_dict()
    if decode_limit:
        limit = summarize([decode_throughput(data, "train", workers) for _ in range(repeats)])
        rows.append({"backend": "decode limit (PIL/libjpeg-turbo, all workers)", "images_per_sec": limit["median"],
                     "min": limit["min"], "max": limit["max"], "repeats": limit["repeats"]})
        for r in rows:
            r["fraction_of_decode_limit"] = r["images_per_sec"] / limit["median"]
    for r in rows:
        name = r["backend"]
        if name in timed and "torch" in timed:
            r["vs_torch"] = paired_ratio(timed[name], timed["torch"])
        if name in timed and f"bare {name}" in timed:
            r["vs_bare_library"] = paired_ratio(timed[name], timed[f"bare {name}"])
        if name in timed and IMAGEFOLDER in timed:
            r["vs_imagefolder"] = paired_ratio(timed[name], timed[IMAGEFOLDER])
    return rows


def disk_read_bytes() -> int:
    """Bytes this process and its live children (DataLoader workers) have read from storage (/proc/PID/io
    read_bytes: what the page cache did not hold)."""
    total = 0
    me = os.getpid()
    for pid in [me, *_children(me)]:
        try:
            with open(f"/proc/{pid}/io") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))
        except (OSError, StopIteration):
            pass  # a child that ended meanwhile
    return total


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _peak_rss_mb() -> float:
    """The largest resident set of this process and of its children, in MB (VmHWM of each)."""
    peak = 0.0
    for pid in [os.getpid(), *_children(os.getpid())]:
        try:
            with open(f"/proc/{pid}/status") as f:
                peak = max(peak, next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024)
        except (OSError, StopIteration):
            pass
    return peak


def bench_cold_store(data: str, backends: list[str], orders: list[str], batch_size: int, res: int, workers: int,
                     repeats: int, device: str = "auto", overrides=()) -> list[dict]:
    """Each backend and order reading its train split from a cold store: the store's files are dropped from the page
    cache before every timed epoch, by every rank (StoreExtents.drop_all: each rank's own map of the .beton, ffcv's,
    is unmapped first, or the pages it maps would stay). Per epoch: images/sec, bytes read from storage
    (by this process and its workers) against the store's size, and the most of the store the page cache held at
    once (sampled every 10 ms); the same loader's warm epochs (store cached, after a warm-up epoch) are the throughput
    it is compared with. Under torchrun each rank measures its own process; rank 0 gets every rank's figures."""
    import torch.distributed as tdist

    from fastrsb.data import create_loader
    from fastrsb.data.page_cache import ResidentPeak

    dist = init_distributed(device, "--device")
    workers = workers or default_workers(dist)
    rows = []
    for spec in backends:
        name, decoder = parse_backend_spec(spec)
        for order in orders:
            cfg = _loader_cfg(data, name, batch_size, res, workers, [*(f"data.{k}={v}" for k, v in decoder.items()),
                                                                    f"data.order={order}", *overrides])
            loader = create_loader(cfg, "train", dist)
            paths = loader.store.paths
            store_bytes = sum(os.path.getsize(p) for p in paths)

            def epoch(e: int) -> tuple[float, int]:
                loader.set_epoch(e)
                if dist.distributed:
                    tdist.barrier()
                t0, n = time.perf_counter(), sum(b.images.shape[0] for b in loader)
                return n / (time.perf_counter() - t0), n

            epoch(0)  # warm-up: compilation, workers
            warm = [epoch(1 + r)[0] for r in range(repeats)]
            cold, reads, peaks = [], [], []
            for r in range(repeats):
                loader.store.drop_all()  # every rank: pages a rank's map of the .beton holds (ffcv) stay otherwise
                if dist.distributed:
                    tdist.barrier()
                read_before = disk_read_bytes()
                with ResidentPeak(paths, interval=0.01) as resident:
                    ips, _ = epoch(1 + repeats + r)
                cold.append(ips)
                reads.append(disk_read_bytes() - read_before)
                peaks.append(resident.peak)
            mine = {"rank": dist.rank, "cold_images_per_sec": float(np.median(cold)), "warm_images_per_sec":
                    float(np.median(warm)), "disk_read_bytes": int(np.median(reads)),
                    "peak_resident_store_bytes": int(max(peaks)), "peak_rss_mb": round(_peak_rss_mb(), 1)}
            ranks = [mine]
            if dist.distributed:
                ranks = [None] * dist.world_size
                tdist.all_gather_object(ranks, mine)
            total_read = sum(r["disk_read_bytes"] for r in ranks)
            s = summarize(cold)
            rows.append({"backend": spec, "order": order, "world_size": dist.world_size,
                         "images_per_sec": sum(r["cold_images_per_sec"] for r in ranks), "min": s["min"],
                         "max": s["max"], "repeats": s["repeats"],
                         "warm_images_per_sec": sum(r["warm_images_per_sec"] for r in ranks),
                         "cold_vs_warm": sum(r["cold_images_per_sec"] for r in ranks)
                         / sum(r["warm_images_per_sec"] for r in ranks),
                         "store_bytes": store_bytes, "disk_read_bytes": total_read,
                         "read_vs_store": total_read / store_bytes,
                         "peak_resident_store_bytes": ranks[0]["peak_resident_store_bytes"],
                         "peak_resident_vs_store": ranks[0]["peak_resident_store_bytes"] / store_bytes,
                         "per_rank": ranks, "blocks": loader.blocks._asdict() if loader.blocks else None,
                         "decoder": loader.decoder_name})
            loader.end_epoch()
            loader.store.drop_all()  # unmapped: this loader's map would keep the next one's store resident
    return rows


def _summary(values: list[float]) -> dict:
    s = summarize(values)
    return {"images_per_sec": s["median"], "min": s["min"], "max": s["max"], "repeats": s["repeats"]}


def _trainer(cfg_path: str | None, overrides: list[str], dist: DistInfo, run_dir: Path):
    from fastrsb.trainer import Trainer

    return Trainer(load_config(cfg_path, overrides), run_dir, dist)


def _measure_steps(trainer, steps: int, repeats: int) -> tuple[list[float], list[float]]:
    """One warm-up window, then `repeats` measured windows of `steps` train steps each, back to back out
    of one running loader (its pipeline stays full: refilling it is not billed as data stall); images/sec
    and data stall from the trainer's own log windows, one value per window."""
    windows = [w for w in trainer.run_steps(steps * (repeats + 1), log_interval=steps) if w.steps == steps][1:]
    return [w.images_per_sec for w in windows], [w.data_stall for w in windows]


def bench_model(model: str, res: int, batch_size: int, channels_last: bool, amp: str, compile_: bool,
                steps: int, repeats: int, device: str = "auto") -> dict:
    """Train-step images/sec on synthetic device batches: the ceiling any data path can reach."""
    dist = init_distributed(device, "--device")
    overrides = [f"model.name={model}", f"model.channels_last={str(channels_last).lower()}",
                 f"model.compile={str(compile_).lower()}", f"train.amp={amp}", f"train.device={device}",
                 "data.backend=synthetic", f"data.batch_size={batch_size}", f"data.train_res={res}",
                 f"data.val_res={res}", f"data.synthetic_num_samples={batch_size * steps * (repeats + 1) * dist.world_size}",
                 "optim.name=sgd", "optim.lr=0.01", "schedule.warmup_epochs=0"]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _trainer(None, overrides, dist, Path(tmp))
        ips, _ = _measure_steps(trainer, steps, repeats)
    row = {"model": model, "res": res, "batch_size": batch_size, "channels_last": channels_last, "amp": amp,
           "compile": compile_, "device": str(dist.device), **_summary(ips)}
    if dist.device.type == "cuda":
        gflop = RN50_TRAIN_GFLOP_224 * (res / 224) ** 2 if model == "resnet50" else None
        name = torch.cuda.get_device_name(dist.device)
        peak = next((v for k, v in GPU_PEAK_BF16_TFLOPS.items() if k in name), None)
        if gflop:
            row["achieved_tflops"] = row["images_per_sec"] * gflop / 1000
            if peak:
                row["fraction_of_peak_bf16"] = row["achieved_tflops"] / peak
    return row


def bench_e2e(config: str, data: str, backend: str, steps: int, repeats: int, overrides: list[str],
              device: str = "auto") -> dict:
    """The real loader + augment + train step: images/sec (global) and data stall."""
    dist = init_distributed(device, "--device")
    ovr = [f"data.path={data}", f"data.backend={backend}", f"train.device={device}", *overrides]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _trainer(config, ovr, dist, Path(tmp))
        # every window inside one epoch: steady state, no epoch-boundary refill in a measurement
        steps = min(steps, trainer.steps_per_epoch // (repeats + 1))
        if steps == 0:
            raise ValueError(f"an epoch has {trainer.steps_per_epoch} steps: too few for --repeats {repeats} "
                             "windows after a warm-up one (lower --repeats or data.batch_size)")
        ips, stall = _measure_steps(trainer, steps, repeats)
        decode = getattr(trainer.cfg.data, DECODER_KEY[backend]) if backend in DECODER_KEY else None
        decoder = trainer.train_loader.decoder_name
        batch_size = trainer.cfg.data.batch_size
    if not dist.is_main:  # rank 0 logs the global figures
        return {}
    s = _summary(ips)
    return {"backend": backend, **({"decode": decode} if decode else {}), "decoder": decoder, "config": Path(config).name,
            "world_size": dist.world_size, "batch_size": batch_size, "steps": steps, **s,
            "data_stall": float(np.median(stall)), "data_stall_max": float(max(stall)), "device": str(dist.device)}


def bench_scaling(config: str, data: str, backend: str, nprocs: list[int], steps: int, repeats: int,
                  overrides: list[str], device: str) -> list[dict]:
    """bench e2e at each process count through torchrun (gloo on CPU, nccl on GPUs)."""
    rows = []
    for k in nprocs:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "e2e.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={k}",
                   "-m", "fastrsb", "bench", "e2e", "--config", config, "--data", data, "--backend", backend,
                   "--steps", str(steps), "--repeats", str(repeats), "--device", device, "--json", str(out),
                   *overrides]
            r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // k))})
            if r.returncode != 0:
                raise RuntimeError(f"bench e2e with {k} process(es) failed:\n{r.stderr[-3000:]}")
            row = json.loads(out.read_text())["results"][0]
        rows.append({"processes": k, **row})
    base = rows[0]["images_per_sec"] / rows[0]["processes"]
    for r in rows:
        r["scaling_efficiency"] = r["images_per_sec"] / (base * r["processes"])
    return rows
