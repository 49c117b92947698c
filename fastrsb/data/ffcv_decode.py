"""fastrsb's JPEG decode stage for ffcv: seeded crop boxes, a reduced decode, PIL's resampling.

Per sample, in one compiled pass (numba, one thread per image):
 1. the box: fastrsb.data.crops, the one crop program every backend runs (train: torchvision's
    RandomResizedCrop keyed on the sample); torchvision's Resize + CenterCrop (val);
 2. the decode: libffcv's `imdecode` (TurboJPEG), at the smallest DCT scale (1/2, 1/4, 1/8)
    that leaves the box at least the output size, of the whole image or, when that is cheaper,
    of only the MCU-aligned window that holds the box's filter taps (a lossless DCT-domain crop);
 3. the resize: Pillow's antialiased bilinear/bicubic convolution (`Image.resize(size, f, box)`)
    in Pillow's own fixed-point arithmetic, with the horizontal flip folded into a pass.

Hand-written (numba) because nothing in ffcv, OpenCV or Pillow does these steps on a box of a
partially decoded image inside ffcv's compiled, multi-threaded pipeline (ffcv's own decoders
decode everything and resize with cv2 INTER_AREA, nearest-neighbour when enlarging). Each kernel
follows the library whose results it reproduces: torchvision for boxes, Pillow for pixels.
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic


PRECISION_BITS = 22  # Pillow's: 32 - 8 (pixel) - 2 (headroom for filters with negative lobes)
_HALF = 1 << (PRECISION_BITS - 1)
_SUPPORT = (1.0, 2.0)  # bilinear, bicubic (a = -0.5): Pillow's filters

# Whole-image decode vs a TurboJPEG lossless crop of the window: the crop Huffman-decodes the whole image
# and re-encodes the window before the window is decoded, so it only wins on small windows. Measured on
# ImageNet-like 500x375 q90 JPEGs, one core (benchmarks/bench_jpeg_decode.py): a window of 5% of the
# image 0.88x the whole decode, 10% 0.92x, 15% 1.01x, 20% 1.11x, all of it 2.5x.
CROP_MAX_AREA_FRACTION = 0.15
_CHROMA_MARGIN = 2  # decoded pixels kept beyond the taps: chroma upsampling differs at a window edge

# What decode_box did with one image, as bits: the low byte is log2 of the DCT scale denominator (0: whole
# size, 1..3: 1/2..1/8), then decoded at all, of a cropped window, fell back to a whole decode after TurboJPEG
# refused the crop, TurboJPEG reported an error. ffcv_loader's decoder records them per sample (DecodeStats).
DCT_SHIFT_MASK = 0xFF
DONE, CROPPED, FALLBACK, DECODE_ERROR = 1 << 8, 1 << 9, 1 << 10, 1 << 11


# ----------------------------------------------------------------------------- resampling
@nb.njit(nogil=True, cache=True)
def _filter(x: float, bicubic: bool) -> float:
    """Pillow's bilinear (triangle) and bicubic (Keys, a = -0.5) kernels."""
    if x < 0.0:
        x = -x
    if not bicubic:
        return 1.0 - x if x < 1.0 else 0.0
    if x < 1.0:
        return (1.5 * x - 2.5) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5
    return 0.0


@nb.njit(nogil=True, cache=True)
def filter_taps(in_size: int, in0: float, scale: float, out_offset: float, out_size: int, bicubic: bool):
    """Taps of a 1-D antialiased resize, as Pillow's precompute_coeffs + normalize_coeffs_8bpc:
    output pixel xx is centred at input coordinate in0 + (xx + out_offset + 0.5) * scale; its
    window spans support * max(scale, 1) input pixels either side, clipped to [0, in_size);
    weights are normalised, then rounded to 22-bit fixed point.
    Returns (first tap, tap count) per output pixel, and the int32 weights."""
    filterscale = scale if scale > 1.0 else 1.0
    support = _SUPPORT[1 if bicubic else 0] * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    bounds = np.empty((out_size, 2), np.int64)
    weights = np.zeros((out_size, ksize), np.int32)
    raw = np.empty(ksize, np.float64)
    inv_filterscale = 1.0 / filterscale
    for xx in range(out_size):
        center = in0 + (xx + out_offset + 0.5) * scale
        xmin = int(center - support + 0.5)  # C's (int) cast truncates, as in Pillow
        if xmin < 0:
            xmin = 0
        xmax = int(center + support + 0.5)
        if xmax > in_size:
            xmax = in_size
        xmax -= xmin
        total = 0.0
        for x in range(xmax):
            w = _filter((x + xmin - center + 0.5) * inv_filterscale, bicubic)
            raw[x] = w
            total += w
        for x in range(xmax):
            w = raw[x] / total if total != 0.0 else raw[x]
            weights[xx, x] = int(-0.5 + w * (1 << PRECISION_BITS)) if w < 0 else int(0.5 + w * (1 << PRECISION_BITS))
        bounds[xx, 0] = xmin
        bounds[xx, 1] = xmax
    return bounds, weights


@nb.njit(nogil=True, cache=True, inline="always")
def _clip8(acc) -> np.uint8:
    v = acc >> PRECISION_BITS
    return np.uint8(0 if v < 0 else (255 if v > 255 else v))


@nb.njit(nogil=True, cache=True)
def _filter_rows(src, col0: int, bounds, weights, dst) -> None:
    """dst[k] = clip(sum_t src[bounds[k, 0] + t, col0:col0 + width] * weights[k, t]), width = dst's.

    Whole contiguous rows at a time, which LLVM vectorises; both passes of the resize run through
    here, the horizontal one on a transposed (column-major) image. Images are 2-D (rows x bytes)."""
    width = dst.shape[1]
    acc = np.empty(width, np.int32)
    for k in range(bounds.shape[0]):
        acc[:] = _HALF
        for t in range(bounds[k, 1]):
            w = weights[k, t]
            line = src[bounds[k, 0] + t, col0:col0 + width]
            for i in range(width):
                acc[i] += np.int32(line[i]) * w
        row = np.uint64(k)
        for i in range(width):
            dst[row, np.uint64(i)] = _clip8(acc[i])


# Two numba traps shape these kernels. Indices are unsigned where it matters: numba then skips its
# negative-index wraparound on every access. No uint8 array is 1-D at a function boundary (JPEG bytes
# travel as address + size): ffcv 1.0.2 flips `mutable` on numba's interned uint8[::1] type each time
# a Loader is built (OSCacheManager.state_type), which corrupts any dispatcher keyed on it ("Cannot
# modify readonly array", KeyErrors in numba's overload table).
_TILE = 16  # rows per transpose tile: 16 source rows and 48-byte destination runs stay in L1


@nb.njit(nogil=True, cache=True)
def _transpose(src, row0: int, col0: int, rows: int, cols: int, dst, mirror: bool) -> None:
    """dst[c, r] = src[row0 + r, col0 + c] for a rows x cols block of pixels (3 bytes each), tile by
    tile; with mirror, src's rows land in reverse order (dst[c, rows - 1 - r] = src[row0 + r, ...]).

    A pixel moves as one unaligned 4-byte load (the byte before it and its 3) and one 4-byte store whose
    extra byte falls on the neighbour written next, which overwrites it; only the first byte of src and
    the last pixel of each dst row take byte by byte copies. Contiguous arrays (C order) only."""
    first_byte = np.intp(src.ctypes.data)
    pitch = src.strides[0]
    src_block = first_byte + row0 * pitch + col0 * 3
    dst_rows, dst_pitch = np.intp(dst.ctypes.data), dst.strides[0]
    for r_first in range(0, rows, _TILE):
        r_end = min(r_first + _TILE, rows)
        for c in range(cols):
            address = src_block + r_first * pitch + c * 3
            row_start = dst_rows + c * dst_pitch
            for r in range(r_first, r_end):
                out = row_start + 3 * (rows - 1 - r if mirror else r)
                if r == rows - 1 or address == first_byte:
                    for k in range(3):
                        _store_u8(out + k, _load_u8(address + k))
                elif mirror:
                    _store_u32(out - 1, _load_u32(address - 1) & np.uint32(0xFFFFFF00))
                else:
                    _store_u32(out, _load_u32(address - 1) >> np.uint32(8))
                address += pitch


@nb.njit(nogil=True, cache=True)
def pillow_vertical_first(in_w: int, in_h: int, out_w: int, out_h: int) -> bool:
    """Pillow 13's pass order for resizing an in_w x in_h image (whatever the box): vertical first
    when it drops more than twice as many rows as columns (read from its ImagingResampleInner;
    earlier Pillows always went horizontal first). The order shows in the last bit: each pass
    rounds to uint8."""
    return in_h > out_h and in_h - out_h > 2 * (in_w - out_w)


@nb.njit(nogil=True, cache=True)
def resample_taps(src, xbounds, xweights, ybounds, yweights, vertical_first: bool, flip: bool, dst) -> None:
    """dst (h, w, 3) from src (H, W, 3) uint8 with precomputed taps (first tap relative to src).

    Each pass covers only what the next one reads; the horizontal one runs on transposed data,
    so both are whole-row vector loops; a flip is the last (or middle) transpose, mirrored."""
    out_h, out_w = dst.shape[0], dst.shape[1]
    r0 = ybounds[0, 0]
    rows = ybounds[out_h - 1, 0] + ybounds[out_h - 1, 1] - r0
    c0 = xbounds[0, 0]
    cols = xbounds[out_w - 1, 0] + xbounds[out_w - 1, 1] - c0
    xb = xbounds.copy()
    xb[:, 0] -= c0
    image = src.reshape(src.shape[0], src.shape[1] * 3)
    out = dst.reshape(out_h, out_w * 3)
    if vertical_first:
        resized_rows = np.empty((out_h, cols * 3), np.uint8)
        _filter_rows(image, c0 * 3, ybounds, yweights, resized_rows)
        columns = np.empty((cols, out_h * 3), np.uint8)
        _transpose(resized_rows, 0, 0, out_h, cols, columns, False)
        resized = np.empty((out_w, out_h * 3), np.uint8)
        _filter_rows(columns, 0, xb, xweights, resized)
        _transpose(resized, 0, 0, out_w, out_h, out, flip)
    else:
        yb = ybounds.copy()
        yb[:, 0] -= r0
        columns = np.empty((cols, rows * 3), np.uint8)
        _transpose(image, r0, c0, rows, cols, columns, False)
        resized = np.empty((out_w, rows * 3), np.uint8)
        _filter_rows(columns, 0, xb, xweights, resized)
        resized_rows = np.empty((rows, out_w * 3), np.uint8)
        _transpose(resized, 0, 0, out_w, rows, resized_rows, flip)
        _filter_rows(resized_rows, 0, yb, yweights, out)


@nb.njit(nogil=True, cache=True)
def resample(src, x_in0: float, x_scale: float, x_offset: float, y_in0: float, y_scale: float, y_offset: float,
             bicubic: bool, flip: bool, dst) -> None:
    """Resize a box of the whole image src (H, W, 3) uint8 into dst (h, w, 3) as Pillow does.

    Output column xx samples src at x_in0 + (xx + x_offset + 0.5) * x_scale (rows alike), so
    `Image.resize((w, h), f, box=(x0, y0, x1, y1))` is x_in0 = x0, x_scale = (x1 - x0) / w,
    offsets 0 (Pillow takes the box as float32)."""
    xb, xw = filter_taps(src.shape[1], x_in0, x_scale, x_offset, dst.shape[1], bicubic)
    yb, yw = filter_taps(src.shape[0], y_in0, y_scale, y_offset, dst.shape[0], bicubic)
    vertical_first = pillow_vertical_first(src.shape[1], src.shape[0], dst.shape[1], dst.shape[0])
    resample_taps(src, xb, xw, yb, yw, vertical_first, flip, dst)


# ----------------------------------------------------------------------------- JPEG side
@nb.njit(nogil=True, cache=True)
def jpeg_mcu_size(address: int, size: int):
    """(MCU width, MCU height) in pixels from the frame header (SOFn) of the JPEG at address, or (0, 0)
    when no frame header comes first: a window's left and top edges must sit on MCU boundaries to be
    cropped. The bytes are read by address: see the note on uint8 arrays above."""
    i = 2  # after SOI
    while i + 4 <= size:
        if _load_u8(address + i) != 0xFF:
            return 0, 0
        marker = _load_u8(address + i + 1)
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = (_load_u8(address + i + 2) << 8) | _load_u8(address + i + 3)
        if 0xC0 <= marker <= 0xCF and marker != 0xC4 and marker != 0xC8 and marker != 0xCC:  # SOFn
            ncomp = _load_u8(address + i + 9) if i + 9 < size else 0
            if ncomp == 0 or i + 10 + 3 * ncomp > size:
                return 0, 0
            if ncomp == 1:  # grayscale: TurboJPEG's MCU is one block whatever the factors say
                return 8, 8
            max_h, max_v = 1, 1
            for k in range(ncomp):
                factors = _load_u8(address + i + 11 + 3 * k)
                max_h = max(max_h, factors >> 4)
                max_v = max(max_v, factors & 15)
            return 8 * max_h, 8 * max_v
        if marker == 0xDA or marker == 0xD9:  # scan data or end before a frame header
            return 0, 0
        i += 2 + length
    return 0, 0


@nb.njit(nogil=True, cache=True)
def jpeg_frame_intact(address: int, size: int) -> bool:
    """Whether the JPEG at address starts with its SOI marker and reaches a frame header through well-formed
    markers: what a decoder needs before it can decode anything. Damage inside the entropy-coded data is not seen."""
    if size < 4 or _load_u8(address) != 0xFF or _load_u8(address + 1) != 0xD8:
        return False
    mcu_w, _ = jpeg_mcu_size(address, size)
    return mcu_w > 0


@intrinsic
def _load_u8(typingctx, address):
    """The byte at a raw address, as an int64."""
    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], context.get_value_type(types.uint8).as_pointer())
        return builder.zext(builder.load(ptr), context.get_value_type(types.int64))
    return types.int64(types.intp), codegen


@intrinsic
def _store_u8(typingctx, address, value):
    """Store the low byte of value at a raw address."""
    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.IntType(8).as_pointer())
        builder.store(builder.trunc(args[1], ir.IntType(8)), ptr)
        return context.get_dummy_value()
    return types.void(types.intp, types.int64), codegen


@intrinsic
def _load_u32(typingctx, address):
    """The 4 bytes at a raw address, unaligned, as a little-endian uint32."""
    def codegen(context, builder, signature, args):
        return builder.load(builder.inttoptr(args[0], ir.IntType(32).as_pointer()), align=1)
    return types.uint32(types.intp), codegen


@intrinsic
def _store_u32(typingctx, address, value):
    """Store a uint32 at a raw address, unaligned."""
    def codegen(context, builder, signature, args):
        builder.store(args[1], builder.inttoptr(args[0], ir.IntType(32).as_pointer()), align=1)
        return context.get_dummy_value()
    return types.void(types.intp, types.uint32), codegen


@intrinsic
def uint8_pointer(typingctx, address):
    """A raw address as a uint8 pointer (for numba.carray over memory ffcv or the caller owns)."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.uint8)))
    return types.CPointer(types.uint8)(types.intp), codegen


@nb.njit(nogil=True, cache=True)
def dct_shift(box_w: float, box_h: float, out_w: int, out_h: int) -> int:
    """log2 of the largest DCT scale denominator (TurboJPEG: 1, 2, 4, 8) at which the box still
    decodes to at least the output size on both axes."""
    shift = 0
    while shift < 3 and box_w >= out_w * (2 << shift) and box_h >= out_h * (2 << shift):
        shift += 1
    return shift


@nb.njit(nogil=True, cache=True)
def decode_window(height: int, width: int, mcu_w: int, mcu_h: int, x_in0: float, x_scale: float, x_offset: float,
                y_in0: float, y_scale: float, y_offset: float, out_w: int, out_h: int, bicubic: bool,
                crop_max_area_fraction: float):
    """Where and how to decode one image for one output box (coordinates in full-size pixels).

    Returns (shift, window (x0, y0, x1, y1) in full-size pixels, crop?, taps relative to the
    decoded window). The taps are computed on the whole image at the decode scale, as Pillow
    would; the window holds all of them plus a margin (MCU-aligned on the left and top, as
    TurboJPEG's crop requires), so a cropped decode gives the same pixels as a whole one. The
    window is cropped out first when it covers at most crop_max_area_fraction of the image."""
    shift = dct_shift(x_scale * out_w, y_scale * out_h, out_w, out_h)
    d = 1 << shift
    dec_w, dec_h = (width + d - 1) // d, (height + d - 1) // d  # TJSCALED
    xb, xw = filter_taps(dec_w, x_in0 / d, x_scale / d, x_offset, out_w, bicubic)
    yb, yw = filter_taps(dec_h, y_in0 / d, y_scale / d, y_offset, out_h, bicubic)
    x0, y0, x1, y1 = 0, 0, width, height
    crop = False
    if mcu_w > 0 and mcu_h > 0:
        xa = max(0, xb[0, 0] - _CHROMA_MARGIN) * d
        xe = min(dec_w, xb[out_w - 1, 0] + xb[out_w - 1, 1] + _CHROMA_MARGIN) * d
        ya = max(0, yb[0, 0] - _CHROMA_MARGIN) * d
        ye = min(dec_h, yb[out_h - 1, 0] + yb[out_h - 1, 1] + _CHROMA_MARGIN) * d
        cx0, cy0 = xa // mcu_w * mcu_w, ya // mcu_h * mcu_h
        cx1, cy1 = min(width, -(-xe // mcu_w) * mcu_w), min(height, -(-ye // mcu_h) * mcu_h)
        if (cx1 - cx0) * (cy1 - cy0) <= crop_max_area_fraction * width * height:
            x0, y0, x1, y1, crop = cx0, cy0, cx1, cy1, True
    xb[:, 0] -= x0 // d
    yb[:, 0] -= y0 // d
    return shift, x0, y0, x1, y1, crop, xb, xw, yb, yw


@intrinsic
def _call_imdecode(typingctx, function, source, source_size, source_h, source_w, dest, crop_h, crop_w, offset_x,
                   offset_y, scale_num, scale_denom, enable_crop, hflip):
    """Call libffcv's imdecode through its address. A ctypes function object would do, but numba
    cannot cache code that holds one (the address changes from process to process); this way the
    decoder is compiled once and cached, and ffcv's per-Loader compile never re-optimises it."""
    u32, i8 = ir.IntType(32), ir.IntType(8)
    fnty = ir.FunctionType(u32, [i8.as_pointer(), ir.IntType(64), u32, u32, i8.as_pointer(), u32, u32, u32, u32, u32,
                                 u32, i8, i8])  # C bool is one byte, 0 or 1

    def codegen(context, builder, signature, args):
        fn = builder.inttoptr(args[0], fnty.as_pointer())
        call_args = [builder.inttoptr(args[1], i8.as_pointer()), args[2]]
        call_args += [builder.trunc(a, u32) for a in args[3:5]]
        call_args.append(builder.inttoptr(args[5], i8.as_pointer()))
        call_args += [builder.trunc(a, u32) for a in args[6:12]]
        call_args += [builder.zext(a, i8) for a in args[12:14]]
        return builder.call(fn, call_args)

    ints = [types.int64] * 10  # source size, height, width, destination address, crop h, w, x, y, scale num, denom
    return types.int32(types.intp, types.intp, *ints, types.boolean, types.boolean), codegen


@nb.njit(nogil=True, cache=True)
def decode_box(imdecode: int, address: int, size: int, is_jpeg: bool, height: int, width: int, x_in0: float,
               x_scale: float, x_offset: float, y_in0: float, y_scale: float, y_offset: float, bicubic: bool,
               flip: bool, out, crop_max_area_fraction: float = CROP_MAX_AREA_FRACTION) -> int:
    """Decode what the box needs of the stored image at address (size bytes) and resize it into out
    (h, w, 3); returns the outcome bits (DCT scale, cropped, fell back, decode error). imdecode is the
    address of libffcv's imdecode (TurboJPEG); box geometry as resample; crop_max_area_fraction as
    decode_window."""
    out_h, out_w = out.shape[0], out.shape[1]
    if not is_jpeg:  # raw pixels (write modes raw/smart/proportion)
        pixels = nb.carray(uint8_pointer(address), (height, width, 3))
        resample(pixels, x_in0, x_scale, x_offset, y_in0, y_scale, y_offset, bicubic, flip, out)
        return DONE
    mcu_w, mcu_h = jpeg_mcu_size(address, size)
    shift, x0, y0, x1, y1, crop, xb, xw, yb, yw = decode_window(height, width, mcu_w, mcu_h, x_in0, x_scale, x_offset,
                                                               y_in0, y_scale, y_offset, out_w, out_h, bicubic,
                                                               crop_max_area_fraction)
    d = 1 << shift
    outcome = shift | DONE
    if crop:
        dec_w, dec_h = (x1 - x0 + d - 1) // d, (y1 - y0 + d - 1) // d
        buf = np.empty((dec_h, dec_w, 3), np.uint8)
        if _call_imdecode(imdecode, address, size, height, width, buf.ctypes.data, y1 - y0, x1 - x0, x0, y0, 1, d,
                          True, False) == 0:
            outcome |= CROPPED
        else:
            # TurboJPEG's lossless crop refuses some JPEGs its decoder reads (e.g. sampling factors it
            # cannot name, such as 1x4 luma): decode the whole image instead of failing the epoch
            crop = False
            outcome |= FALLBACK
            xb[:, 0] += x0 // d
            yb[:, 0] += y0 // d
    if not crop:
        dec_w, dec_h = (width + d - 1) // d, (height + d - 1) // d
        buf = np.empty((dec_h, dec_w, 3), np.uint8)
        if _call_imdecode(imdecode, address, size, height, width, buf.ctypes.data, height, width, 0, 0, 1, d, False,
                          False) != 0:
            outcome |= DECODE_ERROR  # TurboJPEG errors and warnings alike; whatever it wrote is used, as ffcv does
    vertical_first = pillow_vertical_first((width + d - 1) // d, (height + d - 1) // d, out_w, out_h)
    resample_taps(buf, xb, xw, yb, yw, vertical_first, flip, out)
    return outcome


@nb.cfunc(nb.int64(nb.intp, nb.intp, nb.int64, nb.boolean, nb.int64, nb.int64, nb.float64, nb.float64, nb.float64,
                   nb.float64, nb.float64, nb.float64, nb.boolean, nb.boolean, nb.intp, nb.int64, nb.int64),
          nopython=True, cache=True)
def decode_into(imdecode, address, size, is_jpeg, height, width, x_in0, x_scale, x_offset, y_in0, y_scale, y_offset,
                bicubic, flip, out_address, out_h, out_w):
    """decode_box as a C function: ffcv compiles each Loader's pipeline anew, and calling the decoder
    through an address keeps that compile from linking and re-optimising all of it (a Loader then
    starts in about a second instead of ten)."""
    out = nb.carray(uint8_pointer(out_address), (out_h, out_w, 3))
    return decode_box(imdecode, address, size, is_jpeg, height, width, x_in0, x_scale, x_offset, y_in0, y_scale,
                      y_offset, bicubic, flip, out)
