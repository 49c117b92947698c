"""A stored sample damaged after conversion: every backend replaces it by another sample of its batch (the same
one on every backend), names it once per pass, counts it; the trainer carries the count, resumes to the same
weights, and stops past data.max_bad_samples with a checkpoint and an error that names it.

Damage as a disk error leaves it (tests.datagen.damage_sample): zeros over the JPEG's start markers ("start": no
decoder recognises it), or over its scan header ("scan": decoders fail part-way; DALI raises, and its pipeline
must be rebuilt). ffcv's own decoders (data.ffcv_decoder=ffcv) ignore TurboJPEG's errors: only a walk of the
markers up to the frame header guards them, which "start" damage fails and "scan" damage passes."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastrsb.config import load_config
from fastrsb.data import parse_backend_spec
from fastrsb.data import create_loader
from fastrsb.data.bad_samples import BadDataError, replacement_sources
from fastrsb.dist import DistInfo
from tests.datagen import damage_sample, sample_ids
from tests.test_loaders import batched, make_cfg
from tests.test_no_hangs import guarded

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parent.parent
SPECS = ["ffcv", "ffcv:ffcv", "dali", "torch", "torch:device"]
SEES_SCAN_DAMAGE = ["ffcv", "dali", "torch", "torch:device"]
BAD = {"train": 9, "val": 4}  # the damaged sample of each split


def test_a_bad_sample_takes_the_next_good_one_of_its_batch():
    assert replacement_sources(np.array([0, 1, 0, 1, 1], bool)).tolist() == [0, 2, 2, 0, 0]
    assert replacement_sources(np.zeros(3, bool)).tolist() == [0, 1, 2]
    with pytest.raises(BadDataError, match="none of the 2 samples of a batch could be decoded"):
        replacement_sources(np.ones(2, bool))


def _damaged_copy(src: Path, dst: Path, where: str) -> Path:
    shutil.copytree(src, dst)
    for split, index in BAD.items():
        damage_sample(dst, split, index, where)
    return dst


@pytest.fixture(scope="module", params=["start", "scan"])
def damaged_coded(request, coded_dataset, tmp_path_factory):
    return request.param, _damaged_copy(coded_dataset, tmp_path_factory.mktemp("damaged") / "data", request.param)


def _expected(indices: np.ndarray, bs: int, bad: int) -> list[list[int]]:
    """The sampler's batches with the bad sample replaced by the next good one of its batch."""
    out = []
    for batch in batched(indices, bs):
        src = replacement_sources(np.array(batch) == bad)
        out.append([batch[j] for j in src])
    return out


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("spec", SPECS)
def test_every_backend_replaces_a_damaged_sample_alike_and_names_it_once_per_pass(damaged_coded, spec, split,
                                                                                  capfd):
    where, data = damaged_coded
    if where == "scan" and spec not in SEES_SCAN_DAMAGE:
        pytest.skip("ffcv's own decoders cannot see damage past the frame header (docs/data.md)")
    backend, decoder = parse_backend_spec(spec)
    loader = create_loader(make_cfg(data, backend, **decoder), split, DistInfo())
    bad = BAD[split]
    for epoch in (0, 1):  # DALI's second pass already knows the sample: no failure, the same replacement
        loader.set_epoch(epoch)
        images, labels = guarded(f"{spec} {split} epoch {epoch} with a damaged sample",
                                 lambda: list(zip(*[(b.images.clone(), b.targets.clone()) for b in loader])))
        expected = _expected(loader.plan().indices, loader.batch_size, bad)
        assert sample_ids(data, split, images) == expected
        assert torch.cat(labels).tolist() == _labels(data, split, expected)  # each label with its image
        named = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("[data]")]
        in_epoch = bad in loader.plan().indices
        assert len(named) == in_epoch and loader.bad_samples.in_pass == ({bad} if in_epoch else set()), named
        if in_epoch:
            assert re.match(rf"\[data\] {split} sample {bad} \(.*\) could not be decoded \(.+\); replaced by another "
                            rf"sample of its batch \(1 in this pass, 1 in all", named[0]), named[0]
    loader.set_epoch(1, start_batch=2)  # a resumed epoch continues the same batches
    rest = guarded(f"{spec} {split}: a resumed epoch", lambda: [b.images.clone() for b in loader])
    assert sample_ids(data, split, rest) == expected[2:]


def _labels(data: Path, split: str, batches: list[list[int]]) -> list[int]:
    from dataprep.layout import open_dataset

    labels = open_dataset(data).split(split).labels
    return [int(labels[i]) for batch in batches for i in batch]


# ------------------------------------------------------------------ through the trainer
TINY = ["model.name=resnet10t", "data.batch_size=8", "data.train_res=32", "data.val_res=32", "data.workers=1",
        "train.device=cpu", "train.log_interval=2", "train.amp=none", "train.epochs=2",
        "train.checkpoint_every_minutes=0"]


@pytest.fixture(scope="module")
def damaged_small(small_dataset, tmp_path_factory):
    return _damaged_copy(small_dataset, tmp_path_factory.mktemp("damaged_small") / "data", "start")


def _trainer(data: Path, out: Path, spec: str, *extra: str):
    from fastrsb.trainer import Trainer

    backend, decoder = parse_backend_spec(spec)
    cfg = load_config(ROOT / "configs" / "demo.yaml", [*TINY, f"data.path={data}", f"data.backend={backend}",
                                                        *(f"data.{k}={v}" for k, v in decoder.items()), *extra])
    return Trainer(cfg, out, DistInfo())


@pytest.mark.parametrize("spec", SPECS)
def test_a_run_with_a_damaged_sample_finishes_counts_it_and_resumes_to_the_same_weights(damaged_small, spec,
                                                                                        tmp_path):
    """Two epochs over a dataset with one damaged train and one damaged val sample: the run finishes, each epoch
    line of metrics.jsonl carries how many it met, and a run resumed from a mid-epoch checkpoint ends with the
    uninterrupted run's weights (the replacement is a pure function of the batch)."""
    import json

    from fastrsb.checkpoint import list_checkpoints
    from tests.test_trainer import _assert_same_weights

    ref = _trainer(damaged_small, tmp_path / "ref", spec)
    ref.fit()
    epochs = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
              if '"kind": "epoch"' in x]
    in_epoch = [int(BAD["train"] in ref.train_loader.plan(e, 0).indices) for e in (0, 1)]
    assert [e["bad_samples"] for e in epochs] == in_epoch and [e["val_bad_samples"] for e in epochs] == [1, 1]
    if spec == "ffcv:ffcv":
        return  # ffcv's own decoders draw unseeded crops: no run of theirs repeats, damaged or not
    mid = next(p for p in list_checkpoints(tmp_path / "ref" / "checkpoints") if "_e0001_" in p.name)
    again = _trainer(damaged_small, tmp_path / "again", spec)
    again.resume(str(mid))
    assert 0 < again.batch_in_epoch < again.steps_per_epoch
    again.fit()
    _assert_same_weights(again.raw_model, ref.raw_model)
    _assert_same_weights(again.ema.module, ref.ema.module)


@pytest.mark.parametrize("spec", SPECS)
def test_past_max_bad_samples_the_run_checkpoints_and_stops_naming_them(damaged_small, spec, tmp_path):
    tr = _trainer(damaged_small, tmp_path / "run", spec, "data.max_bad_samples=0")
    with pytest.raises(BadDataError) as e:
        tr.fit()  # in the main thread: fit() installs its signal handlers
    message = str(e.value)
    assert re.search(rf"1 (train|val) sample\(s\) could not be decoded, more than data.max_bad_samples=0:\n  "
                     rf"(train sample {BAD['train']}|val sample {BAD['val']}) \(source .*\): ", message), message
    assert f"fastrsb verify {damaged_small}" in message and "rerun the `fastrsb convert` command" in message
    ckpts = list((tmp_path / "run" / "checkpoints").glob("*.pt"))
    assert len(ckpts) == 1  # the state at the stop, to resume from after the repair


def test_the_command_line_exits_4_naming_the_sample(damaged_small, tmp_path):
    r = subprocess.run([sys.executable, "-m", "fastrsb", "train", "--config", str(ROOT / "configs" / "demo.yaml"),
                        "--data", str(damaged_small), "--out", str(tmp_path / "run"), *(f"--{o}" for o in TINY),
                        "--data.backend=torch", "--data.max_bad_samples=0"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 4, r.stderr[-3000:]
    assert re.search(r"fastrsb train: error: 1 (train|val) sample\(s\) could not be decoded", r.stderr), r.stderr[-3000:]
