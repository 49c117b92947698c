"""Models come from timm; fastrsb adds channels-last, optional compile, and local-only teachers."""
from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch
from timm.utils import ModelEmaV3

from fastrsb.config import ModelConfig


def architecture_kwargs(cfg: ModelConfig) -> dict:
    """The timm.create_model arguments that change the network's function (not its training):
    whoever rebuilds the model from saved weights (eval, a teacher, an export) needs the same."""
    kwargs: dict = {}
    if cfg.blurpool:
        # timm's placement (blur after the strided conv's stride-1 twin, and in the stem), not
        # ffcv-imagenet's (a blur in front of every strided conv with >= 16 input channels)
        from timm.layers import BlurPool2d

        kwargs["aa_layer"] = BlurPool2d
    if cfg.norm_layer:
        from timm.layers import get_norm_layer

        try:
            get_norm_layer(cfg.norm_layer)
        except KeyError:
            raise ValueError(f"model.norm_layer={cfg.norm_layer!r}: not a timm norm layer name "
                             "(batchnorm, groupnorm, groupnorm1, layernorm2d, frozenbatchnorm2d, ...)") from None
        kwargs["norm_layer"] = cfg.norm_layer
    return kwargs


def create_model(cfg: ModelConfig, num_classes: int, device: torch.device) -> torch.nn.Module:
    kwargs = {"num_classes": num_classes, "drop_rate": cfg.drop_rate, **architecture_kwargs(cfg)}
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    try:
        model = timm.create_model(cfg.name, pretrained=False, **kwargs)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"model.name={cfg.name!r}: timm cannot build it with {sorted(kwargs)}: {e}") from e
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def create_ema(model: torch.nn.Module, cfg) -> ModelEmaV3 | None:
    """timm's EMA of the weights (ema.enabled), or None. Its multi-tensor (foreach) update runs on every
    device (timm's default, named here because the CPU tests rely on running the GPU's code)."""
    if not cfg.enabled:
        return None
    return ModelEmaV3(model, decay=cfg.decay, use_warmup=cfg.warmup, foreach=True)


def wrap_model(model: torch.nn.Module, cfg: ModelConfig, dist) -> torch.nn.Module:
    """What the train step calls: the model in DDP when the run has several processes, compiled when
    model.compile is set. The module itself stays the trainer's raw_model (weights, EMA, evaluation)."""
    if dist.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    return torch.compile(model) if cfg.compile else model


# fastrsb checkpoints ("ema", "model"), then timm train.py's ("state_dict_ema", "state_dict"); EMA first
_WEIGHT_KEYS = ("ema", "state_dict_ema", "model_ema", "model", "state_dict")


def read_weights_file(path: Path) -> dict:
    """A checkpoint or state_dict file, loaded without running pickled code: .safetensors, or torch.load with
    weights_only=True plus exactly the one global timm's train.py writes (its `args`, an argparse.Namespace)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _recorded_architecture(state: dict) -> str | None:
    """The architecture a checkpoint says it holds: timm's 'arch', or a fastrsb config's model.name."""
    if isinstance(state.get("arch"), str):
        return state["arch"]
    model_cfg = state.get("config", {}).get("model", {}) if isinstance(state.get("config"), dict) else {}
    return model_cfg.get("name") if isinstance(model_cfg.get("name"), str) else None


def _weights_of(state: dict) -> tuple[dict, str]:
    """The state_dict inside a checkpoint (its EMA weights when present) and the key it came from."""
    for key in _WEIGHT_KEYS:
        if isinstance(state.get(key), dict) and state[key]:
            return state[key], key
    return state, "a plain state_dict"


def _misfit(weights: dict, model: torch.nn.Module) -> tuple[list[str], list[str], list[str]]:
    """Keys the model needs but the weights lack, keys it has no place for, and shape mismatches."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in weights and tuple(weights[k].shape) != tuple(v.shape)]
    return missing, unexpected, shapes


def load_teacher(path: str, name: str, num_classes: int, device: torch.device) -> torch.nn.Module:
    """A frozen KD teacher from a local file: a fastrsb checkpoint, a timm train.py checkpoint (both: their EMA
    weights when present), a plain state_dict or a .safetensors file. Never downloads."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"loss.kd_teacher: {p} not found (teachers are local files; nothing is downloaded)")
    try:
        state = read_weights_file(p)
    except Exception as e:
        raise ValueError(f"loss.kd_teacher {p}: cannot be read as weights: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict):
        raise ValueError(f"loss.kd_teacher {p}: holds a {type(state).__name__}, not a checkpoint or state_dict")
    recorded = _recorded_architecture(state)
    weights, source = _weights_of(state)
    # DDP and torch.compile prefixes from other trainers
    weights = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in weights.items()}
    model_cfg = ModelConfig(name=name)
    if isinstance(state.get("config"), dict):  # a fastrsb teacher: rebuild its blurpool / norm layers too
        for key in ("blurpool", "norm_layer"):
            setattr(model_cfg, key, state["config"].get("model", {}).get(key, getattr(model_cfg, key)))
    teacher = create_model(model_cfg, num_classes, torch.device("cpu"))
    what = f"loss.kd_teacher {p} ({source}; the file says {recorded or 'nothing about its architecture'})"
    classifier = teacher.pretrained_cfg.get("classifier")
    head = weights.get(f"{classifier}.weight") if isinstance(classifier, str) else None
    if head is not None and head.ndim == 2 and head.shape[0] != num_classes:
        raise ValueError(f"{what}: the teacher has {head.shape[0]} classes ({classifier}.weight "
                         f"{tuple(head.shape)}), the student's dataset has {num_classes}")
    missing, unexpected, shapes = _misfit(weights, teacher)
    if missing or unexpected or shapes:
        raise ValueError(f"{what}: the weights are not a {name} (loss.kd_teacher_model, default model.name): "
                         f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
                         f"{len(shapes)} shape mismatches {shapes[:3]}")
    teacher.load_state_dict(weights)
    teacher.to(device).to(memory_format=torch.channels_last).eval().requires_grad_(False)
    return teacher
