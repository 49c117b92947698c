"""Conversion throughput: ImageNet-like JPEGs (~500x375, q90) -> FFCV + DALI at max resolution 512.

    python -m benchmarks.bench_convert --images 1200 --workers 1,2 --json benchmarks/results/cpu-2core/convert.json

Reports images/sec and images/sec per worker for each worker count, images per CPU-second (this
process and its worker processes, so other work on a shared machine does not count), and the share
of images stored as they are (the rest re-encoded), timing `convert()` in process after ffcv is
imported (its ~6 s numba import is start-up, not conversion). `--modes as-is,reencode` also times `--reencode`
(every image decoded and re-encoded, the converter's behaviour before pass-through).
"""
from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.imagenet_like import make_imagenet_like
from dataprep.convert import Settings, convert
from fastrsb.bench.report import plot_bars, print_table, summarize, write_result


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the worker pools, ffcv's writer)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-resolution", type=int, default=512)
    ap.add_argument("--formats", default="ffcv,dali")
    ap.add_argument("--modes", default="as-is,reencode", help="as-is (default conversion) and/or reencode (--reencode)")
    ap.add_argument("--src", default=None, help="existing image tree (default: generate ImageNet-like images)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()

    import ffcv.writer  # noqa: F401  (start-up cost, excluded from the timings)

    tmp = Path(tempfile.mkdtemp(prefix="bench_convert_"))
    src = Path(args.src) if args.src else make_imagenet_like(tmp / "src", args.images)
    n = sum(1 for p in src.rglob("*") if p.is_file())
    rows = []
    for mode in args.modes.split(","):
        for w in [int(x) for x in args.workers.split(",")]:
            manifests, per_cpu_second = [], []

            def once() -> float:
                out = tmp / "out"
                shutil.rmtree(out, ignore_errors=True)
                cpu0 = _cpu_seconds()
                t0 = time.perf_counter()
                settings = Settings(formats=args.formats.split(","), max_resolution=args.max_resolution,
                                    reencode=mode == "reencode")
                manifests.append(convert(src, out, settings, workers=w, progress=False, log=lambda s: None))
                wall = time.perf_counter() - t0
                per_cpu_second.append(n / (_cpu_seconds() - cpu0))
                return n / wall

            runs = [once() for _ in range(args.repeats)]
            s = summarize(runs)
            splits = manifests[-1]["splits"].values()
            as_is = sum(v["stored_as_is"] for v in splits)
            reasons: dict[str, int] = {}
            for v in splits:
                for reason, count in v["reencode_reasons"].items():
                    reasons[reason] = reasons.get(reason, 0) + count
            rows.append({"mode": mode, "workers": w, "images": n, "images_per_sec": s["median"],
                         "images_per_sec_per_worker": s["median"] / w, "min": s["min"], "max": s["max"],
                         "repeats": s["repeats"], "images_per_cpu_second": summarize(per_cpu_second)["median"],
                         "stored_as_is_fraction": as_is / n, "reencode_reasons": reasons})
    base = rows[0]["images_per_sec"]
    for r in rows:
        r["speedup_vs_first"] = r["images_per_sec"] / base
    print_table(rows, ["mode", "workers", "images", "images_per_sec", "images_per_sec_per_worker", "min", "max",
                       "images_per_cpu_second", "stored_as_is_fraction", "speedup_vs_first"])
    if args.json:
        write_result(args.json, "convert", rows, {"settings": {"max_resolution": args.max_resolution, "formats": args.formats,
                                                               "jpeg_quality": 90, "source": "benchmarks/imagenet_like.py" if not args.src else args.src}})
    if args.plot:
        plot_bars(args.plot, [f"{r['mode']}, {r['workers']} worker(s)" for r in rows], [r["images_per_sec"] for r in rows],
                  [(r["min"], r["max"]) for r in rows], "images/sec", f"fastrsb convert, {args.formats}, max res {args.max_resolution}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
