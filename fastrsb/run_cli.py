"""`fastrsb train | eval | average | export | plot | sweep | demo`: parse the command line and call the library."""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from fastrsb.checkpoint import CheckpointError, NonFiniteState
    from dataprep.files import atomic_write_json
    from fastrsb.config import ConfigError, load_config, to_dict
    from fastrsb.data import LoaderError
    from fastrsb.data.bad_samples import BadDataError
    from fastrsb.dist import init_distributed, shutdown
    from fastrsb.export import record_launch
    from fastrsb.trainer import Trainer

    try:
        cfg = load_config(args.config, args.overrides, values={"data": {"path": args.data}} if args.data else None)
        dist = init_distributed(cfg.train.device)
        trainer = Trainer(cfg, args.out, dist)
    except (ConfigError, LoaderError, ValueError, FileNotFoundError, RuntimeError) as e:  # before any step
        print(f"fastrsb train: error: {e}", file=sys.stderr)
        return 2
    try:
        if args.resume:
            try:
                path = trainer.resume(args.resume)
            except CheckpointError as e:
                print(f"fastrsb train: error: {e}", file=sys.stderr)
                return 2
            if dist.is_main:
                print(f"[train] resumed from {path} (epoch {trainer.epoch}, batch {trainer.batch_in_epoch})" if path
                      else "[train] no checkpoint to resume from; starting fresh")
        if dist.is_main:
            atomic_write_json(Path(args.out) / "config.json", to_dict(cfg))
            record_launch(args.out, args.config, " ".join(["fastrsb", *sys.argv[1:]]))
            print(f"[train] {cfg.model.name} on {cfg.data.backend} ({trainer.train_loader.decoder_name}; {dist.device}, "
                  f"world {dist.world_size}), "
                  f"{trainer.steps_per_epoch} steps/epoch, global batch {trainer.global_batch}, lr {trainer.peak_lr:g}")
        if trainer.epoch >= cfg.train.epochs and dist.is_main:
            print(f"[train] {args.out} already finished its {cfg.train.epochs} epochs; nothing to do")
        try:
            result = trainer.fit()
        except NonFiniteState as e:
            print(f"fastrsb train: error: {e}", file=sys.stderr)
            return 3
        except BadDataError as e:  # checkpointed first
            print(f"fastrsb train: error: {e}", file=sys.stderr)
            return 4
        except KeyboardInterrupt:  # a second Ctrl-C: the checkpoint being written, if any, was discarded
            print(f"fastrsb train: stopped by a second SIGINT at step {trainer.step} without a checkpoint of it; "
                  f"--resume auto continues from the newest one in {trainer.ckpt_dir}", file=sys.stderr)
            return 128 + signal.SIGINT
        if dist.is_main:
            if result.get("interrupted"):
                print(f"[train] stopped by a signal after step {result['step']}, checkpointed; "
                      f"--resume auto continues from there", file=sys.stderr)
            print(json.dumps(result))
        return 0
    finally:
        shutdown()


def _eval(args: argparse.Namespace) -> int:
    from fastrsb.checkpoint import CheckpointError
    from fastrsb.data import LoaderError
    from fastrsb.evaluation import evaluate_checkpoint

    try:
        m = evaluate_checkpoint(args.checkpoint, args.data, args.res, args.crop_pct, args.ema, args.backend, args.device,
                                args.batch_size)
    except (CheckpointError, LoaderError, ValueError, RuntimeError) as e:
        print(f"fastrsb eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(m))
    return 0


def _average(args: argparse.Namespace) -> int:
    from fastrsb.checkpoint import average_checkpoints

    try:
        out = average_checkpoints(args.run_dir, args.best, args.metric)
    except ValueError as e:
        print(f"fastrsb average: error: {e}", file=sys.stderr)
        return 2
    print(f"[average] wrote {out} (evaluate with: fastrsb eval --checkpoint {out} --data DATA; "
          f"export with: fastrsb export {out} OUT_DIR)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from fastrsb.checkpoint import CheckpointError
    from fastrsb.export import export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, args.ema)
    except (CheckpointError, ValueError) as e:
        print(f"fastrsb export: error: {e}", file=sys.stderr)
        return 2
    cfg = json.loads((out / "config.json").read_text())
    print(f"[export] wrote {out}/model.safetensors, config.json, README.md ({cfg['architecture']}, "
          f"{cfg['num_classes']} classes); load with timm.create_model(\"local-dir:{out}\", pretrained=True)")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from fastrsb.plot import plot_runs

    try:
        drawn = plot_runs(args.runs, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"fastrsb plot: error: {e}", file=sys.stderr)
        return 2
    runs = {label for lines in drawn.values() for label in lines}
    print(f"[plot] wrote {args.out} ({len(drawn)} panels, {len(runs)} lines)")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from fastrsb.config import ConfigError
    from fastrsb.sweep import SweepError, run_sweep

    try:
        summary = run_sweep(args.config, args.data, args.out, [int(s) for s in args.seeds.split(",")], args.nproc,
                            args.overrides)
    except (ConfigError, SweepError) as e:
        print(f"fastrsb sweep: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    for key in ("val_top1", "ema_val_top1"):
        if key in summary:
            print(f"[sweep] {key} {summary[key]['mean']:.2f} ± {summary[key]['std']:.2f} over {len(summary['seeds'])} seeds")
    print(f"[sweep] {Path(args.out) / 'sweep.json'}; curves of every seed: {Path(args.out) / 'sweep.png'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from fastrsb.demo import run_demo

    run_demo(args.out)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a recipe (also under torchrun)",
                       description="Train with a YAML recipe; any config key can be overridden as --section.key=value.")
    p.add_argument("--config", required=True, help="recipe YAML (configs/*.yaml)")
    p.add_argument("--data", default=None, help="converted dataset directory (sets data.path)")
    p.add_argument("--out", required=True, help="run directory: checkpoints/, metrics.jsonl, config.json")
    p.add_argument("--resume", default=None, help="'auto' (newest loadable checkpoint in --out) or a checkpoint path")
    p.set_defaults(func=_train, accepts_overrides=True)

    e = sub.add_parser("eval", help="top-1/top-5 of a checkpoint on a converted val split")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--res", type=int, default=None, help="val resolution (default: the checkpoint's data.val_res)")
    e.add_argument("--crop-pct", type=float, default=None, help="center crop fraction (default: the checkpoint's)")
    e.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    e.add_argument("--backend", default=None, help="loader backend (default: the checkpoint's)")
    e.add_argument("--device", default="auto")
    e.add_argument("--batch-size", type=int, default=None, help="per process (default: the checkpoint's)")
    e.set_defaults(func=_eval)

    a = sub.add_parser("average", help="average the weights of a run's best checkpoints (by val top-1)")
    a.add_argument("run_dir")
    a.add_argument("--best", type=int, default=5)
    a.add_argument("--metric", default="val_top1", choices=("val_top1", "ema_val_top1"),
                   help="rank checkpoints by the raw or the EMA weights' val top-1")
    a.set_defaults(func=_average)

    x = sub.add_parser("export", help="a checkpoint as timm weights: OUT_DIR/model.safetensors, config.json, README.md",
                       description="Write a checkpoint's weights in the form timm.create_model loads (and a model "
                                   "hub serves): model.safetensors, timm's config.json, a model card.")
    x.add_argument("checkpoint", help="a run's checkpoint or the averaged.pt of `fastrsb average`")
    x.add_argument("out_dir")
    x.add_argument("--ema", action="store_true", help="export the EMA weights (default: the raw ones)")
    x.set_defaults(func=_export)

    pl = sub.add_parser("plot", help="training curves of runs (loss, lr, val/EMA top-1, images/sec, data stall)")
    pl.add_argument("runs", nargs="+", metavar="RUN", help="run directories, or sweep directories (every seed)")
    pl.add_argument("--out", required=True, help="PNG to write")
    pl.set_defaults(func=_plot)

    s = sub.add_parser("sweep", help="run a recipe over several seeds and report mean ± std top-1")
    s.add_argument("--config", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--seeds", default="0,1,2")
    s.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun)")
    s.set_defaults(func=_sweep, accepts_overrides=True)

    d = sub.add_parser("demo", help="embedded dataset -> convert -> train on CPU with ffcv and dali -> eval")
    d.add_argument("--out", default="demo_out")
    d.set_defaults(func=_demo)
