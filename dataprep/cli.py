"""`fastrsb convert` and `fastrsb verify`."""
from __future__ import annotations

import argparse
import sys


def _convert(args: argparse.Namespace) -> int:
    from dataprep.convert import ConversionError, Settings, convert
    from dataprep.sources import SourceError

    settings = Settings(formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()),
                        max_resolution=args.max_resolution, jpeg_quality=args.jpeg_quality, write_mode=args.write_mode,
                        compress_probability=args.compress_probability, smart_threshold=args.smart_threshold,
                        shard_size=args.shard_size, reencode=args.reencode, shuffle_store=args.shuffle_store)
    try:
        convert(args.src, args.out, settings, workers=args.workers, class_list=args.class_list,
                val_ground_truth=args.val_ground_truth, val_id_mapping=args.val_id_mapping,
                source_format=args.source_format, strict=args.strict,
                progress=not args.no_progress)
    except (ConversionError, SourceError) as e:
        print(f"fastrsb convert: error: {e}", file=sys.stderr)
        return 2
    return 0


def _verify(args: argparse.Namespace) -> int:
    from dataprep.layout import DatasetError
    from dataprep.verify import verify

    try:
        verify(args.out, quick=args.quick)
    except DatasetError as e:
        print(f"fastrsb verify: FAILED: {e}", file=sys.stderr)
        return 1
    return 0


def _demo_data(args: argparse.Namespace) -> int:
    from dataprep.embedded import write_digits

    print(write_digits(args.dest, image_size=args.image_size))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert an image tree or Hub shards to FFCV .beton + DALI tar shards + manifest",
                       description="Convert ImageNet (a class-per-folder tree, or the Hub's parquet or WebDataset "
                       "shards) to FFCV and DALI formats. "
                       "Every image is decoded and checked first; undecodable files are skipped and reported. "
                       "JPEGs that need no change are stored as they are, the rest re-encoded. "
                       "Re-running the same command resumes an interrupted conversion, and rewrites any output that no longer "
                       "matches what was written.")
    p.add_argument("src", help="dataset root with train/ (and val/), a single class-per-folder tree, or a folder of the "
                   "Hub's parquet files (SRC/data/train-*.parquet) or WebDataset tars (SRC/*-train-*.tar)")
    p.add_argument("--source-format", choices=["folder", "parquet", "wds"], default=None,
                   help="the layout of SRC (default: detected, and named in the first line of output)")
    p.add_argument("out", help="output directory")
    p.add_argument("--formats", default="ffcv,dali", help="comma-separated: ffcv,dali (default both)")
    p.add_argument("--workers", type=int, default=None, help="decode processes (default: all cores)")
    p.add_argument("--max-resolution", type=int, default=512, help="longer side of stored images (default 512)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    p.add_argument("--reencode", action="store_true",
                   help="re-encode every image (default: baseline YCbCr JPEGs within --max-resolution that decode "
                        "cleanly are stored byte for byte)")
    p.add_argument("--write-mode", default="jpg", choices=["jpg", "raw", "smart", "proportion"],
                   help="FFCV image storage (DALI shards are always JPEG)")
    p.add_argument("--compress-probability", type=float, default=0.5, help="FFCV 'proportion' mode: share stored as JPEG")
    p.add_argument("--smart-threshold", type=int, default=None, help="FFCV 'smart' mode: raw below this many bytes of pixels")
    p.add_argument("--shard-size", type=int, default=1024, help="candidate images per DALI shard / resume unit")
    p.add_argument("--shuffle-store", action="store_true",
                   help="store a class-folder tree's samples in a seeded random order instead of by label: what "
                        "data.order=block needs to mix classes (the Hub's shards come shuffled)")
    p.add_argument("--class-list", default=None, help="file with one class name per line, in index order")
    p.add_argument("--val-ground-truth", default=None, help="flat val/: ILSVRC2012_validation_ground_truth.txt")
    p.add_argument("--val-id-mapping", default=None, help="flat val/: devkit meta.mat or 'ILSVRC2012_ID wnid' lines")
    p.add_argument("--strict", action="store_true", help="fail (exit 2, no manifest) if any input had to be skipped")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_convert)

    v = sub.add_parser("verify", help="check a converted dataset against its manifest and decode its samples",
                       description="Checks counts, labels, sizes and checksums of both formats and decodes every "
                       "sample (a random subset with --quick). Exits non-zero naming the first problem.")
    v.add_argument("out", help="directory written by fastrsb convert")
    v.add_argument("--quick", action="store_true", help="decode a sample of images; hash only the small files")
    v.set_defaults(func=_verify)

    d = sub.add_parser("demo-data", help="write the embedded digits dataset as class folders (no download)")
    d.add_argument("dest")
    d.add_argument("--image-size", type=int, default=64)
    d.set_defaults(func=_demo_data)
