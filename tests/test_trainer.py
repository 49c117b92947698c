"""The trainer on CPU: precision paths, checkpoints, resume, signals, metrics, eval/average/sweep, DDP over gloo."""
from __future__ import annotations

import contextlib
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
from fastrsb.precision import autocast
from fastrsb.checkpoint import NonFiniteState

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
    """The one AMP path with autocast on the CPU: inputs and logits in the AMP dtype, a GradScaler only for
    fp16, whose scale and growth counter come back from a checkpoint; the resumed trainer then takes the
    very step the original takes."""
    tr = _synthetic_trainer(tmp_path, f"train.amp={amp}", "augment.mixup_alpha=0.2")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    assert tr.scaler.is_enabled() == (amp == "fp16")
    batch = next(iter(tr.train_loader))
    x, _ = tr.train_aug(batch.images, batch.targets)
    with autocast(tr.amp, tr.dist.device):
        assert x.dtype == dtype and tr.model(x).dtype == dtype
    windows = tr.run_steps(2)
    assert all(math.isfinite(w.loss) for w in windows) and tr.step == 2
    if amp == "fp16":  # a scale and growth counter no fresh scaler has
        tr.scaler.update(new_scale=float(2 ** 7))
        tr.scaler._growth_tracker.fill_(5)
    path = tr.save_checkpoint()
    tr.run_steps(1)  # before `again` exists: the RNGs (Mixup's is numpy's) are process-global
    again = _synthetic_trainer(tmp_path / "again", f"train.amp={amp}", "augment.mixup_alpha=0.2")
    again.resume(str(path))
    if amp == "fp16":
        assert again.scaler.get_scale() == 2 ** 7 and again.scaler.state_dict()["_growth_tracker"] == 5
    else:
        assert again.scaler.state_dict() == {}  # bf16 needs no loss scaling
    assert again.step == 2
    again.run_steps(1)
    _assert_same_weights(again.raw_model, tr.raw_model)


def test_resume_after_the_epochs_last_step(tmp_path):
    """A checkpoint taken after an epoch's last batch resumes into the epoch's end, with the epoch's figures."""
    tr = _synthetic_trainer(tmp_path, "train.epochs=2")
    tr.train_epoch()
    assert tr.batch_in_epoch == tr.steps_per_epoch == 3
    path = tr.save_checkpoint()
    again = _synthetic_trainer(tmp_path / "again", "train.epochs=2")
    again.resume(str(path))
    assert (again.epoch, again.batch_in_epoch, again.step) == (0, 3, 3)
    assert again.train_epoch() == [] and again.totals.loss == tr.totals.loss  # the epoch's figures came back
    resumed = again.fit()  # goes on from the end of epoch 0
    ref = _synthetic_trainer(tmp_path / "ref", "train.epochs=2")
    uninterrupted = ref.fit()
    assert again.step == ref.step == 6
    for key in ("loss", "val_top1", "val_top5", "ema_val_top1", "ema_val_top5"):
        assert resumed[key] == uninterrupted[key], key
    _assert_same_weights(again.raw_model, ref.raw_model)
    _assert_same_weights(again.ema.module, ref.ema.module)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])][:3]


def test_synthetic_backend_resumes_mid_epoch_bit_exact(tmp_path):
    """The synthetic backend keys its images on the sample index: stopped after 2 of the last epoch's 3 steps,
    checkpointed and resumed, a run ends with the weights and figures of an uninterrupted one (the epoch's
    loss included: the resumed part adds to the checkpointed sum)."""
    ref = _synthetic_trainer(tmp_path / "ref", "train.epochs=2")
    uninterrupted = ref.fit()
    first = _synthetic_trainer(tmp_path / "first", "train.epochs=2")
    first.run_steps(first.steps_per_epoch + 2)
    path = first.save_checkpoint()
    again = _synthetic_trainer(tmp_path / "again", "train.epochs=2")
    again.resume(str(path))
    assert (again.epoch, again.batch_in_epoch) == (1, 2)
    resumed = again.fit()
    for key in ("loss", "val_top1", "val_top5", "ema_val_top1", "ema_val_top5"):
        assert resumed[key] == uninterrupted[key], key
    _assert_same_weights(again.raw_model, ref.raw_model)
    _assert_same_weights(again.ema.module, ref.ema.module)


def test_the_epochs_loss_does_not_depend_on_where_log_windows_close():
    """A checkpoint, a stop or a resume closes a log window early; the epoch's loss (summed over windows) must not
    change with it, or a resumed run reports another figure than an uninterrupted one. Here 1 + 2**-30 is exact
    in a double sum of the float32 step losses and rounds to 1 in a float32 one."""
    from fastrsb.metrics import EpochTotals, LogWindow

    losses = torch.tensor([7.5, 1.0, 2.0 ** -30])  # float32, as the step returns them

    def epoch_loss(windows: list[list[int]]) -> float:
        totals = EpochTotals()
        for steps in windows:
            window = LogWindow(torch.device("cpu"))
            for i in steps:
                window.add(losses[i], 8, 0.0)
            totals.add(window, float(window.loss), 1, bad_samples=0)
        return totals.loss

    assert epoch_loss([[0], [1, 2]]) == epoch_loss([[0], [1], [2]]) == epoch_loss([[0, 1, 2]])


@pytest.mark.parametrize("where", ["ema weight", "bn buffer", "ema bn buffer", "optimizer momentum"])
def test_checkpoint_refuses_non_finite_state_beyond_the_weights(tmp_path, where):
    """A NaN/inf anywhere a resumed run would read it stops the checkpoint, naming the tensor; nothing is written."""
    tr = _synthetic_trainer(tmp_path, "ema.enabled=true")
    tr.run_steps(1)
    assert tr.save_checkpoint() is not None  # finite: written
    before = sorted(tr.ckpt_dir.iterdir())
    with torch.no_grad():
        if where == "ema weight":
            tr.ema.module.conv1[0].weight[0, 0, 0, 0] = float("nan")
            name = "ema.conv1.0.weight"
        elif where == "bn buffer":
            tr.raw_model.bn1.running_var[0] = float("inf")
            name = "model.bn1.running_var"
        elif where == "ema bn buffer":
            tr.ema.module.bn1.running_mean[1] = float("-inf")
            name = "ema.bn1.running_mean"
        else:
            buf = tr.optimizer.state[tr.raw_model.fc.weight]["momentum_buffer"]
            buf[0, 0] = float("nan")
            idx = [p is tr.raw_model.fc.weight for g in tr.optimizer.param_groups for p in g["params"]].index(True)
            name = f"optimizer.state.{idx}.momentum_buffer"
    tr.step += 1  # another file name, so a written checkpoint would show
    with pytest.raises(NonFiniteState, match=re.escape(name)):
        tr.save_checkpoint()
    assert sorted(tr.ckpt_dir.iterdir()) == before


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


@pytest.fixture(scope="module")
def ffcv_ref_run(small_dataset, tmp_path_factory):
    """The uninterrupted reference run of test_kill_and_resume_is_bit_exact[ffcv] (ref_run's, on ffcv)."""
    out = tmp_path_factory.mktemp("ref_ffcv") / "run"
    _run(small_dataset, out, *REF_ARGS, backend="ffcv")
    return out


@pytest.fixture(scope="module")
def dali_ref_run(small_dataset, tmp_path_factory):
    """ref_run's uninterrupted run on dali."""
    out = tmp_path_factory.mktemp("ref_dali") / "run"
    _run(small_dataset, out, *REF_ARGS, backend="dali")
    return out


REF_RUNS = {"torch": "ref_run", "ffcv": "ffcv_ref_run", "dali": "dali_ref_run"}


@pytest.mark.parametrize("backend", ["torch", "ffcv", "dali"])
def test_kill_and_resume_is_bit_exact(small_dataset, backend, request, tmp_path):
    """SIGKILL mid-epoch, resume from the last checkpoint: the same final weights and metrics as an
    uninterrupted run (CPU fp32). Every backend takes each sample's crop and flip from the one crop program,
    keyed on (seed, epoch, sample index, copy), whichever process or thread decodes it."""
    ref_run = request.getfixturevalue(REF_RUNS[backend])
    p = _run(small_dataset, tmp_path / "killed", *REF_ARGS, backend=backend, start_new_session=True)
    ckpts = tmp_path / "killed" / "checkpoints"
    t0 = time.time()
    # kill once a checkpoint from inside epoch 2 exists (epoch 1 ends at step 7)
    while not any(ckpts.glob("ckpt_e0001_s00000000[89].pt")):
        assert p.poll() is None and time.time() - t0 < 240
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    r = _run(small_dataset, tmp_path / "killed", *REF_ARGS, "--resume=auto", backend=backend)
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


def _run_stopped_at(data, out, stops: list[str], *extra, backend: str, timeout: float = 180):
    """`train` under tests.stop_at (stop signals sent at exact moments; see there), guarded: a run that does
    not end in `timeout` s fails the test naming the stops. Returns (the CompletedProcess, seconds from the
    last signal sent to the process's exit)."""
    cmd = [sys.executable, "-m", "tests.stop_at", *stops, "--", "train", "--config", str(CONFIGS / "demo.yaml"),
           "--data", str(data), "--out", str(out), *[f"--{o}" for o in TINY], f"--data.backend={backend}", *extra]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        stdout, stderr = p.communicate()
        pytest.fail(f"hung: {backend} run stopped at {stops} had not exited after {timeout} s\n{stderr[-3000:]}")
    ended = time.time()
    sent = [float(t) for t in re.findall(r"\[stop_at\] SIG\w+ at \S+ t=([0-9.]+)", stderr)]
    assert len(sent) == len(stops), f"not every stop was sent: {stops}\n{stderr[-3000:]}"
    return subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr), ended - max(sent)


# 60 images // batch 8 = 7 steps per epoch; REF_ARGS checkpoint at every log interval (2 steps)
STOPS = {
    "ffcv, SIGTERM at an epoch's last step": ("ffcv", ["step:7=TERM"]),
    # ffcv's worker has put the epoch's last batches (data.ffcv_batches_ahead = 3) into its full queue
    "ffcv, SIGTERM batches_ahead steps before an epoch's end": ("ffcv", ["step:4=TERM"]),
    "ffcv, SIGTERM during the first batch": ("ffcv", ["step:1=TERM"]),
    "dali, SIGTERM at an epoch's last step": ("dali", ["step:7=TERM"]),
    "torch, SIGINT mid-epoch": ("torch", ["step:4=INT"]),
    "torch, SIGTERM during evaluation": ("torch", ["eval:1=TERM"]),
    "torch, SIGTERM during a checkpoint write": ("torch", ["save:3=TERM"]),
}


@pytest.mark.parametrize("case", STOPS)
def test_a_stop_checkpoints_exits_0_promptly_and_the_run_resumes(small_dataset, case, request, tmp_path):
    """A stop signal at an exact moment: the run finishes its step, writes a checkpoint and exits 0 within 30 s,
    and `--resume auto` continues to the uninterrupted run's weights."""
    backend, stops = STOPS[case]
    out = tmp_path / "run"
    r, exit_s = _run_stopped_at(small_dataset, out, stops, *REF_ARGS, backend=backend)
    assert r.returncode == 0, r.stderr[-3000:]
    assert exit_s < 30, f"{case}: exited {exit_s:.1f} s after the signal"
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["interrupted"] is True
    from fastrsb.checkpoint import list_checkpoints, load

    newest = load(list_checkpoints(out / "checkpoints")[0])
    assert newest["step"] == result["step"] > 0  # the checkpoint of the step it stopped after
    assert not list((out / "checkpoints").glob(".*.partial"))
    resumed = _run(small_dataset, out, *REF_ARGS, "--resume=auto", backend=backend)
    assert f"(epoch {newest['epoch']}, batch {newest['batch_in_epoch']})" in resumed.stdout
    ref = request.getfixturevalue(REF_RUNS[backend])
    a, b = _model_state(ref), _model_state(out)
    assert all(torch.equal(a[k], b[k]) for k in a), case


def test_a_second_sigint_during_the_checkpoint_write_discards_it(small_dataset, ref_run, tmp_path):
    """Ctrl-C twice: the first asks for a stop after step 3, the second lands while that checkpoint is being
    written. The run exits at once with 130, the half-written file is gone, the newest checkpoint is the whole
    one of step 2, and the resumed run ends where an uninterrupted one does."""
    out = tmp_path / "run"
    r, _ = _run_stopped_at(small_dataset, out, ["step:3=INT", "save:2=INT"], *REF_ARGS, backend="torch")
    assert r.returncode == 130, r.stderr[-3000:]
    assert "second SIGINT at step 3" in r.stderr
    from fastrsb.checkpoint import list_checkpoints, load

    assert [p.name for p in (out / "checkpoints").iterdir()] == [list_checkpoints(out / "checkpoints")[0].name]
    assert load(list_checkpoints(out / "checkpoints")[0])["step"] == 2
    _run(small_dataset, out, *REF_ARGS, "--resume=auto")
    a, b = _model_state(ref_run), _model_state(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


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
    from fastrsb.evaluation import evaluate_checkpoint

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
    # fastrsb eval of averaged.pt scores the mean weights (not one of the checkpoints it came from)
    from fastrsb.config import from_dict
    from fastrsb.evaluation import create_evaluator
    from fastrsb.model import create_model

    cfg = from_dict(scored[0]["config"])
    cfg.data.path = str(small_dataset)
    evaluator = create_evaluator(cfg, DistInfo())
    model = create_model(cfg.model, evaluator.loader.num_classes, torch.device("cpu"))
    model.load_state_dict({k: (v + scored[1]["model"][k]) / 2 if v.is_floating_point() else v
                           for k, v in scored[0]["model"].items()})
    expect = evaluator.evaluate(model)
    assert evaluate_checkpoint(str(out / "averaged.pt"), str(small_dataset), device="cpu") == expect
    assert avg["num_classes"] == 3  # `fastrsb export` needs it
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


# DDP proofs. Equality between a 2-process and a 1-process run at the same global batch must hold here:
# - same samples per step: the sampler deals each rank order[r::world] of the epoch's permutation, so the ranks'
#   batches at a step together are the 1-process batch (checked below), and the synthetic backend's images
#   and labels are a function of the sample index alone (not of the rank);
# - no layer that mixes samples: model.norm_layer=groupnorm1 normalizes each image over its own (C, H, W),
#   where BatchNorm would use per-process batch statistics (and SyncBN has no gloo/CPU path);
# - no per-rank randomness: no RandAugment, Mixup, dropout or drop-path.
# DDP averages the ranks' gradients of their mean losses, which is the gradient of the global batch's mean
# loss; what differs is float summation order, so weights agree to float tolerance, not bit for bit.
DDP_BATCH, DDP_STEPS = 8, 4  # per process, per epoch
DDP = ["model.name=resnet10t", "model.norm_layer=groupnorm1", "data.backend=synthetic", "data.synthetic_num_classes=5",
       f"data.synthetic_num_samples={2 * DDP_BATCH * DDP_STEPS}", "data.train_res=32", "data.val_res=32",
       "train.device=cpu", "train.amp=none", "train.log_interval=2", "train.checkpoint_every_minutes=0"]
DDP_TOL = dict(rtol=1e-4, atol=1e-5)  # measured: 2.4e-7 max difference after 4 steps; without all-reduce 0.47


def _one_process_weights(tmp_path, *extra) -> tuple[dict, dict]:
    """The reference: one process at the global batch of the 2-process runs. Returns (weights, final metrics)."""
    from fastrsb.trainer import Trainer

    cfg = load_config(CONFIGS / "demo.yaml", [*DDP, f"data.batch_size={2 * DDP_BATCH}", *extra])
    tr = Trainer(cfg, tmp_path / "one_process", DistInfo())
    return tr.raw_model.state_dict(), tr.fit()


def test_ranks_batches_make_up_the_one_process_batch():
    from fastrsb.data.sampler import epoch_samples

    n = 2 * DDP_BATCH * DDP_STEPS
    for epoch in (0, 1):
        one = epoch_samples(n, seed=0, epoch=epoch, rank=0, world_size=1, batch_size=2 * DDP_BATCH)[0]
        ranks = [epoch_samples(n, seed=0, epoch=epoch, rank=r, world_size=2, batch_size=DDP_BATCH)[0] for r in (0, 1)]
        for step in range(DDP_STEPS):
            both = [i for r in ranks for i in r[step * DDP_BATCH:(step + 1) * DDP_BATCH]]
            assert sorted(both) == sorted(one[step * 2 * DDP_BATCH:(step + 1) * 2 * DDP_BATCH])


def test_two_process_ddp_equals_one_process_and_fails_without_allreduce(tmp_path):
    """2 gloo processes x batch 8 for 4 steps end with the weights of 1 process x batch 16; the same 2 processes
    without DDP's gradient all-reduce (each rank steps on its half) do not: the check discriminates."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tests.ddp_worker",
           str(out), *[f"--{o}" for o in DDP], f"--data.batch_size={DDP_BATCH}", "--train.epochs=1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    one, one_final = _one_process_weights(tmp_path, "train.epochs=1")
    ddp = torch.load(out / "ddp.pt")
    assert ddp.keys() == one.keys()
    for k in one:
        torch.testing.assert_close(ddp[k], one[k], **DDP_TOL, msg=k)
    assert _final(out / "ddp")["loss"] == pytest.approx(one_final["loss"], rel=1e-5)  # mean over both ranks
    local = torch.load(out / "no_allreduce.pt")
    with pytest.raises(AssertionError):
        for k in one:
            torch.testing.assert_close(local[k], one[k], **DDP_TOL, msg=k)
    # every rank agreed to checkpoint after the same steps (one all-reduce per log interval), and the
    # checkpoint holds each rank's own RNG streams
    from fastrsb.checkpoint import list_checkpoints, load

    ckpts = list_checkpoints(out / "ddp" / "checkpoints")
    assert [load(c)["step"] for c in reversed(ckpts)] == [2, 4]
    state = load(ckpts[0])
    assert state["world_size"] == 2 and len(state["rng"]) == len(state["augment"]) == 2
    assert state["rng"][0]["torch"].tolist() != state["rng"][1]["torch"].tolist()


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through /proc")
def test_torchrun_restarts_a_killed_rank_and_the_run_resumes(tmp_path):
    """`torchrun --max-restarts=2 ... train --resume auto`: SIGKILL rank 1 in the middle of epoch 2; torchrun
    restarts both ranks, they resume from the newest checkpoint and finish every epoch, ending where an
    uninterrupted run ends (the 1-process reference, as above)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=2",
           "-m", "fastrsb", "train", "--config", str(CONFIGS / "demo.yaml"), "--out", str(out), "--resume", "auto",
           *[f"--{o}" for o in DDP], f"--data.batch_size={DDP_BATCH}", "--train.epochs=3"]
    log_out, log_err = tmp_path / "stdout", tmp_path / "stderr"
    with open(log_out, "w") as fo, open(log_err, "w") as fe:
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True, start_new_session=True)
    workers: list[int] = []
    try:
        t0 = time.time()
        while not any((out / "checkpoints").glob("ckpt_e0001_s00000000[56].pt")):  # epoch 2 runs steps 5-8
            assert p.poll() is None and time.time() - t0 < 240, log_err.read_text()[-3000:]
            time.sleep(0.02)
        workers = _children(p.pid)
        victims = [c for c in workers if _rank_of(c) == 1]
        assert len(victims) == 1, victims
        os.kill(victims[0], signal.SIGKILL)
        p.wait(timeout=180)
    finally:
        if p.poll() is None:  # torchrun starts its workers in sessions of their own: end them one by one
            for pid in [*_children(p.pid), *workers]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            os.killpg(p.pid, signal.SIGKILL)
    stdout, stderr = log_out.read_text(), log_err.read_text()
    assert p.returncode == 0, stderr[-3000:]
    assert "exitcode: -9" in stderr  # torchrun saw the kill
    assert re.search(r"resumed from .* \(epoch 1, batch [1-3]\)", stdout), stdout[-2000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines if r["kind"] == "epoch"] == [1, 2, 3]
    one, _ = _one_process_weights(tmp_path, "train.epochs=3")
    resumed = _model_state(out)
    for k in one:
        torch.testing.assert_close(resumed[k], one[k], **DDP_TOL, msg=k)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through /proc")
def test_sigterm_to_torchrun_stops_the_whole_group_cleanly(tmp_path):
    """A scheduler cancels the job: SIGTERM to torchrun in the middle of epoch 2. torchrun forwards it to its
    workers; they agree on the stop at the next log interval, write one checkpoint together and exit 0 before
    torchrun's grace period ends (no worker is SIGKILLed), and the resumed group ends where a 1-process run ends."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastrsb",
           "train", "--config", str(CONFIGS / "demo.yaml"), "--out", str(out), "--resume", "auto",
           *[f"--{o}" for o in DDP], f"--data.batch_size={DDP_BATCH}", "--train.epochs=3"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    workers: list[int] = []
    try:
        t0 = time.time()
        while not any((out / "checkpoints").glob("ckpt_e0001_s00000000[56].pt")):  # epoch 2 runs steps 5-8
            assert p.poll() is None and time.time() - t0 < 240
            time.sleep(0.02)
        workers = _children(p.pid)
        p.send_signal(signal.SIGTERM)
        sent = time.time()
        try:
            _, stderr = p.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail("hung: torchrun and its workers had not exited 90 s after SIGTERM")
        exit_s = time.time() - sent
    finally:
        if p.poll() is None:
            for pid in [*_children(p.pid), *workers]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            os.killpg(p.pid, signal.SIGKILL)
    assert exit_s < 30, f"the group took {exit_s:.1f} s to stop"
    assert "exitcode: -9" not in stderr and "SIGKILL" not in stderr, stderr[-3000:]  # no worker had to be killed
    from fastrsb.checkpoint import list_checkpoints, load

    newest = load(list_checkpoints(out / "checkpoints")[0])
    assert newest["epoch"] == 1 and newest["batch_in_epoch"] > 0, (newest["epoch"], newest["batch_in_epoch"])  # in epoch 2
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one, _ = _one_process_weights(tmp_path, "train.epochs=3")
    resumed = _model_state(out)
    for k in one:
        torch.testing.assert_close(resumed[k], one[k], **DDP_TOL, msg=k)


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
    from PIL import Image

    assert Image.open(out / "sweep.png").size[0] > 300  # both seeds' curves (the plot's own test checks them)


@pytest.mark.parametrize("order", ["random", "block"])
def test_a_run_stopped_on_2_ranks_resumes_on_1_at_the_same_global_batch(tmp_path, order):
    """2 gloo processes x batch 8 checkpoint in the middle of their epoch (step 2 of 4); 1 process x batch 16 resumes
    from there and ends with the weights of 1 process x batch 16 run uninterrupted: at a constant global batch each
    global step takes the same samples whatever the world size, in random and in block order. The resume says what
    is not carried over (per-process random streams); at another global batch a mid-epoch resume is refused."""
    from fastrsb.checkpoint import CheckpointError, list_checkpoints
    from fastrsb.trainer import Trainer

    blocks = ["data.order=block", "data.block_mb=0.012", "data.window_blocks=4"] if order == "block" else []
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastrsb", "train",
           "--config", str(CONFIGS / "demo.yaml"), "--out", str(out), *[f"--{o}" for o in [*DDP, *blocks]],
           f"--data.batch_size={DDP_BATCH}", "--train.epochs=1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    mid = next(p for p in list_checkpoints(out / "checkpoints") if p.name.endswith("_s000000002.pt"))
    cfg = load_config(CONFIGS / "demo.yaml", [*DDP, *blocks, f"data.batch_size={2 * DDP_BATCH}", "train.epochs=1"])
    one = Trainer(cfg, tmp_path / "resumed", DistInfo())
    with pytest.warns(UserWarning, match=r"written by 2 process\(es\), resuming with 1 at the same global batch \(16\): "
                                         r"the epoch goes on with exactly the samples and crops it had left"):
        one.resume(str(mid))
    assert (one.epoch, one.batch_in_epoch) == (0, 2)
    one.fit()
    reference, _ = _one_process_weights(tmp_path, *blocks, "train.epochs=1")
    for k, v in reference.items():
        torch.testing.assert_close(one.raw_model.state_dict()[k], v, **DDP_TOL, msg=k)
    other = Trainer(load_config(CONFIGS / "demo.yaml", [*DDP, *blocks, f"data.batch_size={DDP_BATCH}",
                                                         "train.epochs=1"]), tmp_path / "other", DistInfo())
    with pytest.raises(CheckpointError, match=r"middle of epoch 0 at a global batch of 16 \(2 process\(es\) x "
                                              r"data.batch_size=8\); this run's is 8 .* Resume with data.batch_size=16"):
        other.resume(str(mid))
