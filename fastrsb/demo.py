"""`fastrsb demo`: the embedded digits -> convert (both formats) and verify -> train a small ResNet on the
CPU with each backend -> evaluate, in minutes."""
from __future__ import annotations

import json
import time
from pathlib import Path

from dataprep.convert import convert
from dataprep.embedded import write_digits
from dataprep.verify import verify
from fastrsb.config import load_config
from fastrsb.dist import init_distributed
from fastrsb.export import record_launch
from fastrsb.metrics import train_throughput
from fastrsb.trainer import Trainer

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def run_demo(out: str | Path, backends=("ffcv", "dali"), epochs: int | None = None) -> dict:
    """Runs the demo into OUT; returns (and writes OUT/summary.json) each backend's val top-1/top-5,
    images/sec and train time."""
    out = Path(out)
    src = write_digits(out / "digits")
    data = out / "data"
    print("[demo] converting the embedded digits dataset to ffcv + dali")
    convert(src, data, progress=False)
    verify(data)  # every file hashed, every sample decoded in both formats: seconds for the digits
    summary = {}
    for backend in backends:
        values = {"data": {"backend": backend, "path": str(data)}, "train": {"device": "cpu"}}
        if epochs is not None:
            values["train"]["epochs"] = epochs
        cfg = load_config(CONFIGS / "demo.yaml", values=values)
        run = out / f"run_{backend}"
        trainer = Trainer(cfg, run, init_distributed("cpu"))
        record_launch(run, CONFIGS / "demo.yaml", f"fastrsb demo --out {out}")
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
