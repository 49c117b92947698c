"""timm's RandAugment, run on whole uint8 batches on the device.

Hand-written because no library does this: timm runs RandAugment per image with PIL on the CPU
(the decode workers' budget), DALI's auto_aug.rand_augment is a different variant (no magnitude
noise, no "increasing" ops), and FFCV has none. Every sample draws its own ops, probabilities,
magnitudes and signs exactly as timm's RandAugment/AugmentOp do; samples are then grouped by op,
so a batch costs a few vectorized torch calls per layer, not a Python loop over images.
Each op reproduces the PIL operation timm calls (ImageOps/ImageEnhance/Image.transform) on uint8
data, including PIL's integer rounding, so timm's PIL implementation is the test oracle.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
    """timm's LEVEL_TO_ARG, vectorized: level (M,) float magnitudes, sign (M,) of +-1."""
    lv = level / LEVEL_DENOM
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


# ------------------------------------------------------------------ pixel ops on (M,3,H,W) uint8
def _blend(degenerate: torch.Tensor, img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL Image.blend(degenerate, img, factor) on uint8: truncation toward zero, then clip."""
    f = factor.view(-1, 1, 1, 1)
    out = degenerate.float() + f * (img.float() - degenerate.float())
    return out.clamp(0, 255).trunc().to(torch.uint8)


def _grayscale(img: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16, shape (M,1,H,W) int32."""
    x = img.to(torch.int32)
    return (x[:, 0:1] * 19595 + x[:, 1:2] * 38470 + x[:, 2:3] * 7471 + 0x8000) >> 16


def _apply_lut(img: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """lut (M,3,256) uint8-valued, per sample and channel."""
    m, c, h, w = img.shape
    flat = img.reshape(m, c, h * w).long()
    return torch.gather(lut.to(img.dtype), 2, flat).reshape(m, c, h, w)


def _histogram(img: torch.Tensor) -> torch.Tensor:
    m, c, h, w = img.shape
    flat = img.reshape(m * c, h * w).long()
    hist = torch.zeros(m * c, 256, dtype=torch.int64, device=img.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    return hist.view(m, c, 256)


def auto_contrast(img: torch.Tensor) -> torch.Tensor:
    """ImageOps.autocontrast (cutoff 0): per channel, min..max stretched to 0..255 with int() truncation."""
    lo = img.amin(dim=(2, 3)).float()
    hi = img.amax(dim=(2, 3)).float()
    scale = 255.0 / (hi - lo).clamp(min=1)
    offset = -lo * scale
    ix = torch.arange(256, device=img.device, dtype=torch.float32)
    lut = (ix.view(1, 1, 256) * scale.unsqueeze(-1) + offset.unsqueeze(-1)).trunc().clamp(0, 255)
    lut = torch.where((hi > lo).unsqueeze(-1), lut, ix.view(1, 1, 256))
    return _apply_lut(img, lut)


def equalize(img: torch.Tensor) -> torch.Tensor:
    """ImageOps.equalize: per channel lut[i] = (step // 2 + sum(hist[:i])) // step,
    step = (total - count of the last non-empty bin) // 255; identity when step is 0."""
    hist = _histogram(img)
    idx = torch.arange(256, device=img.device)
    last_bin = torch.where(hist > 0, idx, torch.full_like(idx, -1)).amax(-1, keepdim=True)
    last_count = torch.gather(hist, 2, last_bin.clamp(min=0))
    step = (hist.sum(-1, keepdim=True) - last_count) // 255
    before = torch.cumsum(hist, -1) - hist
    lut = ((step // 2 + before) // step.clamp(min=1)).clamp(max=255)
    lut = torch.where(step > 0, lut, idx.view(1, 1, 256))
    return _apply_lut(img, lut)


def posterize(img: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """ImageOps.posterize: keep the top `bits` bits (timm: 8 or more bits is the identity)."""
    b = bits.long().clamp(0, 8)
    mask = ((0xFF << (8 - b)) & 0xFF).to(torch.uint8).view(-1, 1, 1, 1)
    return img & mask


def solarize(img: torch.Tensor, thresh: torch.Tensor) -> torch.Tensor:
    t = thresh.view(-1, 1, 1, 1)
    return torch.where(img.to(torch.int32) < t, img, 255 - img)


def solarize_add(img: torch.Tensor, add: torch.Tensor, thresh: int = 128) -> torch.Tensor:
    a = add.view(-1, 1, 1, 1).to(torch.int32)
    x = img.to(torch.int32)
    return torch.where(x < thresh, (x + a).clamp(max=255), x).to(torch.uint8)


def color(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(_grayscale(img).expand_as(img), img, factor)


def contrast(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Contrast: blend with a flat image of the rounded mean grey level."""
    mean = torch.floor(_grayscale(img).float().mean(dim=(1, 2, 3)) + 0.5)
    return _blend(mean.view(-1, 1, 1, 1).expand_as(img), img, factor)


def brightness(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(torch.zeros_like(img), img, factor)


_SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]])


def sharpness(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Sharpness: blend with PIL's SMOOTH filter (kernel/13, rounded), borders unfiltered."""
    m, c, h, w = img.shape
    k = (_SMOOTH / 13.0).to(img.device).view(1, 1, 3, 3).expand(c, 1, 3, 3)
    smooth = F.conv2d(img.float(), k, groups=c)
    smooth = torch.floor(smooth + 0.5).clamp(0, 255)
    degenerate = img.float().clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(degenerate, img, factor)


def affine(img: torch.Tensor, coeffs: torch.Tensor, fill=IMAGENET_FILL) -> torch.Tensor:
    """PIL Image.transform(AFFINE, (a,b,c,d,e,f), BILINEAR, fillcolor): output pixel centre (x+.5, y+.5)
    samples the input at (a x' + b y' + c, d x' + e y' + f); outside the image is `fill`.
    coeffs (M,6) float. Bilinear: timm sets resample from the train interpolation; we use bilinear."""
    m, c, h, w = img.shape
    dev = img.device
    ys, xs = torch.meshgrid(torch.arange(h, device=dev, dtype=torch.float32) + 0.5,
                            torch.arange(w, device=dev, dtype=torch.float32) + 0.5, indexing="ij")
    a, b, cc, d, e, f = (coeffs[:, i].view(-1, 1, 1) for i in range(6))
    u = a * xs + b * ys + cc  # input coordinates, pixel-corner convention
    v = d * xs + e * ys + f
    grid = torch.stack([2 * u / w - 1, 2 * v / h - 1], dim=-1)  # align_corners=False normalisation
    src = torch.cat([img.float(), torch.ones(m, 1, h, w, device=dev)], dim=1)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    inside = (u >= 0) & (u < w) & (v >= 0) & (v < h)  # PIL fills where the sample point is outside
    coverage = out[:, 3:4].clamp(min=1e-6)
    pix = out[:, :3] / coverage  # renormalise partial border taps (PIL clamps taps at the border)
    fill_t = torch.tensor(fill, device=dev, dtype=torch.float32).view(1, 3, 1, 1)
    pix = torch.where(inside.unsqueeze(1), pix, fill_t)
    return torch.floor(pix + 0.5).clamp(0, 255).to(torch.uint8)


def _affine_coeffs(name: str, arg: torch.Tensor, h: int, w: int) -> torch.Tensor:
    one, zero = torch.ones_like(arg), torch.zeros_like(arg)
    if name == "ShearX":
        return torch.stack([one, arg, zero, zero, one, zero], 1)
    if name == "ShearY":
        return torch.stack([one, zero, zero, arg, one, zero], 1)
    if name == "TranslateXRel":
        return torch.stack([one, zero, arg * w, zero, one, zero], 1)
    if name == "TranslateYRel":
        return torch.stack([one, zero, zero, zero, one, arg * h], 1)
    if name == "Rotate":  # PIL Image.rotate(deg): counter-clockwise about (w/2, h/2), same size
        ang = -torch.deg2rad(arg)
        cos, sin = torch.cos(ang), torch.sin(ang)
        cx, cy = w / 2.0, h / 2.0
        c = cos * -cx + sin * -cy + cx
        f = -sin * -cx + cos * -cy + cy
        return torch.stack([cos, sin, c, -sin, cos, f], 1)
    raise KeyError(name)


def apply_op_args(images: torch.Tensor, name: str, arg: torch.Tensor) -> torch.Tensor:
    """Apply op `name` with per-sample PIL-level arguments `arg` (M,) to uint8 (M,3,H,W)."""
    base = name.removesuffix("Increasing").removesuffix("Original")
    if name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
        return affine(images, _affine_coeffs(name, arg.float(), images.shape[2], images.shape[3]))
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


def apply_op(images: torch.Tensor, name: str, level: float) -> torch.Tensor:
    """timm op `name` at magnitude `level` (0..10) in the positive direction, for every sample.
    images: uint8 (N,3,H,W) on any device; returns the same dtype/shape/memory format."""
    lv = torch.full((images.shape[0],), float(level), device=images.device)
    arg = level_to_arg(name, lv, torch.ones_like(lv))
    out = apply_op_args(images.contiguous(), name, arg)
    return out.contiguous(memory_format=torch.channels_last) if images.is_contiguous(memory_format=torch.channels_last) else out


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
    """Per-sample RandAugment decisions drawn on the CPU from a seeded generator, ops applied on
    the batch's device grouped by op."""

    def __init__(self, spec: RandAugmentSpec, seed: int = 0):
        self.spec = spec
        self.gen = torch.Generator().manual_seed(seed)

    @classmethod
    def from_config(cls, config: str, seed: int = 0) -> "RandAugment":
        return cls(parse_rand_augment(config), seed)

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
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"RandAugment expects uint8 (N,3,H,W) batches, got {images.dtype} {tuple(images.shape)}")
        d = self.draw(images.shape[0])
        dev = images.device
        out = images.contiguous()  # ops work on NCHW-contiguous data; the layout is restored below
        for layer in range(self.spec.num_layers):
            op, apply = d["op"][layer], d["apply"][layer]
            for k, name in enumerate(self.spec.ops):
                sel = torch.nonzero((op == k) & apply).flatten()
                if sel.numel() == 0:
                    continue
                arg = level_to_arg(name, d["magnitude"][layer, sel], d["sign"][layer, sel] if name in SIGNED else torch.ones(sel.numel()))
                sel_dev = sel.to(dev)
                out = out.index_copy(0, sel_dev, apply_op_args(out.index_select(0, sel_dev), name, arg.to(dev)))
        return out.contiguous(memory_format=torch.channels_last) if images.is_contiguous(memory_format=torch.channels_last) else out

    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])
