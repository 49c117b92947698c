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


# ---- the same images in the Hub's layouts ---------------------------------------------------------------------------
# `fastrsb convert` reads the Hub's parquet shards and timm's WebDataset tars; these re-pack a class-folder tree into
# both, so the three routes can be run (and compared) on the same images. Shards are shuffled, as the Hub's are.

HUB_SPLITS = {"train": "train", "val": "validation"}


def shuffled_records(tree: str | Path, seed: int = 0) -> dict[str, list[tuple[Path, int]]]:
    """split -> [(image file, label)] of TREE/<split>/<class>/*, labels the sorted class folders' indices (the
    folder route's), in a seeded random order."""
    tree, rng = Path(tree), np.random.default_rng(seed)
    classes = sorted(d.name for d in (tree / "train").iterdir() if d.is_dir())
    out = {}
    for split in HUB_SPLITS:
        if not (tree / split).is_dir():
            continue
        records = [(p, c) for c, name in enumerate(classes)
                   for p in sorted((tree / split / name).rglob("*")) if p.is_file() and not p.name.startswith(".")]
        out[split] = [records[k] for k in rng.permutation(len(records))]
    return out


def _hub_shards(records: list, count: int) -> list[list]:
    return [records[k::count] for k in range(count)]


def write_parquet_shards(dest: str | Path, records: dict[str, list[tuple[Path, int]]], classes: list[str] | None,
                         files_per_split: int = 2, rows_per_group: int = 100) -> list[Path]:
    """DEST/data/{train,validation}-NNNNN-of-NNNNN.parquet as the Hub's `datasets` writes them (pyarrow): columns
    image {bytes, path} and label, the ClassLabel names (when given) in the schema's `huggingface` metadata, row
    groups of rows_per_group (the Hub's image datasets use 100). Returns the files written."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    features = {"image": {"_type": "Image"}, "label": {"dtype": "int64", "_type": "Value"}}
    if classes is not None:
        features["label"] = {"names": list(classes), "_type": "ClassLabel"}
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())],
                       metadata={"huggingface": json.dumps({"info": {"features": features}})})
    written = []
    for split, split_records in records.items():
        shards = _hub_shards(split_records, files_per_split)
        for k, shard in enumerate(shards):
            path = Path(dest) / "data" / f"{HUB_SPLITS.get(split, split)}-{k:05d}-of-{len(shards):05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            table = pa.table({"image": [{"bytes": p.read_bytes(), "path": p.name} for p, _ in shard],
                              "label": [label for _, label in shard]}, schema=schema)
            pq.write_table(table, path, row_group_size=rows_per_group)
            written.append(path)
    return written


def write_wds_shards(dest: str | Path, records: dict[str, list[tuple[Path, int]]], files_per_split: int = 2,
                     prefix: str = "imagenet1k") -> list[Path]:
    """DEST/<prefix>-{train,validation}-NNNN.tar as timm publishes them: per image KEY.jpg (KEY.webp/.png for those
    formats) + KEY.cls (the label in ASCII) + KEY.json, written with tarfile. Returns the files written."""
    import io
    import json
    import tarfile

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    written = []
    for split, split_records in records.items():
        for k, shard in enumerate(_hub_shards(split_records, files_per_split)):
            path = Path(dest) / f"{prefix}-{HUB_SPLITS.get(split, split)}-{k:04d}.tar"
            path.parent.mkdir(parents=True, exist_ok=True)
            with tarfile.open(path, "w") as tar:
                for p, label in shard:
                    key = p.stem.replace(".", "_")
                    ext = {".webp": "webp", ".png": "png"}.get(p.suffix.lower(), "jpg")
                    add(tar, f"{key}.{ext}", p.read_bytes())
                    add(tar, f"{key}.cls", str(label).encode())
                    add(tar, f"{key}.json", json.dumps({"filename": p.name, "label": label}).encode())
            written.append(path)
    return written
