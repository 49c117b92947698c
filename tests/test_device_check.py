"""benchmarks/device_check.sh and run_gpu_node.sh: every step runs, a failed step is named and never
shown as a result, and the GPU-only suite refuses a machine without a GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.device_summary import summarize, table

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(900)
STEPS = {"model_channels_last", "model_no_channels_last", "model_compile", "randaug", "e2e_synthetic",
         "e2e_synthetic_no_augment", "e2e_torch", "e2e_torch_device_decode", "e2e_torch_device_decode_160",
         "loader_torch_32", "loader_torch_24", "step_ops"}


def test_device_check_runs_every_step_on_the_cpu(tmp_path):
    """Without cuda the script runs the GPU check's steps at tiny sizes: tests, three model-only
    variants, RandAugment vs timm, data + conversion, e2e synthetic with and without the batch stage,
    that step's ops per step beside its time, and e2e on the torch backend; three files come back. As on
    the lent GPU machine, ffcv and DALI are not importable (tests/no_ffcv_dali: a process that imports
    either anyway exits 97, failing its step)."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT / "tests" / "no_ffcv_dali")}
    r = subprocess.run(["bash", "benchmarks/device_check.sh", str(out)], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=850)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["device_check.json", "device_check.log", "summary.txt"]
    doc = json.loads((out / "device_check.json").read_text())
    assert doc["failed_steps"] == [] and set(doc["steps"]) == STEPS
    rows = {name: step["results"] for name, step in doc["steps"].items()}
    ops = rows.pop("step_ops")[0]  # ops per step, beside e2e_synthetic's time per step
    assert (ops["config"], ops["batch_size"]) == ("rsb_a3.yaml", rows["e2e_synthetic"][0]["batch_size"])
    assert ops["total"] > ops["forward + backward"] > 0 and ops["optimizer"] > 0
    for name, results in rows.items():
        for row in results:
            assert row["images_per_sec"] > 0 and row["min"] <= row["images_per_sec"] <= row["max"], name
    assert [rows[f"model_{v}"][0]["channels_last"] for v in ("channels_last", "no_channels_last")] == [True, False]
    assert rows["model_compile"][0]["compile"] is True
    assert [rows[n][0]["backend"] for n in ("e2e_synthetic", "e2e_torch", "e2e_torch_device_decode")] == \
        ["synthetic", "torch", "torch"]
    for res in (32, 24):  # device decode beside the reference, each row from its own loader
        assert [r["backend"] for r in rows[f"loader_torch_{res}"]] == ["torch:device:torchvision", "torch"]
        assert rows[f"loader_torch_{res}"][0]["decoder"].startswith("torchvision 0.")
        assert rows[f"loader_torch_{res}"][0]["decode"]["fallbacks"] == 0
    summary = (out / "summary.txt").read_text()
    assert "FAILED" not in summary and "tests (augment parity + sync audit): passed" in summary
    assert f"ops per step, rsb_a3.yaml (resnet10t, lamb, batch 4, none): batch stage {ops['batch stage']:,.0f}" in summary
    assert "us per dispatched op" in summary
    assert "ok" in (out / "device_check.log").read_text()


def test_a_failing_step_is_named_and_the_rest_still_run(tmp_path):
    log = tmp_path / "log"
    script = (f"LOG={log} LIMIT=3; source benchmarks/steps.sh; step good true; step bad false; step slow sleep 10; "
              "step after true; echo \"failed: ${failed[*]}\"")
    r = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip().splitlines()[-1] == "failed: bad slow"
    assert "!! slow failed (exit 124, over 3 s)" in r.stdout and "== after" in log.read_text()


def test_summaries_show_failed_steps_as_failed_never_as_figures():
    doc = {"machine": {"gpu": {"name": "H200"}, "versions": {}, "cpu_cores": 16},
           "results": [{"model": "resnet50", "device": "cuda:0", "images_per_sec": 4000.0, "min": 1.0, "max": 2.0}]}
    lines = summarize({"model_channels_last": doc, "model_compile": doc}, failed=["model_compile"])
    assert any(line.startswith("model only, resnet50 channels_last: 4,000 img/s") for line in lines)
    assert any(line.startswith("model only, model no_channels_last: FAILED") for line in lines)  # wrote nothing
    assert any("compile: FAILED" in line for line in lines) and "model only >= 5,000 img/s: MISSED" in lines
    assert lines[-1] == "FAILED steps: model_compile"


def test_summary_puts_ops_per_step_beside_the_steps_time():
    machine = {"gpu": {"name": "H100"}, "versions": {}, "cpu_cores": 16}
    ops = {"config": "rsb_a3.yaml", "model": "resnet50", "optim": "lamb", "batch_size": 256, "amp": "bf16",
           "batch stage": 1000, "forward + backward": 900, "optimizer": 42, "EMA": 0, "total": 1943}
    e2e = {"batch_size": 256, "world_size": 1, "images_per_sec": 2560.0, "min": 2500.0, "max": 2600.0, "data_stall": 0.0}
    docs = {"step_ops": {"machine": machine, "results": [ops]}, "e2e_synthetic": {"machine": machine, "results": [e2e]}}
    lines = summarize(docs, failed=[])
    assert ("ops per step, rsb_a3.yaml (resnet50, lamb, batch 256, bf16): batch stage 1,000, forward + backward 900, "
            "optimizer 42, EMA 0; 1,943 in all") in lines
    assert "e2e_synthetic: 100.0 ms per step, 51.5 us per dispatched op" in lines  # 256 images at 2,560 img/s
    assert "ops per step: FAILED" in summarize(docs, failed=["step_ops"])


def test_table_lists_every_result_row(tmp_path):
    (tmp_path / "loader.json").write_text(json.dumps({"results": [
        {"backend": "ffcv", "images_per_sec": 1234.0, "min": 1000.0, "max": 1300.0},
        {"backend": "dali", "images_per_sec": 999.0, "min": 900.0, "max": 1000.0, "data_stall": 0.25}]}))
    lines = table(tmp_path, ["e2e_torch"])
    assert "backend ffcv" in lines[0] and "1,234 img/s (1,000-1,300)" in lines[0]
    assert "data stall 25.0%" in lines[1] and lines[-1] == "FAILED steps (no results shown): e2e_torch"


def _stub(path: Path, body: str) -> None:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


NO_GPU = {  # how the machine says it has no GPU: a stub nvidia-smi, or none and the installed torch decides
    "nvidia-smi without a driver": (
        "echo \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\" >&2; exit 9",
        ["nvidia-smi -L lists no GPU"]),
    "nvidia-smi lists no device": ("echo 'No devices were found'; exit 6", ["nvidia-smi -L lists no GPU"]),
    # .venv's torch (or python3's) where there is one; a fresh checkout with neither: no /dev/nvidia*
    "no nvidia-smi": (None, ["torch sees no GPU", "no nvidia-smi, torch or /dev/nvidia* shows a GPU"]),
}


@pytest.mark.parametrize("case", list(NO_GPU))
def test_run_gpu_node_refuses_a_machine_without_a_gpu_before_installing_anything(tmp_path, case):
    """Exit 2 with the no-GPU message within seconds, before scripts/bootstrap.sh: stubs for the first
    commands bootstrap runs (dpkg, apt-get, sudo) record a call and fail, so a bootstrap would show even
    where everything is installed, and could install nothing."""
    smi, messages = NO_GPU[case]
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name in ("dpkg", "apt-get", "sudo"):
        _stub(stubs / name, f"echo {name} >> {tmp_path / 'installer_called'}; exit 1")
    if smi is None:
        import shutil

        import torch

        if shutil.which("nvidia-smi") or torch.cuda.is_available():
            pytest.skip("this machine has a GPU or an nvidia-smi: the case needs neither")
    else:
        _stub(stubs / "nvidia-smi", smi)
    stamp = ROOT / ".venv" / ".fastrsb-installed"
    before = stamp.stat().st_mtime_ns if stamp.exists() else None
    start = time.monotonic()
    r = subprocess.run(["bash", "benchmarks/run_gpu_node.sh", "imagenet-like"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}"})
    took = time.monotonic() - start
    assert r.returncode == 2 and any(f"run_gpu_node.sh: {m} on " in r.stderr for m in messages), r.stdout + r.stderr
    assert "this suite measures GPUs" in r.stderr and "benchmarks/device_check.sh" in r.stderr
    assert "[bootstrap]" not in r.stdout + r.stderr and "setting up .venv" not in r.stderr
    assert not (tmp_path / "installer_called").exists()
    assert (stamp.stat().st_mtime_ns if stamp.exists() else None) == before
    assert took < 30, f"{case}: {took:.1f} s to refuse"
    assert not list((ROOT / "benchmarks" / "results").glob("*x*"))  # nothing written
