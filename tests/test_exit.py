"""A process that used a loader exits 0, closed or not: every backend and decoder, train and val, with the
epochs left running (their threads busy decoding ahead) and with the loaders and iterators deleted.

Each case is a child process under a timeout that fails the test naming it. Before fastrsb.data.base ended
the running epochs at exit, data.torch_decode=device died with SIGABRT ("terminate called without an active
exception") every time and the ffcv backend now and then."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(300)
BOUND_S = 60  # a child imports torch and builds two loaders: ~5 s here
SPECS = ["ffcv", "ffcv:ffcv", "dali", "torch", "torch:device", "synthetic"]

CHILD = """
import sys
from fastrsb.config import load_config
from fastrsb.data import parse_backend_spec
from fastrsb.data import create_loader
from fastrsb.dist import DistInfo

spec, path, how = sys.argv[1:4]
backend, decoder = parse_backend_spec(spec)
cfg = load_config(values={"data": {"path": path, "backend": backend, "batch_size": 2, "train_res": 32, "val_res": 32,
                                   "workers": 2, "synthetic_num_samples": 60, "synthetic_num_classes": 3, **decoder},
                          "train": {"device": "cpu"}})
loaders = [create_loader(cfg, split, DistInfo()) for split in ("train", "val")]
iterators = [iter(loader) for loader in loaders]
print([tuple(next(it).images.shape) for it in iterators], flush=True)
if how == "deleted":
    del loaders, iterators
"""


# deleted: only the backends that were seen to abort (every child costs ~5 s of the suite)
CASES = [(spec, "left running") for spec in SPECS] + [("ffcv", "deleted"), ("torch:device", "deleted")]


@pytest.mark.parametrize("spec, how", CASES)
def test_a_process_that_used_a_loader_exits_0_without_closing_it(coded_dataset, spec, how):
    what = f"a process that took one train and one val batch from {spec} ({how})"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    try:
        r = subprocess.run([sys.executable, "-c", CHILD, spec, str(coded_dataset), how], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=BOUND_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"hung: {what} had not exited after {BOUND_S} s\n{(e.stderr or b'')[-2000:]!r}")
    assert r.stdout.startswith("[(2, 3, 32, 32), (2, 3, 32, 32)]"), f"{what}: {r.stdout}\n{r.stderr[-2000:]}"
    assert r.returncode == 0, f"{what}: exit {r.returncode}\n{r.stderr[-2000:]}"
