"""`fastrsb sweep`: one recipe over several seeds (RSB's seed study), run after run, then mean ± std."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from fastrsb.config import load_config, to_dict
from fastrsb.plot import plot_runs

METRICS = ("val_top1", "val_top5", "ema_val_top1", "ema_val_top5")


class SweepError(RuntimeError):
    """A seed's run failed; the sweep stops there."""


def run_sweep(config: str, data: str, out: str | Path, seeds: list[int], nproc: int = 1,
              overrides: list[str] | None = None) -> dict:
    """Train the recipe (with `overrides`) once per seed in OUT/seedN, each resumable (--resume auto), and
    summarise the final val metrics in OUT/sweep.json and the curves in OUT/sweep.png. Each run gets its
    resolved config as OUT/seedN/recipe.yaml (train.seed set, which data.seed follows), so the launched processes
    read the values themselves, not a re-typed command line."""
    out = Path(out)
    finals = {}
    for seed in seeds:
        run = out / f"seed{seed}"
        cfg = load_config(config, overrides, values={"data": {"path": data}, "train": {"seed": seed}})
        run.mkdir(parents=True, exist_ok=True)
        (run / "recipe.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        launcher = [sys.executable, "-m", "fastrsb"] if nproc == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "fastrsb"]
        cmd = [*launcher, "train", "--config", str(run / "recipe.yaml"), "--out", str(run), "--resume", "auto"]
        print("[sweep]", " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            raise SweepError(f"seed {seed} failed (its run: {run})")
        lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        finals[seed] = [r for r in lines if "val_top1" in r][-1]
    summary: dict = {"config": str(config), "seeds": list(finals)}
    for key in METRICS:
        vals = [f[key] for f in finals.values() if key in f]
        if len(vals) == len(finals):
            summary[key] = {"per_seed": vals, "mean": statistics.mean(vals),
                            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    (out / "sweep.json").write_text(json.dumps(summary, indent=1))
    plot_runs([out / f"seed{seed}" for seed in finals], out / "sweep.png")
    return summary
