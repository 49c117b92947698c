"""`fastrsb verify`: check a converted dataset against its manifest and decode its samples.

Stored image sizes (<split>.sizes.npy, what the shard-reading backends place their crops by) are
checked three ways: the record itself (SplitInfo.image_sizes: one row per sample, sides within
1..max_resolution), every checked shard sample's decoded JPEG, and every sample's height/width in the
.beton's metadata (all of them, in --quick too: the metadata is read whole anyway)."""
from __future__ import annotations

import random
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np

from dataprep.images import BadImage, decode_jpeg
from dataprep.layout import DatasetError, open_dataset, read_wds_index, sha256_file


class VerifyError(DatasetError):
    """The dataset does not match its manifest or holds a sample that does not decode."""


def _size_mismatch(split, i: int, what: str, h: int, w: int, sizes: np.ndarray) -> VerifyError:
    return VerifyError(f"{split.root / split.sizes}: {split.describe_sample(i)} is {h}x{w} (height x width) {what}, "
                       f"the size record says {int(sizes[i, 0])}x{int(sizes[i, 1])}")


def _pick(n: int, quick: bool, rng: random.Random, k: int = 64) -> list[int]:
    """Every sample, or with quick a few random ones plus the first and the last."""
    if not quick or n <= k:
        return list(range(n))
    return sorted(set(rng.sample(range(n), k)) | {0, n - 1})


def _check_dali(split, labels: np.ndarray, sizes: np.ndarray, quick: bool, rng: random.Random) -> list[bytes | None]:
    """Returns the JPEG bytes of the checked samples by global index (None where not read)."""
    jpegs: list[bytes | None] = [None] * len(labels)
    base = 0
    for sh in split.shards:
        tar_path, idx_path = split.root / sh["tar"], split.root / sh["index"]
        entries = read_wds_index(idx_path)
        if len(entries) != sh["num_samples"]:
            raise VerifyError(f"{idx_path}: {len(entries)} samples, manifest says {sh['num_samples']}")
        with tarfile.open(tar_path) as tar:
            jpg_members = {m.offset_data: m for m in tar.getmembers() if m.name.endswith(".jpg")}
        with open(tar_path, "rb") as f:
            for k in _pick(len(entries), quick, rng):
                e, i = entries[k], base + k
                for ext in ("jpg", "cls"):
                    if ext not in e:
                        raise VerifyError(f"{idx_path}: sample {k} has no .{ext} component")
                f.seek(e["cls"][0])
                cls = f.read(e["cls"][1])
                if cls != str(int(labels[i])).encode():
                    raise VerifyError(f"{tar_path}: sample {k} (dataset index {i}) has label {cls!r}, manifest order says {labels[i]}")
                f.seek(e["jpg"][0])
                data = f.read(e["jpg"][1])
                member = jpg_members.get(e["jpg"][0])
                if member is None or member.size != e["jpg"][1]:
                    raise VerifyError(f"{idx_path}: entry {k} does not point at a .jpg member of {tar_path}")
                try:
                    arr = decode_jpeg(data)
                except (BadImage, OSError, SyntaxError) as err:
                    raise VerifyError(f"{tar_path}: sample {member.name} does not decode: {err}") from None
                if arr.shape[:2] != tuple(sizes[i]):
                    raise _size_mismatch(split, i, "as its JPEG decodes", *arr.shape[:2], sizes)
                jpegs[i] = data
        base += len(entries)
    if base != len(labels):
        raise VerifyError(f"{split.root}/dali: shards hold {base} '{split.name}' samples, manifest says {len(labels)}")
    return jpegs


def _check_ffcv(split, labels: np.ndarray, sizes: np.ndarray, quick: bool, rng: random.Random, dali_jpegs) -> None:
    try:
        from ffcv.reader import Reader
    except ImportError as e:
        raise VerifyError(f"verifying the ffcv format needs the ffcv package: {e}") from e
    path = split.beton_path
    try:
        reader = Reader(str(path))
    except Exception as e:  # ffcv raises assorted errors on a damaged header
        raise VerifyError(f"{path}: not a readable .beton ({type(e).__name__}: {e})") from None
    if reader.num_samples != len(labels):
        raise VerifyError(f"{path}: {reader.num_samples} samples, manifest says {len(labels)}")
    if set(reader.field_names) != {"image", "label"}:
        raise VerifyError(f"{path}: fields {reader.field_names}, expected image and label")
    meta = reader.metadata
    img_col = f"f{reader.field_names.index('image')}"
    lab_col = f"f{reader.field_names.index('label')}"
    got = np.asarray(meta[lab_col], dtype=np.int64)
    if not np.array_equal(got, labels):
        bad = int(np.flatnonzero(got != labels)[0])
        raise VerifyError(f"{path}: sample {bad} has label {got[bad]}, manifest order says {labels[bad]}")
    hw = np.stack([np.asarray(meta[img_col]["height"], np.int64), np.asarray(meta[img_col]["width"], np.int64)], 1)
    if not np.array_equal(hw, sizes):
        bad = int(np.flatnonzero((hw != sizes).any(axis=1))[0])
        raise _size_mismatch(split, bad, f"in {path.name}'s metadata", int(hw[bad, 0]), int(hw[bad, 1]), sizes)
    alloc = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    with open(path, "rb") as f:
        for i in _pick(len(labels), quick, rng):
            rec = meta[img_col][i]
            ptr, h, w, mode = int(rec["data_ptr"]), int(rec["height"]), int(rec["width"]), int(rec["mode"])
            if ptr not in alloc:
                raise VerifyError(f"{path}: sample {i} points outside the allocation table")
            f.seek(ptr)
            data = f.read(alloc[ptr])
            if mode == 0:  # jpg
                try:
                    arr = decode_jpeg(data)
                except (BadImage, OSError, SyntaxError) as err:
                    raise VerifyError(f"{path}: sample {i} does not decode: {err}") from None
                if arr.shape[:2] != (h, w):
                    raise VerifyError(f"{path}: sample {i} decodes to {arr.shape[:2]}, metadata says {(h, w)}")
                if dali_jpegs is not None and dali_jpegs[i] is not None and dali_jpegs[i] != data:
                    raise VerifyError(f"{path}: sample {i} differs from the same sample in the DALI shards")
            elif len(data) < h * w * 3:
                raise VerifyError(f"{path}: raw sample {i} holds {len(data)} bytes, {h}x{w}x3 needs {h * w * 3}")


def verify(root: str | Path, quick: bool = False, log: Callable[[str], None] = print, seed: int = 0) -> None:
    ds = open_dataset(root)  # manifest present, every listed file present with its size
    m = ds.manifest
    for rel, meta in m["files"].items():
        p = ds.root / rel
        big = p.suffix in (".tar", ".beton")
        if quick and big:
            continue  # sizes were checked; quick mode skips hashing the bulk data
        if sha256_file(p) != meta["sha256"]:
            raise VerifyError(f"{p}: sha256 differs from the manifest (the file was modified or is damaged)")
    rng = random.Random(seed)
    for name, s in m["splits"].items():
        split = ds.split(name)
        if len(s["per_class"]) != ds.num_classes or sum(s["per_class"]) != s["num_samples"]:
            raise VerifyError(f"manifest: split '{name}' per_class does not add up to num_samples over {ds.num_classes} classes")
        labels = split.labels
        try:
            sizes = split.image_sizes()
        except DatasetError as e:
            raise VerifyError(str(e)) from None
        jpegs = _check_dali(split, labels, sizes, quick, rng) if "dali" in ds.formats else None
        if "ffcv" in ds.formats:
            _check_ffcv(split, labels, sizes, quick, rng, jpegs)
        log(f"[verify] {name}: {s['num_samples']} samples OK ({', '.join(ds.formats)}{', quick' if quick else ''})")
    log(f"[verify] {ds.root}: OK")
