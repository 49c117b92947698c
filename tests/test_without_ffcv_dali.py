"""fastrsb where ffcv, DALI and torchcodec are not installed (the lent GPU machine has none of them): every child
process runs with tests/no_ffcv_dali on PYTHONPATH, whose sitecustomize makes them unimportable and fails the
process (exit 97) if ffcv or DALI got imported anyway. Import, convert --formats dali, verify, bench model, bench
e2e, train on the torch (decoding on the device with torchvision) and synthetic backends work; asking for ffcv or
dali is a one-line error naming the package.
device_check.sh's CPU mode runs under the same blocker in tests/test_device_check.py.

FASTRSB_TEST_PYTHON=/path/to/python runs the children with another interpreter (a torch 2.11 venv, say),
fastrsb imported from this checkout."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.datagen import make_good_tree

ROOT = Path(__file__).resolve().parent.parent
BLOCKER = Path(__file__).resolve().parent / "no_ffcv_dali"
PYTHON = os.environ.get("FASTRSB_TEST_PYTHON", sys.executable)
CONFIGS = ROOT / "configs"
pytestmark = pytest.mark.timeout(300)
# the only modules that may need the missing packages, and the package each needs
BACKEND_MODULES = {"fastrsb.data.ffcv_loader": "ffcv", "fastrsb.data.ffcv_internals": "ffcv",
                   "fastrsb.data.dali_loader": "nvidia.dali"}
TINY_TRAIN = ["--model.name=resnet10t", "--data.batch_size=8", "--data.train_res=32", "--data.val_res=32",
              "--data.workers=1", "--train.device=cpu", "--train.log_interval=2", "--train.amp=none",
              "--train.epochs=1"]
TINY_E2E = ["--device", "cpu", "--config", str(CONFIGS / "rsb_a3.yaml"), "--steps", "2", "--repeats", "1",
            "--model.name=resnet10t", "--data.batch_size=4", "--train.amp=none", "--data.train_res=32",
            "--data.val_res=32", "--data.workers=1"]


def without_ffcv_dali(name: str, *args: str, rc: int = 0, timeout: float = 120, check_only: bool = False):
    """`PYTHON args` under the blocker, guarded by a timeout that fails the test naming the command; asserts
    its exit status is `rc` and returns the CompletedProcess."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BLOCKER), str(ROOT)]), "PYTHONUNBUFFERED": "1"}
    env.pop("FASTRSB_NO_FFCV_DALI", None)
    if check_only:
        env["FASTRSB_NO_FFCV_DALI"] = "check"
    try:
        r = subprocess.run([PYTHON, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{name}: still running after {timeout} s (hung?)\n{(e.stderr or b'')[-3000:]!r}")
    assert r.returncode == rc, f"{name}: exit {r.returncode}, expected {rc}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def test_the_blocker_blocks_and_its_exit_check_notices_an_import():
    r = without_ffcv_dali("blocked imports", "-c", """
import importlib
for name in ("ffcv", "ffcv.loader", "nvidia.dali", "nvidia.dali.fn", "torchcodec", "torchcodec.decoders"):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        print("missing", e.name)
import torch, torchvision, timm  # torch's CUDA libraries live under the nvidia namespace: not blocked
""")
    # a submodule is missing because its package is, as when the package is not installed
    assert r.stdout.split() == ["missing", "ffcv"] * 2 + ["missing", "nvidia.dali"] * 2 + ["missing", "torchcodec"] * 2
    has_ffcv = subprocess.run([PYTHON, "-c", "import importlib.util as u, sys; sys.exit(u.find_spec('ffcv') is None)"],
                              timeout=60).returncode == 0  # the children's interpreter, without the blocker
    if not has_ffcv:
        pytest.skip("ffcv is not installed in this interpreter: the exit check has nothing to catch")
    # the blocker broken on purpose (check only): the child that imports ffcv fails, naming it
    r = without_ffcv_dali("ffcv imported behind the blocker", "-c", "import ffcv", rc=97, check_only=True)
    assert "[no_ffcv_dali] imported: ffcv" in r.stderr


def test_every_module_but_the_two_backends_imports():
    r = without_ffcv_dali("import every module", "-c", """
import importlib, json, pkgutil
import benchmarks, dataprep, fastrsb
failed = {}
for pkg in (fastrsb, dataprep, benchmarks):
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if m.name.endswith(".__main__"):
            continue
        try:
            importlib.import_module(m.name)
        except Exception as e:
            failed[m.name] = [type(e).__name__, getattr(e, "name", None), str(e)]
print(json.dumps(failed))
""")
    failed = json.loads(r.stdout.strip().splitlines()[-1])
    assert {m: e[1] for m, e in failed.items()} == BACKEND_MODULES, failed
    assert all(e[0] == "ModuleNotFoundError" for e in failed.values()), failed


def test_convert_bench_and_train_without_ffcv_dali(tmp_path):
    """The lent GPU machine's whole workflow on tiny sizes, each step a fresh process under the blocker."""
    make_good_tree(tmp_path / "src" / "train", 8, size=(64, 48))
    make_good_tree(tmp_path / "src" / "val", 3, size=(64, 48), seed=1)
    data = tmp_path / "data"
    without_ffcv_dali("convert --formats dali", "-m", "fastrsb", "convert", str(tmp_path / "src"), str(data),
                      "--formats", "dali", "--workers", "1", "--no-progress")
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["settings"]["formats"] == ["dali"] and not list(data.glob("*.beton"))
    assert list((data / "dali").glob("train-*.tar")) and list((data / "dali").glob("train-*.idx"))
    without_ffcv_dali("verify", "-m", "fastrsb", "verify", str(data))
    # the default formats include ffcv: refused, naming the package
    r = without_ffcv_dali("convert (default formats)", "-m", "fastrsb", "convert", str(tmp_path / "src"),
                          str(tmp_path / "both"), "--workers", "1", "--no-progress", rc=2)
    assert "'ffcv' needs the ffcv package" in r.stderr and "No module named 'ffcv'" in r.stderr

    without_ffcv_dali("bench model", "-m", "fastrsb", "bench", "model", "--device", "cpu", "--model", "resnet10t",
                      "--res", "32", "--batch-size", "4", "--amp", "none", "--steps", "2", "--repeats", "1",
                      "--json", str(tmp_path / "model.json"))
    without_ffcv_dali("bench e2e --backend synthetic", "-m", "fastrsb", "bench", "e2e", *TINY_E2E, "--data",
                      str(data), "--backend", "synthetic", "--data.synthetic_num_samples=16",
                      "--json", str(tmp_path / "e2e.json"))
    for name in ("model", "e2e"):
        rows = json.loads((tmp_path / f"{name}.json").read_text())["results"]
        assert rows and all(row["images_per_sec"] > 0 for row in rows), (name, rows)

    # the torch backend as the GPU machine runs it: decoding on the device, with torchvision (no torchcodec there)
    first_lines = {"torch": "[train] resnet10t on torch (torchvision 0.", "synthetic": "[train] resnet10t on synthetic ("}
    for backend, first_line in first_lines.items():
        out = tmp_path / f"run_{backend}"
        r = without_ffcv_dali(f"train --data.backend={backend}", "-m", "fastrsb", "train", "--config",
                              str(CONFIGS / "demo.yaml"), "--data", str(data), "--out", str(out), *TINY_TRAIN,
                              f"--data.backend={backend}", "--data.torch_decode=device",
                              "--data.synthetic_num_samples=16")
        assert r.stdout.startswith(first_line), r.stdout[:300]
        assert "torchcodec is installed" not in r.stderr  # not installed is not unusable: no warning
        metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert any("val_top1" in m for m in metrics) and list((out / "checkpoints").iterdir()), backend

    # asking for the missing backends: exit 2 and one line naming the package and the extra to install
    r = without_ffcv_dali("bench e2e --backend ffcv", "-m", "fastrsb", "bench", "e2e", *TINY_E2E, "--data",
                          str(data), "--backend", "ffcv", rc=2)
    assert "backend 'ffcv' needs a library that is not installed: No module named 'ffcv'" in r.stderr
    assert "pip install -e '.[ffcv]'" in r.stderr and "Traceback" not in r.stderr
    r = without_ffcv_dali("train --data.backend=dali", "-m", "fastrsb", "train", "--config",
                          str(CONFIGS / "demo.yaml"), "--data", str(data), "--out", str(tmp_path / "run_dali"),
                          *TINY_TRAIN, "--data.backend=dali", rc=2)
    assert "backend 'dali' needs a library that is not installed: No module named 'nvidia.dali'" in r.stderr
    assert "pip install -e '.[dali]'" in r.stderr and "Traceback" not in r.stderr
