"""timm's RandAugment ops as torch ops on groups of images: the implementation that runs on cuda.

Every op takes uint8 images (M, H, W, 3), the NHWC memory of a channels-last batch, plus its
per-sample parameters as an (M, k) float64 tensor on the same device, and returns new uint8 images.
Nothing here reads a device value on the host, copies host data to the device or makes an output
whose size depends on the data, so a GPU never waits on the host (the parameters arrive in the
batch's one host->device copy, fastrsb.augment.parcel).

Each op reproduces the PIL call timm makes bit for bit, in PIL's own arithmetic, like the numba kernels
of randaugment_numba.py: integer tables and integer sums, float32 blends (as separate multiply and add
kernels, never fused, so no FMA changes a rounding), double-precision bilinear sampling for the
geometric ops (PIL computes the sample point and the interpolation in double and truncates), and
divisions only of tensor by tensor (torch computes `scalar / tensor`, and on cuda `tensor / scalar`,
through a reciprocal, which is not correctly rounded).
Hand-written because no library runs timm's RandAugment on device batches.
"""
from __future__ import annotations

import torch

from fastrsb.augment.op_table import KERNEL


def _factor(params: torch.Tensor) -> torch.Tensor:
    """An enhance factor per sample as a (M,1,1,1) float32 column: PIL casts the double to float."""
    return params[:, 0].float().view(-1, 1, 1, 1)


def _blend(degenerate: torch.Tensor, img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend(degenerate, img, factor) on float32 inputs: degenerate + factor * (img -
    degenerate), clipped and truncated. `img` is consumed (used as scratch)."""
    return img.sub_(degenerate).mul_(factor).add_(degenerate).clamp_(0, 255).to(torch.uint8)


def _grey(img: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L, (R*19595 + G*38470 + B*7471 + 0x8000) >> 16, int32 (M, H, W, 1)."""
    c = img.to(torch.int32)
    return (c[..., 0:1] * 19595 + c[..., 1:2] * 38470 + c[..., 2:3] * 7471 + 0x8000) >> 16


def _lut_index(img: torch.Tensor) -> torch.Tensor:
    """int64 (M, H, W, 3): value + 256 * channel + 768 * sample, one flat index into per-sample,
    per-channel histograms and tables."""
    dev = img.device
    channel = torch.arange(3, device=dev, dtype=torch.int64) * 256
    sample = (torch.arange(img.shape[0], device=dev, dtype=torch.int64) * 768).view(-1, 1, 1, 1)
    return img.to(torch.int64) + channel + sample


def _apply_lut(img: torch.Tensor, lut: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """lut (M, 3, 256) of values 0..255: PIL's Image.point per sample and channel."""
    index = _lut_index(img) if index is None else index
    return torch.take(lut.to(torch.uint8), index)


def auto_contrast(img: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """ImageOps.autocontrast(cutoff=0): per channel, int(ix * scale + offset) clipped, scale =
    255 / (max - min) and offset = -min * scale in double; identity where max == min."""
    lo, hi = img.reshape(img.shape[0], -1, 3).aminmax(dim=1)
    lo, hi = lo.double().unsqueeze(-1), hi.double().unsqueeze(-1)
    scale = torch.full_like(lo, 255.0) / (hi - lo).clamp(min=1)  # scalar / tensor is a reciprocal times 255
    offset = -lo * scale
    ix = torch.arange(256, device=img.device, dtype=torch.float64)
    lut = (ix * scale + offset).trunc().clamp(0, 255)
    return _apply_lut(img, torch.where(hi > lo, lut, ix))


def equalize(img: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """ImageOps.equalize: per channel lut[i] = (step // 2 + sum(hist[:i])) // step, step = (total -
    count of the last non-empty bin) // 255, identity when step is 0. The histogram is a fixed-size
    scatter_add (bincount would size its output from the data, a read-back)."""
    m = img.shape[0]
    index = _lut_index(img)
    hist = torch.zeros(m * 768, device=img.device, dtype=torch.int64)
    hist.scatter_add_(0, index.view(-1), torch.ones((), device=img.device, dtype=torch.int64).expand(index.numel()))
    hist = hist.view(m, 3, 256)
    bins = torch.arange(256, device=img.device)
    last_bin = torch.where(hist > 0, bins, -1).amax(-1, keepdim=True)
    last_count = torch.gather(hist, 2, last_bin.clamp(min=0))
    step = (hist.sum(-1, keepdim=True) - last_count) // 255
    before = torch.cumsum(hist, -1) - hist
    lut = ((step // 2 + before) // step.clamp(min=1)).clamp(max=255)
    return _apply_lut(img, torch.where(step > 0, lut, bins), index)


def invert(img: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    return 255 - img


def posterize(img: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """ImageOps.posterize: keep the top `bits` bits (8 or more: identity; 0: black, timm's meaning)."""
    bits = params[:, 0].long().clamp(0, 8)
    mask = ((255 << (8 - bits)) & 255).to(torch.uint8).view(-1, 1, 1, 1)
    return img & mask


def solarize(img: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """ImageOps.solarize: invert the values at or above the threshold (256: none); x ^ 255 is 255 - x."""
    thresh = params[:, 0].to(torch.int16).view(-1, 1, 1, 1)
    return img ^ (img >= thresh).to(torch.uint8).mul_(255)


def solarize_add(img: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """timm's solarize_add: min(255, x + add) where x < 128."""
    add = params[:, 0].clamp(0, 255).to(torch.int16).view(-1, 1, 1, 1)
    return torch.where(img < 128, (img.to(torch.int16) + add).clamp_(max=255).to(torch.uint8), img)


def color(img: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Color: blend with the image's own grey version."""
    return _blend(_grey(img).float(), img.float(), _factor(params))


def contrast(img: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Contrast: blend with a flat image of the mean grey level, int(mean + 0.5), the
    mean taken as an exact integer sum divided in double (PIL's ImageStat)."""
    total = _grey(img).sum(dim=(1, 2, 3), dtype=torch.int64).double()
    # tensor / tensor: cuda divides by a host scalar as a multiplication by its reciprocal, not exactly
    mean = torch.floor(total / torch.full_like(total, img.shape[1] * img.shape[2]) + 0.5).float()
    return _blend(mean.view(-1, 1, 1, 1), img.float(), _factor(params))


def brightness(img: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Brightness: blend with black, i.e. factor * x."""
    return img.float().mul_(_factor(params)).clamp_(0, 255).to(torch.uint8)


def sharpness(img: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Sharpness: blend with PIL's SMOOTH filter (1 1 1 / 1 5 1 / 1 1 1, / 13 rounded, i.e.
    (2 * sum + 13) // 26 in integers). The filter keeps the 1-pixel border, which blends to itself.
    Integer sums of shifted views, not a convolution: cuDNN may pick TF32 or Winograd algorithms,
    which are not exact."""
    out = img.clone()
    if min(img.shape[1:3]) < 3:  # all border
        return out
    c = img.to(torch.int32)
    rows = (c[:, :-2], c[:, 1:-1], c[:, 2:])
    total = 4 * c[:, 1:-1, 1:-1]
    for r in rows:
        total = total + r[:, :, :-2] + r[:, :, 1:-1] + r[:, :, 2:]
    smooth = ((2 * total + 13) // 26).float()
    out[:, 1:-1, 1:-1] = _blend(smooth, c[:, 1:-1, 1:-1].float(), _factor(params))
    return out


def affine(img: torch.Tensor, params: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """PIL's Image.transform(AFFINE, (a0..a5), BILINEAR, fillcolor=fill) for every geometric op (Rotate,
    ShearX/Y, TranslateX/YRel), params (M, 6) float64: the output pixel centre (xc, yc) samples the
    input at u = a0 xc + a1 yc + a2, v = a3 xc + a4 yc + a5 (double, in that order); outside
    [0, w) x [0, h) it takes the fill; else x = floor(u - .5) with dx its fraction (y alike), taps
    clamped to the image, v1 = p + (q - p) dx per row, then v1 + (v2 - v1) dy, truncated. Clamping the
    lower row's index gives PIL's "upper row only" at the bottom edge (v2 == v1 then). fill: uint8 (3,)."""
    m, h, w, _ = img.shape
    dev = img.device
    a = params.view(m, 6, 1, 1)
    xc = torch.arange(w, device=dev, dtype=torch.float64).add_(0.5).view(1, 1, w)
    yc = torch.arange(h, device=dev, dtype=torch.float64).add_(0.5).view(1, h, 1)
    u = a[:, 0] * xc + a[:, 1] * yc + a[:, 2]
    v = a[:, 3] * xc + a[:, 4] * yc + a[:, 5]
    inside = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    u, v = u - 0.5, v - 0.5
    fx, fy = u.floor(), v.floor()
    dx, dy = (u - fx).view(m, -1, 1), (v - fy).view(m, -1, 1)
    x0, x1 = fx.clamp(0, w - 1).long(), (fx + 1).clamp(0, w - 1).long()
    y0, y1 = (fy.clamp(0, h - 1).long() * w), ((fy + 1).clamp(0, h - 1).long() * w)
    pixels = img.reshape(m, h * w, 3)

    def tap(row, col):
        return torch.gather(pixels, 1, (row + col).view(m, -1, 1).expand(-1, -1, 3)).double()

    p, q = tap(y0, x0), tap(y0, x1)
    v1 = p + (q - p) * dx
    p, q = tap(y1, x0), tap(y1, x1)
    v2 = p + (q - p) * dx
    out = (v1 + (v2 - v1) * dy).to(torch.uint8)
    return torch.where(inside.view(m, -1, 1), out, fill).view(m, h, w, 3)


# the torch op of each kernel but AFFINE, by op code (the same program runs on either implementation)
_OPS = {KERNEL.AUTOCONTRAST: auto_contrast, KERNEL.EQUALIZE: equalize, KERNEL.INVERT: invert,
        KERNEL.POSTERIZE: posterize, KERNEL.SOLARIZE: solarize, KERNEL.SOLARIZE_ADD: solarize_add,
        KERNEL.COLOR: color, KERNEL.CONTRAST: contrast, KERNEL.BRIGHTNESS: brightness, KERNEL.SHARPNESS: sharpness}


def apply(code: int, img: torch.Tensor, params: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """The kernel of op code `code` on a group of images (AFFINE also takes the fill colour)."""
    return affine(img, params, fill) if code == KERNEL.AFFINE else _OPS[code](img, params)
