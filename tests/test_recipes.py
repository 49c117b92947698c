"""Pure pieces of training: config errors, lr schedules and progressive resizing against the
reference implementations' formulas, loss numerics, optimizer groups, teachers, every recipe built."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fastrsb.config import ConfigError, LossConfig, load_config
from fastrsb.dist import DistInfo
from fastrsb.optim import lr_at, resolution_at

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


# ------------------------------------------------------------------ config
def test_unknown_key_and_wrong_type_name_the_key():
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config(CONFIGS / "rsb_a1.yaml", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(CONFIGS / "rsb_a1.yaml", ["train.epochs=ten"])
    with pytest.raises(ConfigError, match="'modle'"):
        load_config(None, ["modle.name=resnet50"])


@pytest.mark.parametrize("override,expect", [
    ("loss.kind=focal", "'loss.kind': expected one of ce, bce, got 'focal'"),
    ("train.amp=bf32", "'train.amp': expected one of auto, bf16, fp16, none"),
    ("data.backend=webdataset", "'data.backend': expected one of ffcv, dali, torch, synthetic"),
    ("data.interpolation=lanczos", "'data.interpolation'"),
    ("augment.mix_mode=row", "'augment.mix_mode'"),
    ("schedule.kind=linear", "'schedule.kind'"),
])
def test_allowed_values_live_in_the_types(override, expect):
    with pytest.raises(ConfigError, match=re.escape(expect)):
        load_config(None, [override])


@pytest.mark.parametrize("overrides,expect", [
    (["augment.mixup_alpha=0.2", "data.batch_size=7"], "data.batch_size must be even"),
    (["loss.kd_weight=0.5"], "set loss.kd_teacher"),
    (["loss.kd_weight=1.5", "loss.kd_teacher=t.pt"], "loss.kd_weight must lie in [0, 1]"),
    (["progressive.enabled=true", "progressive.min_res=224", "progressive.max_res=160"], "progressive.min_res=224 >"),
    (["data.dali_decode=mixed", "train.device=cpu"], "data.dali_decode=mixed"),
    (["augment.randaugment_impl=numba", "train.device=cuda"], "augment.randaugment_impl=numba"),
    (["data.block_mb=0"], "data.block_mb must be > 0"),
    (["data.window_blocks=0"], "data.window_blocks must be >= 1"),
    (["data.scale=[0.5,0.2]"], "data.scale"),
    (["data.batch_size=0"], "data.batch_size must be >= 1"),
])
def test_settings_that_do_not_go_together_fail_at_load(overrides, expect):
    """One cross-field validate() runs on every config made, naming the keys, before any work."""
    with pytest.raises(ConfigError, match=re.escape(expect)):
        load_config(None, overrides)


def test_backend_specs_name_each_backends_decoder_key():
    """BACKEND[:DECODE] (fastrsb bench --backends, the tests) sets the data.* key of that backend's decoder; the
    table names real keys, and a decoder for a backend that has none is an error naming the spec."""
    from fastrsb.config import DataConfig, allowed
    from fastrsb.data import DECODER_KEY, parse_backend_spec

    assert parse_backend_spec("torch:device") == ("torch", {"torch_decode": "device"})
    assert parse_backend_spec("synthetic") == ("synthetic", {})
    for backend, key in DECODER_KEY.items():
        value = allowed(DataConfig, key)[-1]
        name, decoder = parse_backend_spec(f"{backend}:{value}")
        cfg = load_config(None, [f"data.backend={name}", *(f"data.{k}={v}" for k, v in decoder.items())])
        assert (cfg.data.backend, getattr(cfg.data, key)) == (backend, value)
    with pytest.raises(ValueError, match="'synthetic:fast': only ffcv:DECODE, dali:DECODE, torch:DECODE"):
        parse_backend_spec("synthetic:fast")
    assert parse_backend_spec("torch:device:torchvision") == (
        "torch", {"torch_decode": "device", "torch_device_decoder": "torchvision"})
    with pytest.raises(ValueError, match="'torch:workers:torchcodec': only torch:device:LIBRARY name a library"):
        parse_backend_spec("torch:workers:torchcodec")


# ------------------------------------------------------------------ schedules
def test_cosine_schedule_values():
    cfg = load_config(None, ["schedule.warmup_epochs=5", "schedule.min_lr=1e-6", "schedule.warmup_start=0.0",
                             "schedule.cooldown_epochs=10"]).schedule
    spe, epochs, peak = 100, 610, 5e-3
    assert lr_at(0, spe, epochs, peak, cfg) == 0.0
    assert lr_at(250, spe, epochs, peak, cfg) == pytest.approx(peak / 2)
    assert lr_at(500, spe, epochs, peak, cfg) == pytest.approx(peak)
    mid = 500 + (60000 - 500) / 2  # halfway through the cosine (ends at epoch 600, then cooldown)
    assert lr_at(mid, spe, epochs, peak, cfg) == pytest.approx(1e-6 + 0.5 * (peak - 1e-6))
    quarter = 500 + (60000 - 500) / 4
    assert lr_at(quarter, spe, epochs, peak, cfg) == pytest.approx(1e-6 + 0.5 * (peak - 1e-6) * (1 + math.cos(math.pi / 4)))
    assert lr_at(60000, spe, epochs, peak, cfg) == pytest.approx(1e-6)
    assert lr_at(60900, spe, epochs, peak, cfg) == pytest.approx(1e-6)


def _ffcv_epoch_lrs(f, epochs: int, iters: int) -> np.ndarray:
    """ffcv-imagenet train_loop: each epoch interpolates between get_lr(epoch) and get_lr(epoch + 1)."""
    return np.concatenate([np.interp(np.arange(iters), [0, iters], [f(e), f(e + 1)]) for e in range(epochs)])


def test_cyclic_schedule_matches_ffcv_imagenet_at_every_step():
    cfg = load_config(CONFIGS / "ffcv_rn50_16ep.yaml")
    lr, epochs, iters = 1.7, cfg.train.epochs, 7

    def get_cyclic_lr(epoch):  # ffcv-imagenet train_imagenet.py
        return np.interp([epoch], [0, 2, epochs], [1e-4 * lr, lr, 0])[0]

    ours = [lr_at(s, iters, epochs, lr, cfg.schedule) for s in range(epochs * iters)]
    np.testing.assert_allclose(ours, _ffcv_epoch_lrs(get_cyclic_lr, epochs, iters), rtol=1e-12, atol=1e-15)


def test_step_schedule_matches_ffcv_imagenet_at_every_step():
    cfg = load_config(None, ["schedule.kind=step", "schedule.warmup_epochs=0", "schedule.step_epochs=3",
                             "schedule.step_ratio=0.2"]).schedule
    lr, epochs, iters = 0.5, 8, 5

    def get_step_lr(epoch):  # ffcv-imagenet train_imagenet.py
        return 0 if epoch >= epochs else 0.2 ** (epoch // 3) * lr

    ours = [lr_at(s, iters, epochs, lr, cfg) for s in range(epochs * iters)]
    np.testing.assert_allclose(ours, _ffcv_epoch_lrs(get_step_lr, epochs, iters), rtol=1e-12, atol=1e-15)


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="schedule.kind"):
        lr_at(10, 10, 5, 0.1, load_config(None, ["schedule.kind=linear", "schedule.warmup_epochs=0"]).schedule)


@pytest.mark.parametrize("recipe", ["ffcv_rn50_16ep.yaml", "ffcv_rn50_88ep.yaml", None])
def test_progressive_resizing_matches_ffcv_imagenet(recipe):
    over = [] if recipe else ["progressive.enabled=true", "progressive.min_res=176", "progressive.max_res=208",
                              "progressive.start_ramp=3", "progressive.end_ramp=9", "train.epochs=12"]
    cfg = load_config(CONFIGS / recipe if recipe else None, over)
    p = cfg.progressive

    def get_resolution(epoch):  # ffcv-imagenet train_imagenet.py
        if epoch <= p.start_ramp:
            return p.min_res
        if epoch >= p.end_ramp:
            return p.max_res
        return int(np.round(np.interp([epoch], [p.start_ramp, p.end_ramp], [p.min_res, p.max_res])[0] / 32)) * 32

    assert [resolution_at(e, p, 0) for e in range(cfg.train.epochs)] == [get_resolution(e) for e in range(cfg.train.epochs)]
    assert resolution_at(0, load_config(None).progressive, 224) == 224  # off: data.train_res


# ------------------------------------------------------------------ losses
def _smoothed(y, n, eps):
    t = torch.full((len(y), n), eps / n)
    t[torch.arange(len(y)), y] += 1 - eps
    return t


def test_bce_and_ce_numerics_against_formulas():
    from fastrsb.losses import TaskLoss

    torch.manual_seed(0)
    logits = torch.randn(6, 5)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    smooth = _smoothed(y, 5, 0.1)
    bce = TaskLoss(LossConfig(kind="bce", label_smoothing=0.1, bce_target_threshold=0.2))
    target = (smooth > 0.2).float()  # timm: threshold the smoothed target
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert bce(logits, y).item() == pytest.approx(ref.item(), rel=1e-6)
    # soft (mixup) targets arrive smoothed: only the threshold applies
    soft = 0.7 * smooth + 0.3 * smooth.roll(1, 0)
    ref_soft = torch.nn.functional.binary_cross_entropy_with_logits(logits, (soft > 0.2).float())
    assert bce(logits, soft).item() == pytest.approx(ref_soft.item(), rel=1e-6)
    plain = TaskLoss(LossConfig(kind="bce"))
    ref_plain = torch.nn.functional.binary_cross_entropy_with_logits(logits, soft)
    assert plain(logits, soft).item() == pytest.approx(ref_plain.item(), rel=1e-6)

    ce = TaskLoss(LossConfig(kind="ce", label_smoothing=0.1))
    logp = logits.log_softmax(-1)
    assert ce(logits, y).item() == pytest.approx((-(smooth * logp).sum(-1)).mean().item(), rel=1e-5)
    assert ce(logits, soft).item() == pytest.approx((-(soft * logp).sum(-1)).mean().item(), rel=1e-5)


def test_kd_numerics_against_formulas():
    from fastrsb.losses import Criterion, kd_loss

    torch.manual_seed(1)
    logits, teacher = torch.randn(6, 5), torch.randn(6, 5)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    for t in (1.0, 2.0):
        p_t = (teacher / t).softmax(-1)
        ref_kl = (p_t * (p_t.log() - (logits / t).log_softmax(-1))).sum(-1).mean() * t * t
        assert kd_loss(logits, teacher, t).item() == pytest.approx(ref_kl.item(), rel=1e-5)
        crit = Criterion(LossConfig(kind="ce", kd_weight=0.8, kd_temperature=t), teacher=lambda x: teacher)
        expect = 0.8 * ref_kl + 0.2 * torch.nn.functional.cross_entropy(logits, y)
        assert crit(None, logits, y).item() == pytest.approx(expect.item(), rel=1e-5)
    with pytest.raises(ValueError, match="kd_teacher"):
        Criterion(LossConfig(kd_weight=0.8))
    with pytest.raises(ValueError, match="kd_teacher"):
        Criterion(LossConfig(), teacher=lambda x: teacher)


# ------------------------------------------------------------------ model, optimizer, teacher
def test_no_weight_decay_on_1d_parameters():
    from fastrsb.config import ModelConfig, OptimConfig
    from fastrsb.model import create_model
    from fastrsb.optim import create_optimizer

    model = create_model(ModelConfig(name="resnet18"), 10, torch.device("cpu"))
    for name in ("lamb", "sgd", "adamw"):
        opt = create_optimizer(model, OptimConfig(name=name, weight_decay=0.02), 1e-3)
        decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        for pname, p in model.named_parameters():
            assert (id(p) in decayed) == (p.ndim > 1), (name, pname)  # downsample BN and biases included
    assert opt.param_groups[0]["weight_decay"] in (0.0, 0.02)
    assert create_optimizer(model, OptimConfig(name="sgd"), 0.1).param_groups[0]["nesterov"] is True


def test_model_options():
    from fastrsb.config import ModelConfig
    from fastrsb.model import create_model

    m = create_model(ModelConfig(name="resnet18", blurpool=True, drop_path_rate=0.1), 7, torch.device("cpu"))
    assert any(type(x).__name__ == "BlurPool2d" for x in m.modules())
    assert any(type(x).__name__ == "DropPath" for x in m.modules())
    assert m.fc.out_features == 7
    assert m.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="model.name"):
        create_model(ModelConfig(name="no_such_model_xyz"), 7, torch.device("cpu"))


class _NotAWeight:
    """A global torch.load(weights_only=True) must keep refusing: only timm's argparse.Namespace is allowed."""


def test_teacher_loads_timm_fastrsb_plain_and_safetensors_and_refuses_misfits(tmp_path):
    import argparse

    import timm
    from safetensors.torch import save_file
    from timm.utils import CheckpointSaver, ModelEmaV3, NativeScaler

    from fastrsb.model import load_teacher

    torch.manual_seed(0)
    src = timm.create_model("resnet18", num_classes=4)
    ema = ModelEmaV3(src, decay=0.5)
    with torch.no_grad():  # EMA weights that differ from the raw ones: the teacher must be the EMA
        for p in src.parameters():
            p.add_(0.01 * torch.randn_like(p))
    optimizer = torch.optim.SGD(src.parameters(), lr=0.1, momentum=0.9)
    src(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # momentum buffers in the optimizer state, as in a real checkpoint
    # the arguments as timm's train.py keeps them: strings, numbers, None, lists, bools
    args = argparse.Namespace(model="resnet18", num_classes=4, pretrained=False, img_size=None, input_size=None,
                              crop_pct=None, mean=None, std=None, interpolation="", batch_size=128, opt="lamb",
                              lr=5e-3, weight_decay=0.02, sched="cosine", epochs=600, decay_milestones=[90, 180, 270],
                              aa="rand-m7-mstd0.5-inc1", mixup=0.1, cutmix=1.0, smoothing=0.0, bce_loss=True,
                              model_ema=True, model_ema_decay=0.9998, amp=True, seed=0, output="", experiment="")
    # timm's own writer: {'epoch', 'arch', 'optimizer', 'version', 'args', 'amp_scaler', 'state_dict',
    # 'state_dict_ema', 'metric', 'saver'}
    saver = CheckpointSaver(src, optimizer, args=args, model_ema=ema, amp_scaler=NativeScaler(device="cpu"),
                            checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(epoch=3, metric=71.5)
    timm_ckpt = tmp_path / "last.pth.tar"
    raw = torch.load(timm_ckpt, weights_only=False)
    assert isinstance(raw["args"], argparse.Namespace) and {"state_dict", "state_dict_ema", "optimizer"} <= set(raw)
    with pytest.raises(Exception, match="Namespace"):  # what refused timm checkpoints before
        torch.load(timm_ckpt, weights_only=True)

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref_ema, ref_raw = ema.module.eval()(x), src.eval()(x)
    sd, ema_sd = src.state_dict(), ema.module.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "plain.safetensors"))
    files = {
        timm_ckpt.name: ref_ema,
        "plain.pt": ref_raw,
        "plain.safetensors": ref_raw,
        "fastrsb.pt": ref_ema,
        "timm_no_ema_ddp.pt": ref_raw,
    }
    torch.save(sd, tmp_path / "plain.pt")
    torch.save({"model": sd, "ema": ema_sd, "step": 3, "config": {"model": {"name": "resnet18"}}}, tmp_path / "fastrsb.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 5}, tmp_path / "timm_no_ema_ddp.pt")
    for name, expected in files.items():
        teacher = load_teacher(str(tmp_path / name), "resnet18", 4, torch.device("cpu"))
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        with torch.no_grad():
            torch.testing.assert_close(teacher(x), expected, msg=name)
    # misfits name both sides: the file's classes / architecture and what the run needs
    with pytest.raises(ValueError, match=r"the teacher has 4 classes .*student's dataset has 10"):
        load_teacher(str(timm_ckpt), "resnet18", 10, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"file says resnet18\).*not a resnet34"):
        load_teacher(str(timm_ckpt), "resnet34", 4, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"nothing about its architecture.*not a resnet50 .*shape mismatches"):
        load_teacher(str(tmp_path / "plain.pt"), "resnet50", 4, torch.device("cpu"))
    # weights-only safety kept: any other global is still refused
    torch.save({"state_dict": sd, "extra": _NotAWeight()}, tmp_path / "unsafe.pt")
    with pytest.raises(ValueError, match="cannot be read as weights"):
        load_teacher(str(tmp_path / "unsafe.pt"), "resnet18", 4, torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_teacher(str(tmp_path / "missing.pt"), "resnet18", 4, torch.device("cpu"))


# ------------------------------------------------------------------ recipes
def test_recipes_carry_their_published_values():
    a1, a2, a3 = (load_config(CONFIGS / f"rsb_{x}.yaml") for x in ("a1", "a2", "a3"))
    for c, ep, lr, wd, mix, ra, rep, dp, ls, res in ((a1, 600, 5e-3, 0.01, 0.2, "rand-m7-mstd0.5-inc1", 3, 0.05, 0.1, 224),
                                                     (a2, 300, 5e-3, 0.02, 0.1, "rand-m7-mstd0.5-inc1", 3, 0.05, 0.0, 224),
                                                     (a3, 100, 8e-3, 0.02, 0.1, "rand-m6-mstd0.5-inc1", 1, 0.0, 0.0, 160)):
        assert (c.train.epochs, c.optim.name, c.optim.lr, c.optim.weight_decay) == (ep, "lamb", lr, wd)
        assert c.optim.lr_ref_batch == 2048 == c.data.batch_size * 8 and c.schedule.warmup_epochs == 5
        assert (c.augment.mixup_alpha, c.augment.cutmix_alpha, c.augment.randaugment) == (mix, 1.0, ra)
        assert (c.data.num_repeats, c.model.drop_path_rate, c.loss.label_smoothing) == (rep, dp, ls)
        assert (c.loss.kind, c.loss.bce_target_threshold) == ("bce", 0.2)
        assert (c.data.train_res, c.data.val_res, c.data.crop_pct) == (res, 224, 0.95)
    kd = load_config(CONFIGS / "kd_lamb_ema.yaml", ["loss.kd_teacher=teacher.pt"])  # a KD recipe needs one
    assert (kd.train.epochs, kd.schedule.cooldown_epochs, kd.schedule.warmup_epochs) == (610, 10, 5)
    assert (kd.optim.name, kd.optim.lr, kd.optim.lr_ref_batch, kd.data.num_repeats) == ("lamb", 5e-3, 1536, 3)
    assert (kd.loss.kd_weight, kd.ema.enabled) == (0.8, True)
    rs = load_config(CONFIGS / "resnet_rs50.yaml")
    assert (rs.model.name, rs.train.epochs, rs.optim.lr * 4096 / rs.optim.lr_ref_batch) == ("resnetrs50", 350, 1.6)
    assert (rs.optim.weight_decay, rs.ema.decay, rs.model.drop_rate, rs.loss.label_smoothing) == (4e-5, 0.9999, 0.25, 0.1)
    ramps = {16: (11, 13), 24: (17, 20), 32: (23, 27), 40: (29, 34), 56: (41, 48), 88: (65, 76)}
    for ep, (start, end) in ramps.items():  # ffcv-imagenet rn50_configs/rn50_{ep}_epochs.yaml
        c = load_config(CONFIGS / f"ffcv_rn50_{ep}ep.yaml")
        assert (c.train.epochs, c.progressive.start_ramp, c.progressive.end_ramp) == (ep, start, end)
        assert (c.optim.name, c.optim.lr, c.optim.weight_decay, c.loss.label_smoothing) == ("sgd", 1.7, 1e-4, 0.1)
        assert (c.model.blurpool, c.train.flip_tta, c.data.val_res, c.schedule.kind) == (True, True, 256, "cyclic")


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_recipe_builds_on_cpu(recipe, small_dataset, tmp_path):
    """Model, optimizer, schedule, loss, augmentation and loaders from each recipe, on tiny data."""
    from fastrsb.trainer import Trainer

    extra = [f"data.path={small_dataset}", "data.backend=torch", "data.batch_size=4", "data.workers=1",
             "train.device=cpu", "data.train_res=32", "data.val_res=32"]
    if recipe == "kd_lamb_ema.yaml":
        with pytest.raises(ValueError, match="loss.kd_teacher"):  # the recipe is KD: no teacher, no run
            Trainer(load_config(CONFIGS / recipe, extra), tmp_path / "run", DistInfo())
        import timm

        teacher = tmp_path / "teacher.pt"
        torch.save(timm.create_model("resnet50", num_classes=3).state_dict(), teacher)
        extra.append(f"loss.kd_teacher={teacher}")
    cfg = load_config(CONFIGS / recipe, extra)
    tr = Trainer(cfg, tmp_path / "run", DistInfo())
    assert tr.num_classes == 3 and tr.raw_model.num_classes == 3
    batch = next(iter(tr.train_loader))
    x, y = tr.train_aug(batch.images, batch.targets)
    loss = tr.criterion(x, tr.model(x), y)
    assert torch.isfinite(loss)
    loss.backward()
    tr.optimizer.step()
    assert tr.peak_lr == pytest.approx(cfg.optim.lr * 4 / cfg.optim.lr_ref_batch if cfg.optim.lr_ref_batch else cfg.optim.lr)
