"""The trainer on CPU: precision paths, checkpoints, resume, signals, metrics, eval/average/sweep, DDP over gloo."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastrsb.config import load_config
from fastrsb.dist import DistInfo

pytestmark = pytest.mark.timeout(600)
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TINY = ["model.name=resnet10t", "data.batch_size=8", "data.train_res=32", "data.val_res=32", "data.workers=1",
        "train.device=cpu", "train.log_interval=2", "train.amp=none"]


# ------------------------------------------------------------------ in-process pieces
def _synthetic_trainer(tmp_path, *extra):
    from fastrsb.trainer import Trainer

    cfg = load_config(CONFIGS / "demo.yaml", [*TINY, "data.backend=synthetic", "data.synthetic_num_samples=24",
                                              "data.synthetic_num_classes=5", *extra])
    return Trainer(cfg, tmp_path / "run", DistInfo())


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_path_on_cpu(tmp_path, amp):
    """The one AMP path with autocast on the CPU: inputs in the AMP dtype, GradScaler only for fp16,
    the scaler's state round-trips through a checkpoint."""
    tr = _synthetic_trainer(tmp_path, f"train.amp={amp}", "augment.mixup_alpha=0.2")
    assert tr.scaler.is_enabled() == (amp == "fp16")
    batch = next(iter(tr.train_loader))
    assert tr.train_aug(batch.images, batch.targets)[0].dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    stats = tr.train_epoch(None, max_steps=2)
    assert stats is not None and math.isfinite(stats["loss"]) and tr.step == 2
    path = tr.save_checkpoint()
    again = _synthetic_trainer(tmp_path / "again", f"train.amp={amp}", "augment.mixup_alpha=0.2")
    again.resume(str(path))
    assert again.scaler.state_dict() == tr.scaler.state_dict() and again.step == 2


def test_resume_after_the_epochs_last_step(tmp_path):
    """A checkpoint taken after an epoch's last batch resumes into the epoch's end, with the epoch's figures."""
    tr = _synthetic_trainer(tmp_path, "train.epochs=2")
    first = tr.train_epoch(None)
    assert tr.batch_in_epoch == tr.steps_per_epoch == 3
    path = tr.save_checkpoint()
    again = _synthetic_trainer(tmp_path / "again", "train.epochs=2")
    again.resume(str(path))
    assert again.train_epoch(None)["loss"] == first["loss"] and again.step == 3
    assert again.fit()["val_top1"] >= 0 and again.step == 6


def _run(data, out, *extra, backend="torch", timeout=300, check=True, **popen):
    cmd = [sys.executable, "-m", "fastrsb", "train", "--config", str(CONFIGS / "demo.yaml"), "--data", str(data),
           "--out", str(out), *[f"--{o}" for o in TINY], f"--data.backend={backend}", *extra]
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _final(out):
    lines = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "val_top1" in r][-1]


def _model_state(out):
    from fastrsb.checkpoint import list_checkpoints, load

    return load(list_checkpoints(Path(out) / "checkpoints")[0])["model"]


REF_ARGS = ("--train.epochs=2", "--train.checkpoint_every_minutes=0", "--ema.enabled=true")


@pytest.fixture(scope="module")
def ref_run(small_dataset, tmp_path_factory):
    """One uninterrupted run shared by the tests below (they copy it before changing anything):
    60 images // batch 8 = 7 steps per epoch, 2 epochs, a checkpoint every log interval (2 steps)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    _run(small_dataset, out, *REF_ARGS)
    return out


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_kill_and_resume_is_bit_exact(small_dataset, ref_run, tmp_path):
    """SIGKILL mid-epoch, resume from the last checkpoint: the same final weights and metrics as an
    uninterrupted run (torch backend: per-sample seeded augmentation; CPU fp32)."""
    p = _run(small_dataset, tmp_path / "killed", *REF_ARGS, start_new_session=True)
    ckpts = tmp_path / "killed" / "checkpoints"
    t0 = time.time()
    # kill once a checkpoint from inside epoch 2 exists (epoch 1 ends at step 7)
    while not any(ckpts.glob("ckpt_e0001_s00000000[89].pt")):
        assert p.poll() is None and time.time() - t0 < 240
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    r = _run(small_dataset, tmp_path / "killed", *REF_ARGS, "--resume=auto")
    assert re.search(r"resumed from .* \(epoch 1, batch [1-6]\)", r.stdout), r.stdout  # mid-epoch
    ref, res = _final(ref_run), _final(tmp_path / "killed")
    for key in ("val_top1", "val_top5", "ema_val_top1", "ema_val_top5", "loss"):
        assert ref[key] == res[key], key
    a, b = _model_state(ref_run), _model_state(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_checkpoints_and_exits_cleanly(small_dataset, tmp_path):
    p = _run(small_dataset, tmp_path / "run", "--train.epochs=50", start_new_session=True)
    log = tmp_path / "run" / "metrics.jsonl"
    t0 = time.time()
    while not (log.exists() and log.read_text().count("\n") >= 2):
        assert p.poll() is None and time.time() - t0 < 240
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    assert '"interrupted": true' in out
    from fastrsb.checkpoint import list_checkpoints, load

    state = load(list_checkpoints(tmp_path / "run" / "checkpoints")[0])
    assert state["step"] > 0 and state["config"]["train"]["epochs"] == 50
    assert state["step"] == json.loads(out.strip().splitlines()[-1])["step"]  # the step it stopped after


def test_corrupt_checkpoint_is_refused_and_auto_resume_skips_it(small_dataset, ref_run, tmp_path):
    from fastrsb.checkpoint import CheckpointError, latest_loadable, list_checkpoints, load

    out = _copy_run(ref_run, tmp_path / "run")
    ckpts = list_checkpoints(out / "checkpoints")
    newest = ckpts[0]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # torn write
    with pytest.raises(CheckpointError, match="corrupt"):
        load(newest)
    with pytest.warns(UserWarning, match="skipping"):
        path, state = latest_loadable(out / "checkpoints")
    assert path == ckpts[1] and state["step"] < 14
    r = _run(small_dataset, out, *REF_ARGS, f"--resume={newest}", check=False)
    assert r.returncode == 2 and "corrupt" in r.stderr
    # a flipped bit inside the tensor data leaves a file torch.load would read without complaint
    data = bytearray(ckpts[1].read_bytes())
    data[len(data) // 2] ^= 0x01
    ckpts[1].write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC"):
        load(ckpts[1])
    with pytest.warns(UserWarning, match="skipping"):
        assert latest_loadable(out / "checkpoints")[0] == ckpts[2]


def test_non_finite_loss_stops_without_overwriting(small_dataset, ref_run, tmp_path):
    out = _copy_run(ref_run, tmp_path / "run")
    good = {p.name: p.read_bytes() for p in (out / "checkpoints").glob("*.pt")}
    r = _run(small_dataset, out, "--train.epochs=3", "--resume=auto", "--optim.lr=1e30", check=False)
    assert r.returncode == 3 and "not finite" in r.stderr
    assert {p.name: p.read_bytes() for p in (out / "checkpoints").glob("*.pt")} == good


def test_eval_and_average_commands(small_dataset, ref_run, tmp_path):
    from fastrsb.checkpoint import list_checkpoints
    from fastrsb.run_cli import evaluate_checkpoint

    final = _final(ref_run)
    newest = list_checkpoints(ref_run / "checkpoints")[0]
    # fastrsb eval reproduces the figures the run logged for its last checkpoint, raw and EMA
    assert evaluate_checkpoint(str(newest), str(small_dataset), device="cpu")["top1"] == final["val_top1"]
    r = subprocess.run([sys.executable, "-m", "fastrsb", "eval", "--checkpoint", str(newest), "--data",
                        str(small_dataset), "--device", "cpu", "--ema"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["num_samples"] == 18 and (m["top1"], m["top5"]) == (final["ema_val_top1"], final["ema_val_top5"])

    out = _copy_run(ref_run, tmp_path / "run")
    r = subprocess.run([sys.executable, "-m", "fastrsb", "average", str(out), "--best", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from fastrsb.checkpoint import load

    avg = load(out / "averaged.pt", required=("model", "ema", "config"))
    scored = [s for s in map(load, list_checkpoints(out / "checkpoints")) if "val_top1" in s["metrics"]]
    assert len(scored) == 2 and avg["averaged_by"] == "val_top1"
    for key in ("model", "ema"):
        for name, v in avg[key].items():
            if v.is_floating_point():
                torch.testing.assert_close(v, (scored[0][key][name] + scored[1][key][name]) / 2)
    m = evaluate_checkpoint(str(out / "averaged.pt"), str(small_dataset), device="cpu")
    assert m["num_samples"] == 18 and 0 <= m["top1"] <= m["top5"] <= 100
    r = subprocess.run([sys.executable, "-m", "fastrsb", "average", str(out), "--best", "3"], capture_output=True, text=True)
    assert r.returncode == 2 and "--best 3" in r.stderr


def test_metrics_lines(ref_run):
    lines = [json.loads(x) for x in (ref_run / "metrics.jsonl").read_text().splitlines()]
    step_lines = [r for r in lines if r["kind"] == "interval"]
    assert len(step_lines) == 14 // 2  # 60 train images // batch 8 = 7 steps per epoch, 2 epochs, every 2nd step
    for r in lines:  # interval and epoch lines carry the same train figures
        assert r["images_per_sec"] > 0 and 0 <= r["data_stall"] <= 1 and r["peak_memory_mb"] > 0
        assert math.isfinite(r["loss"]) and r["lr"] > 0 and r["res"] == 32
    epochs = [r for r in lines if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and [r["step"] for r in epochs] == [7, 14]
    assert all({"val_top1", "val_top5", "ema_val_top1", "ema_val_top5", "epoch_time_s"} <= set(r) for r in epochs)
    assert [r["epoch"] for r in step_lines][:2] == [round(2 / 7, 4), round(4 / 7, 4)]


def test_two_process_gloo_ddp(small_dataset, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastrsb",
           "train", "--config", str(CONFIGS / "demo.yaml"), "--data", str(small_dataset), "--out", str(out),
           *[f"--{o}" for o in TINY], "--data.backend=dali", "--train.epochs=2", "--train.checkpoint_every_minutes=0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    final = _final(out)
    assert 0 <= final["val_top1"] <= 100
    from fastrsb.checkpoint import list_checkpoints, load

    ckpts = list_checkpoints(out / "checkpoints")
    assert len(ckpts) > 2  # mid-epoch checkpoints too: every rank agreed to take them at the same step
    state = load(ckpts[0])
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["rng"][0]["torch"].tolist() != state["rng"][1]["torch"].tolist()
    # ranks stayed in sync: DDP keeps one set of weights, so loading them back evaluates cleanly
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_sweep_summarises_seeds(small_dataset, tmp_path):
    out = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "-m", "fastrsb", "sweep", "--config", str(CONFIGS / "demo.yaml"),
                        "--data", str(small_dataset), "--out", str(out), "--seeds", "0,1",
                        *[f"--{o}" for o in TINY], "--data.backend=torch", "--train.epochs=1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "sweep.json").read_text())
    finals = [_final(out / f"seed{s}")["val_top1"] for s in (0, 1)]
    assert summary["seeds"] == [0, 1] and summary["val_top1"]["per_seed"] == finals
    assert summary["val_top1"]["mean"] == pytest.approx(sum(finals) / 2)
    assert summary["val_top1"]["std"] == pytest.approx(abs(finals[0] - finals[1]) / math.sqrt(2))
    assert "val_top1" in r.stdout and "±" in r.stdout
