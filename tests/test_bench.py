"""Every bench command on tiny data: well-formed JSON with positive numbers (no speed thresholds),
and the data-stall meter against a loader slowed on purpose."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastrsb.config import load_config
from fastrsb.dist import DistInfo

pytestmark = pytest.mark.timeout(600)
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TINY = ["--model.name=resnet18", "--data.batch_size=8", "--data.train_res=32", "--data.val_res=32",
        "--data.workers=1", "--train.amp=none"]


def _bench(tmp_path, *args):
    out = tmp_path / "r.json"
    plot = tmp_path / "r.png"
    r = subprocess.run([sys.executable, "-m", "fastrsb", "bench", *args, "--json", str(out), "--plot", str(plot),
                        "--device", "cpu"], capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["machine"]["cpu_cores"] >= 1 and doc["machine"]["versions"]["torch"] and doc["command"].startswith("python -m fastrsb")
    assert plot.stat().st_size > 1000
    for row in doc["results"]:
        assert row["images_per_sec"] > 0 and row["min"] <= row["images_per_sec"] <= row["max"]
    return doc


def test_bench_loader(small_dataset, tmp_path):
    doc = _bench(tmp_path, "loader", "--data", str(small_dataset), "--backends", "ffcv,dali,torch", "--batch-size", "8",
                 "--res", "32", "--workers", "2", "--repeats", "2", "--reference", str(small_dataset.parent / "src"))
    names = [r["backend"] for r in doc["results"]]
    assert names[:6] == ["ffcv", "bare ffcv", "dali", "bare dali", "torch", "torchvision ImageFolder (original JPEGs)"]
    assert names[-1].startswith("decode limit")
    assert all(r["repeats"] == 2 for r in doc["results"])
    first = doc["results"][0]
    assert first["vs_bare_library"] > 0 and first["vs_torch"] > 0 and first["vs_imagefolder"] > 0


def test_bench_model(tmp_path):
    doc = _bench(tmp_path, "model", "--model", "resnet18", "--res", "32", "--batch-size", "4", "--steps", "2",
                 "--repeats", "3", "--amp", "none")
    assert doc["results"][0]["repeats"] == 3 and doc["results"][0]["device"] == "cpu"


def test_bench_e2e_and_scaling(small_dataset, tmp_path):
    doc = _bench(tmp_path, "e2e", "--config", str(CONFIGS / "demo.yaml"), "--data", str(small_dataset),
                 "--backend", "dali", "--steps", "3", "--repeats", "2", *TINY)
    assert 0 <= doc["results"][0]["data_stall"] <= 1
    doc = _bench(tmp_path, "scaling", "--config", str(CONFIGS / "demo.yaml"), "--data", str(small_dataset),
                 "--backend", "torch", "--nprocs", "1,2", "--steps", "2", "--repeats", "1", *TINY)
    rows = doc["results"]
    assert [r["processes"] for r in rows] == [1, 2] and rows[1]["world_size"] == 2
    assert rows[0]["scaling_efficiency"] == pytest.approx(1.0)


class SlowLoader:
    """Wraps a loader and sleeps before each batch: a data path slower than the model, on purpose."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay = inner, delay

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)

    def __iter__(self):
        for b in self.inner:
            time.sleep(self.delay)
            yield b


def test_data_stall_meter(tmp_path):
    from fastrsb.bench.suite import _measure_steps
    from fastrsb.trainer import Trainer

    cfg = load_config(CONFIGS / "demo.yaml", ["data.backend=synthetic", "data.batch_size=4", "data.train_res=32",
                                              "data.val_res=32", "data.synthetic_num_classes=10",
                                              "data.synthetic_num_samples=400", "train.log_interval=5", "train.amp=none"])
    fast = Trainer(cfg, tmp_path / "fast", DistInfo())
    _, stall_fast = _measure_steps(fast, 5, 2)
    slow = Trainer(cfg, tmp_path / "slow", DistInfo())
    # a second per batch: far slower than this tiny step even on a loaded 2-core machine
    slow.train_loader = SlowLoader(slow.train_loader, delay=1.0)
    _, stall_slow = _measure_steps(slow, 5, 2)
    assert max(stall_fast) < 0.1, stall_fast
    assert min(stall_slow) > 0.6, stall_slow


def test_bench_randaugment_script(tmp_path):
    """benchmarks/bench_randaugment.py on a tiny batch: both of our rows (the CPU's numba kernels and the
    torch ops) and both timm rows, one measurement per round each, ratios consistent."""
    out = tmp_path / "ra.json"
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench_randaugment", "--batch-size", "8", "--res", "48",
                        "--batches", "1", "--repeats", "2", "--json", str(out)], capture_output=True, text=True,
                       timeout=300, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = doc["results"]
    assert [row["implementation"].split(" (")[0] for row in rows] == [
        "fastrsb numba", "fastrsb torch", "timm PIL per image", "timm PIL per image"]
    for row in rows:
        assert row["images_per_sec"] > 0 and row["min"] <= row["images_per_sec"] <= row["max"]
        assert len(row["per_round"]) == 2
        # each round's ratio (rows timed back to back), median over rounds
        assert row["vs_timm_1_process"] == statistics.median(
            x / y for x, y in zip(row["per_round"], rows[2]["per_round"]))
    assert rows[2]["vs_timm_1_process"] == 1.0 and doc["settings"]["config"] == "rand-m7-mstd0.5-inc1"
