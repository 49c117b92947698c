"""`fastrsb plot` on finished tiny runs: one panel per quantity, every run's line holding its metrics.jsonl figures."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastrsb.config import load_config
from fastrsb.dist import DistInfo

pytestmark = pytest.mark.timeout(300)
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PANELS = ["train loss", "learning rate", "val top-1 (%)", "images/sec", "data stall (fraction of wall time)"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A two-seed "sweep" of tiny synthetic runs: 2 epochs of 3 steps, a metrics line every 2 steps, EMA on."""
    from fastrsb.trainer import Trainer

    root = tmp_path_factory.mktemp("sweep")
    for seed in (0, 1):
        cfg = load_config(CONFIGS / "demo.yaml", [
            "model.name=resnet10t", "data.backend=synthetic", "data.synthetic_num_samples=24",
            "data.synthetic_num_classes=5", "data.batch_size=8", "data.train_res=32", "data.val_res=32",
            "train.device=cpu", "train.amp=none", "train.epochs=2", "train.log_interval=2", "ema.enabled=true",
            f"train.seed={seed}", f"data.seed={seed}"])
        Trainer(cfg, root / f"seed{seed}", DistInfo()).fit()
    return root


def _lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_plot_draws_each_quantity_of_each_run(sweep, tmp_path):
    from PIL import Image

    from fastrsb.plot import plot_runs

    out = tmp_path / "curves.png"
    drawn = plot_runs([sweep / "seed0", sweep / "seed1"], out)
    assert list(drawn) == PANELS
    assert Image.open(out).size == (800, 1200)  # 8 x 12 inches at 100 dpi: five stacked panels
    for seed in (0, 1):
        lines = _lines(sweep / f"seed{seed}")
        intervals = [r for r in lines if r["kind"] == "interval"]
        epochs = [r for r in lines if r["kind"] == "epoch"]
        assert len(intervals) == 3 and len(epochs) == 2
        name = f"seed{seed}"
        for panel, key in (("train loss", "loss"), ("learning rate", "lr"), ("images/sec", "images_per_sec"),
                           ("data stall (fraction of wall time)", "data_stall")):
            assert drawn[panel][name] == ([r["epoch"] for r in intervals], [r[key] for r in intervals]), panel
        val = drawn["val top-1 (%)"]
        assert val[name] == ([1.0, 2.0], [r["val_top1"] for r in epochs])
        assert val[f"{name} EMA"] == ([1.0, 2.0], [r["ema_val_top1"] for r in epochs])
    assert all(len(lines) == 2 for title, lines in drawn.items() if title != "val top-1 (%)")


def test_plot_cli_takes_a_sweep_folder_and_refuses_a_folder_without_runs(sweep, tmp_path):
    out = tmp_path / "sweep.png"
    r = subprocess.run([sys.executable, "-m", "fastrsb", "plot", str(sweep), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "5 panels, 4 lines" in r.stdout and out.stat().st_size > 10_000  # seed0, seed1 and their EMA lines
    r = subprocess.run([sys.executable, "-m", "fastrsb", "plot", str(tmp_path), "--out", str(tmp_path / "x.png")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no metrics.jsonl" in r.stderr and not (tmp_path / "x.png").exists()
