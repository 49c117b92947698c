"""ImageNet-like JPEGs for benchmarks: real photographs (scikit-image's bundled samples),
randomly cropped, flipped, colour-shifted and resized to ~500x375, saved at quality 90 —
the size and JPEG entropy of an average ImageNet train image, with no download."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina", "cat")


def _photos() -> list[np.ndarray]:
    import skimage.data as data

    return [getattr(data, name)() for name in PHOTOS]


def make_imagenet_like(dest: str | Path, num_images: int, num_classes: int = 10, size=(500, 375),
                       quality: int = 90, seed: int = 0, with_val: int = 0) -> Path:
    """Write DEST/train/<class>/*.JPEG (and DEST/val/... when with_val > 0). Idempotent."""
    dest = Path(dest)
    rng = np.random.default_rng(seed)
    photos = _photos()
    for split, n in (("train", num_images), ("val", with_val)):
        for i in range(n):
            c = i % num_classes
            path = dest / split / f"class_{c:03d}" / f"img_{i:06d}.JPEG"
            if path.exists():
                continue
            src = photos[rng.integers(len(photos))]
            h, w = src.shape[:2]
            ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            crop = src[y:y + ch, x:x + cw].astype(np.float32)
            crop = crop * rng.uniform(0.7, 1.3, size=3) + rng.uniform(-20, 20, size=3)
            img = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8))
            if rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            jitter = rng.integers(-40, 41)
            tw, th = (size[0] + jitter, size[1] + jitter // 2) if rng.random() < 0.75 else (size[1], size[0])
            path.parent.mkdir(parents=True, exist_ok=True)
            img.resize((tw, th), Image.BILINEAR).save(path, format="JPEG", quality=quality)
    return dest
