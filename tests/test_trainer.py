"""The trainer on CPU: schedules, losses, recipes, checkpoints, resume, signals, DDP over gloo."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastrsb.config import ConfigError, load_config
from fastrsb.dist import DistInfo
from fastrsb.optim import lr_at, resolution_at

pytestmark = pytest.mark.timeout(600)
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TINY = ["model.name=resnet18", "data.batch_size=8", "data.train_res=32", "data.val_res=32", "data.workers=1",
        "train.device=cpu", "train.log_interval=2", "train.amp=none"]


def tiny_cfg(data, backend="torch", extra=()):
    return load_config(CONFIGS / "demo.yaml", [*TINY, f"data.backend={backend}", f"data.path={data}", *extra])


# ------------------------------------------------------------------ pure pieces
def test_cosine_schedule_values():
    cfg = load_config(None, ["schedule.warmup_epochs=5", "schedule.min_lr=1e-6", "schedule.warmup_start=0.0",
                             "schedule.cooldown_epochs=10"]).schedule
    spe, epochs, peak = 100, 610, 5e-3
    assert lr_at(0, spe, epochs, peak, cfg) == 0.0
    assert lr_at(250, spe, epochs, peak, cfg) == pytest.approx(peak / 2)
    assert lr_at(500, spe, epochs, peak, cfg) == pytest.approx(peak)
    mid = 500 + (60000 - 500) / 2  # halfway through the cosine (ends at epoch 600, then cooldown)
    assert lr_at(mid, spe, epochs, peak, cfg) == pytest.approx(1e-6 + 0.5 * (peak - 1e-6))
    assert lr_at(60000, spe, epochs, peak, cfg) == pytest.approx(1e-6)
    assert lr_at(60900, spe, epochs, peak, cfg) == pytest.approx(1e-6)


def test_cyclic_and_step_schedules_and_progressive_resizing():
    cyc = load_config(CONFIGS / "ffcv_rn50_88ep.yaml").schedule
    assert lr_at(0, 10, 88, 1.7, cyc) == pytest.approx(1.7e-4)
    assert lr_at(20, 10, 88, 1.7, cyc) == pytest.approx(1.7)
    assert lr_at(450, 10, 88, 1.7, cyc) == pytest.approx(1.7 * (88 - 45) / 86)
    step = load_config(None, ["schedule.kind=step", "schedule.warmup_epochs=0", "schedule.step_epochs=30"]).schedule
    assert lr_at(2999, 100, 90, 0.1, step) == pytest.approx(0.1)
    assert lr_at(3000, 100, 90, 0.1, step) == pytest.approx(0.01)
    prog = load_config(CONFIGS / "ffcv_rn50_88ep.yaml").progressive
    assert [resolution_at(e, prog, 0) for e in (0, 65, 70, 76, 87)] == [160, 160, 160, 192, 192]
    assert resolution_at(73, prog, 0) == 192 and resolution_at(68, prog, 0) == 160


def test_bce_and_kd_numerics_against_formulas():
    from fastrsb.config import LossConfig
    from fastrsb.losses import Criterion, TaskLoss, kd_loss

    torch.manual_seed(0)
    logits = torch.randn(6, 5)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    bce = TaskLoss(LossConfig(kind="bce", label_smoothing=0.1, bce_target_threshold=0.2))
    smooth = torch.full((6, 5), 0.1 / 5)
    smooth[torch.arange(6), y] += 0.9
    target = (smooth > 0.2).float()  # timm: threshold the smoothed target
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert bce(logits, y).item() == pytest.approx(ref.item(), rel=1e-6)
    ce = TaskLoss(LossConfig(kind="ce", label_smoothing=0.1))
    logp = logits.log_softmax(-1)
    ref_ce = (-(smooth * logp).sum(-1)).mean()
    assert ce(logits, y).item() == pytest.approx(ref_ce.item(), rel=1e-5)
    teacher = torch.randn(6, 5)
    t = 2.0
    p_t = (teacher / t).softmax(-1)
    ref_kl = (p_t * (p_t.log() - (logits / t).log_softmax(-1))).sum(-1).mean() * t * t
    assert kd_loss(logits, teacher, t).item() == pytest.approx(ref_kl.item(), rel=1e-5)
    crit = Criterion(LossConfig(kind="ce", kd_weight=0.8, kd_temperature=t), teacher=lambda x: teacher)
    expect = 0.8 * ref_kl + 0.2 * torch.nn.functional.cross_entropy(logits, y)
    assert crit(None, logits, y).item() == pytest.approx(expect.item(), rel=1e-5)


def test_no_weight_decay_on_1d_parameters():
    from fastrsb.config import ModelConfig, OptimConfig
    from fastrsb.model import create_model
    from fastrsb.optim import create_optimizer

    model = create_model(ModelConfig(name="resnet18"), 10, torch.device("cpu"))
    opt = create_optimizer(model, OptimConfig(name="lamb", weight_decay=0.02), 1e-3)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim > 1), name  # downsample BN and biases included


def test_unknown_key_and_wrong_type_name_the_key():
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config(CONFIGS / "rsb_a1.yaml", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(CONFIGS / "rsb_a1.yaml", ["train.epochs=ten"])


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_recipe_builds_on_cpu(recipe, small_dataset, tmp_path):
    """Model, optimizer, schedule, loss, augmentation and loaders from each recipe, on tiny data."""
    from fastrsb.trainer import Trainer

    extra = [f"data.path={small_dataset}", "data.backend=torch", "data.batch_size=4", "data.workers=1",
             "train.device=cpu", "data.train_res=32", "data.val_res=32"]
    if recipe == "kd_lamb_ema.yaml":
        teacher = tmp_path / "teacher.pt"
        import timm

        torch.save(timm.create_model("resnet50", num_classes=3).state_dict(), teacher)
        extra.append(f"loss.kd_teacher={teacher}")
    cfg = load_config(CONFIGS / recipe, extra)
    tr = Trainer(cfg, tmp_path / "run", DistInfo())
    batch = next(iter(tr.train_loader))
    x, y = tr.train_aug(batch.images, batch.targets)
    loss = tr.criterion(x, tr.net(x), y)
    assert torch.isfinite(loss)
    assert tr.num_classes == 3


# ------------------------------------------------------------------ runs
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


def test_kill_and_resume_is_bit_exact(small_dataset, tmp_path):
    """SIGKILL mid-epoch, resume from the last checkpoint: the same final weights and metrics as an
    uninterrupted run (torch backend: per-sample seeded augmentation; CPU fp32)."""
    args = ("--train.epochs=3", "--train.checkpoint_every_minutes=0", "--ema.enabled=true")
    _run(small_dataset, tmp_path / "ref", *args)
    p = _run(small_dataset, tmp_path / "killed", *args, start_new_session=True)
    ckpts = tmp_path / "killed" / "checkpoints"
    t0 = time.time()
    while not any(ckpts.glob("ckpt_e0001_*.pt")):  # a mid-epoch-2 checkpoint exists once epoch 1 is done
        assert p.poll() is None and time.time() - t0 < 240
        time.sleep(0.05)
    while len(list(ckpts.glob("ckpt_*.pt"))) < 3:
        assert p.poll() is None and time.time() - t0 < 240
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    r = _run(small_dataset, tmp_path / "killed", *args, "--resume=auto")
    assert "resumed from" in r.stdout
    ref, res = _final(tmp_path / "ref"), _final(tmp_path / "killed")
    for key in ("val_top1", "val_top5", "ema_val_top1"):
        assert ref[key] == res[key], key
    a, b = _model_state(tmp_path / "ref"), _model_state(tmp_path / "killed")
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


def test_corrupt_checkpoint_is_refused_and_auto_resume_skips_it(small_dataset, tmp_path):
    from fastrsb.checkpoint import CheckpointError, latest_loadable, list_checkpoints, load

    out = tmp_path / "run"
    _run(small_dataset, out, "--train.epochs=2")
    ckpts = list_checkpoints(out / "checkpoints")
    assert len(ckpts) == 2
    newest = ckpts[0]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # torn write
    with pytest.raises(CheckpointError, match="corrupt"):
        load(newest)
    with pytest.warns(UserWarning, match="skipping"):
        path, state = latest_loadable(out / "checkpoints")
    assert path == ckpts[1] and state["epoch"] == 1
    r = _run(small_dataset, out, "--train.epochs=2", f"--resume={newest}", check=False)
    assert r.returncode == 2 and "corrupt" in r.stderr


def test_non_finite_loss_stops_without_overwriting(small_dataset, tmp_path):
    out = tmp_path / "run"
    _run(small_dataset, out, "--train.epochs=1")
    good = sorted((out / "checkpoints").glob("*.pt"))
    r = _run(small_dataset, out, "--train.epochs=2", "--resume=auto", "--optim.lr=1e30", "--optim.name=sgd", check=False)
    assert r.returncode == 3 and "not finite" in r.stderr
    assert sorted((out / "checkpoints").glob("*.pt")) == good


def test_eval_and_average_commands(small_dataset, tmp_path):
    out = tmp_path / "run"
    _run(small_dataset, out, "--train.epochs=3", "--ema.enabled=true")
    r = subprocess.run([sys.executable, "-m", "fastrsb", "average", str(out), "--best", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for extra in ([], ["--ema"]):
        r = subprocess.run([sys.executable, "-m", "fastrsb", "eval", "--checkpoint", str(out / "averaged.pt"),
                            "--data", str(small_dataset), "--device", "cpu", *extra], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        m = json.loads(r.stdout.strip().splitlines()[-1])
        assert m["num_samples"] == 18 and 0 <= m["top1"] <= m["top5"] <= 100


def test_metrics_lines(small_dataset, tmp_path):
    out = tmp_path / "run"
    _run(small_dataset, out, "--train.epochs=1", "--ema.enabled=true")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    step_lines = [r for r in lines if "images_per_sec" in r]
    assert step_lines and all(r["images_per_sec"] > 0 and 0 <= r["data_stall"] <= 1 and r["peak_memory_mb"] > 0
                              and math.isfinite(r["loss"]) and r["lr"] > 0 for r in step_lines)
    assert {"val_top1", "val_top5", "ema_val_top1", "ema_val_top5"} <= set(lines[-1])


def test_two_process_gloo_ddp(small_dataset, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastrsb",
           "train", "--config", str(CONFIGS / "demo.yaml"), "--data", str(small_dataset), "--out", str(out),
           *[f"--{o}" for o in TINY], "--data.backend=dali", "--train.epochs=2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    final = _final(out)
    assert 0 <= final["val_top1"] <= 100
    from fastrsb.checkpoint import list_checkpoints, load

    state = load(list_checkpoints(out / "checkpoints")[0])
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    # ranks stayed in sync: DDP keeps one set of weights, so loading them back evaluates cleanly
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
