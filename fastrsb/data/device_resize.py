"""Crop + antialiased resize (+ flip) of a whole batch of differently sized images in a handful of launches, on
any device: Pillow's resampling written as two batched matrix products.

Pillow resizes separably: each output pixel is a normalised sum of input pixels under a filter (triangle for
bilinear, Keys a=-0.5 for bicubic) centred at box_start + (i + 0.5) * scale and widened by max(scale, 1) when
shrinking (the antialiasing), cut to the image (not the box: taps reach past a crop's edge), horizontal pass
first, each pass rounded to uint8. With every sample's taps laid out as a (res x padded) matrix, one pass over
the batch is one batched matmul, so a batch of 256 costs about 15 launches plus one copy per image into the
padded batch, instead of several launches per image (torchvision's resized_crop per sample: ~80 ms of host time
for 256 images, measured on meta tensors). Hand-written because no library resizes a ragged batch of boxes.
"""
from __future__ import annotations

import numpy as np
import torch

from fastrsb.data.crops import center_crop_geometries

# columns of the per-sample parameter rows (resize_params)
START_Y, SCALE_Y, HEIGHT, START_X, SCALE_X, WIDTH, FLIP = range(7)


def resize_params(sizes: np.ndarray, boxes: np.ndarray | None, flips: np.ndarray | None, res: int,
                  crop_pct: float) -> np.ndarray:
    """float32 (N, 7) rows (start_y, scale_y, height, start_x, scale_x, width, flip) for images of stored
    (height, width) `sizes`. Train (boxes (top, left, h, w) and flips): each box resized to res x res, as
    Pillow's resize(box=...). Val (boxes None): torchvision's Resize(floor(res / crop_pct)) of the shorter side
    then CenterCrop(res), as one resize of the whole image read at the crop's offset."""
    sizes = np.asarray(sizes, np.float64)
    h, w = sizes[:, 0], sizes[:, 1]
    if boxes is not None:
        top, left, bh, bw = (np.asarray(boxes, np.float64)[:, c] for c in range(4))
        sy, sx = bh / res, bw / res
        y0, x0 = top, left
        flip = np.asarray(flips, np.float64)
    else:
        sy, y_offset, sx, x_offset = center_crop_geometries(sizes, res, crop_pct).T
        y0, x0 = y_offset * sy, x_offset * sx
        flip = np.zeros(len(h))
    return np.stack([y0, sy, h, x0, sx, w, flip], 1).astype(np.float32)


def _filter(x: torch.Tensor, interpolation: str) -> torch.Tensor:
    x = x.abs()
    if interpolation == "bilinear":
        return (1 - x).clamp(min=0)
    a = -0.5  # Pillow's bicubic
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def tap_matrix(start: torch.Tensor, scale: torch.Tensor, size: torch.Tensor, flip: torch.Tensor | None, out: int,
               padded: int, interpolation: str, dtype: torch.dtype) -> torch.Tensor:
    """(N, out, padded): row i of sample k holds Pillow's normalised filter taps of output pixel i along one
    axis (start, scale, size: (N,) float32 on the device; flip: (N,) 0/1 mirrors the output, or None)."""
    i = torch.arange(out, device=start.device, dtype=torch.float32)
    if flip is not None:
        i = i + flip[:, None] * (out - 1 - 2 * i)  # (N, out): output i reads what output out-1-i would
    center = start[:, None] + (i + 0.5) * scale[:, None]
    widen = scale.clamp(min=1.0)[:, None, None]
    j = torch.arange(padded, device=start.device, dtype=torch.float32) + 0.5
    taps = _filter((j - center[..., None]) / widen, interpolation) * (j < size[:, None, None])
    return (taps / taps.sum(-1, keepdim=True)).to(dtype)


def resize_batch(images: list[torch.Tensor], params: torch.Tensor, res: int, interpolation: str,
                 dtype: torch.dtype) -> torch.Tensor:
    """(N, res, res, 3) uint8 of `images` ((3, h_k, w_k) uint8, one device) resized by `params` (resize_params'
    rows, on that device). dtype: the matmuls' (float16 on cuda: the uint8 values are exact in it and tensor
    cores accumulate in float32; float32 on the CPU)."""
    hp = max(int(im.shape[1]) for im in images)
    wp = max(int(im.shape[2]) for im in images)
    batch = images[0].new_zeros((len(images), 3, hp, wp), dtype=dtype)
    for k, im in enumerate(images):  # one copy per image: the only per-sample launch
        batch[k, :, :im.shape[1], :im.shape[2]].copy_(im)
    p = params.T
    wx = tap_matrix(p[START_X], p[SCALE_X], p[WIDTH], p[FLIP], res, wp, interpolation, dtype)
    wy = tap_matrix(p[START_Y], p[SCALE_Y], p[HEIGHT], None, res, hp, interpolation, dtype)
    # horizontal pass, rounded to uint8 levels as Pillow's intermediate image is; then vertical
    rows = torch.matmul(batch, wx.transpose(1, 2).unsqueeze(1)).round_().clamp_(0, 255)
    out = torch.matmul(wy.unsqueeze(1), rows).round_().clamp_(0, 255)
    return out.to(torch.uint8).permute(0, 2, 3, 1).contiguous()
