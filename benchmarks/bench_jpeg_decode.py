"""What a JPEG decode costs on one core, through libffcv's imdecode (TurboJPEG): the measurements behind
fastrsb's decoder choices (fastrsb/data/ffcv_decode.py) and the converter's pass-through rule.

    python -m benchmarks.bench_jpeg_decode --images 300 --json benchmarks/results/cpu-2core/jpeg_decode.json

- whole-image decode at each DCT scale (1, 1/2, 1/4, 1/8);
- a lossless DCT-domain crop of an MCU-aligned window (TurboJPEG's transform: it Huffman-decodes the
  whole image and re-encodes the window) followed by the window's decode, by window area: where it
  beats the whole-image decode sets CROP_MAX_AREA_FRACTION;
- baseline against progressive JPEGs of the same pictures (whether progressive sources are kept).
Milliseconds per image, the minimum over repeats (one process, so one core).
"""
from __future__ import annotations

import argparse
import io
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.imagenet_like import make_imagenet_like
from fastrsb.bench.report import print_table, write_result

AREAS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.35, 0.5, 1.0)


def _ms_per_image(fn, count: int, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best / count * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--src", default=None, help="existing image tree (default: generate ImageNet-like images)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from ffcv.libffcv import imdecode

    tmp = Path(tempfile.mkdtemp(prefix="bench_jpeg_"))
    src = Path(args.src) if args.src else make_imagenet_like(tmp / "src", args.images)
    files = sorted(p for p in src.rglob("*") if p.is_file())[:args.images]
    data = [np.fromfile(p, np.uint8) for p in files]
    sizes = [Image.open(p).size for p in files]
    out = np.empty(max(w * h for w, h in sizes) * 3, np.uint8)
    n, rng = len(files), np.random.default_rng(0)

    def whole(denom: int):
        def run():
            for d, (w, h) in zip(data, sizes):
                imdecode(d, out, h, w, h, w, 0, 0, 1, denom, False, False)
        return run

    def windows(area: float):
        boxes = []  # an MCU-aligned (16 px) window of the given share of the image, anywhere in it
        for w, h in sizes:
            cw, ch = max(16, int(w * area ** 0.5)), max(16, int(h * area ** 0.5))
            x = int(rng.integers(0, w - cw + 1)) // 16 * 16
            y = int(rng.integers(0, h - ch + 1)) // 16 * 16
            boxes.append((x, y, min(cw, w - x), min(ch, h - y)))

        def run():
            for d, (w, h), (x, y, cw, ch) in zip(data, sizes, boxes):
                imdecode(d, out, h, w, ch, cw, x, y, 1, 1, True, False)
        return run

    rows = [{"what": f"whole image, DCT scale 1/{k}", "ms_per_image": _ms_per_image(whole(k), n, args.repeats)}
            for k in (1, 2, 4, 8)]
    full = rows[0]["ms_per_image"]
    for area in AREAS:
        ms = _ms_per_image(windows(area), n, args.repeats)
        rows.append({"what": f"crop window {area:.0%} of the image, then decode", "window_area": area,
                     "ms_per_image": ms})
    progressive, baseline = [], []
    for p in files:
        with Image.open(p) as im:
            for bucket, kw in ((baseline, {}), (progressive, {"progressive": True})):
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=90, **kw)
                bucket.append(np.frombuffer(buf.getvalue(), np.uint8))
    for name, encoded in (("baseline", baseline), ("progressive", progressive)):
        def run(encoded=encoded):
            for d, (w, h) in zip(encoded, sizes):
                imdecode(d, out, h, w, h, w, 0, 0, 1, 1, False, False)
        rows.append({"what": f"whole image, {name} q90 re-encode of the same pictures",
                     "ms_per_image": _ms_per_image(run, n, args.repeats)})
    for r in rows:
        r["vs_whole_decode"] = r["ms_per_image"] / full
    print_table(rows, ["what", "ms_per_image", "vs_whole_decode"])
    if args.json:
        write_result(args.json, "jpeg_decode", rows, {"settings": {"images": n, "repeats": args.repeats,
                                                                   "source": args.src or "benchmarks/imagenet_like.py"}})
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
