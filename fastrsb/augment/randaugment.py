"""timm's RandAugment, run on whole uint8 batches on the device.

Hand-written because no library does this: timm runs RandAugment per image with PIL on the CPU
(the decode workers' budget), DALI's auto_aug.rand_augment is a different variant (no magnitude
noise, no "increasing" ops), and FFCV has none. Every sample draws its own ops, probabilities,
magnitudes and signs exactly as timm's RandAugment/AugmentOp do; samples are then grouped by op,
so a batch costs a few vectorized torch calls per layer, not a Python loop over images.
Each op reproduces the PIL operation timm calls (ImageOps/ImageEnhance/Image.transform) on uint8
data, including PIL's integer rounding, so timm's PIL implementation is the test oracle.

The decisions become a kernel program (an op code and six parameters per sample and layer) through the
op table (op_table.py: each timm op's level -> argument mapping, sign and kernel). Two implementations
run the program: the torch ops of randaugment_torch.py (any device; what runs on cuda) and, on the
CPU, the per-image numba kernels of randaugment_numba.py (bit-exact with PIL, and several times
faster there: the torch ops are memory-bound on a CPU). `impl` chooses; "auto" takes the numba
kernels on the CPU and the torch ops elsewhere.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numba
import numpy as np
import torch

from fastrsb.augment import randaugment_numba as numba_kernels
from fastrsb.augment import randaugment_torch as torch_ops
from fastrsb.augment.op_table import IMAGENET_FILL, KERNEL, LEVEL_DENOM, level_to_arg, program_step
from fastrsb.augment.parcel import Parcel
from fastrsb.config import AugmentConfig, allowed

RAND_TRANSFORMS = ["AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
                   "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]
RAND_INCREASING_TRANSFORMS = ["AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                              "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                              "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                              "TranslateYRel"]


def apply_op_args(images: torch.Tensor, name: str, arg: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Apply op `name` with per-sample PIL-level arguments `arg` (M,) to uint8 (M,H,W,3) NHWC images."""
    h, w = images.shape[1:3]
    code, params = program_step(name, arg, h, w)
    ops = create_ops(impl, images.device)
    parcel = Parcel()
    prepared = ops.prepare(torch.full((1, images.shape[0]), code, dtype=torch.int8), params.unsqueeze(0), parcel)
    return ops.run(images, prepared, parcel.send(images) if len(parcel) else None)


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
class _TorchLayers:
    layers: list[_Layer]
    restore: slice  # parcel slice: the order that puts the samples back


class NumbaOps:
    """The numba kernels of randaugment_numba.py, CPU only: each image runs its own ops in order, in
    parallel over images on torch's intra-op thread count. They read the kernel program from host memory:
    nothing goes into the parcel."""

    def __init__(self):
        self._buffer: torch.Tensor | None = None

    def prepare(self, codes: torch.Tensor, params: torch.Tensor, parcel: Parcel) -> tuple[torch.Tensor, torch.Tensor]:
        return codes, params

    def run(self, images: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor], sent: torch.Tensor | None) -> torch.Tensor:
        """uint8 (N,H,W,3) images through the program."""
        codes, params = prepared
        out = torch.empty_like(images)
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        previous = numba.set_parallel_chunksize(1)  # an image costs 3 to 300 us: hand them out one at a time
        try:
            numba_kernels.run_program(images.numpy(), out.numpy(), self._scratch(images).numpy(), codes.numpy(),
                                      params.numpy(), np.asarray(IMAGENET_FILL, np.uint8), KERNEL)
        finally:
            numba.set_parallel_chunksize(previous)
        return out

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

    def prepare(self, codes: torch.Tensor, params: torch.Tensor, parcel: Parcel) -> _TorchLayers:
        """A kernel program (codes (L, n), params (L, n, 6)) as the torch ops run it: each layer gathers the
        batch sorted by op code, so every op group is one contiguous slice (one set of launches for all
        its samples); a last gather restores the sample order. Group sizes are known here, on the host,
        so the device never has to report them. Gathers are cheap on any device, unlike scattering
        groups back into the batch. The gather orders and parameters go into `parcel`."""
        layers, n = codes.shape
        holds = np.arange(n)  # after a layer's gather, row j holds sample holds[j]
        position = np.empty(n, np.int64)
        built = []
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
                if sorted_codes[start] != KERNEL.IDENTITY:
                    groups.append(_Group(int(sorted_codes[start]), int(start), int(stop),
                                         parcel.add(params[layer].numpy()[order[start:stop]])))
            built.append(_Layer(gather, groups))
        position[holds] = np.arange(n)
        return _TorchLayers(built, parcel.add(position))

    def run(self, images: torch.Tensor, prepared: _TorchLayers, sent: torch.Tensor) -> torch.Tensor:
        """uint8 (N,H,W,3) images through the prepared layers, their orders and parameters read from `sent` (the
        parcel on the device)."""
        if self._fill is None:  # timm's fill colour, copied to the batches' device once, not with every batch
            self._fill = torch.tensor(IMAGENET_FILL, dtype=torch.uint8, device=images.device)
        work = images
        for layer in prepared.layers:
            # out= matters: index_select into a tensor it allocates itself takes a path ~5x slower on CPU
            work = torch.index_select(work, 0, sent[layer.gather].long(), out=torch.empty_like(work))
            for g in layer.groups:
                params = sent[g.params].view(-1, 6)
                work[g.start:g.stop] = torch_ops.apply(g.code, work[g.start:g.stop], params, self._fill)
        return torch.index_select(work, 0, sent[prepared.restore].long(), out=torch.empty_like(work))


IMPLEMENTATIONS = {"numba": NumbaOps, "torch": TorchOps}  # by augment.randaugment_impl's names


def resolve_randaugment_impl(impl: str, device_type: str) -> str:
    """augment.randaugment_impl for a device type: 'auto' takes the numba kernels on the CPU and the torch ops
    elsewhere; the kernels run on the CPU only."""
    if impl not in allowed(AugmentConfig, "randaugment_impl"):
        raise ValueError(f"augment.randaugment_impl: expected one of {allowed(AugmentConfig, 'randaugment_impl')}, "
                         f"got {impl!r}")
    if impl == "auto":
        return "numba" if device_type == "cpu" else "torch"
    if impl == "numba" and device_type != "cpu":
        raise ValueError(f"augment.randaugment_impl=numba runs on the CPU only, not on {device_type}; use torch or auto")
    return impl


def create_ops(impl: str, device: torch.device) -> NumbaOps | TorchOps:
    """augment.randaugment_impl's choice for `device` ('auto': the numba kernels on the CPU, the torch ops
    elsewhere)."""
    return IMPLEMENTATIONS[resolve_randaugment_impl(impl, device.type)]()


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
        prepared = self.prepare(images, parcel)
        return self.apply(images, prepared, parcel.send(images) if len(parcel) else None)

    def prepare(self, images: torch.Tensor, parcel: Parcel):
        """Draw this batch's decisions on the host; what the device needs goes into `parcel` (sent with the
        rest of the batch stage's decisions). Returns what `apply` runs."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"RandAugment expects uint8 (N,3,H,W) batches, got {images.dtype} {tuple(images.shape)}")
        if images.device.type != self.device.type:
            raise ValueError(f"RandAugment was set up for {self.device}, got a batch on {images.device}")
        n, _, h, w = images.shape
        return self.ops.prepare(*self._program(self.draw(n), h, w), parcel)

    def apply(self, images: torch.Tensor, prepared, sent: torch.Tensor | None) -> torch.Tensor:
        """Run a prepared batch, reading its device side from `sent` (the parcel on the device)."""
        return _restore_layout(self.ops.run(_nhwc(images), prepared, sent), images)

    def _program(self, d: dict[str, torch.Tensor], h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The draws as a kernel program: op codes (layers, n) int8 (IDENTITY where no op applies) and
        their params (layers, n, 6) float64."""
        layers, n = d["op"].shape
        codes = torch.full((layers, n), KERNEL.IDENTITY, dtype=torch.int8)
        params = torch.zeros(layers, n, 6, dtype=torch.float64)
        for k, name in enumerate(self.spec.ops):
            chosen = d["apply"] & (d["op"] == k)
            if not chosen.any():
                continue
            arg = level_to_arg(name, d["magnitude"][chosen], d["sign"][chosen])
            codes[chosen], params[chosen] = program_step(name, arg, h, w)
        return codes, params

    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])
