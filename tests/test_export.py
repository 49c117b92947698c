"""`fastrsb export` -> timm: a run on the demo digits, exported raw and EMA, loaded back by timm's own
create_model, scores with timm's own eval transform exactly what `fastrsb eval` reports."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.timeout(600)
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastrsb", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo's digits converted, and two epochs of a small ResNet on them (torch backend: no numba warm-up),
    enough to score well above chance, so predictions are not all alike."""
    from dataprep.convert import convert
    from dataprep.embedded import write_digits

    root = tmp_path_factory.mktemp("demo")
    data = root / "data"
    convert(write_digits(root / "digits"), data, workers=2, progress=False, log=lambda s: None)
    run = root / "run"
    r = _cli("train", "--config", CONFIGS / "demo.yaml", "--data", data, "--out", run, "--model.name=resnet10t",
             "--data.backend=torch", "--data.workers=2", "--train.epochs=2", "--schedule.warmup_epochs=0",
             "--train.device=cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    from fastrsb.checkpoint import list_checkpoints

    return data, run, list_checkpoints(run / "checkpoints")[0]


def _val_split(data: Path):
    """The converted val JPEGs (the bytes both formats store) and their labels, in dataset order."""
    from dataprep.layout import open_dataset
    from PIL import Image

    split = open_dataset(data).split("val")
    loc = split.shard_locations()
    images = []
    for shard, offset, size in zip(loc.shard, loc.offset, loc.size):
        with open(loc.tar_paths[shard], "rb") as f:
            f.seek(int(offset))
            images.append(Image.open(io.BytesIO(f.read(int(size)))).convert("RGB"))
    return images, split.labels


@torch.no_grad()
def _timm_top1(model, images, labels) -> float:
    """Top-1 through timm's own eval pipeline, configured from the exported config.json alone."""
    import timm

    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    model.eval()
    hits = 0
    for start in range(0, len(images), 128):
        x = torch.stack([transform(im) for im in images[start:start + 128]])
        hits += (model(x).argmax(1) == torch.as_tensor(labels[start:start + 128])).sum().item()
    return 100 * hits / len(images)


@pytest.mark.parametrize("ema", [False, True])
def test_export_loads_in_timm_with_the_same_weights_and_top1(demo_run, tmp_path, ema):
    import timm

    from fastrsb.checkpoint import load

    data, run, ckpt = demo_run
    out = tmp_path / "export"
    r = _cli("export", ckpt, out, *(["--ema"] if ema else []))
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    state = load(ckpt)
    expected = state["ema" if ema else "model"]
    assert (cfg["architecture"], cfg["num_classes"]) == ("resnet10t", 10)
    pre = cfg["pretrained_cfg"]
    assert (pre["input_size"], pre["crop_pct"], pre["interpolation"]) == ([3, 48, 48], 1.0, "bilinear")
    assert (pre["mean"], pre["std"]) == (state["config"]["augment"]["mean"], state["config"]["augment"]["std"])
    assert cfg["fastrsb"]["recipe"] == "demo" and cfg["fastrsb"]["weights"] == ("ema" if ema else "raw")
    assert cfg["fastrsb"]["metrics"] == {k: v for k, v in state["metrics"].items() if "top" in k}

    # the call (with num_classes in the overlay: else timm drops a classifier it thinks is ImageNet's)
    by_name = timm.create_model(cfg["architecture"], pretrained=True, num_classes=cfg["num_classes"],
                                pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"),
                                                            num_classes=cfg["num_classes"]))
    by_folder = timm.create_model(f"local-dir:{out}", pretrained=True)  # what a hub download does
    for model in (by_name, by_folder):
        got = model.state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected)

    fastrsb_eval = _cli("eval", "--checkpoint", ckpt, "--data", data, "--backend", "torch", "--device", "cpu",
                        *(["--ema"] if ema else []))
    assert fastrsb_eval.returncode == 0, fastrsb_eval.stderr[-3000:]
    top1 = json.loads(fastrsb_eval.stdout.strip().splitlines()[-1])["top1"]
    images, labels = _val_split(data)
    assert _timm_top1(by_folder, images, labels) == top1
    assert top1 == state["metrics"]["ema_val_top1" if ema else "val_top1"]  # and what the run logged

    card = (out / "README.md").read_text()
    assert "library_name: timm" in card and "recipe `demo`" in card and f"| {'ema_' if ema else ''}val_top1 | {top1} |" in card


def test_averaged_checkpoint_exports_the_same_way(demo_run, tmp_path):
    import timm

    from fastrsb.checkpoint import load

    data, run, ckpt = demo_run
    r = _cli("average", run, "--best", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "averaged"
    r = _cli("export", run / "averaged.pt", out)
    assert r.returncode == 0, r.stderr[-3000:]
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    from fastrsb.checkpoint import list_checkpoints

    # the mean of the single best checkpoint is that checkpoint
    best = max(list_checkpoints(run / "checkpoints"), key=lambda p: load(p)["metrics"].get("val_top1", -1))
    expected = load(best)["model"]
    assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected)
    assert json.loads((out / "config.json").read_text())["fastrsb"]["metrics"]["averaged_from"] == [best.name]


def test_export_refuses_what_timm_cannot_rebuild(demo_run, tmp_path):
    from fastrsb.checkpoint import load, save_atomic
    from fastrsb.export import export_checkpoint

    _, run, ckpt = demo_run
    state = load(ckpt)
    state["ema"] = None
    save_atomic(state, tmp_path / "no_ema.pt")
    with pytest.raises(ValueError, match="no EMA weights"):
        export_checkpoint(tmp_path / "no_ema.pt", tmp_path / "a", ema=True)
    state["config"]["model"]["blurpool"] = True
    save_atomic(state, tmp_path / "blurpool.pt")
    r = _cli("export", tmp_path / "blurpool.pt", tmp_path / "b")
    assert r.returncode == 2 and "model.blurpool=true" in r.stderr and not (tmp_path / "b").exists()
