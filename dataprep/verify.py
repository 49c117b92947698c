"""`fastrsb verify`: check a converted dataset against its manifest and decode its samples.

Every stored sample is read from each file that holds it (the DALI shard and the .beton), checked against the
crc32 the converter recorded for it (<split>.samples.tsv: a damaged sample that still decodes is caught too),
decoded, and its label and size compared with <split>.labels.npy and <split>.sizes.npy. Every damaged sample
found is reported, named by SplitInfo.describe_sample (index, source record, shard member, .beton), and then
verify fails; a file whose structure is broken (a shard index that does not match its tar, a .beton ffcv cannot
open) stops it at once. Stored image sizes (what the shard-reading backends place their crops by) are checked
three ways: the record itself (SplitInfo.image_sizes: one row per sample, sides within 1..max_resolution),
every checked shard sample's decoded JPEG, and every sample's height/width in the .beton's metadata (all of
them, in --quick too: the metadata is read whole anyway)."""
from __future__ import annotations

import random
import tarfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from dataprep.images import BadImage, decode_jpeg
from dataprep.files import sha256_file
from dataprep.layout import DatasetError, SplitInfo, open_dataset, read_wds_index

_BULK = (".tar", ".beton")  # data files: a damaged one is read on to name its damaged samples
_Problem = tuple[str, int, str]  # (split, sample index, what is wrong), one per finding


class VerifyError(DatasetError):
    """The dataset does not match its manifest or holds a sample that does not decode."""


def _size_mismatch(split: SplitInfo, i: int, what: str, h: int, w: int, sizes: np.ndarray) -> _Problem:
    return (split.name, i, f"{split.root / split.sizes}: {split.describe_sample(i)} is {h}x{w} (height x width) "
                           f"{what}, the size record says {int(sizes[i, 0])}x{int(sizes[i, 1])}")


def _pick(n: int, quick: bool, rng: random.Random, k: int = 64) -> list[int]:
    """Every sample, or with quick a few random ones plus the first and the last."""
    if not quick or n <= k:
        return list(range(n))
    return sorted(set(rng.sample(range(n), k)) | {0, n - 1})


def _labels_name(split: SplitInfo) -> str:
    return split.label_file or "the manifest's per-class order"


def _check_stored(split: SplitInfo, i: int, data: bytes, held_in: str, expected_crc: int | None,
                  problems: list[_Problem]) -> np.ndarray | None:
    """Checksum, then decode, of sample i's stored JPEG as read from held_in; returns its pixels when they decode."""
    if expected_crc is not None and zlib.crc32(data) != expected_crc:
        problems.append((split.name, i, f"{split.describe_sample(i)}: checksum differs in {held_in} (crc32 "
                                        f"{zlib.crc32(data):08x}, expected {expected_crc:08x})"))
    try:
        return decode_jpeg(data)
    except (BadImage, OSError, SyntaxError) as err:
        problems.append((split.name, i, f"{split.describe_sample(i)}: does not decode from {held_in}: {err}"))
        return None


def _check_dali(split: SplitInfo, labels: np.ndarray, sizes: np.ndarray, crcs: np.ndarray | None, quick: bool,
                rng: random.Random, problems: list[_Problem]) -> dict[int, int]:
    """Checks the shards' samples; returns the crc32 of each sample read, by dataset index."""
    read_crcs: dict[int, int] = {}
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
                member = jpg_members.get(e["jpg"][0])
                if member is None or member.size != e["jpg"][1]:
                    raise VerifyError(f"{idx_path}: entry {k} does not point at a .jpg member of {tar_path}")
                f.seek(e["cls"][0])
                cls = f.read(e["cls"][1])
                if cls != str(int(labels[i])).encode():
                    problems.append((split.name, i, f"{tar_path}: sample {k} (dataset index {i}) has label {cls!r}, "
                                                    f"{_labels_name(split)} says {labels[i]}"))
                f.seek(e["jpg"][0])
                data = f.read(e["jpg"][1])
                read_crcs[i] = zlib.crc32(data)
                arr = _check_stored(split, i, data, sh["tar"], None if crcs is None else int(crcs[i]), problems)
                if arr is not None and arr.shape[:2] != tuple(sizes[i]):
                    problems.append(_size_mismatch(split, i, "as its JPEG decodes", *arr.shape[:2], sizes))
        base += len(entries)
    if base != len(labels):
        raise VerifyError(f"{split.root}/dali: shards hold {base} '{split.name}' samples, manifest says {len(labels)}")
    return read_crcs


def _check_ffcv(split: SplitInfo, labels: np.ndarray, sizes: np.ndarray, expected_crc: Callable[[int], int | None],
                quick: bool, rng: random.Random, problems: list[_Problem]) -> None:
    """expected_crc(i): the crc32 sample i's bytes in the .beton must have, or None where nothing says."""
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
    for bad in np.flatnonzero(got != labels).tolist():
        problems.append((split.name, bad, f"{path}: sample {bad} has label {got[bad]}, {_labels_name(split)} says "
                                          f"{labels[bad]}"))
    hw = np.stack([np.asarray(meta[img_col]["height"], np.int64), np.asarray(meta[img_col]["width"], np.int64)], 1)
    for bad in np.flatnonzero((hw != sizes).any(axis=1)).tolist():
        problems.append(_size_mismatch(split, bad, f"in {path.name}'s metadata", int(hw[bad, 0]), int(hw[bad, 1]),
                                       sizes))
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
                arr = _check_stored(split, i, data, split.beton, expected_crc(i), problems)
                if arr is not None and arr.shape[:2] != (h, w):
                    problems.append((split.name, i, f"{split.describe_sample(i)}: decodes to {arr.shape[:2]} from "
                                                    f"{split.beton}, its metadata says {(h, w)}"))
            elif len(data) < h * w * 3:
                raise VerifyError(f"{path}: raw sample {i} holds {len(data)} bytes, {h}x{w}x3 needs {h * w * 3}")


def _beton_crc(settings: dict, crcs: np.ndarray | None, dali_crcs: dict[int, int]) -> Callable[[int], int | None]:
    """What a .beton sample's bytes must hash to: in the jpg write mode the .beton stores the shards' JPEG bytes, so
    the recorded crc32 (a format-2 dataset has none: then the crc32 of the same sample as read from its shard);
    the other write modes store ffcv's own encodings, which nothing records."""
    if settings.get("write_mode", "jpg") != "jpg":
        return lambda i: None
    if crcs is not None:
        return lambda i: int(crcs[i])
    return dali_crcs.get


def verify(root: str | Path, quick: bool = False, log: Callable[[str], None] = print, seed: int = 0) -> None:
    """Check every split of the dataset at root; raises VerifyError naming every damaged sample found."""
    ds = open_dataset(root)  # manifest present, every listed file present with its size
    m = ds.manifest
    damaged_files = []
    for rel, meta in m["files"].items():
        p = ds.root / rel
        big = p.suffix in _BULK
        if quick and big:
            continue  # sizes were checked; quick mode skips hashing the bulk data
        if sha256_file(p) != meta["sha256"]:
            if not big:  # a listing, index or record: everything else is read through it
                raise VerifyError(f"{p}: sha256 differs from the manifest (the file was modified or is damaged)")
            damaged_files.append(f"{p}: sha256 differs from the manifest (the file was modified or is damaged)")
    rng = random.Random(seed)
    problems: list[_Problem] = []
    for name, s in m["splits"].items():
        split = ds.split(name)
        if len(s["per_class"]) != ds.num_classes or sum(s["per_class"]) != s["num_samples"]:
            raise VerifyError(f"manifest: split '{name}' per_class does not add up to num_samples over {ds.num_classes} classes")
        try:
            labels, sizes, crcs = split.labels, split.image_sizes(), split.checksums()
        except DatasetError as e:
            raise VerifyError(str(e)) from None
        found_before = len(problems)
        dali_crcs = _check_dali(split, labels, sizes, crcs, quick, rng, problems) if "dali" in ds.formats else {}
        if "ffcv" in ds.formats:
            _check_ffcv(split, labels, sizes, _beton_crc(m["settings"], crcs, dali_crcs), quick, rng, problems)
        found = len({i for _, i, _ in problems[found_before:]})
        log(f"[verify] {name}: {s['num_samples']} samples {f'checked, {found} damaged or mismatched' if found else 'OK'} "
            f"({', '.join(ds.formats)}{', quick' if quick else ''})")
    if problems or damaged_files:
        samples = len({(name, i) for name, i, _ in problems})
        raise VerifyError(f"{ds.root}: {samples} damaged or mismatched sample(s) in {len(damaged_files)} damaged "
                          f"file(s) (re-running the same `fastrsb convert` rewrites what was damaged):\n"
                          + "\n".join(f"  {line}" for line in [p[2] for p in problems] + damaged_files))
    log(f"[verify] {ds.root}: OK")
