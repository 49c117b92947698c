"""Decode-check one source image and decide what to store: its own bytes, or a re-encode.

A JPEG with 3 components in YCbCr, 8 bits, sequential (baseline) coding, no EXIF rotation and both
sides within max_resolution is stored byte for byte when TurboJPEG decodes it fully without an error
or a warning (that decode is its check; TurboJPEG is what ffcv's and DALI's CPU decoders run, and it
is stricter than PIL, which reads past libjpeg's warnings): no generation of JPEG loss, and no
re-encode at conversion time. Every other input is decoded as `PIL.Image.open(f).convert("RGB")`
(what timm and torchvision train on), so CMYK, grayscale, palette, RGBA and PNGs behind a .JPEG name
all become RGB JPEG, resized by FFCV's own rule (longer side to max_resolution, sizes truncated, cv2
INTER_AREA) and re-encoded. Progressive JPEGs are re-encoded too: TurboJPEG decodes them ~3x slower
than baseline ones (benchmarks/bench_jpeg_decode.py).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError



def _resize_area(arr: np.ndarray, width: int, height: int) -> np.ndarray:
    """FFCV's resize rule (cv2 INTER_AREA), so .beton and shards hold the bytes ffcv's own writer would make.
    cv2 comes with the ffcv extra; imported here so a machine without it converts every image that fits."""
    try:
        import cv2
    except ImportError as e:
        raise RuntimeError("an image larger than max_resolution must be resized with OpenCV (FFCV's rule): "
                           "pip install opencv-python-headless, or the ffcv extra") from e
    cv2.setNumThreads(1)  # one process per core already; cv2's own threads would oversubscribe
    return cv2.resize(arr, (width, height), interpolation=cv2.INTER_AREA)


class BadImage(Exception):
    """A source file that must not reach any output; the message is the reason recorded."""


@dataclass(frozen=True)
class PreparedImage:
    jpeg: bytes
    height: int
    width: int
    as_is: bool = False  # the source's own bytes (else a re-encode)
    reencode_reason: str = ""  # why it was not stored as is ("" when as_is)


def fit_size(width: int, height: int, max_resolution: int) -> tuple[int, int]:
    """(w, h) after FFCV's resizer: longer side to max_resolution when larger, truncating."""
    ratio = max_resolution / max(width, height)
    if ratio >= 1:
        return width, height
    return int(ratio * width), int(ratio * height)


def read_source(source: str | Path | bytes) -> bytes:
    """An input's bytes: a file's (read here), or those a source already read (a parquet row, a tar member)."""
    if isinstance(source, bytes):
        data = source
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise BadImage(f"unreadable: {e.strerror}") from e
    if not data:
        raise BadImage("empty (0 bytes)")
    return data


def load_rgb(source: str | Path | bytes) -> np.ndarray:
    """Fully decode an image (a path or its bytes) as RGB uint8 HWC, or raise BadImage saying why."""
    data = read_source(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.load()  # forces the full decode: truncated data raises here
                rgb = im if im.mode == "RGB" else im.convert("RGB")
                arr = np.asarray(rgb)
    except UnidentifiedImageError:
        raise BadImage("not an image (no decoder recognises it)") from None
    except Image.DecompressionBombWarning as e:
        raise BadImage(f"decompression bomb guard: {e}") from None
    except Image.DecompressionBombError as e:
        raise BadImage(f"decompression bomb guard: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"corrupt or truncated image: {e}") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) < 1:
        raise BadImage(f"unexpected decoded shape {arr.shape}")
    return arr


@dataclass(frozen=True)
class JpegHeader:
    """What the markers before the first scan say about a JPEG (ITU T.81; libjpeg's colour rules)."""

    width: int
    height: int
    precision: int  # bits per sample
    components: int
    coding: str  # baseline | extended | progressive | lossless | hierarchical | arithmetic
    colorspace: str  # ycbcr | rgb | gray | cmyk | ycck | unknown, as libjpeg infers it
    exif_orientation: int  # 1 (also when absent) = upright


_SOF_CODING = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive", 0xC3: "lossless",
               0xC5: "hierarchical", 0xC6: "hierarchical", 0xC7: "hierarchical"}  # 0xC9-0xCF: arithmetic


def jpeg_header(data: bytes) -> JpegHeader | None:
    """Parse a JPEG's frame header and colour markers; None when data is not a JPEG or no frame
    header comes before the first scan."""
    if data[:2] != b"\xff\xd8":
        return None
    jfif, adobe_transform, orientation = False, None, 1
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        body = data[i + 4:i + 2 + length]
        if marker == 0xE0 and body[:5] == b"JFIF\0":
            jfif = True
        elif marker == 0xEE and body[:5] == b"Adobe" and len(body) >= 12:
            adobe_transform = body[11]
        elif marker == 0xE1 and body[:6] == b"Exif\0\0":
            orientation = _exif_orientation(body[6:])
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn
            if len(body) < 6:
                return None
            ncomp = body[5]
            ids = tuple(body[6 + 3 * k] for k in range(ncomp) if 6 + 3 * k < len(body))
            return JpegHeader(width=int.from_bytes(body[3:5], "big"), height=int.from_bytes(body[1:3], "big"),
                              precision=body[0], components=ncomp, coding=_SOF_CODING.get(marker, "arithmetic"),
                              colorspace=_colorspace(ncomp, ids, jfif, adobe_transform), exif_orientation=orientation)
        elif marker in (0xDA, 0xD9):  # a scan or the end before any frame header
            return None
        i += 2 + length
    return None


def _colorspace(ncomp: int, ids: tuple, jfif: bool, adobe_transform: int | None) -> str:
    """libjpeg's guess of the stored colour space (jdapimin.c, default_decompress_parms)."""
    if ncomp == 1:
        return "gray"
    if ncomp == 3:
        if jfif:
            return "ycbcr"
        if adobe_transform is not None:
            return "rgb" if adobe_transform == 0 else "ycbcr"
        return "rgb" if ids == (0x52, 0x47, 0x42) else "ycbcr"  # component ids 'R', 'G', 'B'
    if ncomp == 4:
        return "ycck" if adobe_transform == 2 else "cmyk"
    return "unknown"


def _exif_orientation(tiff: bytes) -> int:
    """The Orientation tag (0x0112) of an Exif block's IFD0; 1 when absent or unreadable."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "little" if tiff[:2] == b"II" else "big"
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 1
    for k in range(int.from_bytes(tiff[ifd:ifd + 2], order)):
        entry = tiff[ifd + 2 + 12 * k:ifd + 14 + 12 * k]
        if len(entry) == 12 and int.from_bytes(entry[:2], order) == 0x0112:
            return int.from_bytes(entry[8:10], order)
    return 1


class _TurboJpeg:
    """TurboJPEG's decompressor through ctypes: the library ffcv's decoder and DALI's CPU decoder use.
    decodes_cleanly decodes the whole bitstream and reports any error *or warning* (TurboJPEG returns
    -1 on either), stricter than PIL, which reads past libjpeg's warnings. It decodes at 1/8 scale:
    every Huffman-coded coefficient is still read (where damage shows), only the IDCT is smaller
    (0.6x the time of a full decode, benchmarks/bench_jpeg_decode.py)."""

    _TJPF_RGB, _TJFLAG_FASTDCT = 0, 2048

    def __init__(self):
        name = ctypes.util.find_library("turbojpeg")
        if name is None:
            raise OSError("libturbojpeg not found")
        self.lib = ctypes.CDLL(name)
        self.lib.tjInitDecompress.restype = ctypes.c_void_p
        self.lib.tjDecompress2.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p,
                                           ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.handle = self.lib.tjInitDecompress()

    def decodes_cleanly(self, data: bytes, width: int, height: int) -> bool:
        width, height = (width + 7) // 8, (height + 7) // 8  # TurboJPEG picks the 1/8 scale for these sizes
        out = np.empty(height * width * 3, np.uint8)
        return self.lib.tjDecompress2(self.handle, data, len(data), out.ctypes.data, width, 0, height,
                                      self._TJPF_RGB, self._TJFLAG_FASTDCT) == 0


_turbojpeg: list[_TurboJpeg | None] = []


def _decoder() -> _TurboJpeg | None:
    """One decompressor per process (converter workers are processes); None without libturbojpeg."""
    if not _turbojpeg:
        try:
            _turbojpeg.append(_TurboJpeg())
        except OSError:
            _turbojpeg.append(None)
    return _turbojpeg[0]


def reencode_reason(data: bytes, max_resolution: int) -> str:
    """Why a source must be decoded and re-encoded rather than stored as is (a category the manifest
    counts); "" when its own bytes may be stored, TurboJPEG's clean full decode included."""
    h = jpeg_header(data)
    if h is None:
        return "not a JPEG"
    if h.colorspace != "ycbcr" or h.components != 3:
        return f"{h.colorspace} JPEG"
    if h.precision != 8:
        return f"{h.precision}-bit JPEG"
    if h.coding not in ("baseline", "extended"):
        return f"{h.coding} JPEG"
    if h.exif_orientation != 1:
        return "EXIF-rotated JPEG"  # DALI applies the rotation, PIL and TurboJPEG do not
    if max(h.width, h.height) > max_resolution:
        return "larger than max resolution"
    if h.width * h.height > (Image.MAX_IMAGE_PIXELS or h.width * h.height):
        return "larger than PIL's decompression bomb guard"  # PIL then refuses it, with the reason
    decoder = _decoder()
    if decoder is None:
        return "no libturbojpeg to check the decode"
    if not decoder.decodes_cleanly(data, h.width, h.height):
        return "TurboJPEG error or warning"
    return ""


def prepare_image(source: str | Path | bytes, max_resolution: int, jpeg_quality: int,
                  reencode: bool = False) -> PreparedImage:
    """What to store for one input (a file's path or a record's bytes), or raise BadImage. An eligible JPEG keeps its
    own bytes (TurboJPEG decoded it fully), unless `reencode`; anything else is decoded by PIL and re-encoded."""
    data = read_source(source)
    reason = "--reencode" if reencode else reencode_reason(data, max_resolution)
    if not reason:
        header = jpeg_header(data)
        return PreparedImage(data, header.height, header.width, as_is=True)
    arr = load_rgb(data)
    h, w = arr.shape[:2]
    nw, nh = fit_size(w, h, max_resolution)
    if (nw, nh) != (w, h):
        if min(nw, nh) < 1:
            raise BadImage(f"degenerate size {w}x{h}: resizing to max side {max_resolution} leaves an empty side")
        arr = _resize_area(arr, nw, nh)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=jpeg_quality)
    return PreparedImage(buf.getvalue(), nh, nw, reencode_reason=reason)


def decode_jpeg(data: bytes) -> np.ndarray:
    """Decode stored JPEG bytes (used by verify and the FFCV raw path)."""
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage("not an image (no decoder recognises it)") from None
    with im:
        if im.format != "JPEG":
            raise BadImage(f"stored sample is {im.format}, not JPEG")
        im.load()
        return np.asarray(im.convert("RGB"))
