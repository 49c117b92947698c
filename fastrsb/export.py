"""`fastrsb export`: a checkpoint's weights as a folder timm (and a model hub) loads as is.

OUT/model.safetensors   the raw or EMA weights, timm's own key names
OUT/config.json         timm's hub config (what timm's save_config_for_hf writes and `local-dir:` / `hf-hub:`
                        read): architecture, num_classes, model_args, pretrained_cfg with the eval
                        preprocessing (input_size, crop_pct, mean, std, interpolation); fastrsb adds a
                        "fastrsb" block with the recipe, metrics and provenance
OUT/README.md           a model card

Written by hand rather than with timm's save_config_for_hf: that copies the registry entry of the
architecture (tag, license, paper ids of timm's own ImageNet weights), which would describe weights
these are not.
"""
from __future__ import annotations

import json
from pathlib import Path

import timm
import torch

from dataprep.files import atomic_write, atomic_write_bytes, atomic_write_json
from fastrsb import checkpoint as ckpt
from fastrsb.config import from_dict
from fastrsb.model import architecture_kwargs

WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
LAUNCH = "launch.json"  # written by `fastrsb train` into the run directory: recipe and command


def record_launch(run_dir: str | Path, recipe: str | Path, command: str) -> None:
    """RUN/launch.json: the recipe file and the command that started the run, for the model card."""
    atomic_write_json(Path(run_dir) / LAUNCH, {"recipe": str(recipe), "command": command})


def _run_dir(checkpoint: Path) -> Path:
    """RUN for RUN/checkpoints/ckpt_*.pt and for RUN/averaged.pt."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def _launch(checkpoint: Path) -> dict:
    path = _run_dir(checkpoint) / LAUNCH
    return json.loads(path.read_text()) if path.is_file() else {}


def _dataset_summary(path: str) -> dict:
    """Classes and split sizes from the converted dataset's manifest, when it is still there."""
    from dataprep.layout import DatasetError, open_dataset

    try:
        ds = open_dataset(path)
    except (DatasetError, OSError, ValueError):
        return {"path": path}
    return {"path": path, "classes": ds.classes,
            "num_samples": {name: s["num_samples"] for name, s in ds.manifest["splits"].items()}}


def _metrics(state: dict) -> dict:
    """What the checkpoint knows about its quality: the evaluation at the checkpoint, or for an
    averaged checkpoint, the scores of the checkpoints it averaged."""
    m = {k: v for k, v in state.get("metrics", {}).items() if "top" in k}
    if "averaged_from" in state:
        m.update(averaged_by=state["averaged_by"], averaged_from=state["averaged_from"],
                 averaged_scores=state["averaged_scores"])
    return m


def timm_config(model: torch.nn.Module, cfg, num_classes: int, extra: dict) -> dict:
    """timm's hub config.json for `model` evaluated the way the run evaluated it."""
    model_args = {"num_classes": num_classes}
    if cfg.model.norm_layer:
        model_args["norm_layer"] = cfg.model.norm_layer
    return {
        "architecture": cfg.model.name,
        "num_classes": num_classes,
        "num_features": model.num_features,
        "global_pool": "avg",
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [3, cfg.data.val_res, cfg.data.val_res],
            "crop_pct": cfg.data.crop_pct,
            "crop_mode": "center",
            "interpolation": cfg.data.interpolation,
            "mean": list(cfg.augment.mean),
            "std": list(cfg.augment.std),
            "num_classes": num_classes,
            "first_conv": model.pretrained_cfg.get("first_conv"),
            "classifier": model.pretrained_cfg.get("classifier"),
            "fixed_input_size": False,
        },
        "fastrsb": extra,
    }


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, ema: bool = False) -> Path:
    """Write OUT_DIR/{model.safetensors, config.json, README.md} from a fastrsb checkpoint (or averaged.pt)."""
    from safetensors.torch import save_file

    checkpoint, out = Path(checkpoint), Path(out_dir)
    state = ckpt.load(checkpoint, required=("model", "config"))
    weights = state.get("ema") if ema else state["model"]
    if weights is None:
        raise ValueError(f"{checkpoint} holds no EMA weights (train with ema.enabled=true, or export without --ema)")
    if "num_classes" not in state:
        raise ValueError(f"{checkpoint} does not record num_classes (written by an older fastrsb: re-run "
                         "`fastrsb average`, or export one of the run's checkpoints)")
    cfg, num_classes = from_dict(state["config"]), state["num_classes"]
    if cfg.model.blurpool:
        # timm records aa_layer as a class, which config.json cannot hold: timm would rebuild the net
        # without its blur layers and load these weights without complaint (BlurPool has no weights)
        raise ValueError(f"{checkpoint}: model.blurpool=true cannot be described in timm's config.json "
                         "(aa_layer is a class); export supports models timm rebuilds from their name")
    model = timm.create_model(cfg.model.name, pretrained=False, num_classes=num_classes, **architecture_kwargs(cfg.model))
    try:
        model.load_state_dict(weights)  # strict: the export must hold exactly what timm's model needs
    except RuntimeError as e:
        raise ValueError(f"{checkpoint}: its {'EMA' if ema else 'raw'} weights do not fit timm's {cfg.model.name} "
                         f"with {num_classes} classes: {e}") from None
    launch = _launch(checkpoint)
    recipe = Path(launch["recipe"]).stem if launch.get("recipe") else None
    extra = {"recipe": recipe, "weights": "ema" if ema else "raw", "metrics": _metrics(state),
             "epoch": state.get("epoch"), "step": state.get("step"), "checkpoint": checkpoint.name,
             "train_command": launch.get("command"), "code_version": state.get("code_version"),
             "data": _dataset_summary(cfg.data.path), "config": state["config"]}
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(out / WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    config = timm_config(model, cfg, num_classes, extra)
    atomic_write_json(out / CONFIG, config)
    atomic_write_bytes(out / CARD, model_card(config, f"fastrsb export {checkpoint} {out}{' --ema' if ema else ''}").encode())
    return out


def model_card(config: dict, export_command: str) -> str:
    x = config["fastrsb"]
    arch, n = config["architecture"], config["num_classes"]
    pre = config["pretrained_cfg"]
    metrics = x["metrics"]
    rows = "\n".join(f"| {k} | {v} |" for k, v in metrics.items()) or "| (not evaluated at this checkpoint) | |"
    data = x["data"]
    sizes = ", ".join(f"{k}: {v:,}" for k, v in data.get("num_samples", {}).items()) or "not recorded"
    classes = data.get("classes")
    shown = ", ".join(classes[:20]) + (", ..." if len(classes) > 20 else "") if classes else "not recorded"
    kwargs = "".join(f", {k}={v!r}" for k, v in config["model_args"].items() if k != "num_classes")
    return f"""---
library_name: timm
tags:
- image-classification
- timm
- fastrsb
---
# {arch} ({x['recipe'] or 'recipe not recorded'}, {x['weights']} weights)

A timm `{arch}` trained with fastrsb{f" (recipe `{x['recipe']}`)" if x['recipe'] else ''}, {n} classes,
{x['weights']} weights from `{x['checkpoint']}` (epoch {x['epoch']}, step {x['step']}, code {x['code_version']}).

## Use with timm

```python
import timm

model = timm.create_model("local-dir:PATH_TO_THIS_FOLDER", pretrained=True)  # or "hf-hub:USER/REPO" once pushed
# or by name, with the weights file (num_classes in the overlay too, or timm drops the classifier):
model = timm.create_model("{arch}", pretrained=True, num_classes={n}{kwargs},
                          pretrained_cfg_overlay=dict(file="PATH_TO_THIS_FOLDER/model.safetensors", num_classes={n}))
cfg = timm.data.resolve_data_config({{}}, model=model)  # {pre['input_size'][1]} px, crop_pct {pre['crop_pct']}, {pre['interpolation']}
transform = timm.data.create_transform(**cfg)
```

## Metrics (fastrsb's evaluation on the dataset's val split)

| metric | value |
| --- | --- |
{rows}

## Data

`{data['path']}`: {sizes}. Classes ({n}): {shown}.

## How it was made

Training: `{x['train_command'] or 'not recorded'}`

Export: `{export_command}`

The full training configuration is in `config.json` under `fastrsb.config`.
"""
