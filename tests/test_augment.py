"""Device-side augmentation on real photographs: timm's PIL RandAugment is the oracle."""
from __future__ import annotations

import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import auto_augment as aa

from fastrsb.augment import BatchAugment, apply_op, op_table
from fastrsb.augment.op_table import IMAGENET_FILL, level_to_arg
from fastrsb.augment.randaugment import (RAND_INCREASING_TRANSFORMS, RAND_TRANSFORMS, RandAugment, apply_op_args,
                                         parse_rand_augment)
from fastrsb.config import AugmentConfig

# (device, impl): the CPU runs both implementations (the numba kernels it uses by default, and the torch
# ops that are the cuda path's CPU twin); on a machine with a GPU the torch ops also run on cuda
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TARGETS = [("cpu", "numba"), ("cpu", "torch")] + [("cuda", "torch")] * torch.cuda.is_available()
OPS = sorted(set(RAND_TRANSFORMS + RAND_INCREASING_TRANSFORMS) | set(op_table.OPS))  # every row of the op table
GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
ENHANCE_INC = {"ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"}
TIMM_SIGNED = GEOMETRIC | ENHANCE_INC  # the ops whose argument timm negates at random (_randomly_negate)


def photographs() -> list[Image.Image]:
    """scikit-image's bundled photos at odd sizes, plus any in $FASTRSB_PARITY_IMAGES."""
    import skimage.data as sd

    imgs = [Image.fromarray(sd.astronaut()).resize((223, 157)), Image.fromarray(sd.coffee()).resize((160, 107)),
            Image.fromarray(sd.chelsea()).resize((131, 199))]
    extra = os.environ.get("FASTRSB_PARITY_IMAGES")
    if extra:
        for p in sorted(Path(extra).iterdir()):
            try:
                imgs.append(Image.open(p).convert("RGB"))
            except OSError:
                continue
    return imgs


def timm_op(img: Image.Image, name: str, level: float) -> Image.Image | None:
    """timm's PIL op at `level`, positive direction, bilinear, ImageNet fill. None where PIL refuses
    the argument (Pillow >= 10 rejects posterize to 0 bits; we keep timm's old meaning: all black)."""
    hp = {"translate_const": 100, "img_mean": IMAGENET_FILL}
    random.seed(0)
    args = aa.LEVEL_TO_ARG[name](level, hp) if aa.LEVEL_TO_ARG[name] else ()
    if name in GEOMETRIC:
        args = tuple(abs(a) for a in args)
    if name in ENHANCE_INC:
        args = (max(0.1, 1.0 + level / 10 * 0.9),)
    try:
        return aa.NAME_TO_OP[name](img, *args, fillcolor=IMAGENET_FILL, resample=Image.BILINEAR)
    except ValueError:
        return None


def to_batch(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device,impl", TARGETS)
@pytest.mark.parametrize("name", OPS)
def test_op_parity_with_timm(name, device, impl):
    """Every op against timm's PIL op on real photographs at levels across 0..10: identical, every pixel,
    for both implementations (the numba kernels and the torch ops that run on cuda compute in PIL's own
    integer, float32 and double arithmetic)."""
    for img in photographs():
        batch = to_batch(img).to(device)
        for level in (0, 1, 2.5, 4, 5.5, 7, 8, 9.3, 10):
            ref = timm_op(img, name, level)
            if ref is None:
                continue
            ours = apply_op(batch, name, level, impl=impl)[0].permute(1, 2, 0).cpu().numpy().astype(int)
            diff = np.abs(np.asarray(ref).astype(int) - ours)
            assert diff.max() == 0, (name, level, (diff > 0).mean())


@pytest.mark.parametrize("impl", ["numba", "torch"])
@pytest.mark.parametrize("size", [(1, 1), (2, 3), (3, 2)])
def test_tiny_images_match_timm(size, impl):
    """Images too small for the 3x3 smoothing filter or a full bilinear neighbourhood."""
    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8))
    for name in OPS:
        for level in (0, 5, 10):
            ref = timm_op(img, name, level)
            if ref is None:
                continue
            ours = apply_op(to_batch(img), name, level, impl=impl)[0].permute(1, 2, 0).numpy().astype(int)
            assert np.abs(np.asarray(ref).astype(int) - ours).max() == 0, (name, level)


@pytest.mark.parametrize("device,impl", TARGETS)
def test_parity_in_both_directions_at_any_magnitude(device, impl):
    """timm's own level -> argument mapping (its random negation included; ops it never negates ignore
    the sign) at noisy magnitudes: our level_to_arg gives the same double, and both implementations the
    same pixels, on a photograph whose sides are odd and unequal (and on any in $FASTRSB_PARITY_IMAGES)."""
    hp = {"translate_const": 100, "img_mean": IMAGENET_FILL}
    rng = np.random.default_rng(0)
    images = [photographs()[2].resize((97, 61))] + photographs()[3:]
    for name, img in ((name, img) for name in OPS for img in images):
        for level in rng.uniform(0, 10, 8):
            random.seed(int(rng.integers(1 << 30)))
            args = aa.LEVEL_TO_ARG[name](level, hp) if aa.LEVEL_TO_ARG[name] else ()
            negated = bool(args) and name in TIMM_SIGNED and (args[0] < 1.0 if name in ENHANCE_INC else args[0] < 0)
            # an op timm never negates must ignore the drawn sign: it gets -1
            sign = -1.0 if negated or name not in TIMM_SIGNED else 1.0
            ours = level_to_arg(name, torch.tensor([level], dtype=torch.float64), torch.tensor([sign]))
            if args:
                assert ours.item() == args[0], (name, level, ours.item(), args)
            try:
                ref = aa.NAME_TO_OP[name](img, *args, fillcolor=IMAGENET_FILL, resample=Image.BILINEAR)
            except ValueError:  # Pillow >= 10 refuses posterize to 0 bits
                continue
            out = apply_op_args(to_batch(img).permute(0, 2, 3, 1).contiguous().to(device), name, ours, impl=impl)
            assert np.array_equal(np.asarray(ref), out[0].cpu().numpy()), (name, level, negated)


def test_impl_is_checked():
    with pytest.raises(ValueError, match="randaugment_impl"):
        RandAugment.from_config("rand-m9", impl="pil")
    with pytest.raises(ValueError, match="CPU only"):
        RandAugment.from_config("rand-m9", impl="numba", device=torch.device("meta"))
    with pytest.raises(ValueError, match="set up for cpu, got a batch on meta"):  # its ops were chosen for the CPU
        RandAugment.from_config("rand-m9")(torch.zeros(2, 3, 4, 4, dtype=torch.uint8, device="meta"))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CPU only"):
            apply_op(torch.zeros(1, 3, 4, 4, dtype=torch.uint8, device="cuda"), "Invert", 0, impl="numba")


def test_posterize_zero_bits_is_black_as_timm_meant():
    img = to_batch(photographs()[0])
    assert apply_op(img, "Posterize", 0).max() == 0


@pytest.mark.parametrize("config,expect", [
    ("rand-m9-mstd0.5", dict(magnitude=9, num_layers=2, prob=0.5, magnitude_std=0.5, increasing=False)),
    ("rand-m7-mstd0.5-inc1", dict(magnitude=7, magnitude_std=0.5, increasing=True)),
    ("rand-m6-n3-mstd101-mmax12-p0.3", dict(magnitude=6, num_layers=3, magnitude_std=math.inf, magnitude_max=12, prob=0.3)),
])
def test_parse_matches_timm(config, expect):
    spec = parse_rand_augment(config)
    for k, v in expect.items():
        assert getattr(spec, k) == v
    ref = aa.rand_augment_transform(config, {"translate_const": 100, "img_mean": IMAGENET_FILL})
    assert [op.name for op in ref.ops] == spec.ops and ref.num_layers == spec.num_layers
    assert ref.ops[0].prob == spec.prob


def _timm_decisions(config: str, n: int):
    """Record which op timm's RandAugment applies, and at what magnitude, over n images."""
    ra = aa.rand_augment_transform(config, {"translate_const": 100, "img_mean": IMAGENET_FILL})
    applied: list[tuple[str, float]] = []
    for op in ra.ops:
        def record(img, *args, _name=op.name, **kw):
            applied.append((_name, args[0] if args else 0.0))
            return img
        op.aug_fn = record
    img = Image.new("RGB", (8, 8))
    random.seed(0)
    np.random.seed(0)
    for _ in range(n):
        ra(img)
    return applied


def test_policy_statistics_match_timm():
    """Op frequencies (chi-square) and magnitude distributions (KS) of our per-sample draws vs timm."""
    from scipy import stats

    config, n = "rand-m7-mstd0.5-inc1", 6000
    ref = _timm_decisions(config, n)
    ra = RandAugment.from_config(config, seed=1)
    d = ra.draw(n)
    ops = ra.spec.ops
    ours = [(ops[o], m) for o, a, m in zip(d["op"].flatten().tolist(), d["apply"].flatten().tolist(),
                                            d["magnitude"].flatten().tolist()) if a]
    # how many ops apply per image: binomial(2, 0.5) in both
    assert abs(len(ours) - len(ref)) < 4 * math.sqrt(n)
    counts = np.array([[sum(1 for x in seq if x[0] == name) for name in ops] for seq in (ours, ref)])
    chi2, p, _, _ = stats.chi2_contingency(counts)
    assert p > 0.001, (p, counts)
    # magnitudes: timm's Rotate argument is 30 * m / 10 with a random sign; compare |arg| * 10 / 30
    ref_rot = [abs(a) * 10 / 30 for name, a in ref if name == "Rotate"]
    our_rot = [m for name, m in ours if name == "Rotate"]
    assert stats.ks_2samp(ref_rot, our_rot).pvalue > 0.001
    ref_sign = np.mean([a > 0 for name, a in ref if name == "Rotate"])
    our_sign = (d["sign"][d["apply"] & (d["op"] == ops.index("Rotate"))] > 0).float().mean().item()
    assert abs(ref_sign - our_sign) < 0.06


@pytest.mark.parametrize("device,impl", TARGETS)
def test_randaugment_keeps_dtype_shape_format_and_is_seeded(device, impl):
    batch = torch.cat([to_batch(photographs()[0].resize((64, 48)))] * 16).to(device).contiguous(memory_format=torch.channels_last)
    a, b, c = (RandAugment.from_config("rand-m9-mstd0.5-inc1", seed=seed, impl=impl, device=batch.device)(batch)
               for seed in (3, 3, 4))
    assert a.dtype == torch.uint8 and a.shape == batch.shape and a.is_contiguous(memory_format=torch.channels_last)
    assert a.device == batch.device
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert sum(not torch.equal(a[i], batch[i]) for i in range(16)) >= 8  # most images changed
    # each sample draws its own ops: identical inputs give different outputs
    assert len({a[i].sum().item() for i in range(16)}) > 4


@pytest.mark.parametrize("impl", ["numba", "torch"])
def test_batched_randaugment_applies_each_samples_own_ops_in_order(impl):
    """torch: the batch is sorted by op, worked on in groups and put back; numba: each image runs its
    own program in some thread. Either way the result must be exactly each sample's drawn ops applied
    to it alone, layer after layer; and the input is left untouched."""
    config, n = "rand-m9-n3-mstd0.5-inc1", 40
    photos = [to_batch(p.resize((56, 44))) for p in photographs()]
    batch = torch.cat([photos[i % len(photos)] for i in range(n)]).contiguous(memory_format=torch.channels_last)
    before = batch.clone()
    out = RandAugment.from_config(config, seed=5, impl=impl)(batch)
    assert torch.equal(batch, before)
    ra = RandAugment.from_config(config, seed=5, impl=impl)
    d, ops = ra.draw(n), ra.spec.ops
    assert d["apply"].any(0).sum() >= n // 2
    for i in range(n):
        x = batch[i:i + 1].permute(0, 2, 3, 1).contiguous()  # ops work on (M,H,W,3)
        for layer in range(ra.spec.num_layers):
            if d["apply"][layer, i]:
                name = ops[d["op"][layer, i]]
                arg = level_to_arg(name, d["magnitude"][layer, i:i + 1], d["sign"][layer, i:i + 1])
                x = apply_op_args(x, name, arg, impl)
        assert torch.equal(out[i], x[0].permute(2, 0, 1)), i
    nchw = apply_op(batch.contiguous(), "Rotate", 5, impl=impl)
    assert nchw.is_contiguous() and torch.equal(nchw, apply_op(batch, "Rotate", 5, impl=impl))


def test_numba_result_does_not_depend_on_thread_count():
    batch = torch.cat([to_batch(p.resize((64, 48))) for p in photographs()] * 8).contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = RandAugment.from_config("rand-m9-mstd0.5-inc1", seed=7, impl="numba")(batch)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, RandAugment.from_config("rand-m9-mstd0.5-inc1", seed=7, impl="numba")(batch))


def _aug(train=True, **kw):
    cfg = AugmentConfig(**kw)
    return BatchAugment(cfg, num_classes=10, label_smoothing=0.1, dtype=torch.float32, train=train,
                        device=torch.device("cpu"), seed=0)


def test_normalize_only_in_eval():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([1, 2, 3, 4])
    out, t = _aug(train=False, mixup_alpha=0.2, randaugment="rand-m9")(x, y)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    assert torch.allclose(out, (x.float() - mean) / std) and torch.equal(t, y)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("alphas", [dict(mixup_alpha=0.8, cutmix_alpha=0.0), dict(mixup_alpha=0.0, cutmix_alpha=1.0),
                                    dict(mixup_alpha=0.8, cutmix_alpha=1.0)],
                         ids=["mixup", "cutmix", "both"])
def test_mixup_is_timms_mixup(mode, alphas):
    """The batched Mixup/CutMix against timm's own Mixup run on the same numpy RNG state, batch after
    batch (mixup, cutmix and unmixed draws, mix_prob 0.7): the same pixels and soft targets, bit for bit."""
    from timm.data import Mixup

    x = torch.randint(0, 256, (8, 3, 20, 24), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    aug = _aug(**alphas, mix_mode=mode, mix_prob=0.7)
    ref = Mixup(**alphas, mode=mode, prob=0.7, label_smoothing=0.1, num_classes=10)
    unchanged = 0
    for seed in range(12):
        np.random.seed(seed)
        out, t = aug(x, y)
        np.random.seed(seed)
        ref_x, ref_t = ref(aug.normalize(x), y)
        assert torch.equal(out, ref_x) and torch.equal(t, ref_t), seed
        unchanged += torch.equal(out, aug.normalize(x))
    assert 0 < unchanged < 12 if mode == "batch" else unchanged < 12  # some batches drew no mixing


def test_mixup_mixes_pixels_and_targets_with_the_drawn_lambda():
    """Batch-mode mixup: every image is lam * itself + (1 - lam) * its partner (the flipped batch), and its
    target lam * its label + (1 - lam) * the partner's; with CutMix the pasted share of the image is the
    partner's share of the target."""
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    aug = _aug(mixup_alpha=1.0)
    aug.mixup.label_smoothing = 0.0
    np.random.seed(3)
    out, t = aug(x, y)
    lam = t[0, 0].item()
    assert 0.05 < lam < 0.95 and torch.allclose(t, lam * F.one_hot(y, 10) + (1 - lam) * F.one_hot(y.flip(0), 10))
    plain = aug.normalize(x)
    torch.testing.assert_close(out, lam * plain + (1 - lam) * plain.flip(0))
    cut = _aug(cutmix_alpha=1.0)
    cut.mixup.label_smoothing = 0.0
    black_white = torch.zeros(2, 3, 40, 40, dtype=torch.uint8)
    black_white[1] = 255  # sample 0 gets a box from sample 1 (timm mixes with the flipped batch)
    boxes = 0
    for seed in range(8):
        np.random.seed(seed)
        out, t = cut(black_white, torch.tensor([0, 1]))
        pasted = (out[0, 0] > 0).float().mean().item()  # share of sample 0 now from sample 1
        assert abs(pasted - t[0, 1].item()) < 1e-6
        boxes += 0 < pasted < 1
    assert boxes >= 4


def test_odd_batch_with_mixup_is_a_clear_error():
    with pytest.raises(ValueError, match="even batch"):
        _aug(mixup_alpha=0.2)(torch.zeros(3, 3, 8, 8, dtype=torch.uint8), torch.zeros(3, dtype=torch.long))


def test_unknown_randaugment_section_is_an_error():
    with pytest.raises(ValueError, match="augment.randaugment"):
        parse_rand_augment("rand-m9-q3")
