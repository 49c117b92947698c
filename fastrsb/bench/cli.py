"""`fastrsb bench loader | model | step | e2e | scaling`."""
from __future__ import annotations

import argparse
import sys


def _out(args, kind: str, rows: list[dict], columns: list[str], label_key: str, title: str, extra: dict) -> None:
    from fastrsb.bench.report import plot_bars, print_table, write_result
    from fastrsb.dist import init_distributed

    if not init_distributed(getattr(args, "device", "auto"), "--device").is_main:
        return
    print_table(rows, columns)
    if args.json:
        write_result(args.json, kind, rows, extra)
    if args.plot:
        plot_bars(args.plot, [str(r[label_key]) for r in rows], [r["images_per_sec"] for r in rows],
                  [(r["min"], r["max"]) for r in rows], "images/sec (median, min-max)", title)


def _loader(args) -> int:
    from fastrsb.bench.suite import bench_cold_store, bench_loader

    if args.cold:
        rows = bench_cold_store(args.data, args.backends.split(","), args.orders.split(","), args.batch_size, args.res,
                                args.workers, args.repeats, args.device, args.overrides)
        _out(args, "loader_cold_store", rows, ["backend", "order", "world_size", "images_per_sec", "cold_vs_warm",
                                               "read_vs_store", "peak_resident_vs_store"], "backend",
             f"loader from a cold store: uint8 {args.res}px train batches of {args.batch_size}",
             {"settings": {"data": args.data, "batch_size": args.batch_size, "res": args.res, "workers": args.workers,
                           "overrides": args.overrides}})
        return 0

    rows = bench_loader(args.data, args.backends.split(","), args.batch_size, args.res, args.workers, args.repeats,
                        args.device, not args.no_bare, not args.no_decode_limit, args.epochs, args.reference,
                        args.overrides)
    _out(args, "loader", rows, ["backend", "images_per_sec", "min", "max", "vs_torch", "vs_bare_library"]
         + (["vs_imagefolder"] if args.reference else []) + ["fraction_of_decode_limit"], "backend",
         f"loader only: uint8 {args.res}px train batches of {args.batch_size}",
         {"settings": {"data": args.data, "batch_size": args.batch_size, "res": args.res, "workers": args.workers,
                       "epochs_per_repeat": args.epochs, "reference": args.reference,
                       "overrides": args.overrides}})
    return 0


def _model(args) -> int:
    from fastrsb.bench.suite import bench_model

    rows = [bench_model(args.model, args.res, args.batch_size, args.channels_last, args.amp, args.compile,
                        args.steps, args.repeats, args.device)]
    _out(args, "model", rows, ["model", "res", "batch_size", "amp", "compile", "device", "images_per_sec", "min", "max",
                               "achieved_tflops", "fraction_of_peak_bf16"], "model",
         f"model only: {args.model} train step, synthetic data", {})
    return 0


def _e2e(args) -> int:
    from fastrsb.bench.suite import bench_e2e

    rows = [bench_e2e(args.config, args.data, args.backend, args.steps, args.repeats, args.overrides, args.device)]
    _out(args, "e2e", rows, ["backend", "world_size", "images_per_sec", "min", "max", "data_stall"], "backend",
         f"end to end: {args.config}", {})
    return 0


def _scaling(args) -> int:
    from fastrsb.bench.suite import bench_scaling

    rows = bench_scaling(args.config, args.data, args.backend, [int(k) for k in args.nprocs.split(",")], args.steps,
                         args.repeats, args.overrides, args.device)
    _out(args, "scaling", rows, ["processes", "images_per_sec", "min", "max", "data_stall", "scaling_efficiency"],
         "processes", f"scaling: {args.config} on {args.backend}", {})
    return 0


def _step(args) -> int:
    from fastrsb.bench.report import print_table, write_result
    from fastrsb.bench.step import bench_step
    from fastrsb.trainer import STEP_PARTS

    rows = [bench_step(config, args.overrides, args.batch_size, args.res, args.steps, args.device)
            for config in args.config]
    print_table(rows, ["config", "model", "optim", "batch_size", "amp", *STEP_PARTS, "total", "min", "max"])
    if args.json:
        write_result(args.json, "step", rows)
    return 0


def _reporting_errors(handler):
    """A benchmark's user errors (no GPU for --device cuda, a bad config key, missing data) as one line
    naming the setting, exit 2, before any measurement."""
    def run(args) -> int:
        from fastrsb.data import LoaderError
        from fastrsb.dist import DeviceError

        try:
            return handler(args)
        except (DeviceError, LoaderError, ValueError) as e:
            print(f"fastrsb bench {args.bench_command}: error: {e}", file=sys.stderr)
            return 2

    return run


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repeats", type=int, default=3, help="measured repeats after one warm-up (default 3)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--json", default=None, help="write results with machine, versions and command")
    p.add_argument("--plot", default=None, help="write a bar chart (PNG)")


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks: loader, model, step (ops), e2e, scaling")
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)

    p = bsub.add_parser("loader", help="loader-only images/sec, side by side (+ bare libraries and decode limit)")
    p.add_argument("--data", required=True)
    p.add_argument("--backends", default="ffcv,dali,torch")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--workers", type=int, default=0, help="decode workers/threads (default: all cores)")
    p.add_argument("--epochs", type=int, default=2, help="consecutive epochs timed per repeat (default 2)")
    p.add_argument("--no-bare", action="store_true", help="skip the bare-library rows")
    p.add_argument("--no-decode-limit", action="store_true", help="skip the decode-only row")
    p.add_argument("--reference", default=None, metavar="SRC",
                   help="also time torchvision's ImageFolder on SRC, the original tree DATA was converted from")
    p.add_argument("--cold", action="store_true",
                   help="a cold store: the page cache dropped before each epoch; bytes read from storage, resident "
                        "store pages, RSS, against warm epochs (--orders; data.* overrides such as --data.block_mb=8)")
    p.add_argument("--orders", default="random,block", help="with --cold: the data.order values to measure")
    _common(p)
    p.set_defaults(func=_reporting_errors(_loader), accepts_overrides=True)

    m = bsub.add_parser("model", help="train-step images/sec on synthetic device data (the ceiling)")
    m.add_argument("--model", default="resnet50")
    m.add_argument("--res", type=int, default=224)
    m.add_argument("--batch-size", type=int, default=256)
    m.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    m.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"])
    m.add_argument("--compile", action="store_true")
    m.add_argument("--steps", type=int, default=20, help="measured steps per repeat")
    _common(m)
    m.set_defaults(func=_reporting_errors(_model))

    s = bsub.add_parser("step", help="aten ops dispatched per train step, by part, on the GPU's code paths",
                        description="aten ops one train step of each recipe dispatches: batch stage, forward + "
                                    "backward, optimizer, EMA; synthetic data, cuda's settings on any device; "
                                    "extra --section.key=value override the recipes")
    s.add_argument("--config", required=True, nargs="+", help="one or more recipes, a row each")
    s.add_argument("--batch-size", type=int, default=2,
                   help="the counted steps' batch (default 2; the batch stage is counted at the recipe's data.batch_size, "
                        "where RandAugment forms as many op groups as in training)")
    s.add_argument("--res", type=int, default=64,
                   help="train resolution (default 64; counts do not depend on it while a ResNet's last feature map is "
                        "over 1x1, i.e. above 32 px)")
    s.add_argument("--steps", type=int, default=3, help="steps counted after one warm-up step (default 3)")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda")
    s.add_argument("--json", default=None, help="write results with machine, versions and command")
    s.set_defaults(func=_reporting_errors(_step), accepts_overrides=True)

    for name, fn, helptext in (("e2e", _e2e, "real loader + augment + train step: images/sec and data stall"),
                               ("scaling", _scaling, "e2e at several process counts (torchrun), scaling efficiency")):
        e = bsub.add_parser(name, help=helptext, description=helptext + "; extra --section.key=value override the recipe")
        e.add_argument("--config", required=True)
        e.add_argument("--data", required=True)
        e.add_argument("--backend", default="ffcv")
        e.add_argument("--steps", type=int, default=50, help="measured steps per repeat (capped at an epoch)")
        if name == "scaling":
            e.add_argument("--nprocs", default="1,2")
        _common(e)
        e.set_defaults(func=_reporting_errors(fn), accepts_overrides=True)
