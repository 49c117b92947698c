"""Decode-check and re-encode one source image.

Pixels are those of `PIL.Image.open(f).convert("RGB")`, what timm and torchvision train on,
so CMYK, grayscale, palette, RGBA and PNGs hiding behind a .JPEG name all become RGB JPEG.
The resize rule is FFCV's own (longer side to max_resolution, sizes truncated, cv2 INTER_AREA),
so the FFCV and DALI outputs hold the same JPEG bytes.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

cv2.setNumThreads(1)  # one process per core already; cv2's own threads would oversubscribe


class BadImage(Exception):
    """A source file that must not reach any output; the message is the reason recorded."""


@dataclass(frozen=True)
class PreparedImage:
    jpeg: bytes
    height: int
    width: int


def fit_size(width: int, height: int, max_resolution: int) -> tuple[int, int]:
    """(w, h) after FFCV's resizer: longer side to max_resolution when larger, truncating."""
    ratio = max_resolution / max(width, height)
    if ratio >= 1:
        return width, height
    return int(ratio * width), int(ratio * height)


def load_rgb(path: str | Path) -> np.ndarray:
    """Fully decode an image as RGB uint8 HWC, or raise BadImage saying why."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise BadImage(f"unreadable: {e.strerror}") from e
    if size == 0:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()  # forces the full decode: truncated data raises here
                rgb = im.convert("RGB")
    except UnidentifiedImageError:
        raise BadImage("not an image (no decoder recognises it)") from None
    except Image.DecompressionBombWarning as e:
        raise BadImage(f"decompression bomb guard: {e}") from None
    except Image.DecompressionBombError as e:
        raise BadImage(f"decompression bomb guard: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"corrupt or truncated image: {e}") from None
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) < 1:
        raise BadImage(f"unexpected decoded shape {arr.shape}")
    return arr


def prepare_image(path: str | Path, max_resolution: int, jpeg_quality: int) -> PreparedImage:
    arr = load_rgb(path)
    h, w = arr.shape[:2]
    nw, nh = fit_size(w, h, max_resolution)
    if (nw, nh) != (w, h):
        if min(nw, nh) < 1:
            raise BadImage(f"degenerate size {w}x{h}: resizing to max side {max_resolution} leaves an empty side")
        arr = cv2.resize(arr, (nw, nh), interpolation=cv2.INTER_AREA)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=jpeg_quality)
    return PreparedImage(buf.getvalue(), nh, nw)


def decode_jpeg(data: bytes) -> np.ndarray:
    """Decode stored JPEG bytes (used by verify and the FFCV raw path)."""
    with Image.open(io.BytesIO(data)) as im:
        if im.format != "JPEG":
            raise BadImage(f"stored sample is {im.format}, not JPEG")
        im.load()
        return np.asarray(im.convert("RGB"))
