"""timm's RandAugment, run on whole uint8 batches on the device.

Hand-written because no library does this: timm runs RandAugment per image with PIL on the CPU
(the decode workers' budget), DALI's auto_aug.rand_augment is a different variant (no magnitude
noise, no "increasing" ops), and FFCV has none. Every sample draws its own ops, probabilities,
magnitudes and signs exactly as timm's RandAugment/AugmentOp do; samples are then grouped by op,
so a batch costs a few vectorized torch calls per layer, not a Python loop over images.
Each op reproduces the PIL operation timm calls (ImageOps/ImageEnhance/Image.transform) on uint8
data, including PIL's integer rounding, so timm's PIL implementation is the test oracle.

Two implementations share the decisions: the torch ops below (any device; what runs on cuda) and, on
the CPU, the per-image numba kernels of randaugment_cpu.py (bit-exact with PIL, and several times
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
import torch.nn.functional as F

from fastrsb.augment import randaugment_cpu as kernels

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


# ------------------------------------------------------------------ pixel ops
# Every op takes and returns uint8 images (M,H,W,3), contiguous: the NHWC memory of a channels-last
# batch, so no layout conversion is ever made. Per-sample arguments arrive as (M,) tensors on the
# CPU. Float work is float32 and kept to few passes: on a CPU these ops are memory-bound.
def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(M,) per-sample values as a (M,1,1,1) float32 column on `like`'s device."""
    return v.to(device=like.device, dtype=torch.float32).view(-1, 1, 1, 1)


def _to_uint8(f: torch.Tensor) -> torch.Tensor:
    """Clip to 0..255 and truncate, as PIL's (UINT8) casts do."""
    return f.clamp_(0, 255).to(torch.uint8)


def _blend(degenerate: torch.Tensor, img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL Image.blend(degenerate, img, factor) on float32 inputs: deg + factor*(img - deg), clip, truncate.
    `img` is consumed (used as scratch)."""
    return _to_uint8(img.sub_(degenerate).mul_(_col(factor, img)).add_(degenerate))


def _grayscale(img: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L, (R*19595 + G*38470 + B*7471 + 0x8000) >> 16, as float32 (M,H,W,1). Exact: every
    partial sum is an integer below 2**24, which float32 holds exactly. Elementwise on purpose: a matmul
    or convolution may run in TF32 on a GPU, which would not be exact."""
    f = img.float()
    gray = f[..., 0] * 19595.0
    gray.add_(f[..., 1], alpha=38470.0).add_(f[..., 2], alpha=7471.0)
    return gray.add_(32768.0).mul_(1.0 / 65536.0).floor_().unsqueeze(-1)


# per-channel index offsets 0/256/512 for one HWC image, cached per (pixels, device)
_CHANNEL_OFFSETS: dict[tuple[int, str], torch.Tensor] = {}


def _lut_index(img: torch.Tensor) -> torch.Tensor:
    """int32 (M, H*W*3): each pixel's value + 256 * its channel + 768 * its sample, so that one flat
    index addresses per-sample, per-channel histograms and lookup tables."""
    m = img.shape[0]
    flat = img.reshape(m, -1)
    key = (flat.shape[1], str(img.device))
    if key not in _CHANNEL_OFFSETS:
        _CHANNEL_OFFSETS[key] = (torch.arange(flat.shape[1], device=img.device, dtype=torch.int32) % 3) * 256
    sample = torch.arange(m, device=img.device, dtype=torch.int32).view(-1, 1) * 768
    return flat.to(torch.int32).add_(_CHANNEL_OFFSETS[key]).add_(sample)


def _apply_lut(img: torch.Tensor, lut: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """lut (M,3,256) values 0..255, per sample and channel."""
    if index is None:
        index = _lut_index(img)
    out = torch.empty(img.shape, dtype=torch.uint8, device=img.device)
    torch.index_select(lut.to(torch.uint8).reshape(-1), 0, index.view(-1), out=out.view(-1))
    return out


def auto_contrast(img: torch.Tensor) -> torch.Tensor:
    """ImageOps.autocontrast (cutoff 0): per channel, min..max stretched to 0..255 with int() truncation."""
    lo, hi = img.reshape(img.shape[0], -1, 3).aminmax(dim=1)
    lo, hi = lo.float(), hi.float()
    scale = 255.0 / (hi - lo).clamp(min=1)
    offset = -lo * scale
    ix = torch.arange(256, device=img.device, dtype=torch.float32)
    lut = (ix.view(1, 1, 256) * scale.unsqueeze(-1) + offset.unsqueeze(-1)).trunc().clamp(0, 255)
    lut = torch.where((hi > lo).unsqueeze(-1), lut, ix.view(1, 1, 256))
    return _apply_lut(img, lut)


def equalize(img: torch.Tensor) -> torch.Tensor:
    """ImageOps.equalize: per channel lut[i] = (step // 2 + sum(hist[:i])) // step,
    step = (total - count of the last non-empty bin) // 255; identity when step is 0."""
    m = img.shape[0]
    index = _lut_index(img)
    hist = torch.bincount(index.view(-1), minlength=m * 768).view(m, 3, 256)
    idx = torch.arange(256, device=img.device)
    last_bin = torch.where(hist > 0, idx, torch.full_like(idx, -1)).amax(-1, keepdim=True)
    last_count = torch.gather(hist, 2, last_bin.clamp(min=0))
    step = (hist.sum(-1, keepdim=True) - last_count) // 255
    before = torch.cumsum(hist, -1) - hist
    lut = ((step // 2 + before) // step.clamp(min=1)).clamp(max=255)
    lut = torch.where(step > 0, lut, idx.view(1, 1, 256))
    return _apply_lut(img, lut, index)


def posterize(img: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """ImageOps.posterize: keep the top `bits` bits (timm: 8 or more bits is the identity)."""
    b = bits.long().clamp(0, 8)
    mask = ((0xFF << (8 - b)) & 0xFF).to(device=img.device, dtype=torch.uint8).view(-1, 1)
    return (img.reshape(img.shape[0], -1) & mask).view(img.shape)


def solarize(img: torch.Tensor, thresh: torch.Tensor) -> torch.Tensor:
    """ImageOps.solarize: invert the pixels at or above the threshold (256: none). XOR with 255 is 255 - x."""
    flat = img.reshape(img.shape[0], -1)
    t = thresh.to(device=img.device, dtype=torch.int16).view(-1, 1)
    flip = (flat >= t).to(torch.uint8).mul_(255)
    return flat.bitwise_xor(flip).view(img.shape)


def solarize_add(img: torch.Tensor, add: torch.Tensor, thresh: int = 128) -> torch.Tensor:
    """timm's solarize_add: x + add (clipped) below the threshold. With timm's range (add <= 110 < 128)
    x + add stays below 256, so uint8 arithmetic cannot wrap; larger adds are clipped explicitly."""
    flat = img.reshape(img.shape[0], -1)
    a = add.clamp(0, 255).to(device=img.device, dtype=torch.uint8).view(-1, 1)
    below = flat < thresh
    if int(add.max()) + thresh - 1 <= 255:
        return flat.add(below.to(torch.uint8).mul_(a)).view(img.shape)
    return torch.where(below, (flat.to(torch.int16) + a).clamp_(max=255).to(torch.uint8), flat).view(img.shape)


def color(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    gray = _grayscale(img).expand(img.shape).contiguous()
    return _blend(gray, img.float(), factor)


def contrast(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Contrast: blend with a flat image of the rounded mean grey level."""
    mean = torch.floor(_grayscale(img).mean(dim=(1, 2, 3)) + 0.5)
    return _blend(_col(mean, img), img.float(), factor)


def brightness(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _to_uint8(img.float().mul_(_col(factor, img)))


# PIL's SMOOTH kernel without its divisor 13: integer weights keep the convolution exact even where
# cuDNN computes float32 convolutions in TF32
_SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]])


def sharpness(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Sharpness: blend with PIL's SMOOTH filter (kernel / 13, rounded). The filter leaves
    the 1-pixel border as it is, so the border blends to itself."""
    if min(img.shape[1:3]) < 3:  # all border
        return img.clone()
    f = img.float()
    kernel = _SMOOTH.to(img.device).expand(3, 1, 3, 3)
    # depthwise 3x3 on the channels-last view; (s + 6.5) / 13 is never within 1/26 of an integer,
    # so floor gives PIL's rounding exactly
    smooth = F.conv2d(f.permute(0, 3, 1, 2), kernel, groups=3).permute(0, 2, 3, 1)
    smooth = smooth.add_(6.5).mul_(1.0 / 13.0).floor_()
    out = img.clone()
    out[:, 1:-1, 1:-1] = _blend(smooth, f[:, 1:-1, 1:-1].contiguous(), factor)  # _blend consumes its copy
    return out


def affine(img: torch.Tensor, coeffs: torch.Tensor, fill=IMAGENET_FILL) -> torch.Tensor:
    """PIL Image.transform(AFFINE, (a,b,c,d,e,f), BILINEAR, fillcolor) on (M,H,W,3): the output pixel
    centre (x+.5, y+.5) samples the input at u = a x' + b y' + c, v = d x' + e y' + f (pixel-corner
    convention). PIL clamps the bilinear taps at the image edge, which is grid_sample's border padding,
    and fills where (u, v) is outside the image. PIL truncates its double-precision result; float32
    lands a hair below exact integers, hence +1e-3. coeffs (M,6) float."""
    m, h, w, _ = img.shape
    dev = img.device
    # u, v in pixels (float32 as computed here reproduces PIL's inside/outside decisions on exact
    # boundaries in the parity tests, where normalised coordinates do not), then normalised in place
    # to grid_sample's coordinates (align_corners=False)
    k = coeffs.to(torch.float32)
    rows = k.tolist()
    xs = (torch.arange(w, dtype=torch.float32) + 0.5).view(1, 1, w)
    ys = (torch.arange(h, dtype=torch.float32) + 0.5).view(1, h, 1)
    grid = torch.empty(m, h, w, 2, device=dev)
    outside = None
    for axis, size in ((0, w), (1, h)):
        a, b, c = (k[:, 3 * axis + j].view(-1, 1, 1) for j in range(3))
        g = grid[..., axis]
        torch.add((a * xs).to(dev), (b * ys + c).to(dev), out=g)
        identity = all(row[3 * axis:3 * axis + 3] == ([1.0, 0.0, 0.0] if axis == 0 else [0.0, 1.0, 0.0]) for row in rows)
        if not identity:  # PIL fills where u is outside [0, w) or v outside [0, h); a shear keeps one inside
            out_g = (g < 0) | (g >= size)
            outside = out_g if outside is None else outside.logical_or_(out_g)
        g.mul_(2.0 / size).sub_(1.0)
    out = F.grid_sample(img.float().permute(0, 3, 1, 2), grid, mode="bilinear", padding_mode="border",
                        align_corners=False)  # (M,3,H,W): each channel a contiguous plane
    if outside is not None:
        for channel, value in enumerate(fill):
            out[:, channel].masked_fill_(outside, value)
    return out.add_(0.001).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def translate(img: torch.Tensor, shift: torch.Tensor, dim: int, fill=IMAGENET_FILL) -> torch.Tensor:
    """affine() for a pure translation along `dim` (2: x, 1: y), which needs no grid: output pixel i
    samples the input at i + shift, so with k = floor(shift) and fraction t every output is
    a + (b - a) * t of the input pixels i + k and i + k + 1 (PIL's bilinear, +1e-3 as in affine()),
    taps clamped at the edge, fill where the sample point is outside. shift (M,) in pixels; a few
    slice ops per sample."""
    size = img.shape[dim]
    out = torch.empty_like(img)
    fill_t = torch.tensor(fill, device=img.device, dtype=torch.uint8)
    for i, s in enumerate(shift.tolist()):
        k = math.floor(s)
        t = s - k
        src, dst = img[i].movedim(dim - 1, 0), out[i].movedim(dim - 1, 0)
        # PIL samples where 0 <= i + 0.5 + s < size, i.e. for outputs lo <= i < hi
        lo = min(max(0, math.ceil(-0.5 - s)), size)
        hi = max(min(size, math.ceil(size - 0.5 - s)), lo)
        dst[:lo] = fill_t
        dst[hi:] = fill_t
        if hi == lo:
            continue
        # taps a = src[i + k], b = src[i + k + 1] for lo <= i < hi; they leave the image by at most one
        # pixel, which the clamp replaces by the edge pixel
        if 0 <= lo + k and hi + k <= size - 1:  # no clamping: a plain slice
            taps = src[lo + k:hi + k + 1]
        else:
            taps = src.index_select(0, torch.arange(lo + k, hi + k + 1, device=img.device).clamp_(0, size - 1))
        if t == 0:
            dst[lo:hi] = taps[:-1]
            continue
        a = taps[:-1].float()
        dst[lo:hi] = torch.add(a, taps[1:].float().sub_(a), alpha=t).add_(0.001)
    return out


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


IMPLS = ("auto", "torch", "numba")


def resolve_impl(impl: str, device: torch.device) -> str:
    """'auto': the numba kernels on the CPU, the torch ops on any other device."""
    if impl not in IMPLS:
        raise ValueError(f"RandAugment impl: expected one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "numba" if device.type == "cpu" else "torch"
    if impl == "numba" and device.type != "cpu":
        raise ValueError(f"RandAugment impl 'numba' runs on the CPU only, not on {device}")
    return impl


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


def run_kernels(images: torch.Tensor, codes: torch.Tensor, params: torch.Tensor,
                scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Run a kernel program on uint8 (N,H,W,3) CPU images: ops codes[l, i] with params[l, i] (IDENTITY
    = none) applied to image i layer after layer, images in parallel on torch's intra-op thread count.
    `scratch`, like `images`, holds intermediate results (allocated here when not given)."""
    out = torch.empty_like(images)
    scratch = torch.empty_like(images) if scratch is None else scratch
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
    if resolve_impl(impl, images.device) == "numba":
        code, params = kernel_op(name, arg, h, w)
        codes = torch.full((1, images.shape[0]), code, dtype=torch.int8)
        return run_kernels(images, codes, params.unsqueeze(0))
    base = name.removesuffix("Increasing").removesuffix("Original")
    if name in ("TranslateXRel", "TranslateYRel"):  # a pure shift: translate() needs no sampling grid
        along_x = name == "TranslateXRel"
        shift = affine_coefficients(name, arg, h, w)[:, 2 if along_x else 5]
        return translate(images, shift, 2 if along_x else 1)
    if name in ("Rotate", "ShearX", "ShearY"):
        return affine(images, affine_coefficients(name, arg, h, w))
    if name == "AutoContrast":
        return auto_contrast(images)
    if name == "Equalize":
        return equalize(images)
    if name == "Invert":
        return 255 - images
    if base == "Posterize":
        return posterize(images, arg)
    if base == "Solarize":
        return solarize(images, arg)
    if name == "SolarizeAdd":
        return solarize_add(images, arg)
    fn = {"Color": color, "Contrast": contrast, "Brightness": brightness, "Sharpness": sharpness}.get(base)
    if fn is None:
        raise KeyError(f"unknown RandAugment op {name!r}")
    return fn(images, arg.float())


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


class RandAugment:
    """Per-sample RandAugment decisions drawn on the CPU from a seeded generator, then applied on the
    batch's device: as a kernel program on the CPU (impl "numba"), or by the torch ops grouped by op
    (impl "torch", any device). Both give each sample its own ops in order."""

    def __init__(self, spec: RandAugmentSpec, seed: int = 0, impl: str = "auto"):
        resolve_impl(impl, torch.device("cpu"))  # validates the name
        self.spec, self.impl = spec, impl
        self.gen = torch.Generator().manual_seed(seed)
        self._buffers: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_config(cls, config: str, seed: int = 0, impl: str = "auto") -> "RandAugment":
        return cls(parse_rand_augment(config), seed, impl)

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
        """A new augmented batch (the input is not modified), same dtype, shape and memory format.
        Each layer gathers the batch sorted by that layer's op, so every op group is a contiguous slice
        worked on in place; a last gather restores the sample order. Gathers are cheap on CPU and GPU
        alike, unlike scattering groups back into the batch."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"RandAugment expects uint8 (N,3,H,W) batches, got {images.dtype} {tuple(images.shape)}")
        n, dev, num_ops = images.shape[0], images.device, len(self.spec.ops)
        d = self.draw(n)
        work = _nhwc(images)
        if resolve_impl(self.impl, dev) == "numba":
            codes, params = self._program(d, work.shape[1], work.shape[2])
            return _restore_layout(run_kernels(work, codes, params, self._scratch(work, 0)), images)
        holds = torch.arange(n)  # work[j] holds sample holds[j]
        for layer in range(self.spec.num_layers):
            op = torch.where(d["apply"][layer], d["op"][layer], num_ops)  # num_ops: not applied
            order = torch.argsort(op, stable=True)
            position = torch.empty_like(holds)
            position[holds] = torch.arange(n)
            work = torch.index_select(work, 0, position[order].to(dev), out=self._scratch(work, layer % 2))
            holds = order
            start = 0
            for k, count in enumerate(torch.bincount(op, minlength=num_ops + 1)[:num_ops].tolist()):
                if count:
                    name, group = self.spec.ops[k], order[start:start + count]
                    sign = d["sign"][layer, group] if name in SIGNED else torch.ones(count)
                    arg = level_to_arg(name, d["magnitude"][layer, group], sign)
                    work[start:start + count] = apply_op_args(work[start:start + count], name, arg, "torch")
                start += count
        position = torch.empty_like(holds)
        position[holds] = torch.arange(n)
        # out= matters: index_select into a tensor it allocates itself takes a path ~5x slower on CPU
        restored = torch.index_select(work, 0, position.to(dev), out=torch.empty_like(work))
        return _restore_layout(restored, images)

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

    def _scratch(self, like: torch.Tensor, which: int) -> torch.Tensor:
        """Work buffers kept across calls (two for the torch ops, one for the kernels): a fresh batch-sized
        tensor per layer would be page-faulted in on every call, which on a CPU costs as much as the ops
        themselves."""
        key = (which, tuple(like.shape), like.device)
        if key not in self._buffers:
            self._buffers = {k: v for k, v in self._buffers.items() if k[1:] == key[1:]}
            self._buffers[key] = torch.empty_like(like)
        return self._buffers[key]

    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])
