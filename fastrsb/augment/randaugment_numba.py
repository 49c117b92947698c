"""timm's RandAugment ops as per-image CPU kernels (numba), bit-exact with the PIL calls timm makes.

Why a second implementation beside the torch ops of randaugment_torch.py: on a CPU those ops are
memory-bound (several float passes over each op group plus gathers of the whole batch per layer), slower
than timm's per-image PIL spread over the same cores. Here one thread takes an image through all of its
ops while it sits in cache: each op is one pass in PIL's own arithmetic (integer tables, float32
blends, double-precision bilinear sampling), so the result is PIL's to the bit, and the geometric ops
that move whole rows (shears, translations) run as contiguous, vectorizable row segments instead of a
per-pixel gather. The torch ops remain the implementation for cuda (and run on the CPU in tests).

Every kernel reads `src` and writes `dst`, uint8 (H, W, 3) C-contiguous, distinct arrays. Which kernel
runs for which op code is `apply`'s dispatch; the codes (fastrsb.augment.op_table.KERNEL) come in as an
argument, `kernel`.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

# Only the fast-math flags that cannot change a finite result: no contraction into FMA and no
# reassociation, which would break bit-exactness with PIL's C arithmetic.
_MATH = {"nnan", "ninf", "nsz"}
_KW = dict(nogil=True, cache=True, fastmath=_MATH)


_U = np.uint64  # unsigned indices: numba then emits no negative-index wraparound, which blocks vectorization


@njit(**_KW)
def _copy(src, dst):
    s, d = src.reshape(-1), dst.reshape(-1)  # an explicit loop: LLVM makes it a memcpy, slicing does not
    for k in range(s.size):
        d[k] = s[k]


@njit(**_KW)
def _apply_lut(src, dst, lut):
    """lut (3, 256) uint8, one table per channel: PIL's Image.point on an RGB image."""
    s, d = src.reshape(-1, 3), dst.reshape(-1, 3)
    red, green, blue = lut[0], lut[1], lut[2]
    for k in range(s.shape[0]):
        d[k, 0] = red[s[k, 0]]
        d[k, 1] = green[s[k, 1]]
        d[k, 2] = blue[s[k, 2]]


@njit(**_KW)
def _blend(a, b, factor):
    """PIL's ImagingBlend for one value: a + factor * (b - a) in float32, clipped, truncated."""
    t = np.float32(a) + factor * np.float32(b - a)
    return np.int32(min(max(t, np.float32(0.0)), np.float32(255.0)))


@njit(**_KW)
def _grey(pixels, k):
    """PIL's RGB -> L conversion of pixel k of an (N, 3) array."""
    return (np.int32(pixels[k, 0]) * 19595 + np.int32(pixels[k, 1]) * 38470 + np.int32(pixels[k, 2]) * 7471
            + 0x8000) >> 16


@njit(**_KW)
def autocontrast(src, dst):
    """ImageOps.autocontrast(cutoff=0): per channel min..max stretched, table computed in double."""
    s = src.reshape(-1)
    # per-lane minima/maxima over blocks of 48 bytes (a multiple of 3: lane j is channel j % 3), which
    # vectorizes; the tail and the lanes are folded per channel after
    lanes = 48
    lane_lo, lane_hi = np.full(lanes, 255, np.uint8), np.zeros(lanes, np.uint8)
    blocks = s.size // lanes
    for b in range(blocks):
        block = s[b * lanes: (b + 1) * lanes]
        for j in range(lanes):
            lane_lo[j] = min(lane_lo[j], block[j])
            lane_hi[j] = max(lane_hi[j], block[j])
    lo, hi = np.full(3, 255, np.int32), np.zeros(3, np.int32)
    for j in range(lanes):
        lo[j % 3] = min(lo[j % 3], lane_lo[j])
        hi[j % 3] = max(hi[j % 3], lane_hi[j])
    for k in range(blocks * lanes, s.size):
        lo[k % 3] = min(lo[k % 3], s[k])
        hi[k % 3] = max(hi[k % 3], s[k])
    lut = np.empty((3, 256), np.uint8)
    for c in range(3):
        if hi[c] <= lo[c]:
            for ix in range(256):
                lut[c, ix] = ix
            continue
        scale = 255.0 / (hi[c] - lo[c])
        offset = -lo[c] * scale
        for ix in range(256):
            lut[c, ix] = min(max(int(ix * scale + offset), 0), 255)
    _apply_lut(src, dst, lut)


@njit(**_KW)
def equalize(src, dst):
    """ImageOps.equalize: lut[i] = (step // 2 + sum(hist[:i])) // step per channel, step =
    (count - count in the last non-empty bin) // 255; identity for one bin or step 0."""
    s = src.reshape(-1, 3)
    hist = np.zeros((3, 256), np.int64)
    for k in range(s.shape[0]):
        hist[0, s[k, 0]] += 1
        hist[1, s[k, 1]] += 1
        hist[2, s[k, 2]] += 1
    lut = np.empty((3, 256), np.uint8)
    for c in range(3):
        bins, last, total = 0, 0, 0
        for i in range(256):
            if hist[c, i]:
                bins += 1
                last = i
                total += hist[c, i]
        step = (total - hist[c, last]) // 255 if bins > 1 else 0
        if step == 0:
            for i in range(256):
                lut[c, i] = i
            continue
        acc = step // 2
        for i in range(256):
            lut[c, i] = min(acc // step, 255)
            acc += hist[c, i]
    _apply_lut(src, dst, lut)


@njit(**_KW)
def invert(src, dst):
    s, d = src.reshape(-1), dst.reshape(-1)
    for k in range(s.size):
        d[k] = s[k] ^ np.uint8(255)


@njit(**_KW)
def posterize(src, dst, bits):
    """ImageOps.posterize; 8 or more bits is the identity (timm), 0 bits black (timm's meaning)."""
    b = int(bits)
    if b >= 8:
        _copy(src, dst)
        return
    mask = np.uint8((0xFF << (8 - max(b, 0))) & 0xFF)
    s, d = src.reshape(-1), dst.reshape(-1)
    for k in range(s.size):
        d[k] = s[k] & mask


@njit(**_KW)
def solarize(src, dst, thresh):
    """ImageOps.solarize: values at or above the threshold inverted."""
    t = np.int32(thresh)
    s, d = src.reshape(-1), dst.reshape(-1)
    for k in range(s.size):
        v = np.int32(s[k])
        d[k] = 255 - v if v >= t else v


@njit(**_KW)
def solarize_add(src, dst, add):
    """timm's solarize_add: min(255, x + add) below 128."""
    a = np.int32(add)
    s, d = src.reshape(-1), dst.reshape(-1)
    for k in range(s.size):
        v = np.int32(s[k])
        d[k] = min(v + a, 255) if v < 128 else v


@njit(**_KW)
def _blend_flat(src, dst, degenerate, factor):
    """Image.blend(flat image of one grey level, src, factor)."""
    f = np.float32(factor)
    s, d = src.reshape(-1), dst.reshape(-1)
    for k in range(s.size):
        d[k] = _blend(degenerate, np.int32(s[k]), f)


@njit(**_KW)
def brightness(src, dst, factor):
    """ImageEnhance.Brightness: blend with black."""
    _blend_flat(src, dst, np.int32(0), factor)


@njit(**_KW)
def contrast(src, dst, factor):
    """ImageEnhance.Contrast: blend with the mean grey level, int(mean + 0.5)."""
    pixels = src.reshape(-1, 3)
    total = 0
    for k in range(pixels.shape[0]):
        total += _grey(pixels, k)
    _blend_flat(src, dst, np.int32(int(total / pixels.shape[0] + 0.5)), factor)


@njit(**_KW)
def color(src, dst, factor):
    """ImageEnhance.Color: blend with the image's own grey version (grey first, in a vectorizable
    pass, spread to the three channels so the blend runs over flat memory)."""
    f = np.float32(factor)
    pixels = src.reshape(-1, 3)
    grey3 = np.empty(pixels.shape, np.int32)
    for k in range(pixels.shape[0]):
        g = _grey(pixels, k)
        grey3[k, 0] = g
        grey3[k, 1] = g
        grey3[k, 2] = g
    s, d, g3 = src.reshape(-1), dst.reshape(-1), grey3.reshape(-1)
    for k in range(s.size):
        d[k] = _blend(g3[k], np.int32(s[k]), f)


@njit(**_KW)
def sharpness(src, dst, factor):
    """ImageEnhance.Sharpness: blend with PIL's SMOOTH filter (1 1 1 / 1 5 1 / 1 1 1, / 13, rounded,
    which is (2 * sum + 13) // 26 in integers); the filter keeps the 1-pixel border, which thus blends
    to itself. Taps are row slices, so the inner loop is plain contiguous arithmetic."""
    f = np.float32(factor)
    h, w, _ = src.shape
    _copy(src, dst)
    if h < 3 or w < 3:
        return
    n = 3 * (w - 2)  # interior elements of a row
    s, d = src.reshape(h, 3 * w), dst.reshape(h, 3 * w)
    for y in range(1, h - 1):
        up, mid, down = s[y - 1], s[y], s[y + 1]
        a0, a1, a2 = up[0:n], up[3:n + 3], up[6:n + 6]
        b0, b1, b2 = mid[0:n], mid[3:n + 3], mid[6:n + 6]
        c0, c1, c2 = down[0:n], down[3:n + 3], down[6:n + 6]
        out = d[y, 3:n + 3]
        for j in range(n):
            total = (np.int32(a0[j]) + np.int32(a1[j]) + np.int32(a2[j]) + np.int32(b0[j]) + 5 * np.int32(b1[j])
                     + np.int32(b2[j]) + np.int32(c0[j]) + np.int32(c1[j]) + np.int32(c2[j]))
            out[j] = _blend((2 * total + 13) // 26, np.int32(b1[j]), f)


# ------------------------------------------------------------------ geometry
# PIL's affine transform with BILINEAR (Geometry.c): the output pixel centre (xc, yc) = (x + .5, y + .5)
# maps to u = a0 xc + a1 yc + a2, v = a3 xc + a4 yc + a5 (double, in that order); outside
# [0, w) x [0, h) the pixel keeps the fill; else x = floor(u - .5) with dx its fraction (same for y),
# taps clamped to the image, the lower row used only where it exists: v1 = p + (q - p) dx per row,
# then v1 + (v2 - v1) dy, truncated. Each kernel computes every pixel's (u, v) by that formula, so
# rounding matches PIL's to the last bit; the fast paths only choose how taps are fetched.

@njit(**_KW)
def _bilinear_pixel(s, d, o, w, h, u, v):
    """Output pixel at flat offset o of d, sampled at input position (u, v), known to be inside."""
    u -= 0.5
    v -= 0.5
    fx, fy = math.floor(u), math.floor(v)
    dx, dy = u - fx, v - fy
    xi, yi = int(fx), int(fy)
    x0, x1 = 3 * min(max(xi, 0), w - 1), 3 * min(max(xi + 1, 0), w - 1)
    r0 = 3 * w * min(max(yi, 0), h - 1)
    lower = 0 <= yi + 1 < h
    r1 = 3 * w * (yi + 1)
    for c in range(3):
        p, q = np.int32(s[r0 + x0 + c]), np.int32(s[r0 + x1 + c])
        v1 = p + (q - p) * dx
        v2 = v1
        if lower:
            p2, q2 = np.int32(s[r1 + x0 + c]), np.int32(s[r1 + x1 + c])
            v2 = p2 + (q2 - p2) * dx
        d[o + c] = int(v1 + (v2 - v1) * dy)


@njit(**_KW)
def _fill_pixel(d, o, fill):
    d[o] = fill[0]
    d[o + 1] = fill[1]
    d[o + 2] = fill[2]


_OUTSIDE = -(1 << 40)  # tap index of a pixel whose sample point is outside the image


@njit(**_KW)
def _affine_general(src, dst, a, fill):
    """Any affine map (Rotate). Per row, a vectorizable pass computes every pixel's sample point,
    then each pixel fetches its four taps (unclamped in the interior)."""
    h, w, _ = src.shape
    row = 3 * w
    s, d = src.reshape(-1), dst.reshape(-1)
    frac_x, frac_y = np.empty(w), np.empty(w)
    tap_x, tap_y = np.empty(w, np.int64), np.empty(w, np.int64)
    for y in range(h):
        yc = y + 0.5
        bu, bv = a[1] * yc, a[4] * yc
        for x in range(w):
            xc = x + 0.5
            u = a[0] * xc + bu + a[2]
            v = a[3] * xc + bv + a[5]
            fx, fy = np.floor(u - 0.5), np.floor(v - 0.5)
            frac_x[x], frac_y[x] = (u - 0.5) - fx, (v - 0.5) - fy
            tap_x[x] = np.int64(fx) if (0.0 <= u) & (u < w) & (0.0 <= v) & (v < h) else _OUTSIDE
            tap_y[x] = np.int64(fy)
        for x in range(w):
            xi, yi = tap_x[x], tap_y[x]
            o = 3 * (y * w + x)
            if xi == _OUTSIDE:
                _fill_pixel(d, o, fill)
            elif 0 <= xi and xi + 1 < w and 0 <= yi and yi + 1 < h:
                dx, dy = frac_x[x], frac_y[x]
                b, ou = _U(yi * row + 3 * xi), _U(o)
                for c in range(3):
                    p, q = np.int32(s[b + _U(c)]), np.int32(s[b + _U(c + 3)])
                    p2, q2 = np.int32(s[b + _U(row + c)]), np.int32(s[b + _U(row + c + 3)])
                    v1 = p + (q - p) * dx
                    v2 = p2 + (q2 - p2) * dx
                    d[ou + _U(c)] = np.int32(v1 + (v2 - v1) * dy)
            else:  # taps clamped at the border: the sample point again, by the same expressions
                _bilinear_pixel(s, d, o, w, h, a[0] * (x + 0.5) + bu + a[2], a[3] * (x + 0.5) + bv + a[5])


@njit(**_KW)
def _lerp(a, b, out, frac):
    """out = int(p + (q - p) * frac) elementwise, p from a, q from b (equal-length slices): PIL's
    bilinear where one of the two weights is exactly zero (v1 + (v2 - v1) * 0 is v1). Vectorized."""
    for j in range(out.size):
        p = np.int32(a[j])
        out[j] = np.int32(p + (np.int32(b[j]) - p) * frac)


@njit(**_KW)
def _lerp_pixels(a, b, out, frac):
    """_lerp over pixels, frac (n,) one weight per pixel of the (3n,) slices. A row's weights come in
    runs of equal value (one run for a translation; a shear's differ only in the last bits where u
    crosses a power of two), each run one vectorized _lerp."""
    n = frac.size
    x = 0
    while x < n:
        f = frac[x]
        end = x + 1
        while end < n and frac[end] == f:
            end += 1
        _lerp(a[3 * x:3 * end], b[3 * x:3 * end], out[3 * x:3 * end], f)
        x = end


@njit(**_KW)
def _affine_rows_x(src, dst, a, fill):
    """(1, b, c, 0, 1, 0): ShearX, TranslateX. v is the row centre, so output row y samples input row y
    at u = xc + b yc + c. Where u - .5 floors to x + k for every inside pixel of the row (always, but
    for rounding in the last bit, which takes the per-pixel path), the row is a shifted lerp over
    contiguous memory."""
    h, w, _ = src.shape
    row = 3 * w
    s, d = src.reshape(h, row), dst.reshape(h, row)
    flat = src.reshape(-1)
    pos, frac, tap = np.empty(w), np.empty(w), np.empty(w, np.int64)
    for y in range(h):
        yc = y + 0.5
        bu = a[1] * yc
        for x in range(w):
            u = (x + 0.5) + bu + a[2]
            fx = np.floor(u - 0.5)
            pos[x] = u
            frac[x] = (u - 0.5) - fx
            tap[x] = np.int64(fx) - x
        lo, hi = 0, w  # u increases with x: the inside pixels are lo <= x < hi
        while lo < w and pos[lo] < 0.0:
            lo += 1
        while hi > lo and pos[hi - 1] >= w:
            hi -= 1
        out = d[y]
        for x in range(lo):
            _fill_pixel(out, 3 * x, fill)
        for x in range(hi, w):
            _fill_pixel(out, 3 * x, fill)
        if lo >= hi:
            continue
        k = tap[lo]
        mismatches = 0
        for x in range(lo, hi):
            mismatches += tap[x] != k
        # taps x + k and x + k + 1 lie inside the image for vlo <= x < vhi; edge pixels clamp
        vlo, vhi = (min(max(lo, -k), hi), min(hi, w - 1 - k)) if mismatches == 0 else (hi, hi)
        vhi = max(vhi, vlo)
        for x in range(lo, vlo):
            _bilinear_pixel(flat, out, 3 * x, w, h, pos[x], yc)
        for x in range(vhi, hi):
            _bilinear_pixel(flat, out, 3 * x, w, h, pos[x], yc)
        if vlo < vhi:
            first, last = 3 * (vlo + k), 3 * (vhi + k)
            _lerp_pixels(s[y, first:last], s[y, first + 3:last + 3], out[3 * vlo:3 * vhi], frac[vlo:vhi])


@njit(**_KW)
def _affine_rows_y(src, dst, a, fill):
    """(1, 0, 0, b, 1, c): ShearY, TranslateY. u is the column centre, so output pixel (y, x) lerps
    input rows r and r + 1 of its own column at v = b xc + yc + c. A translation's output row reads two
    whole input rows (a contiguous lerp); a shear's taps are fetched per pixel."""
    h, w, _ = src.shape
    row = 3 * w
    s, d = src.reshape(h, row), dst.reshape(h, row)
    flat = src.reshape(-1)
    frac, tap = np.empty(w), np.empty(w, np.int64)
    for y in range(h):
        yc = y + 0.5
        out = d[y]
        for x in range(w):
            v = a[3] * (x + 0.5) + yc + a[5]
            fy = np.floor(v - 0.5)
            frac[x] = (v - 0.5) - fy
            tap[x] = np.int64(fy) if (0.0 <= v) & (v < h) else _OUTSIDE
        r = tap[0]
        mismatches = 0
        for x in range(w):
            mismatches += tap[x] != r
        if mismatches == 0 and 0 <= r and r + 1 <= h - 1:
            _lerp_pixels(s[r], s[r + 1], out, frac)
            continue
        for x in range(w):
            t = tap[x]
            if t == _OUTSIDE:
                _fill_pixel(out, 3 * x, fill)
            elif 0 <= t and t + 1 <= h - 1:
                f, base, o = frac[x], _U(t * row + 3 * x), _U(3 * x)
                for c in range(3):
                    p = np.int32(flat[base + _U(c)])
                    out[o + _U(c)] = np.int32(p + (np.int32(flat[base + _U(row + c)]) - p) * f)
            else:
                _bilinear_pixel(flat, out, 3 * x, w, h, x + 0.5, a[3] * (x + 0.5) + yc + a[5])


@njit(**_KW)
def affine(src, dst, a, fill):
    if a[0] == 1.0 and a[3] == 0.0 and a[4] == 1.0 and a[5] == 0.0:
        _affine_rows_x(src, dst, a, fill)
    elif a[0] == 1.0 and a[1] == 0.0 and a[2] == 0.0 and a[4] == 1.0:
        _affine_rows_y(src, dst, a, fill)
    else:
        _affine_general(src, dst, a, fill)


@njit(**_KW)
def apply(code, p, src, dst, fill, kernel):
    """One op of the program on one image: the kernel of op code `code` (kernel: the KernelCodes)."""
    if code == kernel.AUTOCONTRAST:
        autocontrast(src, dst)
    elif code == kernel.EQUALIZE:
        equalize(src, dst)
    elif code == kernel.INVERT:
        invert(src, dst)
    elif code == kernel.POSTERIZE:
        posterize(src, dst, p[0])
    elif code == kernel.SOLARIZE:
        solarize(src, dst, p[0])
    elif code == kernel.SOLARIZE_ADD:
        solarize_add(src, dst, p[0])
    elif code == kernel.COLOR:
        color(src, dst, p[0])
    elif code == kernel.CONTRAST:
        contrast(src, dst, p[0])
    elif code == kernel.BRIGHTNESS:
        brightness(src, dst, p[0])
    elif code == kernel.SHARPNESS:
        sharpness(src, dst, p[0])
    elif code == kernel.AFFINE:
        affine(src, dst, p, fill)
    else:
        _copy(src, dst)


@njit(parallel=True, **_KW)
def run_program(src, dst, scratch, codes, params, fill, kernel):
    """dst[i] = the ops codes[:, i] (kernel.IDENTITY: skipped) applied in order to src[i], each image in
    one thread, ping-ponging between dst[i] and scratch[i] so the last op lands in dst[i].
    src, dst, scratch (N, H, W, 3) uint8; codes (L, N) int; params (L, N, 6) float64; fill (3,) uint8;
    kernel: the KernelCodes."""
    n = src.shape[0]
    layers = codes.shape[0]
    for i in prange(n):
        todo = 0
        for layer in range(layers):
            if codes[layer, i] != kernel.IDENTITY:
                todo += 1
        if todo == 0:
            _copy(src[i], dst[i])
            continue
        cur = src[i]
        for layer in range(layers):
            code = codes[layer, i]
            if code == kernel.IDENTITY:
                continue
            out = dst[i] if todo % 2 == 1 else scratch[i]
            apply(code, params[layer, i], cur, out, fill, kernel)
            cur = out
            todo -= 1
