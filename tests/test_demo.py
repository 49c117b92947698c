"""The demo end to end: embedded digits -> convert -> train on CPU with ffcv and dali -> eval."""
from __future__ import annotations

import json

import pytest

from fastrsb.demo import run_demo

pytestmark = pytest.mark.timeout(900)


def test_demo_learns_far_above_chance(tmp_path):
    summary = run_demo(tmp_path / "demo")
    assert json.loads((tmp_path / "demo" / "summary.json").read_text()) == json.loads(json.dumps(summary))
    for backend in ("ffcv", "dali"):
        assert summary[backend]["val_top1"] > 80.0, summary  # 10 classes: chance is 10%
        assert summary[backend]["images_per_sec"] > 0
