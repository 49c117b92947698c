"""`fastrsb train | eval | average | export | plot | sweep | demo`."""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _train(args: argparse.Namespace) -> int:
    from fastrsb.config import ConfigError, load_config
    from fastrsb.data import LoaderError
    from fastrsb.dist import init_distributed, shutdown
    from fastrsb.trainer import NonFiniteLoss, Trainer

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.path={args.data}")
    try:
        cfg = load_config(args.config, overrides)
        dist = init_distributed(cfg.train.device)
        trainer = Trainer(cfg, args.out, dist)
    except (ConfigError, LoaderError, ValueError, FileNotFoundError, RuntimeError) as e:  # before any step
        print(f"fastrsb train: error: {e}", file=sys.stderr)
        return 2
    try:
        if args.resume:
            from fastrsb.checkpoint import CheckpointError

            try:
                path = trainer.resume(args.resume)
            except CheckpointError as e:
                print(f"fastrsb train: error: {e}", file=sys.stderr)
                return 2
            if dist.is_main:
                print(f"[train] resumed from {path} (epoch {trainer.epoch}, batch {trainer.batch_in_epoch})" if path
                      else "[train] no checkpoint to resume from; starting fresh")
        if dist.is_main:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            from fastrsb.config import to_dict

            (Path(args.out) / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
            _write_launch(args.out, args.config, " ".join(["fastrsb", *sys.argv[1:]]))
            print(f"[train] {cfg.model.name} on {cfg.data.backend} ({dist.device}, world {dist.world_size}), "
                  f"{trainer.steps_per_epoch} steps/epoch, global batch {trainer.global_batch}, lr {trainer.peak_lr:g}")
        if trainer.epoch >= cfg.train.epochs and dist.is_main:
            print(f"[train] {args.out} already finished its {cfg.train.epochs} epochs; nothing to do")
        try:
            result = trainer.fit()
        except NonFiniteLoss as e:
            print(f"fastrsb train: error: {e}", file=sys.stderr)
            return 3
        if dist.is_main:
            print(json.dumps(result))
        return 0
    finally:
        shutdown()


def _write_launch(run_dir: str | Path, recipe: str | Path, command: str) -> None:
    """RUN/launch.json: the recipe file and the command, for `fastrsb export`'s model card."""
    from fastrsb.export import LAUNCH

    (Path(run_dir) / LAUNCH).write_text(json.dumps({"recipe": str(recipe), "command": command}, indent=1) + "\n")


def evaluate_checkpoint(checkpoint: str, data: str, res: int | None = None, crop_pct: float | None = None,
                        ema: bool = False, backend: str | None = None, device: str = "auto",
                        batch_size: int | None = None) -> dict:
    """Top-1/top-5 of a checkpoint's raw (or EMA) weights on a converted val split."""
    import torch

    from fastrsb import checkpoint as ckpt
    from fastrsb.augment import build_batch_augment
    from fastrsb.config import from_dict
    from fastrsb.data import create_loader
    from fastrsb.dist import init_distributed
    from fastrsb.model import create_model
    from fastrsb.trainer import amp_dtype, evaluate

    state = ckpt.load(checkpoint, required=("model", "config"))
    cfg = from_dict(state["config"])
    cfg.data.path = data
    cfg.train.device = device
    for key, value in (("val_res", res), ("crop_pct", crop_pct), ("backend", backend), ("batch_size", batch_size)):
        if value is not None:
            setattr(cfg.data, key, value)
    dist = init_distributed(device)
    loader = create_loader(cfg, "val", dist)
    weights = state.get("ema") if ema else state["model"]
    if weights is None:
        raise ValueError(f"{checkpoint} holds no EMA weights (train with ema.enabled=true)")
    model = create_model(cfg.model, loader.num_classes, dist.device)
    model.load_state_dict(weights)
    dtype = amp_dtype(cfg.train.amp, dist.device)
    aug = build_batch_augment(cfg.augment, loader.num_classes, 0.0, dtype or torch.float32, False)
    return evaluate(model, loader, aug, dtype, dist, cfg.train.flip_tta)


def _eval(args: argparse.Namespace) -> int:
    from fastrsb.checkpoint import CheckpointError
    from fastrsb.data import LoaderError

    try:
        m = evaluate_checkpoint(args.checkpoint, args.data, args.res, args.crop_pct, args.ema, args.backend, args.device,
                                args.batch_size)
    except (CheckpointError, LoaderError, ValueError) as e:
        print(f"fastrsb eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(m))
    return 0


def average_checkpoints(run_dir: str | Path, best: int, metric: str = "val_top1") -> Path:
    """Average the weights (raw and EMA) of the `best` checkpoints by `metric` into RUN_DIR/averaged.pt."""
    from fastrsb import checkpoint as ckpt

    run_dir = Path(run_dir)
    scored = []
    for p in ckpt.list_checkpoints(run_dir / "checkpoints"):
        try:
            state = ckpt.load(p)
        except ckpt.CheckpointError as e:
            print(f"[average] skipping {e}", file=sys.stderr)
            continue
        value = state.get("metrics", {}).get(metric)
        if value is not None:
            scored.append((value, p, state))
    if len(scored) < best:
        raise ValueError(f"{run_dir}: {len(scored)} checkpoint(s) with {metric}, --best {best} asked "
                         "(train.keep_checkpoints bounds how many best ones are kept)")
    scored.sort(key=lambda s: -s[0])
    chosen = scored[:best]

    def mean_of(key: str):
        if chosen[0][2].get(key) is None:
            return None
        out = {}
        for name, ref in chosen[0][2][key].items():
            if ref.is_floating_point():
                out[name] = sum(s[2][key][name].double() for s in chosen).div(len(chosen)).to(ref.dtype)
            else:
                out[name] = ref  # integer buffers (BN step counters): from the best checkpoint
        return out

    avg = {"model": mean_of("model"), "ema": mean_of("ema"), "config": chosen[0][2]["config"],
           "num_classes": chosen[0][2].get("num_classes"),
           "code_version": ckpt.code_version(), "averaged_by": metric,
           "averaged_from": [str(s[1].name) for s in chosen], "averaged_scores": [s[0] for s in chosen]}
    out = run_dir / "averaged.pt"
    ckpt.save_atomic(avg, out)
    return out


def _average(args: argparse.Namespace) -> int:
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
    """The same recipe over several seeds (RSB's seed study): runs one after another, then mean ± std."""
    out = Path(args.out)
    finals = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        run = out / f"seed{seed}"
        launcher = [sys.executable, "-m", "fastrsb"] if args.nproc == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", "-m", "fastrsb"]
        cmd = [*launcher, "train", "--config", args.config, "--data", args.data, "--out", str(run),
               "--resume", "auto", f"--train.seed={seed}", f"--data.seed={seed}", *args.overrides]
        print("[sweep]", " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            print(f"fastrsb sweep: seed {seed} failed", file=sys.stderr)
            return 1
        lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        finals[seed] = [r for r in lines if "val_top1" in r][-1]
    summary: dict = {"config": args.config, "seeds": list(finals)}
    for key in ("val_top1", "val_top5", "ema_val_top1", "ema_val_top5"):
        vals = [f[key] for f in finals.values() if key in f]
        if len(vals) == len(finals):
            summary[key] = {"per_seed": vals, "mean": statistics.mean(vals),
                            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    (out / "sweep.json").write_text(json.dumps(summary, indent=1))
    for key in ("val_top1", "ema_val_top1"):
        if key in summary:
            print(f"[sweep] {key} {summary[key]['mean']:.2f} ± {summary[key]['std']:.2f} over {len(finals)} seeds")
    from fastrsb.plot import plot_runs

    plot_runs([out / f"seed{seed}" for seed in finals], out / "sweep.png")
    print(f"[sweep] curves of every seed: {out / 'sweep.png'}")
    return 0


def run_demo(out: str | Path, backends=("ffcv", "dali"), epochs: int | None = None) -> dict:
    """Embedded digits -> convert (both formats) -> train a small ResNet on CPU per backend -> eval."""
    from dataprep.convert import convert
    from dataprep.embedded import write_digits
    from dataprep.verify import verify
    from fastrsb.config import load_config
    from fastrsb.dist import init_distributed
    from fastrsb.trainer import Trainer, train_throughput

    out = Path(out)
    src = write_digits(out / "digits")
    data = out / "data"
    print("[demo] converting the embedded digits dataset to ffcv + dali")
    convert(src, data, progress=False)
    verify(data)  # every file hashed, every sample decoded in both formats: seconds for the digits
    summary = {}
    for backend in backends:
        overrides = [f"data.backend={backend}", f"data.path={data}", "train.device=cpu"]
        if epochs is not None:
            overrides.append(f"train.epochs={epochs}")
        cfg = load_config(CONFIGS / "demo.yaml", overrides)
        run = out / f"run_{backend}"
        trainer = Trainer(cfg, run, init_distributed("cpu"))
        _write_launch(run, CONFIGS / "demo.yaml", f"fastrsb demo --out {out}")
        print(f"[demo] training {cfg.model.name} for {cfg.train.epochs} epochs on the {backend} backend (CPU)")
        t0 = time.time()
        metrics = trainer.fit()
        summary[backend] = {"val_top1": metrics["val_top1"], "val_top5": metrics["val_top5"],
                            "images_per_sec": train_throughput(run / "metrics.jsonl"),
                            "train_seconds": time.time() - t0, "epochs": cfg.train.epochs}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{'backend':8} {'val top-1':>9} {'top-5':>7} {'img/s':>8} {'seconds':>8}")
    for b, s in summary.items():
        print(f"{b:8} {s['val_top1']:9.1f} {s['val_top5']:7.1f} {s['images_per_sec']:8.0f} {s['train_seconds']:8.0f}")
    print(f"(10 classes: chance is 10%)  summary: {out / 'summary.json'}")
    return summary


def _demo(args: argparse.Namespace) -> int:
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
