"""The embedded default dataset: scikit-learn's handwritten digits (1,797 real 8x8 scans,
10 classes, shipped inside the package, so nothing is downloaded) written as RGB JPEG
class folders, upscaled so that random-resized-crop and RandAugment have pixels to work on."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dataprep.files import atomic_write

VAL_EVERY = 5  # every 5th image of a class goes to val: a stratified 80/20 split


def write_digits(dest: str | Path, image_size: int = 64, quality: int = 95) -> Path:
    """Write DEST/train/<digit>/*.jpg and DEST/val/<digit>/*.jpg; returns DEST. Idempotent."""
    from sklearn.datasets import load_digits

    dest = Path(dest)
    digits = load_digits()
    seen = np.zeros(10, dtype=int)
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        split = "val" if seen[label] % VAL_EVERY == VAL_EVERY - 1 else "train"
        seen[label] += 1
        folder = dest / split / str(label)
        path = folder / f"digit_{i:04d}.jpg"
        if path.exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        # ink is 0..16 on white paper; bicubic upscaling keeps strokes smooth
        gray = Image.fromarray((255 - img * (255 / 16)).astype(np.uint8), "L")
        gray = gray.resize((image_size, image_size), Image.BICUBIC)
        # durable=False: regenerable demo data, and 1,797 files x 2 fsyncs would be most of the demo's set-up
        atomic_write(path, lambda tmp: gray.convert("RGB").save(tmp, format="JPEG", quality=quality), durable=False)
    return dest
