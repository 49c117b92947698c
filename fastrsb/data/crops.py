"""The one crop program: each train sample's RandomResizedCrop box and flip, a pure function of its
augmentation key (fastrsb.data.sampler.augmentation_keys: seed, epoch, sample index, copy) and its stored
image size; and each val sample's torchvision Resize + CenterCrop, as the resize geometry every backend runs. Every backend runs it: the ffcv decoder per sample inside its compiled pipeline, the DALI and
torch backends per batch on the host (crop_boxes). So one seed gives every backend the same crops, and a
run resumed mid-epoch, on the same backend or another, continues the same stream.

Hand-written (numba) because torchvision draws from torch's global RNG, which neither a compiled ffcv
stage nor a DALI pipeline can share, and its draws depend on what ran before in the process; these are
counter-based (SplitMix64 at a position), so any draw of any sample can be made anywhere, in any order.
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@nb.njit(nogil=True, cache=True)
def mix64(z):
    """SplitMix64's finaliser (of a uint64 or a uint64 array, wrapping arithmetic): a bijection whose outputs
    look independent even for inputs that differ in one bit, and pass BigCrush as a stream."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@nb.njit(nogil=True, cache=True)
def uniform(key, counter: int) -> float:
    """Draw number `counter` of the stream `key`, uniform in [0, 1): SplitMix64 at that position,
    so any draw of any sample is a pure function of (key, counter), whatever thread computes it."""
    z = mix64(np.uint64(key) + np.uint64(counter + 1) * _GOLDEN)
    return float(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@nb.njit(nogil=True, cache=True)
def random_resized_crop(height: int, width: int, scale_lo: float, scale_hi: float, log_ratio_lo: float,
                        log_ratio_hi: float, key):
    """(top, left, h, w) as torchvision's RandomResizedCrop.get_params: up to 10 tries of an area
    fraction uniform in [scale_lo, scale_hi] and a log-uniform aspect ratio, sides rounded half to
    even (Python's round), the position uniform; else the centred crop clamped to the ratio range.
    Draw 0 is the flip's (see `flip_of`); try k uses draws 1 + 4k .. 4 + 4k."""
    area = float(height) * float(width)
    for attempt in range(10):
        base = 1 + 4 * attempt
        target_area = area * (scale_lo + (scale_hi - scale_lo) * uniform(key, base))
        aspect = math.exp(log_ratio_lo + (log_ratio_hi - log_ratio_lo) * uniform(key, base + 1))
        w = int(np.rint(math.sqrt(target_area * aspect)))
        h = int(np.rint(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(uniform(key, base + 2) * (height - h + 1))
            left = int(uniform(key, base + 3) * (width - w + 1))
            return top, left, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < math.exp(log_ratio_lo):
        w = width
        h = int(np.rint(w / math.exp(log_ratio_lo)))
    elif in_ratio > math.exp(log_ratio_hi):
        h = height
        w = int(np.rint(h * math.exp(log_ratio_hi)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@nb.njit(nogil=True, cache=True)
def flip_of(key) -> bool:
    return uniform(key, 0) < 0.5


@nb.njit(nogil=True, cache=True)
def _crop_boxes(sizes, keys, scale_lo, scale_hi, log_ratio_lo, log_ratio_hi, boxes, flips):
    for k in range(len(keys)):
        top, left, h, w = random_resized_crop(sizes[k, 0], sizes[k, 1], scale_lo, scale_hi, log_ratio_lo,
                                              log_ratio_hi, keys[k])
        boxes[k, 0], boxes[k, 1], boxes[k, 2], boxes[k, 3] = top, left, h, w
        flips[k] = flip_of(keys[k])


def crop_boxes(sizes: np.ndarray, keys: np.ndarray, scale, ratio) -> tuple[np.ndarray, np.ndarray]:
    """For samples of stored (height, width) `sizes` (N, 2) and uint64 `keys` (N,): their boxes, int32 (N, 4)
    rows (top, left, h, w), and their flips, bool (N,). scale, ratio: data.scale and data.ratio."""
    sizes = np.ascontiguousarray(sizes, np.int64)
    keys = np.ascontiguousarray(keys, np.uint64)
    boxes = np.empty((len(keys), 4), np.int32)
    flips = np.empty(len(keys), np.bool_)
    _crop_boxes(sizes, keys, float(scale[0]), float(scale[1]), math.log(ratio[0]), math.log(ratio[1]), boxes, flips)
    return boxes, flips


@nb.njit(nogil=True, cache=True)
def val_resize_side(res: int, crop_pct: float) -> int:
    """torchvision's val transform resizes the shorter side to floor(res / crop_pct), then center-crops res."""
    return int(math.floor(res / crop_pct))


@nb.njit(nogil=True, cache=True)
def center_crop_geometry(height: int, width: int, res: int, crop_pct: float):
    """torchvision's Resize(floor(res / crop_pct)) + CenterCrop(res) as one resize of the image:
    (y scale, y offset, x scale, x offset), output pixel (i, j) centred at input
    ((i + y offset + 0.5) * y scale, (j + x offset + 0.5) * x scale), as Pillow computes it when
    torchvision resizes the whole image and then crops."""
    size = val_resize_side(res, crop_pct)
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_h, new_w = size, int(size * width / height)
    top = int(np.rint((new_h - res) / 2.0))
    left = int(np.rint((new_w - res) / 2.0))
    return height / new_h, float(top), width / new_w, float(left)


def center_crop_geometries(sizes: np.ndarray, res: int, crop_pct: float) -> np.ndarray:
    """center_crop_geometry of images of stored (height, width) `sizes` (N, 2): float64 (N, 4) rows."""
    return np.array([center_crop_geometry(int(h), int(w), res, crop_pct) for h, w in np.asarray(sizes)],
                    np.float64).reshape(-1, 4)
