"""Small real image trees for tests: odd sizes, colour modes and broken files.

Each class has its own dominant colour, so a test can tell a sample's class from its pixels.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

CLASS_COLOURS = {"cat": (200, 40, 40), "dog": (40, 60, 200), "eel": (40, 180, 60)}


def textured(w: int, h: int, colour, seed: int) -> Image.Image:
    """A smooth photo-like texture around a class colour (JPEG-friendly, not flat noise)."""
    rng = np.random.default_rng(seed)
    small = rng.normal(0, 25, size=(max(2, h // 16), max(2, w // 16), 3))
    field = np.asarray(Image.fromarray(np.clip(small + 128, 0, 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), float)
    img = np.clip(np.asarray(colour, float) + (field - 128), 0, 255).astype(np.uint8)
    return Image.fromarray(img, "RGB")


def save_jpeg(img: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=kw.pop("quality", 90), **kw)
    return path


def make_good_tree(root: Path, per_class: int, classes=("cat", "dog", "eel"), size=(96, 72), seed: int = 0) -> Path:
    """A clean class-per-folder tree with `per_class` JPEGs per class."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            w, h = size[0] + (i * 7) % 23, size[1] + (i * 5) % 17
            save_jpeg(textured(w, h, CLASS_COLOURS[name], seed * 1000 + c * 100 + i), root / name / f"{name}_{i:04d}.JPEG")
    return root


def make_messy_tree(root: Path) -> dict:
    """train/ + val/ with every kind of trouble; returns {'good': {split: n}, 'bad': {relpath: reason-substring}}."""
    bad: dict[str, str] = {}
    good = {"train": 0, "val": 0}
    tr = root / "train"
    for c, name in enumerate(("cat", "dog", "eel")):
        col = CLASS_COLOURS[name]
        for i, (w, h) in enumerate([(37, 53), (500, 375), (1001, 20), (64, 64)]):
            save_jpeg(textured(w, h, col, c * 10 + i), tr / name / f"{name}_{i}.JPEG")
            good["train"] += 1
    # colour modes and formats in disguise, all of which must become RGB JPEG
    textured(80, 60, CLASS_COLOURS["cat"], 50).convert("L").save(tr / "cat" / "gray.JPEG", format="JPEG")
    textured(80, 60, CLASS_COLOURS["cat"], 51).convert("CMYK").save(tr / "cat" / "cmyk.JPEG", format="JPEG")
    rgba = textured(70, 90, CLASS_COLOURS["dog"], 52).convert("RGBA")
    rgba.save(tr / "dog" / "png_in_disguise.JPEG", format="PNG")
    textured(50, 40, CLASS_COLOURS["dog"], 53).convert("P").save(tr / "dog" / "palette.jpg", format="GIF")
    save_jpeg(textured(120, 90, CLASS_COLOURS["eel"], 54), tr / "eel" / "progressive.JPEG", progressive=True)
    save_jpeg(textured(66, 44, CLASS_COLOURS["eel"], 55), tr / "eel" / "ünïcödé_名前.JPEG")
    save_jpeg(textured(60, 60, CLASS_COLOURS["eel"], 56), tr / "eel" / "nested" / "deeper" / "inner.JPEG")
    good["train"] += 7
    # broken inputs: each must be skipped with a reason, none may reach an output
    buf = io.BytesIO()
    textured(300, 200, CLASS_COLOURS["dog"], 57).save(buf, format="JPEG", quality=90)
    (tr / "dog" / "truncated.JPEG").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    bad["train/dog/truncated.JPEG"] = "truncated"
    (tr / "dog" / "empty.JPEG").write_bytes(b"")
    bad["train/dog/empty.JPEG"] = "empty"
    (tr / "cat" / "notes.JPEG").write_text("this is not an image\n")
    bad["train/cat/notes.JPEG"] = "not an image"
    (tr / "eel" / "nested" / "junk.txt").write_text("junk")
    bad["train/eel/nested/junk.txt"] = "not an image"
    (tr / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden: ignored, not reported
    va = root / "val"
    for c, name in enumerate(("cat", "dog", "eel")):
        for i in range(3):
            save_jpeg(textured(90 + i, 70, CLASS_COLOURS[name], 100 + c * 10 + i), va / name / f"v_{name}_{i}.JPEG")
            good["val"] += 1
    (va / "eel" / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0garbage")
    bad["val/eel/broken.JPEG"] = "corrupt"
    return {"good": good, "bad": bad}


# Colour-coded images: every image is one flat colour that encodes its own number, so whatever crop,
# flip or resize a backend applies, its pixels still say which image it is.
_LEVELS = (24, 72, 120, 168, 216)
CODES = np.array([(_LEVELS[k % 5], _LEVELS[k // 5 % 5], _LEVELS[k // 25]) for k in range(125)], np.float32)


def make_coded_tree(root: Path, per_class: dict[str, int], classes=("a", "b", "c")) -> Path:
    """root/<split>/<class>/<k>.JPEG, image k of odd size (40 + k % 13) x (30 + k % 7) in colour CODES[k]."""
    k = 0
    for split, n in per_class.items():
        for c in classes:
            for _ in range(n):
                path = root / split / c / f"{k:03d}.JPEG"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (40 + k % 13, 30 + k % 7), tuple(int(v) for v in CODES[k])).save(path, quality=95)
                k += 1
    return root


def sample_ids(data: Path, split: str, images) -> list[list[int]]:
    """Which dataset sample each image of each batch (uint8 NCHW tensors of coded images) is, read from its colour."""
    import torch

    rows = (data / f"{split}.samples.tsv").read_text().splitlines()[1:]
    sample_of_code = {int(Path(r.split("\t")[3]).stem): int(r.split("\t")[0]) for r in rows}
    codes_t = torch.from_numpy(CODES)
    out = []
    for x in images:
        codes = torch.cdist(x.float().mean(dim=(2, 3)), codes_t).argmin(1).tolist()
        assert all(c in sample_of_code for c in codes), "a colour that is not an image of this split"
        out.append([sample_of_code[c] for c in codes])
    return out


def damage_sample(data: Path, split: str, index: int, where: str = "start", nbytes: int = 16) -> None:
    """Overwrite `nbytes` of a stored sample's JPEG with zeros where the dataset holds it, the DALI shard and the
    .beton alike, file sizes unchanged: a disk error after conversion. where="start": its SOI and APP markers (no
    decoder recognises it); "scan": the scan header after its SOS marker (decoders fail part-way; a walk of the
    markers up to the frame header passes)."""
    from dataprep.layout import open_dataset

    info = open_dataset(data).split(split)
    starts = []  # (file, offset of the JPEG's first byte)
    if info.shards:
        loc = info.shard_locations()
        starts.append((loc.tar_paths[loc.shard[index]], int(loc.offset[index])))
    if info.beton is not None:
        from ffcv.reader import Reader

        reader = Reader(str(info.beton_path))
        starts.append((info.beton_path, int(reader.metadata[f"f{reader.field_names.index('image')}"][index]["data_ptr"])))
    for path, offset in starts:
        with open(path, "r+b") as f:
            f.seek(offset)
            at = 0 if where == "start" else f.read(1 << 16).index(b"\xff\xda") + 2
            f.seek(offset + at)
            f.write(b"\0" * nbytes)
