"""fastrsb's ffcv decoder against the libraries it reproduces (torchvision's crop boxes, Pillow's resize,
TurboJPEG's whole-image decode), and its determinism in a real ffcv Loader."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastrsb.data.crops import flip_of, random_resized_crop
from fastrsb.data.crops import center_crop_geometry
from fastrsb.data.ffcv_decode import jpeg_mcu_size, resample
from fastrsb.data.sampler import augmentation_keys
from tests.datagen import textured

pytestmark = pytest.mark.timeout(300)
FILTERS = {"bilinear": (Image.BILINEAR, False), "bicubic": (Image.BICUBIC, True)}


def photo_like(w: int, h: int, seed: int) -> Image.Image:
    """A smooth texture with sharp-edged blocks and noise: what JPEG and resampling find hard."""
    rng = np.random.default_rng(seed)
    img = np.asarray(textured(w, h, (120, 110, 90), seed), np.int16).copy()
    for _ in range(6):
        x, y = rng.integers(0, w - 8), rng.integers(0, h - 8)
        img[y:y + rng.integers(4, h // 3), x:x + rng.integers(4, w // 3)] = rng.integers(0, 256, 3)
    img += rng.integers(-12, 13, img.shape).astype(np.int16)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=kw.pop("quality", 90), **kw)
    return buf.getvalue()


# ----------------------------------------------------------------------------- crop boxes
@pytest.mark.parametrize("height,width", [(375, 500), (500, 375), (30, 300)])
def test_crop_boxes_follow_torchvision_random_resized_crop(height, width):
    """Area fraction, aspect ratio and position of 20,000 boxes have torchvision's distributions
    (two-sample KS tests; 30x300 mostly falls back to the centred crop); flips are fair."""
    from scipy.stats import ks_2samp
    from torchvision.transforms import RandomResizedCrop

    n = 20_000
    keys = augmentation_keys(3, 7, np.arange(n), np.zeros(n, np.int64))
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    ours = np.array([random_resized_crop(height, width, 0.08, 1.0, *log_ratio, k) for k in keys], float)
    torch.manual_seed(0)
    image = torch.empty(1, height, width)
    ref = np.array([RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)], float)

    def features(b):  # (top, left, h, w)
        return {"area": b[:, 2] * b[:, 3] / (height * width), "log aspect": np.log(b[:, 3] / b[:, 2]),
                "top": b[:, 0] / (height - b[:, 2] + 1), "left": b[:, 1] / (width - b[:, 3] + 1)}

    for name, values in features(ours).items():
        p = ks_2samp(values, features(ref)[name]).pvalue
        assert p > 1e-3, (name, p)
    flips = np.mean([flip_of(k) for k in keys])
    assert abs(flips - 0.5) < 0.015, flips


def test_crop_boxes_are_pure_functions_of_their_key():
    keys = augmentation_keys(0, 2, np.arange(50), np.zeros(50, np.int64))
    first = [random_resized_crop(375, 500, 0.08, 1.0, -0.29, 0.29, k) for k in keys]
    assert first == [random_resized_crop(375, 500, 0.08, 1.0, -0.29, 0.29, k) for k in keys]
    assert len(set(first)) == 50
    other_copy = augmentation_keys(0, 2, np.arange(50), np.ones(50, np.int64))  # the same images' second copy
    assert not set(first) & {random_resized_crop(375, 500, 0.08, 1.0, -0.29, 0.29, k) for k in other_copy}


# ----------------------------------------------------------------------------- resampling
@pytest.mark.parametrize("interpolation", FILTERS)
def test_resize_of_a_box_equals_pillows_to_the_bit(interpolation):
    """Pillow's Image.resize(size, filter, box) (22-bit fixed point, each pass rounded to uint8, Pillow 13's
    pass order), enlarging and shrinking, integer and fractional (float32) boxes, flipped or not."""
    pil_filter, bicubic = FILTERS[interpolation]
    rng = np.random.default_rng(1)
    for case in range(60):
        w, h = (int(rng.integers(40, 300)), int(rng.integers(40, 300)))
        img = photo_like(w, h, case)
        bw, bh = rng.uniform(4, w), rng.uniform(4, h)
        x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        box = tuple(float(np.float32(v)) for v in (x0, y0, x0 + bw, y0 + bh))
        if case % 2:
            box = tuple(float(round(v)) for v in box)
        out_w, out_h = int(rng.integers(8, 260)), int(rng.integers(8, 260))
        flip = bool(case % 3 == 0)
        expect = np.asarray(img.resize((out_w, out_h), pil_filter, box=box))
        got = np.empty((out_h, out_w, 3), np.uint8)
        x_scale = float(np.float32(box[2]) - np.float32(box[0])) / out_w  # Pillow's (in1 - in0) is float32
        y_scale = float(np.float32(box[3]) - np.float32(box[1])) / out_h
        resample(np.asarray(img), box[0], x_scale, 0.0, box[1], y_scale, 0.0, bicubic, flip, got)
        assert np.array_equal(got, expect[:, ::-1] if flip else expect), (case, box, (out_w, out_h))


def test_center_crop_geometry_is_torchvisions_resize_then_center_crop():
    """Val: one resize of the whole image with an output offset is torchvision's Resize(res / crop_pct)
    followed by CenterCrop(res), on the same pixels, to the bit."""
    from torchvision import transforms as T

    for w, h, res in [(120, 90, 32), (90, 120, 32), (500, 375, 224), (375, 500, 160), (64, 64, 56)]:
        img = photo_like(w, h, w + h)
        expect = np.asarray(T.Compose([T.Resize(math.floor(res / 0.875)), T.CenterCrop(res)])(img))
        y_scale, y_offset, x_scale, x_offset = center_crop_geometry(h, w, res, 0.875)
        got = np.empty((res, res, 3), np.uint8)
        resample(np.asarray(img), 0.0, x_scale, x_offset, 0.0, y_scale, y_offset, False, False, got)
        assert np.array_equal(got, expect), (w, h, res)


# ----------------------------------------------------------------------------- decoding
def _decode(data: bytes, box, out: int, bicubic=False, crop_max_area_fraction=None):
    from fastrsb.data.ffcv_decode import decode_box
    from fastrsb.data.ffcv_internals import IMDECODE

    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
    x0, y0, x1, y1 = box
    got = np.empty((out, out, 3), np.uint8)
    extra = () if crop_max_area_fraction is None else (crop_max_area_fraction,)
    encoded = np.frombuffer(data, np.uint8)
    outcome = decode_box(IMDECODE, encoded.ctypes.data, encoded.size, True, h, w, float(x0), (x1 - x0) / out, 0.0, float(y0),
                         (y1 - y0) / out, 0.0, bicubic, False, got, *extra)
    return got, outcome


def _pillow(data: bytes, box, out: int, pil_filter=Image.BILINEAR) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB").resize((out, out), pil_filter, box=box))


@pytest.mark.parametrize("subsampling", [0, 2])  # 4:4:4, 4:2:0
def test_decoded_box_at_full_scale_matches_pillow(subsampling):
    """For boxes under twice the output (no DCT scaling): the cropped-window decode gives the very pixels
    of the whole-image decode, and both are Pillow's resize(box) of Pillow's decode up to the JPEG decoders'
    IDCTs (TurboJPEG's fast integer IDCT, as libffcv asks, vs Pillow's accurate one): mean |diff| < 1.5
    grey levels and max <= 12 per box (measured: mean 0.94, max 7 on ImageNet-like q90 photographs)."""
    from fastrsb.data.ffcv_decode import CROPPED

    rng = np.random.default_rng(2)
    cropped = 0
    for case in range(24):
        w, h = int(rng.integers(200, 420)), int(rng.integers(200, 420))
        data = jpeg_bytes(photo_like(w, h, 100 + case), subsampling=subsampling)
        out = int(rng.integers(32, 120))
        bw, bh = int(rng.integers(out // 2, 2 * out)), int(rng.integers(out // 2, 2 * out))
        x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        box = (x0, y0, x0 + bw, y0 + bh)
        pil_filter, bicubic = FILTERS["bicubic" if case % 2 else "bilinear"]
        whole, outcome_whole = _decode(data, box, out, bicubic, crop_max_area_fraction=0.0)
        window, outcome_window = _decode(data, box, out, bicubic, crop_max_area_fraction=1.0)
        assert outcome_whole & 0xFF == 0 and not outcome_whole & CROPPED
        assert outcome_window & CROPPED
        cropped += 1
        assert np.array_equal(whole, window), case
        diff = np.abs(whole.astype(int) - _pillow(data, box, out, pil_filter))
        assert diff.mean() < 1.5 and diff.max() <= 12, (case, diff.mean(), diff.max())
    assert cropped == 24


def test_reduced_dct_scale_stays_close_to_pillow():
    """Boxes of at least twice the output decode at 1/2, 1/4 or 1/8 scale (TurboJPEG's scaled IDCT
    averages each block, then Pillow's filter resizes the rest): within mean |diff| < 3 and max <= 64
    of Pillow's full-resolution resize (measured on ImageNet-like q90 photographs: mean 0.88, worst box
    2.3, max 34)."""
    rng = np.random.default_rng(3)
    seen = set()
    for case in range(24):
        w, h = int(rng.integers(300, 520)), int(rng.integers(300, 520))
        data = jpeg_bytes(photo_like(w, h, 200 + case))
        out = int(rng.integers(24, 100))
        bw, bh = int(rng.integers(2 * out, w + 1)), int(rng.integers(2 * out, h + 1))
        x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
        box = (x0, y0, x0 + bw, y0 + bh)
        got, outcome = _decode(data, box, out)
        shift = outcome & 0xFF
        assert shift == int(math.log2(min(bw // out, bh // out, 8))), (box, out, shift)
        seen.add(shift)
        diff = np.abs(got.astype(int) - _pillow(data, box, out))
        assert diff.mean() < 3 and diff.max() <= 64, (case, shift, diff.mean(), diff.max())
    assert {1, 2} <= seen


def luma_1x4_jpeg(img: Image.Image) -> bytes:
    """A valid baseline JPEG TurboJPEG can decode but not crop: a 4:2:0 JPEG (luma sampled 2x2) relabelled
    as luma 1x4. Each MCU still holds 4 luma + 2 chroma blocks, so the data decodes cleanly (as a scrambled
    picture) for any size that is a multiple of 16 x 32, but TurboJPEG's transform cannot name the sampling."""
    data = bytearray(jpeg_bytes(img, subsampling=2))
    sof = data.index(b"\xff\xc0")
    assert data[sof + 11] == 0x22  # FF C0, length, precision, height, width, count, then component 1: id, HV
    data[sof + 11] = 0x14
    return bytes(data)


def test_a_jpeg_turbojpeg_cannot_crop_falls_back_to_a_whole_decode():
    from fastrsb.data.ffcv_decode import FALLBACK

    data = luma_1x4_jpeg(photo_like(256, 192, 9))
    encoded = np.frombuffer(data, np.uint8)
    assert jpeg_mcu_size(encoded.ctypes.data, encoded.size) == (8, 32)
    box = (100, 64, 140, 100)
    whole, outcome_whole = _decode(data, box, 32, crop_max_area_fraction=0.0)
    fallback, outcome = _decode(data, box, 32, crop_max_area_fraction=1.0)
    assert outcome & FALLBACK and not outcome_whole & FALLBACK
    assert np.array_equal(fallback, whole)
    diff = np.abs(fallback.astype(int) - _pillow(data, box, 32))  # Pillow reads it the same way
    assert diff.mean() < 1.5 and diff.max() <= 12


# ----------------------------------------------------------------------------- in an ffcv Loader
@pytest.fixture(scope="module")
def odd_dataset(tmp_path_factory):
    """Photo-like JPEGs stored as they are, one of them the luma-1x4 JPEG TurboJPEG cannot crop."""
    from dataprep.convert import convert

    root = tmp_path_factory.mktemp("odd")
    for k in range(24):
        path = root / "src" / "train" / ("a" if k % 2 else "b") / f"{k:03d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        img = photo_like(256, 192, 300 + k)
        path.write_bytes(luma_1x4_jpeg(img) if k == 5 else jpeg_bytes(img))
    m = convert(root / "src", root / "data", workers=2, progress=False, log=lambda s: None)
    assert m["splits"]["train"]["stored_as_is"] == 24
    return root / "data"


def _loader(data, workers, **over):
    from fastrsb.config import load_config
    from fastrsb.data import create_loader
    from fastrsb.dist import DistInfo

    items = {"backend": "ffcv", "path": str(data), "batch_size": 4, "train_res": 48, "workers": workers, "seed": 11,
             **over}
    return create_loader(load_config(None, [f"data.{k}={v}" for k, v in items.items()]), "train", DistInfo())


def _epoch(loader, epoch, start_batch=0):
    loader.set_epoch(epoch, start_batch)
    return [b.images.clone() for b in loader]


def test_same_seed_same_batches_across_loaders_worker_counts_and_resume(odd_dataset):
    """Two loaders, one and two decode threads: the same pixels, epoch by epoch; a resumed epoch gets the
    batches the whole epoch had left; another epoch gets other crops. Small boxes (scale 0.02-0.06) take
    the cropped-window path, and the JPEG TurboJPEG cannot crop is decoded whole, not dropped."""
    one, two = _loader(odd_dataset, 1, scale="[0.02,0.06]"), _loader(odd_dataset, 2, scale="[0.02,0.06]")
    a, b = _epoch(one, 3), _epoch(two, 3)
    assert len(a) == 6 and all(torch.equal(x, y) for x, y in zip(a, b))
    resumed = _epoch(two, 3, start_batch=4)
    assert len(resumed) == 2 and all(torch.equal(x, y) for x, y in zip(a[4:], resumed))
    assert not any(torch.equal(x, y) for x, y in zip(a, _epoch(one, 4)))
    stats = one.decode_stats.as_dict()
    assert stats["images"] == 48 and stats["fraction_cropped"] > 0.5 and stats["crop_fallbacks"] >= 1
    assert stats["decode_errors"] == 0
