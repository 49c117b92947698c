"""Conversion throughput: ImageNet-like JPEGs (~500x375, q90) -> FFCV + DALI at max resolution 512, from class
folders and from the same images re-packed as the Hub's parquet shards and as WebDataset tars.

    python -m benchmarks.bench_convert --images 1200 --workers 1,2 --routes folder,parquet,wds \\
        --json benchmarks/results/cpu-2core/convert.json

Reports images/sec and images/sec per worker for each route and worker count, images per CPU-second (this
process and its worker processes, so other work on a shared machine does not count), and the share
of images stored as they are (the rest re-encoded), timing `convert()` in process after ffcv is
imported (its ~6 s numba import is start-up, not conversion). `--modes as-is,reencode` also times `--reencode`
(every image decoded and re-encoded, the converter's behaviour before pass-through). `--breakdown` adds where the
time goes, per image on one core: reading the records, the decode check (or decode + resize + re-encode) of each
kind of image, and the .beton writer (from the converter's own log line).
"""
from __future__ import annotations

import argparse
import re
import resource
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.imagenet_like import make_imagenet_like, shuffled_records, write_parquet_shards, write_wds_shards
from dataprep.convert import Settings, convert
from fastrsb.bench.report import plot_bars, print_table, summarize, write_result

ROUTES = ("folder", "parquet", "wds")


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the worker pools, ffcv's writer)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def _sources(tree: Path, tmp: Path, routes: list[str]) -> dict[str, Path]:
    """route -> its source: the tree itself, or the same images re-packed (shuffled, 4 files a split)."""
    records = shuffled_records(tree) if set(routes) - {"folder"} else {}
    classes = sorted(d.name for d in (tree / "train").iterdir())
    sources = {"folder": tree}
    if "parquet" in routes:
        write_parquet_shards(tmp / "parquet", records, classes, files_per_split=4)
        sources["parquet"] = tmp / "parquet"
    if "wds" in routes:
        write_wds_shards(tmp / "wds", records, files_per_split=4)
        sources["wds"] = tmp / "wds"
    return {route: sources[route] for route in routes}


def _breakdown(sources: dict[str, Path], max_resolution: int, beton_seconds: dict[str, float], n: int) -> list[dict]:
    """Milliseconds per image on one core for each stage, measured in this process."""
    from dataprep.images import prepare_image, read_source, reencode_reason
    from dataprep.sources import scan_source

    rows = []
    for route, src in sources.items():
        source = scan_source(src)
        records = [r for rs in source.splits.values() for r in rs]
        t0 = time.perf_counter()
        payloads = [read_source(p) for p in source.payloads(records)]
        rows.append({"stage": f"read the records ({route})", "ms_per_image": 1e3 * (time.perf_counter() - t0) / n})
    kinds: dict[str, list[bytes]] = {}
    for data in payloads:
        kinds.setdefault(reencode_reason(data, max_resolution) or "stored as is", []).append(data)
    for kind, items in sorted(kinds.items()):
        t0 = time.perf_counter()
        for data in items:
            prepare_image(data, max_resolution, 90)
        rows.append({"stage": f"prepare: {kind}", "images": len(items),
                     "ms_per_image": 1e3 * (time.perf_counter() - t0) / len(items)})
    for route, seconds in beton_seconds.items():
        rows.append({"stage": f"ffcv .beton writer ({route}, 1 worker)", "ms_per_image": 1e3 * seconds / n})
    return rows


def _rerun(src: Path, out: Path, settings: Settings) -> dict:
    """A rerun of a finished conversion: nothing to convert, every finished output hashed against its sidecar."""
    convert(src, out, settings, workers=1, progress=False, log=lambda s: None)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and ".work" not in p.parts)
    t0 = time.perf_counter()
    convert(src, out, settings, workers=1, progress=False, log=lambda s: None)
    seconds = time.perf_counter() - t0
    return {"output_mb": size / 1e6, "seconds": seconds, "mb_per_sec": size / 1e6 / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-resolution", type=int, default=512)
    ap.add_argument("--formats", default="ffcv,dali")
    ap.add_argument("--modes", default="as-is", help="as-is (default conversion) and/or reencode (--reencode)")
    ap.add_argument("--routes", default=",".join(ROUTES), help="folder (class folders), parquet, wds (the same images "
                                                               "re-packed)")
    ap.add_argument("--breakdown", action="store_true", help="also time each stage per image on one core")
    ap.add_argument("--src", default=None, help="existing image tree with train/ (default: generate ImageNet-like images)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()

    import ffcv.writer  # noqa: F401  (start-up cost, excluded from the timings)

    tmp = Path(tempfile.mkdtemp(prefix="bench_convert_"))
    tree = Path(args.src) if args.src else make_imagenet_like(tmp / "src", args.images)
    n = sum(1 for p in tree.rglob("*") if p.is_file())
    sources = _sources(tree, tmp, args.routes.split(","))
    rows, beton_seconds = [], {}
    for mode in args.modes.split(","):
        for route, src in sources.items():
            for w in [int(x) for x in args.workers.split(",")]:
                manifests, per_cpu_second, logs = [], [], []

                def once() -> float:
                    out = tmp / "out"
                    shutil.rmtree(out, ignore_errors=True)
                    cpu0 = _cpu_seconds()
                    t0 = time.perf_counter()
                    settings = Settings(formats=args.formats.split(","), max_resolution=args.max_resolution,
                                        reencode=mode == "reencode")
                    manifests.append(convert(src, out, settings, workers=w, progress=False, log=logs.append))
                    wall = time.perf_counter() - t0
                    per_cpu_second.append(n / (_cpu_seconds() - cpu0))
                    return n / wall

                runs = [once() for _ in range(args.repeats)]
                if w == 1 and mode == "as-is":  # the writer's own timing line: "[convert] train: train.beton done in 1.2s"
                    beton_seconds[route] = sum(float(m.group(1)) for line in logs
                                               if (m := re.search(r"\.beton done in ([0-9.]+)s", line))) / args.repeats
                s = summarize(runs)
                splits = manifests[-1]["splits"].values()
                as_is = sum(v["stored_as_is"] for v in splits)
                reasons: dict[str, int] = {}
                for v in splits:
                    for reason, count in v["reencode_reasons"].items():
                        reasons[reason] = reasons.get(reason, 0) + count
                rows.append({"route": route, "mode": mode, "workers": w, "images": n, "images_per_sec": s["median"],
                             "images_per_sec_per_worker": s["median"] / w, "min": s["min"], "max": s["max"],
                             "repeats": s["repeats"], "images_per_cpu_second": summarize(per_cpu_second)["median"],
                             "stored_as_is_fraction": as_is / n, "reencode_reasons": reasons})
    base = rows[0]["images_per_sec"]
    for r in rows:
        r["speedup_vs_first"] = r["images_per_sec"] / base
    print_table(rows, ["route", "mode", "workers", "images", "images_per_sec", "images_per_sec_per_worker", "min", "max",
                       "images_per_cpu_second", "stored_as_is_fraction", "speedup_vs_first"])
    extra = {"settings": {"max_resolution": args.max_resolution, "formats": args.formats, "jpeg_quality": 90,
                          "source": "benchmarks/imagenet_like.py" if not args.src else args.src,
                          "hub_layouts": "benchmarks/imagenet_like.py: write_parquet_shards (row groups of 100), "
                                         "write_wds_shards; 4 files a split, shuffled"}}
    if args.breakdown:
        extra["breakdown"] = _breakdown(sources, args.max_resolution, beton_seconds, n)
        print_table(extra["breakdown"], ["stage", "images", "ms_per_image"])
        extra["rerun"] = _rerun(next(iter(sources.values())), tmp / "rerun", Settings(formats=args.formats.split(","),
                                max_resolution=args.max_resolution))
        print(f"rerun of a finished conversion: {extra['rerun']}")
    if args.json:
        write_result(args.json, "convert", rows, extra)
    if args.plot:
        plot_bars(args.plot, [f"{r['route']}, {r['mode']}, {r['workers']} worker(s)" for r in rows],
                  [r["images_per_sec"] for r in rows], [(r["min"], r["max"]) for r in rows], "images/sec",
                  f"fastrsb convert, {args.formats}, max res {args.max_resolution}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
