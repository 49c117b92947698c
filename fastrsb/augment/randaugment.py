"""timm's RandAugment, run on whole uint8 batches on the device.

Hand-written because no library does this: timm runs RandAugment per image with PIL on the CPU
(the decode workers' budget), DALI's auto_aug.rand_augment is a different variant (no magnitude
noise, no "increasing" ops), and FFCV has none. Every sample draws its own ops, probabilities,
magnitudes and signs exactly as timm's RandAugment/AugmentOp do; samples are then grouped by op,
so a batch costs a few vectorized torch calls per layer, not a Python loop over images.
Each op reproduces the PIL operation timm calls (ImageOps/ImageEnhance/Image.transform) on uint8
data, including PIL's integer rounding, so timm's PIL implementation is the test oracle.

Two implementations share the decisions: the torch ops below (any device; what runs on cuda) and, on
the CPU, the per-image numba kernels of randaugment_numba.py (bit-exact with PIL, and several times
faster there: the torch ops are memory-bound on a CPU). `impl` chooses; "auto" takes the kernels on
the CPU and the torch ops elsewhere.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numba
import numpy as np
import torch

from fastrsb.augment import randaugment_numba as kernels
from fastrsb.augment import randaugment_torch as torch_ops
from fastrsb.augment.parcel import Parcel
from fastrsb.config import resolve_randaugment_impl

LEVEL_DENOM = 10.0
RAND_TRANSFORMS = ["AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
                   "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]
RAND_INCREASING_TRANSFORMS = ["AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                              "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                              "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                              "TranslateYRel"]
# timm's ImageNet hparams: fill = round(255 * IMAGENET_DEFAULT_MEAN), translate_pct 0.45
IMAGENET_FILL = (124, 116, 104)
TRANSLATE_PCT = 0.45

# ops whose level -> argument mapping negates the value with probability 1/2 (timm's _randomly_negate)
SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "TranslateX", "TranslateY",
          "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"}


def level_to_arg(name: str, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """timm's LEVEL_TO_ARG, vectorized: level (M,) magnitudes, sign (M,) of +-1 -> float64 (M,), the
    double-precision value timm computes (PIL casts enhance factors to float32 itself)."""
    lv, sign = level.double() / LEVEL_DENOM, sign.double()
    if name == "Rotate":
        return lv * 30.0 * sign
    if name in ("ShearX", "ShearY"):
        return lv * 0.3 * sign
    if name in ("TranslateXRel", "TranslateYRel"):
        return lv * TRANSLATE_PCT * sign
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return lv * 1.8 + 0.1
    if name.endswith("Increasing") and name[:-10] in ("Color", "Contrast", "Brightness", "Sharpness"):
        return torch.clamp(1.0 + lv * 0.9 * sign, min=0.1)
    if name == "Posterize":
        return torch.floor(lv * 4)
    if name == "PosterizeIncreasing":
        return 4 - torch.floor(lv * 4)
    if name == "PosterizeOriginal":
        return torch.floor(lv * 4) + 4
    if name == "Solarize":
        return torch.clamp(torch.floor(lv * 256), max=256)
    if name == "SolarizeIncreasing":
        return 256 - torch.clamp(torch.floor(lv * 256), max=256)
    if name == "SolarizeAdd":
        return torch.clamp(torch.floor(lv * 110), max=128)
    if name in ("AutoContrast", "Equalize", "Invert"):
        return torch.zeros_like(lv)
    raise KeyError(f"unknown RandAugment op {name!r}")


GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def _rotate_matrix(degrees: float, w: int, h: int) -> list[float]:
    """PIL Image.rotate(degrees) (counter-clockwise about (w/2, h/2), same size) as the inverse map it
    hands to Image.transform, with PIL's own arithmetic: angle taken mod 360, sin/cos rounded to 15
    digits, the centre shift folded into the offsets."""
    angle = -math.radians(degrees % 360.0)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    d, e = round(-math.sin(angle), 15), round(math.cos(angle), 15)
    cx, cy = w / 2.0, h / 2.0
    return [a, b, a * -cx + b * -cy + 0.0 + cx, d, e, d * -cx + e * -cy + 0.0 + cy]


def affine_coefficients(name: str, arg: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The (M, 6) float64 inverse-map coefficients timm's geometric op `name` passes to PIL's
    Image.transform(AFFINE) for args (M,): output pixel centre (xc, yc) samples the input at
    (a0 xc + a1 yc + a2, a3 xc + a4 yc + a5)."""
    arg = arg.double()
    if name == "Rotate":
        return torch.tensor([_rotate_matrix(a, w, h) for a in arg.tolist()], dtype=torch.float64).view(-1, 6)
    one, zero = torch.ones_like(arg), torch.zeros_like(arg)
    if name == "ShearX":
        return torch.stack([one, arg, zero, zero, one, zero], 1)
    if name == "ShearY":
        return torch.stack([one, zero, zero, arg, one, zero], 1)
    if name == "TranslateXRel":  # timm: pixels = pct * width
        return torch.stack([one, zero, arg * w, zero, one, zero], 1)
    if name == "TranslateYRel":
        return torch.stack([one, zero, zero, zero, one, arg * h], 1)
    raise KeyError(f"{name!r} is not a geometric RandAugment op")


# the kernel op code of each timm op, by its name without Increasing/Original
_KERNEL_CODE = {"AutoContrast": kernels.AUTOCONTRAST, "Equalize": kernels.EQUALIZE, "Invert": kernels.INVERT,
                "Posterize": kernels.POSTERIZE, "Solarize": kernels.SOLARIZE, "SolarizeAdd": kernels.SOLARIZE_ADD,
                "Color": kernels.COLOR, "Contrast": kernels.CONTRAST, "Brightness": kernels.BRIGHTNESS,
                "Sharpness": kernels.SHARPNESS, **{g: kernels.AFFINE for g in GEOMETRIC}}


def kernel_op(name: str, arg: torch.Tensor, h: int, w: int) -> tuple[int, torch.Tensor]:
    """(kernel op code, (M, 6) float64 params) for op `name` with args (M,) on h x w images."""
    base = name.removesuffix("Increasing").removesuffix("Original")
    if base not in _KERNEL_CODE:
        raise KeyError(f"unknown RandAugment op {name!r}")
    if name in GEOMETRIC:
        return kernels.AFFINE, affine_coefficients(name, arg, h, w)
    params = torch.zeros(arg.shape[0], 6, dtype=torch.float64)
    params[:, 0] = arg
    return _KERNEL_CODE[base], params


def run_kernels(images: torch.Tensor, codes: torch.Tensor, params: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Run a kernel program on uint8 (N,H,W,3) CPU images: ops codes[l, i] with params[l, i] (IDENTITY
    = none) applied to image i layer after layer, images in parallel on torch's intra-op thread count.
    `scratch`, like `images`, holds intermediate results (NumbaOps keeps one across calls)."""
    out = torch.empty_like(images)
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    previous = numba.set_parallel_chunksize(1)  # an image costs 3 to 300 us: hand them out one at a time
    try:
        kernels.run_program(images.numpy(), out.numpy(), scratch.numpy(), codes.numpy(), params.numpy(),
                            np.asarray(IMAGENET_FILL, np.uint8))
    finally:
        numba.set_parallel_chunksize(previous)
    return out


def apply_op_args(images: torch.Tensor, name: str, arg: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Apply op `name` with per-sample PIL-level arguments `arg` (M,) to uint8 (M,H,W,3) NHWC images."""
    h, w = images.shape[1:3]
    code, params = kernel_op(name, arg, h, w)
    ops = create_ops(impl, images.device)
    parcel = Parcel()
    plan = ops.plan(torch.full((1, images.shape[0]), code, dtype=torch.int8), params.unsqueeze(0), parcel)
    return ops.run(images, plan, parcel.send(images) if len(parcel) else None)


def _torch_op(images: torch.Tensor, code: int, params: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """The torch op of kernel op `code` (see randaugment_torch)."""
    if code == kernels.AFFINE:
        return torch_ops.affine(images, params, fill)
    return torch_ops.OPS[code](images, params)


def _nhwc(images: torch.Tensor) -> torch.Tensor:
    """The (N,H,W,3) view of a channels-last (N,3,H,W) batch (a copy only for other layouts)."""
    return images.permute(0, 2, 3, 1).contiguous()


def _restore_layout(nhwc: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    out = nhwc.permute(0, 3, 1, 2)
    return out if like.is_contiguous(memory_format=torch.channels_last) else out.contiguous()


def apply_op(images: torch.Tensor, name: str, level: float, impl: str = "auto") -> torch.Tensor:
    """timm op `name` at magnitude `level` (0..10) in the positive direction, for every sample.
    images: uint8 (N,3,H,W) on any device; returns the same dtype/shape/memory format."""
    lv = torch.full((images.shape[0],), float(level), dtype=torch.float64)
    arg = level_to_arg(name, lv, torch.ones_like(lv))
    return _restore_layout(apply_op_args(_nhwc(images), name, arg, impl), images)


@dataclass(frozen=True)
class RandAugmentSpec:
    magnitude: float = 10.0
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0
    magnitude_max: float | None = None
    increasing: bool = False

    @property
    def ops(self) -> list[str]:
        return RAND_INCREASING_TRANSFORMS if self.increasing else RAND_TRANSFORMS


def parse_rand_augment(config: str) -> RandAugmentSpec:
    """timm's config string: rand-m{M}-n{N}-mstd{S}-mmax{X}-inc{0|1}-p{P}, timm's defaults."""
    parts = config.split("-")
    if parts[0] != "rand":
        raise ValueError(f"augment.randaugment: {config!r} must start with 'rand-' (timm RandAugment string)")
    kw: dict = {}
    for part in parts[1:]:
        m = re.fullmatch(r"([a-z]+)(\d.*)", part)
        if not m:
            raise ValueError(f"augment.randaugment: cannot parse section {part!r} of {config!r}")
        key, val = m.groups()
        if key == "m":
            kw["magnitude"] = float(int(val))
        elif key == "n":
            kw["num_layers"] = int(val)
        elif key == "p":
            kw["prob"] = float(val)
        elif key == "mstd":
            std = float(val)
            kw["magnitude_std"] = math.inf if std > 100 else std
        elif key == "mmax":
            kw["magnitude_max"] = float(int(val))
        elif key == "inc":
            kw["increasing"] = bool(int(val))
        else:
            raise ValueError(f"augment.randaugment: unknown section {part!r} in {config!r}")
    return RandAugmentSpec(**kw)


@dataclass(frozen=True)
class _Group:
    """Samples start..stop of a layer's sorted batch, all running kernel op `code`; their (M, 6)
    parameters sit at `params` in the parcel."""
    code: int
    start: int
    stop: int
    params: slice


@dataclass(frozen=True)
class _Layer:
    gather: slice  # parcel slice: the order that sorts this layer's batch by op
    groups: list[_Group]


@dataclass(frozen=True)
class _TorchPlan:
    layers: list[_Layer]
    restore: slice  # parcel slice: the order that puts the samples back


class NumbaOps:
    """The numba kernels of randaugment_numba.py, CPU only: each image runs its own ops in order, in
    parallel over images. They read the kernel program from host memory: nothing goes into the parcel."""

    def __init__(self):
        self._buffer: torch.Tensor | None = None

    def plan(self, codes: torch.Tensor, params: torch.Tensor, parcel: Parcel) -> tuple[torch.Tensor, torch.Tensor]:
        return codes, params

    def run(self, images: torch.Tensor, plan: tuple[torch.Tensor, torch.Tensor], sent: torch.Tensor | None) -> torch.Tensor:
        """uint8 (N,H,W,3) images through the program."""
        return run_kernels(images, *plan, self._scratch(images))

    def _scratch(self, like: torch.Tensor) -> torch.Tensor:
        """The kernels' work buffer, kept across calls: a fresh batch-sized tensor would be page-faulted
        in on every call, which on a CPU costs as much as the ops themselves."""
        if self._buffer is None or self._buffer.shape != like.shape:
            self._buffer = torch.empty_like(like)
        return self._buffer


class TorchOps:
    """The torch ops of randaugment_torch.py, any device (what runs on cuda): samples grouped by op code,
    so a layer costs one set of launches per op, not a Python loop over images."""

    def __init__(self):
        self._fill: torch.Tensor | None = None

    def plan(self, codes: torch.Tensor, params: torch.Tensor, parcel: Parcel) -> _TorchPlan:
        """A kernel program (codes (L, n), params (L, n, 6)) as the torch ops run it: each layer gathers the
        batch sorted by op code, so every op group is one contiguous slice (one set of launches for all
        its samples); a last gather restores the sample order. Group sizes are known here, on the host,
        so the device never has to report them. Gathers are cheap on any device, unlike scattering
        groups back into the batch. The gather orders and parameters go into `parcel`."""
        layers, n = codes.shape
        holds = np.arange(n)  # after a layer's gather, row j holds sample holds[j]
        position = np.empty(n, np.int64)
        planned = []
        for layer in range(layers):
            code = codes[layer].numpy()
            order = np.argsort(code, kind="stable")
            position[holds] = np.arange(n)
            gather = parcel.add(position[order])
            holds = order
            groups = []
            sorted_codes = code[order]
            starts = np.flatnonzero(np.diff(sorted_codes, prepend=-1))
            for start, stop in zip(starts, [*starts[1:], n]):
                if sorted_codes[start] != kernels.IDENTITY:
                    groups.append(_Group(int(sorted_codes[start]), int(start), int(stop),
                                         parcel.add(params[layer].numpy()[order[start:stop]])))
            planned.append(_Layer(gather, groups))
        position[holds] = np.arange(n)
        return _TorchPlan(planned, parcel.add(position))

    def run(self, images: torch.Tensor, plan: _TorchPlan, sent: torch.Tensor) -> torch.Tensor:
        """uint8 (N,H,W,3) images through the plan, its orders and parameters read from `sent` (the parcel
        on the device)."""
        if self._fill is None:  # timm's fill colour, copied to the batches' device once, not with every batch
            self._fill = torch.tensor(IMAGENET_FILL, dtype=torch.uint8, device=images.device)
        work = images
        for layer in plan.layers:
            # out= matters: index_select into a tensor it allocates itself takes a path ~5x slower on CPU
            work = torch.index_select(work, 0, sent[layer.gather].long(), out=torch.empty_like(work))
            for g in layer.groups:
                work[g.start:g.stop] = _torch_op(work[g.start:g.stop], g.code, sent[g.params].view(-1, 6), self._fill)
        return torch.index_select(work, 0, sent[plan.restore].long(), out=torch.empty_like(work))


def create_ops(impl: str, device: torch.device) -> NumbaOps | TorchOps:
    """augment.randaugment_impl's choice for `device` ('auto': the kernels on the CPU, the torch ops elsewhere)."""
    return NumbaOps() if resolve_randaugment_impl(impl, device.type) == "numba" else TorchOps()


class RandAugment:
    """Per-sample RandAugment decisions drawn on the host from a seeded generator as a kernel program
    (an op code and six parameters per sample and layer), then applied to the batch by the ops chosen
    once, here, for the device: the numba kernels on the CPU, or the torch ops grouped by op code (any
    device; what runs on cuda). Both give each sample its own ops in order, bit-exact with timm's PIL ops."""

    def __init__(self, spec: RandAugmentSpec, seed: int = 0, impl: str = "auto",
                 device: torch.device = torch.device("cpu")):
        self.spec, self.device = spec, device
        self.ops = create_ops(impl, device)
        self.gen = torch.Generator().manual_seed(seed)

    @classmethod
    def from_config(cls, config: str, seed: int = 0, impl: str = "auto",
                    device: torch.device = torch.device("cpu")) -> "RandAugment":
        return cls(parse_rand_augment(config), seed, impl, device)

    def draw(self, n: int) -> dict[str, torch.Tensor]:
        """The decisions timm's RandAugment makes for n images: per layer an op (uniform, with
        replacement), whether it applies (prob), its magnitude (gauss noise or uniform, clamped)
        and its sign. Shapes (num_layers, n)."""
        s, g, layers = self.spec, self.gen, self.spec.num_layers
        op = torch.randint(len(s.ops), (layers, n), generator=g)
        apply = torch.rand((layers, n), generator=g) < s.prob if s.prob < 1.0 else torch.ones(layers, n, dtype=torch.bool)
        mag = torch.full((layers, n), s.magnitude)
        if s.magnitude_std == math.inf:
            mag = torch.rand((layers, n), generator=g) * s.magnitude
        elif s.magnitude_std > 0:
            mag = mag + s.magnitude_std * torch.randn((layers, n), generator=g)
        mag = mag.clamp(0.0, s.magnitude_max or LEVEL_DENOM)
        sign = torch.where(torch.rand((layers, n), generator=g) > 0.5, -1.0, 1.0)
        return {"op": op, "apply": apply, "magnitude": mag, "sign": sign}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """A new augmented batch (the input is not modified), same dtype, shape and memory format."""
        parcel = Parcel()
        plan = self.prepare(images, parcel)
        return self.apply(images, plan, parcel.send(images) if len(parcel) else None)

    def prepare(self, images: torch.Tensor, parcel: Parcel):
        """Draw this batch's decisions on the host; what the device needs goes into `parcel` (sent with the
        rest of the batch stage's decisions). Returns the plan `apply` runs."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"RandAugment expects uint8 (N,3,H,W) batches, got {images.dtype} {tuple(images.shape)}")
        if images.device.type != self.device.type:
            raise ValueError(f"RandAugment was set up for {self.device}, got a batch on {images.device}")
        n, _, h, w = images.shape
        return self.ops.plan(*self._program(self.draw(n), h, w), parcel)

    def apply(self, images: torch.Tensor, plan, sent: torch.Tensor | None) -> torch.Tensor:
        """Run a prepared batch, reading the device side of its plan from `sent` (the parcel on the device)."""
        return _restore_layout(self.ops.run(_nhwc(images), plan, sent), images)

    def _program(self, d: dict[str, torch.Tensor], h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The draws as a kernel program: op codes (layers, n) int8 (IDENTITY where no op applies) and
        their params (layers, n, 6) float64."""
        layers, n = d["op"].shape
        codes = torch.zeros(layers, n, dtype=torch.int8)
        params = torch.zeros(layers, n, 6, dtype=torch.float64)
        for k, name in enumerate(self.spec.ops):
            chosen = d["apply"] & (d["op"] == k)
            if not chosen.any():
                continue
            sign = d["sign"][chosen] if name in SIGNED else torch.ones(int(chosen.sum()))
            codes[chosen], params[chosen] = kernel_op(name, level_to_arg(name, d["magnitude"][chosen], sign), h, w)
        return codes, params

    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])
