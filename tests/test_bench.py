"""Every bench command on tiny data: well-formed JSON whose medians and ratios follow from its own
per-round figures (no speed thresholds), and the timers and data-stall meter against candidates
slowed on purpose."""
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
        assert row["images_per_sec"] > 0
        if "per_round" in row:  # the summary is of the rounds it lists (stored rounded to 0.1)
            rounds = row["per_round"]
            assert len(rounds) == row["repeats"]
            for key, value in (("images_per_sec", statistics.median(rounds)), ("min", min(rounds)), ("max", max(rounds))):
                assert row[key] == pytest.approx(value, abs=0.051), key
    return doc


def _paired(a: dict, b: dict) -> float:
    """The median over rounds of a's figure over b's, from the JSON's per-round figures."""
    return statistics.median(x / y for x, y in zip(a["per_round"], b["per_round"], strict=True))


def test_bench_loader(small_dataset, tmp_path):
    doc = _bench(tmp_path, "loader", "--data", str(small_dataset), "--backends", "ffcv,dali,torch", "--batch-size", "8",
                 "--res", "32", "--workers", "2", "--repeats", "2", "--reference", str(small_dataset.parent / "src"))
    names = [r["backend"] for r in doc["results"]]
    assert names[:6] == ["ffcv", "bare ffcv", "dali", "bare dali", "torch", "torchvision ImageFolder (original JPEGs)"]
    assert names[-1].startswith("decode limit")
    assert all(r["repeats"] == 2 for r in doc["results"])
    rows = {r["backend"]: r for r in doc["results"]}
    reference = rows["torchvision ImageFolder (original JPEGs)"]
    for name in ("ffcv", "dali"):  # each ratio pairs the rounds of the two rows (per_round is rounded to 0.1)
        row = rows[name]
        assert row["vs_bare_library"] == pytest.approx(_paired(row, rows[f"bare {name}"]), rel=3e-3)
        assert row["vs_torch"] == pytest.approx(_paired(row, rows["torch"]), rel=3e-3)
        assert row["vs_imagefolder"] == pytest.approx(_paired(row, reference), rel=3e-3)
    limit = doc["results"][-1]["images_per_sec"]
    for row in doc["results"]:
        assert row["fraction_of_decode_limit"] == pytest.approx(row["images_per_sec"] / limit)


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
    # efficiency: 2 processes' images/sec against twice one process's
    assert rows[1]["scaling_efficiency"] == pytest.approx(rows[1]["images_per_sec"] / (2 * rows[0]["images_per_sec"]))


def test_round_robin_timer_sees_a_candidate_slowed_on_purpose():
    """The loader benchmark's timer on two candidates yielding the same batches, one sleeping 50 ms per
    batch: in every round the slow one measures at most batch / 50 ms, and below the fast one."""
    import torch

    from fastrsb.bench.suite import _time_round_robin

    batch, per_epoch, delay = 4, 3, 0.05

    def candidate(sleep: float):
        def epoch(i):
            for _ in range(per_epoch):
                time.sleep(sleep)
                yield torch.zeros(batch, 3, 8, 8)
        return epoch

    timed = _time_round_robin([("fast", candidate(0.0)), ("slow", candidate(delay))], repeats=3, epochs=2,
                              sync=lambda: None)
    assert len(timed["fast"]) == len(timed["slow"]) == 3
    assert all(s <= batch / delay for s in timed["slow"]), timed
    assert all(s < f / 10 for s, f in zip(timed["slow"], timed["fast"])), timed


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
    ips_fast, stall_fast = _measure_steps(fast, 5, 2)
    slow = Trainer(cfg, tmp_path / "slow", DistInfo())
    # a second per batch: far slower than this tiny step even on a loaded 2-core machine
    slow.train_loader = SlowLoader(slow.train_loader, delay=1.0)
    ips_slow, stall_slow = _measure_steps(slow, 5, 2)
    assert max(stall_fast) < 0.1, stall_fast
    assert min(stall_slow) > 0.6, stall_slow
    # the same windows' images/sec: at most 4 images per second of sleep, and below the unslowed run's
    assert max(ips_slow) <= 4.0 and max(ips_slow) < min(ips_fast), (ips_slow, ips_fast)


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
    procs = [k for k in rows[0] if k.startswith("vs_timm_") and k.endswith("_processes")]
    assert len(procs) == 1
    for row in rows:
        rounds = row["per_round"]
        assert len(rounds) == 2 and row["images_per_sec"] == statistics.median(rounds) > 0
        assert (row["min"], row["max"]) == (min(rounds), max(rounds))
        # each round's ratio (rows timed back to back), median over rounds: against timm in one process
        # and against timm in a process per core
        assert row["vs_timm_1_process"] == _paired(row, rows[-2])
        assert row[procs[0]] == _paired(row, rows[-1])
    assert doc["settings"]["config"] == "rand-m7-mstd0.5-inc1"


# ------------------------------------------------------------------ ops per step
def test_bench_step_counts_each_part_on_the_gpu_paths(tmp_path):
    """`fastrsb bench step` on two recipes (LAMB without EMA, momentum SGD with it): a row each, with cuda's
    settings on this CPU (bf16, RandAugment's torch ops), the optimizer and EMA on foreach ops, the total
    the sum of the parts, and the batch stage counted on a batch of the recipe's size."""
    out = tmp_path / "step.json"
    r = subprocess.run([sys.executable, "-m", "fastrsb", "bench", "step", "--config", str(CONFIGS / "rsb_a1.yaml"),
                        str(CONFIGS / "resnet_rs50.yaml"), "--steps", "1", "--device", "cpu", "--json", str(out),
                        "--model.name=resnet10t", "--data.batch_size=16"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["command"].startswith("python -m fastrsb bench step") and doc["machine"]["versions"]["timm"]
    a1, rs = doc["results"]
    assert (a1["config"], a1["optim"], rs["optim"]) == ("rsb_a1.yaml", "lamb", "momentum")
    for row in (a1, rs):
        assert (row["amp"], row["randaugment_impl"], row["batch_size"], row["step_batch_size"]) == ("bf16", "torch", 16, 2)
        assert len(row["per_step"]) == 1 and row["min"] <= row["total"] <= row["max"]
        parts = ["batch stage", "forward + backward", "optimizer", "EMA", "other"]
        assert row["total"] == sum(row[p] for p in parts) and row["forward + backward"] > 0
        assert next(iter(row["top_ops"]["optimizer"])).startswith("aten._foreach_")  # the most frequent op
    assert a1["EMA"] == 0 and "aten._foreach_lerp_" in rs["top_ops"]["EMA"]
    assert r.stdout.split()[:3] == ["config", "model", "optim"] and "resnet_rs50.yaml" in r.stdout


def test_step_op_counts_do_not_depend_on_batch_size_or_resolution():
    """Every part dispatches as many ops at batch 2 and 64 px as at 4 and 96 px (the batch stage without
    RandAugment: normalize and Mixup/CutMix); RandAugment's torch ops do not: they dispatch a few ops per op
    group a batch's draws form, and a small batch forms fewer, which is why `bench step` counts the batch
    stage on a batch of the recipe's size."""
    from fastrsb.bench.step import bench_step

    def count(batch_size: int, res: int, *extra: str) -> dict:
        return bench_step(str(CONFIGS / "rsb_a1.yaml"), ["--model.name=resnet10t", "--ema.enabled=true", *extra],
                          batch_size, res, 1, "cpu")

    small, large = (count(b, res, "--augment.randaugment=", "--data.batch_size=8") for b, res in ((2, 64), (4, 96)))
    for part in ("batch stage", "forward + backward", "optimizer", "EMA"):
        assert small[part] == large[part] > 0, part
    few, many = (count(2, 64, f"--data.batch_size={n}")["batch stage"] for n in (2, 64))
    assert few < many
