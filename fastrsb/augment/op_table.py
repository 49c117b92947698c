"""The RandAugment op table: one row per timm op name, the one spec both implementations run.

A row is what timm's LEVEL_TO_ARG and NAME_TO_OP say about the op: how a magnitude becomes the argument
of the PIL call, whether timm negates that argument at random, and which PIL operation runs it (several
names share one: Posterize, PosterizeIncreasing and PosterizeOriginal all posterize). The PIL operations
are the kernels of the program RandAugment draws (an op code and six parameters per sample and layer);
each implementation provides every kernel once, under its code: the torch ops (randaugment_torch.py) and
the numba kernels (randaugment_numba.py). Adding an op is a row here, plus, for a new PIL operation, a
code in KernelCodes and its kernel in each implementation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitudes run 0..10
# timm's ImageNet hparams: fill = round(255 * IMAGENET_DEFAULT_MEAN), translate_pct 0.45
IMAGENET_FILL = (124, 116, 104)
TRANSLATE_PCT = 0.45


class KernelCodes(NamedTuple):
    """The program's op codes (int8 in the program): the PIL operations, one kernel each in both
    implementations. params[..., 0] carries a kernel's PIL-level argument; AFFINE's six params are the
    inverse map of an op's `inverse_map`. A NamedTuple because the numba kernels take it as an argument:
    numba compiles module-level numbers in as constants, and its cache watches only the kernels' own file,
    so a code changed here would run stale."""
    IDENTITY: int = 0  # no op: the sample skips this layer
    AUTOCONTRAST: int = 1
    EQUALIZE: int = 2
    INVERT: int = 3
    POSTERIZE: int = 4
    SOLARIZE: int = 5
    SOLARIZE_ADD: int = 6
    COLOR: int = 7
    CONTRAST: int = 8
    BRIGHTNESS: int = 9
    SHARPNESS: int = 10
    AFFINE: int = 11


KERNEL = KernelCodes()


# ------------------------------------------------------------------ level -> argument
# timm's *_level_to_arg, vectorized: lv = level / LEVEL_DENOM (M,) float64, already negated where a
# signed op's draw says so (timm's _randomly_negate) -> the PIL argument, the double timm computes
# (PIL casts enhance factors to float32 itself)

def _no_argument(lv: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(lv)


def _rotate(lv: torch.Tensor) -> torch.Tensor:  # degrees
    return lv * 30.0


def _shear(lv: torch.Tensor) -> torch.Tensor:
    return lv * 0.3


def _translate_rel(lv: torch.Tensor) -> torch.Tensor:  # a fraction of the image's side
    return lv * TRANSLATE_PCT


def _enhance(lv: torch.Tensor) -> torch.Tensor:
    return lv * 1.8 + 0.1


def _enhance_increasing(lv: torch.Tensor) -> torch.Tensor:
    return torch.clamp(1.0 + lv * 0.9, min=0.1)


def _posterize(lv: torch.Tensor) -> torch.Tensor:  # bits kept
    return torch.floor(lv * 4)


def _posterize_increasing(lv: torch.Tensor) -> torch.Tensor:
    return 4 - _posterize(lv)


def _posterize_original(lv: torch.Tensor) -> torch.Tensor:
    return _posterize(lv) + 4


def _solarize(lv: torch.Tensor) -> torch.Tensor:  # threshold
    return torch.clamp(torch.floor(lv * 256), max=256)


def _solarize_increasing(lv: torch.Tensor) -> torch.Tensor:
    return 256 - _solarize(lv)


def _solarize_add(lv: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.floor(lv * 110), max=128)


# ------------------------------------------------------------------ geometric ops' inverse maps
# What timm's geometric op passes to PIL's Image.transform(AFFINE) for args (M,) float64 on h x w images:
# (M, 6) float64 coefficients; output pixel centre (xc, yc) samples the input at
# (a0 xc + a1 yc + a2, a3 xc + a4 yc + a5).

def _identity_but(index: int, values: torch.Tensor) -> torch.Tensor:
    """The identity map (1, 0, 0, 0, 1, 0) per sample, coefficient `index` set to `values` (M,)."""
    maps = values.new_tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]).repeat(values.shape[0], 1)
    maps[:, index] = values
    return maps


def _rotate_maps(arg: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """PIL Image.rotate(degrees) (counter-clockwise about (w/2, h/2), same size) as the inverse map it
    hands to Image.transform, with PIL's own arithmetic: angle taken mod 360, sin/cos rounded to 15
    digits, the centre shift folded into the offsets."""
    cx, cy = w / 2.0, h / 2.0
    maps = []
    for degrees in arg.tolist():
        angle = -math.radians(degrees % 360.0)
        a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
        d, e = round(-math.sin(angle), 15), round(math.cos(angle), 15)
        maps.append([a, b, a * -cx + b * -cy + 0.0 + cx, d, e, d * -cx + e * -cy + 0.0 + cy])
    return torch.tensor(maps, dtype=torch.float64).view(-1, 6)


def _shear_x_maps(arg: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return _identity_but(1, arg)


def _shear_y_maps(arg: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return _identity_but(3, arg)


def _translate_x_maps(arg: torch.Tensor, h: int, w: int) -> torch.Tensor:  # timm: pixels = pct * width
    return _identity_but(2, arg * w)


def _translate_y_maps(arg: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return _identity_but(5, arg * h)


# ------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Op:
    level_to_arg: Callable[[torch.Tensor], torch.Tensor]  # lv (negated where drawn) -> the PIL argument
    kernel: int  # the code of the PIL operation that runs it (KERNEL.*)
    signed: bool = False  # timm negates the argument with probability 1/2
    # geometric ops (kernel AFFINE): (args (M,), h, w) -> (M, 6) inverse maps, the AFFINE kernel's params
    inverse_map: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None


OPS: dict[str, Op] = {
    "AutoContrast": Op(_no_argument, KERNEL.AUTOCONTRAST),
    "Equalize": Op(_no_argument, KERNEL.EQUALIZE),
    "Invert": Op(_no_argument, KERNEL.INVERT),
    "Rotate": Op(_rotate, KERNEL.AFFINE, signed=True, inverse_map=_rotate_maps),
    "Posterize": Op(_posterize, KERNEL.POSTERIZE),
    "PosterizeIncreasing": Op(_posterize_increasing, KERNEL.POSTERIZE),
    "PosterizeOriginal": Op(_posterize_original, KERNEL.POSTERIZE),
    "Solarize": Op(_solarize, KERNEL.SOLARIZE),
    "SolarizeIncreasing": Op(_solarize_increasing, KERNEL.SOLARIZE),
    "SolarizeAdd": Op(_solarize_add, KERNEL.SOLARIZE_ADD),
    "Color": Op(_enhance, KERNEL.COLOR),
    "ColorIncreasing": Op(_enhance_increasing, KERNEL.COLOR, signed=True),
    "Contrast": Op(_enhance, KERNEL.CONTRAST),
    "ContrastIncreasing": Op(_enhance_increasing, KERNEL.CONTRAST, signed=True),
    "Brightness": Op(_enhance, KERNEL.BRIGHTNESS),
    "BrightnessIncreasing": Op(_enhance_increasing, KERNEL.BRIGHTNESS, signed=True),
    "Sharpness": Op(_enhance, KERNEL.SHARPNESS),
    "SharpnessIncreasing": Op(_enhance_increasing, KERNEL.SHARPNESS, signed=True),
    "ShearX": Op(_shear, KERNEL.AFFINE, signed=True, inverse_map=_shear_x_maps),
    "ShearY": Op(_shear, KERNEL.AFFINE, signed=True, inverse_map=_shear_y_maps),
    "TranslateXRel": Op(_translate_rel, KERNEL.AFFINE, signed=True, inverse_map=_translate_x_maps),
    "TranslateYRel": Op(_translate_rel, KERNEL.AFFINE, signed=True, inverse_map=_translate_y_maps),
}


def level_to_arg(name: str, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """timm's LEVEL_TO_ARG[name], vectorized: level (M,) magnitudes, sign (M,) of +-1 (used by signed ops
    only) -> float64 (M,), the double-precision value timm computes."""
    op = OPS[name]
    lv = level.double() / LEVEL_DENOM
    return op.level_to_arg(lv * sign.double() if op.signed else lv)


def program_step(name: str, arg: torch.Tensor, h: int, w: int) -> tuple[int, torch.Tensor]:
    """(kernel code, (M, 6) float64 params) running op `name` with args (M,) on h x w images."""
    op = OPS[name]
    arg = arg.double()
    if op.inverse_map is not None:
        return op.kernel, op.inverse_map(arg, h, w)
    params = torch.zeros(arg.shape[0], 6, dtype=torch.float64)
    params[:, 0] = arg
    return op.kernel, params
