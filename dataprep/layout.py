"""On-disk layout of a converted dataset, shared by the converter, `verify` and the loaders.

    OUT/manifest.json                 written last, atomically: a dataset without it is incomplete
    OUT/<split>.beton                 FFCV: fields image (RGBImageField) and label (IntField)
    OUT/dali/<split>-NNNNN.tar        WebDataset shard: <key>.jpg + <key>.cls (label as ASCII)
    OUT/dali/<split>-NNNNN.idx        DALI webdataset index (wds2idx v1.2 format)
    OUT/<split>.samples.tsv           index, key, label, source path: which file each sample came from

Sample i of a split is the same image in every format: the converter orders a split by
(label, source path), so labels are `repeat(arange(C), per_class)`, and shard j holds the
samples after those of shards < j.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


class DatasetError(RuntimeError):
    """A converted dataset is missing, incomplete or does not match its manifest."""


def shard_stem(split: str, shard: int) -> str:
    return f"{split}-{shard:05d}"


def sha256_file(path: str | Path, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: str | Path, write: Callable[[Path], object], durable: bool = True) -> None:
    """Make `path` appear whole or not at all: write(tmp) fills the temporary sibling `.NAME.partial`,
    which is renamed over path. durable: the file's data is fsynced before the rename and the directory
    after it, so a crash or power loss right after leaves either the old file or the whole new one (the
    rename itself must reach the disk too). The one way fastrsb writes files that matter: checkpoints,
    .beton files, shards, sidecars, manifests, exported weights. A stale .partial of a killed writer is
    replaced by the next attempt."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.unlink(missing_ok=True)
    try:
        write(tmp)
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | Path, obj: object) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode())


def read_wds_index(path: str | Path) -> list[dict[str, tuple[int, int]]]:
    """Parse a DALI webdataset index: per sample {ext: (data_offset, size)}."""
    lines = Path(path).read_text().splitlines()
    if not lines or not lines[0].startswith("v1.2 "):
        raise DatasetError(f"{path}: not a DALI webdataset index (expected a 'v1.2 N' header)")
    n = int(lines[0].split()[1])
    samples = []
    for line in lines[1:]:
        parts = line.split()
        comp = {}
        for k in range(0, len(parts), 4):
            ext, off, size = parts[k], int(parts[k + 1]), int(parts[k + 2])
            comp[ext] = (off, size)
        samples.append(comp)
    if len(samples) != n:
        raise DatasetError(f"{path}: header says {n} samples, found {len(samples)}")
    return samples


@dataclass(frozen=True)
class ShardLocations:
    """Where each sample's JPEG bytes live in the DALI shards (arrays indexed by sample)."""

    tar_paths: list[Path]
    shard: np.ndarray  # int32 (num_samples,)
    offset: np.ndarray  # int64 data offset of <key>.jpg in its tar
    size: np.ndarray  # int64 byte count of <key>.jpg


@dataclass(frozen=True)
class SplitInfo:
    root: Path
    name: str
    num_samples: int
    per_class: list[int]
    shards: list[dict]  # [{"tar": rel, "index": rel, "num_samples": k}]
    beton: str | None  # relative path or None when ffcv was not written

    @property
    def labels(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.per_class), dtype=np.int64), self.per_class)

    @property
    def beton_path(self) -> Path:
        if self.beton is None:
            raise DatasetError(f"{self.root}: split '{self.name}' was converted without the ffcv format")
        return self.root / self.beton

    def shard_locations(self) -> ShardLocations:
        if not self.shards:
            raise DatasetError(f"{self.root}: split '{self.name}' was converted without the dali format")
        shard_ids, offsets, sizes, tars = [], [], [], []
        for j, sh in enumerate(self.shards):
            entries = read_wds_index(self.root / sh["index"])
            if len(entries) != sh["num_samples"]:
                raise DatasetError(f"{self.root / sh['index']}: {len(entries)} samples, manifest says {sh['num_samples']}")
            tars.append(self.root / sh["tar"])
            for e in entries:
                shard_ids.append(j)
                offsets.append(e["jpg"][0])
                sizes.append(e["jpg"][1])
        return ShardLocations(tars, np.asarray(shard_ids, np.int32), np.asarray(offsets, np.int64), np.asarray(sizes, np.int64))


@dataclass(frozen=True)
class ConvertedDataset:
    root: Path
    manifest: dict

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    @property
    def formats(self) -> list[str]:
        return self.manifest["settings"]["formats"]

    def split(self, name: str) -> SplitInfo:
        splits = self.manifest["splits"]
        if name not in splits:
            raise DatasetError(f"{self.root}: no split '{name}' (has: {', '.join(splits)})")
        s = splits[name]
        return SplitInfo(self.root, name, s["num_samples"], s["per_class"], s.get("dali_shards", []), s.get("ffcv"))


def open_dataset(root: str | Path) -> ConvertedDataset:
    """Open a converted dataset; cheap checks only (use `fastrsb verify` for the full check)."""
    root = Path(root)
    mpath = root / MANIFEST
    if not root.is_dir():
        raise DatasetError(f"dataset directory not found: {root}")
    if not mpath.is_file():
        raise DatasetError(f"{mpath} not found: not a converted dataset, or its conversion did not finish (re-run `fastrsb convert`)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{mpath} is not valid JSON: {e}") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DatasetError(f"{mpath}: format_version {manifest.get('format_version')!r}, this fastrsb reads {FORMAT_VERSION}")
    for rel, meta in manifest.get("files", {}).items():
        p = root / rel
        if not p.is_file():
            raise DatasetError(f"{p} is listed in the manifest but missing")
        if p.stat().st_size != meta["size"]:
            raise DatasetError(f"{p} has {p.stat().st_size} bytes, manifest says {meta['size']}")
    return ConvertedDataset(root, manifest)
