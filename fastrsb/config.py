"""Run configuration: nested dataclasses, YAML recipes, dotted CLI overrides.

A recipe is a YAML mapping whose top-level keys are the sections below. Unknown keys
and values of the wrong type are errors naming the dotted key, raised before any
work starts. `to_dict(cfg)` round-trips into checkpoints and metrics files.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A recipe or override names an unknown key, gives a value of the wrong type or outside the allowed
    ones, or settings that do not go together."""


@dataclass
class DataConfig:
    backend: Literal["ffcv", "dali", "torch", "synthetic"] = "ffcv"
    path: str = ""  # a directory written by `fastrsb convert` (holds manifest.json)
    batch_size: int = 256  # per process
    # decode workers per process (PIL worker processes; ffcv's and DALI's threads; torch_decode=device decodes on the
    # device from one reader thread and ignores it); 0 = all cores / local world size
    workers: int = 0
    train_res: int = 224
    val_res: int = 224
    crop_pct: float = 0.875  # val: resize shorter side to val_res / crop_pct, center crop val_res
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect range
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"  # resize after crop
    num_repeats: int = 1  # repeated augmentation (DeiT/timm RepeatAugSampler); 1 = off
    # the train split's epoch order: random (a seeded permutation, timm's and torch's DistributedSampler's), or block
    # (fastrsb.data.block_order: blocks of the store in random order through a sliding window, for stores larger
    # than RAM; ffcv's QUASI_RANDOM, but distributed, with repeats and seeded crops)
    order: Literal["random", "block"] = "random"
    block_mb: float = 32.0  # data.order=block: stored bytes per block
    window_blocks: int = 8  # data.order=block: blocks read at once, whose samples a batch mixes
    seed: int | None = None  # the sample order's and augmentation's seed; None: train.seed (one seed per run)
    prefetch: int = 4  # batches staged ahead of the consumer (DALI queue depth; cuda staging depth)
    # stored samples that cannot be decoded are replaced by another of their batch and named; past this many (per
    # split, per process) the run checkpoints and stops. None: 0.01% of the split, rounded up; 0: stop on the first
    max_bad_samples: int | None = None
    # backend knobs
    # fastrsb: seeded crops, only the needed part of the JPEG decoded (DCT scale, cropped window), Pillow's
    # bilinear/bicubic; ffcv: ffcv's own decoders (unseeded crops, cv2 INTER_AREA), kept for comparison
    ffcv_decoder: Literal["fastrsb", "ffcv"] = "fastrsb"
    ffcv_os_cache: bool = True  # let the OS page cache hold the .beton (else ffcv's process cache)
    ffcv_batches_ahead: int = 3
    dali_decode: Literal["auto", "cpu", "mixed"] = "auto"  # auto: mixed (nvjpeg) on cuda, cpu otherwise
    # torch backend: workers = PIL in DataLoader workers (the reference); device = batched decode on train.device
    # (nvjpeg on cuda, libjpeg-turbo on the cpu), crops and resize there too
    torch_decode: Literal["workers", "device"] = "workers"
    # torch_decode=device's library: auto = torchcodec where it is installed and works, else torchvision
    torch_device_decoder: Literal["auto", "torchcodec", "torchvision"] = "auto"
    synthetic_num_samples: int = 10000  # synthetic backend: pretend dataset size
    synthetic_num_classes: int = 1000


@dataclass
class AugmentConfig:
    randaugment: str = ""  # timm config string, e.g. rand-m7-mstd0.5-inc1; "" = off
    randaugment_impl: Literal["auto", "torch", "numba"] = "auto"  # auto: numba kernels on cpu, torch ops on cuda
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5
    mix_mode: Literal["batch", "pair", "elem"] = "batch"  # timm's Mixup modes
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass
class ModelConfig:
    name: str = "resnet50"  # anything timm.create_model makes
    drop_path_rate: float = 0.0  # stochastic depth
    drop_rate: float = 0.0  # dropout before the classifier
    blurpool: bool = False  # anti-aliased downsampling (timm aa_layer=BlurPool2d), as ffcv-imagenet's use_blurpool
    # "" = the architecture's own (BatchNorm for ResNets); else a timm norm name: batchnorm | groupnorm |
    # groupnorm1 | layernorm2d | frozenbatchnorm2d | ... (timm.layers.get_norm_layer). groupnorm1 does not mix
    # samples, so a DDP run equals a 1-process run at the same global batch (tests rely on it)
    norm_layer: str = ""
    channels_last: bool = True
    compile: bool = False  # torch.compile the model


@dataclass
class OptimConfig:
    name: str = "lamb"  # timm optimizer name: lamb | sgd (nesterov) | momentum | adamw | ...
    lr: float = 5e-3  # at the global batch lr_ref_batch (or as is when lr_ref_batch is 0)
    lr_ref_batch: int = 0  # >0: lr scales linearly with global batch / lr_ref_batch
    weight_decay: float = 0.01  # never applied to parameters with ndim <= 1 (biases, norms)
    momentum: float = 0.9
    clip_grad: float = 0.0  # max grad norm; 0 = off


@dataclass
class ScheduleConfig:
    kind: Literal["cosine", "cyclic", "step"] = "cosine"  # cyclic: ffcv-imagenet's triangular
    warmup_epochs: float = 5.0
    warmup_start: float = 1e-4  # warmup starts at lr * warmup_start
    min_lr: float = 1e-6  # cosine floor (absolute)
    cooldown_epochs: float = 0.0  # epochs held at min_lr after the cosine (counted inside train.epochs)
    peak_epoch: float = 2.0  # cyclic: linear 1e-4*lr -> lr at peak_epoch -> 0 at the end
    step_epochs: int = 30  # step (ffcv-imagenet): multiply by step_ratio every step_epochs, 0 after the end
    step_ratio: float = 0.1


@dataclass
class LossConfig:
    kind: Literal["ce", "bce"] = "ce"
    label_smoothing: float = 0.0
    bce_target_threshold: float | None = None  # RSB: 0.2
    kd_teacher: str = ""  # local teacher weights (fastrsb or timm checkpoint, or a state_dict file); needed when kd_weight > 0
    kd_teacher_model: str = ""  # timm name of the teacher architecture (default: model.name)
    kd_weight: float = 0.0  # > 0 turns KD on: loss = kd_weight * KL(teacher) + (1 - kd_weight) * task loss
    kd_temperature: float = 1.0


@dataclass
class EmaConfig:
    enabled: bool = False
    decay: float = 0.9999
    warmup: bool = False  # timm's EMA warmup of the decay


@dataclass
class ProgressiveConfig:
    """FFCV-style progressive resizing: train res ramps min_res -> max_res between the epochs."""

    enabled: bool = False
    min_res: int = 160
    max_res: int = 192
    start_ramp: int = 0
    end_ramp: int = 0
    step: int = 32  # resolutions are multiples of this


@dataclass
class TrainConfig:
    epochs: int = 100
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"  # auto: bf16 on cuda, none (fp32) on cpu
    seed: int = 0
    log_interval: int = 50  # steps between host syncs (metrics line, progress bar)
    checkpoint_every_epochs: int = 1
    checkpoint_every_minutes: float = 30.0  # checked at log intervals (mid-epoch); 0 = at every log interval
    keep_checkpoints: int = 5  # newest kept; best-by-val ones are kept for `fastrsb average`
    eval_every_epochs: int = 1
    flip_tta: bool = False  # evaluate on the image and its mirror (ffcv-imagenet lr_tta)
    cudnn_benchmark: bool = True
    tensorboard: bool = False


@dataclass
class Config:
    """A run's whole configuration: a recipe's sections (configs/*.yaml), each key checked as it is made."""

    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def allowed(section: type, key: str) -> tuple:
    """The values a Literal config key allows, e.g. allowed(DataConfig, "backend")."""
    return typing.get_args(typing.get_type_hints(section)[key])


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': expected {tp}, got {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list of {len(args)} values, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"config key '{key}': expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if origin is list:
        (a,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, a, key) for v in value]
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed and type(value) is type(allowed[0]):
            return value
        raise ConfigError(f"config key '{key}': expected one of {', '.join(map(str, allowed))}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


# keys that are gone, and what replaces them
REMOVED = {"data.ffcv_quasi_random": "data.order=block replaces it (it also runs distributed, with data.num_repeats, "
                                     "on every backend, with seeded crops)"}


def _build(cls: type, values: Any, prefix: str) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"config key '{prefix}': expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        dotted = f"{prefix}.{key}" if prefix else key
        if dotted in REMOVED:
            raise ConfigError(f"config key '{dotted}' was removed: {REMOVED[dotted]}")
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix + '.' if prefix else ''}{unknown[0]}' (known in '{prefix or 'top level'}': {', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in values.items()}
    return cls(**kwargs)


def from_dict(values: dict) -> Config:
    """A checked config from nested values (a recipe, a checkpoint's config): types, then validate()."""
    cfg = _build(Config, values, "")
    if cfg.data.seed is None:
        cfg.data.seed = cfg.train.seed
    validate(cfg)
    return cfg


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """What no single key's type can say: ranges, and settings that must go together. Runs on every
    config made (load_config, from_dict), so a bad combination fails before any work, naming the keys."""
    d, a, t, loss, p = cfg.data, cfg.augment, cfg.train, cfg.loss, cfg.progressive
    for key, value in (("data.batch_size", d.batch_size), ("data.train_res", d.train_res), ("data.val_res", d.val_res),
                       ("data.num_repeats", d.num_repeats), ("data.prefetch", d.prefetch), ("train.epochs", t.epochs),
                       ("train.log_interval", t.log_interval), ("train.checkpoint_every_epochs", t.checkpoint_every_epochs),
                       ("train.eval_every_epochs", t.eval_every_epochs), ("train.keep_checkpoints", t.keep_checkpoints)):
        _require(value >= 1, f"{key} must be >= 1, got {value}")
    _require(d.workers >= 0, f"data.workers must be >= 0 (0: all cores), got {d.workers}")
    _require(d.max_bad_samples is None or d.max_bad_samples >= 0,
             f"data.max_bad_samples must be >= 0 (0: stop on the first), got {d.max_bad_samples}")
    _require(0 < d.crop_pct <= 1, f"data.crop_pct must lie in (0, 1], got {d.crop_pct}")
    _require(0 < d.scale[0] <= d.scale[1] <= 1, f"data.scale must be 0 < min <= max <= 1, got {list(d.scale)}")
    _require(0 < d.ratio[0] <= d.ratio[1], f"data.ratio must be 0 < min <= max, got {list(d.ratio)}")
    mixing = a.mixup_alpha > 0 or a.cutmix_alpha > 0
    _require(not mixing or d.batch_size % 2 == 0,
             f"augment.mixup_alpha/cutmix_alpha mix each image with another: data.batch_size must be even, got {d.batch_size}")
    _require(0 <= loss.kd_weight <= 1, f"loss.kd_weight must lie in [0, 1], got {loss.kd_weight}")
    _require(loss.kd_weight == 0 or bool(loss.kd_teacher),
             f"loss.kd_teacher: loss.kd_weight={loss.kd_weight} distils from a teacher; set loss.kd_teacher to a local checkpoint")
    if p.enabled:
        _require(p.min_res <= p.max_res, f"progressive.min_res={p.min_res} > progressive.max_res={p.max_res}")
        _require(p.start_ramp <= p.end_ramp, f"progressive.start_ramp={p.start_ramp} > progressive.end_ramp={p.end_ramp}")
    _require(not (d.dali_decode == "mixed" and t.device == "cpu"),
             "data.dali_decode=mixed decodes on a GPU (nvjpeg), but train.device=cpu; use data.dali_decode=cpu or auto")
    if t.device == "cuda":
        from fastrsb.augment.randaugment import resolve_randaugment_impl  # augment imports this module

        try:
            resolve_randaugment_impl(a.randaugment_impl, t.device)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    _require(d.block_mb > 0, f"data.block_mb must be > 0, got {d.block_mb}")
    _require(d.window_blocks >= 1, f"data.window_blocks must be >= 1, got {d.window_blocks}")


def to_dict(cfg: Config) -> dict:
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`--data.batch_size=128` or `data.batch_size=128` -> (['data', 'batch_size'], 128). Values are YAML."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ConfigError(f"override '{text}': expected --section.key=value")
    key, raw = body.split("=", 1)
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
        node[path[-1]] = value
    return values


def merge(values: dict, more: dict) -> dict:
    """`more`'s leaves set into the nested mapping `values` (in place), e.g. {"data": {"path": p}}."""
    for key, value in more.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            merge(values[key], value)
        else:
            values[key] = value
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                values: dict | None = None) -> Config:
    """A recipe file, then `--section.key=value` overrides (what a user typed), then `values` (settings a
    program passes as values, e.g. {"data": {"path": p}}), checked as one config."""
    settings: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            settings = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if not isinstance(settings, dict):
            raise ConfigError(f"config file {p}: expected a mapping of sections at the top level")
    settings = merge(apply_overrides(settings, overrides or []), values or {})
    return from_dict(settings)
