"""On-disk layout of a converted dataset, shared by the converter, `verify` and the loaders.

    OUT/manifest.json                 written last, atomically: a dataset without it is incomplete
    OUT/<split>.beton                 FFCV: fields image (RGBImageField) and label (IntField)
    OUT/dali/<split>-NNNNN.tar        WebDataset shard: <key>.jpg + <key>.cls (label as ASCII)
    OUT/dali/<split>-NNNNN.idx        DALI webdataset index (wds2idx v1.2 format)
    OUT/<split>.samples.tsv           index, key, label, source record, crc32 of the stored JPEG (format 3)
    OUT/<split>.labels.npy            int64 (num_samples,): each sample's label (format 3)
    OUT/<split>.sizes.npy             int32 (num_samples, 2): (height, width) of each stored JPEG (format 2)

Sample i of a split is the same image in every format, and shard j holds the samples after those of
shards < j. A folder source's split is ordered by (label, source path); a Hub source (parquet, WebDataset)
keeps its own order, file by file and record by record, so labels are recorded per sample
(<split>.labels.npy). A format-2 dataset (folder sources only) has no labels file: its labels are
`repeat(arange(C), per_class)`.

Every listed file is in the manifest's `files` with its byte size and sha256. The sizes are those
of the JPEG as stored (after the converter's re-encode/resize to max_resolution), the same
numbers as the .beton's height/width, so a backend that reads the shards can place a crop without
decoding a header: `SplitInfo.image_sizes()`, a 10 MB array for ImageNet's 1.28M train images.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
FORMAT_VERSION = 3  # 3: <split>.labels.npy (any sample order) and a crc32 per sample; 2: <split>.sizes.npy
READABLE_FORMATS = (2, 3)  # what open_dataset reads; format 2's labels follow from per_class
LISTING_COLUMNS = ("index", "key", "label", "source", "crc32")  # <split>.samples.tsv; format 2 has no crc32
SPLITS = ("train", "val")


class DatasetError(RuntimeError):
    """A converted dataset is missing, incomplete or does not match its manifest."""


def shard_stem(split: str, shard: int) -> str:
    return f"{split}-{shard:05d}"


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


class ShardReader:
    """Sample i's stored JPEG bytes, read by offset from its tar shard: how everything that reads the shards reads
    them (the torch and dali backends, the decode benchmark). Each shard is opened once, on first use in the process
    that reads (DataLoader workers are processes of their own). read_ahead=False tells the kernel not to read past
    what is asked (data.order=block: read-ahead past a block brings back pages already dropped)."""

    def __init__(self, loc: ShardLocations, read_ahead: bool = True):
        self.loc, self.read_ahead = loc, read_ahead
        self._fds: dict[int, int] = {}

    def read(self, i: int) -> bytes:
        j = int(self.loc.shard[i])
        fd = self._fds.get(j)
        if fd is None:
            fd = self._fds[j] = os.open(self.loc.tar_paths[j], os.O_RDONLY)
            if not self.read_ahead:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return os.pread(fd, int(self.loc.size[i]), int(self.loc.offset[i]))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


@dataclass(frozen=True)
class SplitInfo:
    root: Path
    name: str
    num_samples: int
    per_class: list[int]
    shards: list[dict]  # [{"tar": rel, "index": rel, "num_samples": k}]
    beton: str | None  # relative path or None when ffcv was not written
    sizes: str | None = None  # relative path of <split>.sizes.npy
    listing: str | None = None  # relative path of <split>.samples.tsv
    max_resolution: int | None = None  # no stored side is longer (the converter's --max-resolution)
    label_file: str | None = None  # relative path of <split>.labels.npy; None: a format-2 dataset

    @cached_property
    def labels(self) -> np.ndarray:
        """int64 (num_samples,): sample i's label. Read from <split>.labels.npy (format 3) and checked against the
        manifest's per-class counts; a format-2 dataset's samples are in label order."""
        if self.label_file is None:
            return np.repeat(np.arange(len(self.per_class), dtype=np.int64), self.per_class)
        path = self.root / self.label_file
        labels = self._load_array(path, "labels")
        if labels.dtype.kind not in "iu" or labels.shape != (self.num_samples,):
            raise DatasetError(f"{path}: holds a {labels.dtype} array of shape {labels.shape}, expected integer "
                               f"({self.num_samples},): split '{self.name}' has {self.num_samples} samples")
        bad = np.flatnonzero((labels < 0) | (labels >= len(self.per_class)))
        if len(bad):
            raise DatasetError(f"{path}: {self.describe_sample(int(bad[0]))} has label {int(labels[bad[0]])}, "
                               f"outside the {len(self.per_class)} classes")
        if np.bincount(labels, minlength=len(self.per_class)).tolist() != list(self.per_class):
            raise DatasetError(f"{path}: its labels do not add up to the manifest's per-class counts of split "
                               f"'{self.name}'")
        return labels.astype(np.int64, copy=False)

    def _load_array(self, path: Path, what: str) -> np.ndarray:
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise DatasetError(f"{path}: not a readable .npy array of {what} ({e}); re-run `fastrsb convert` "
                               f"into {self.root}") from None

    @property
    def beton_path(self) -> Path:
        if self.beton is None:
            raise DatasetError(f"{self.root}: split '{self.name}' was converted without the ffcv format")
        return self.root / self.beton

    def image_sizes(self) -> np.ndarray:
        """int32 (num_samples, 2): the (height, width) of sample i's JPEG as stored in the shards (and the
        .beton's height/width, in every write mode), row i = dataset index i; read from <split>.sizes.npy
        without decoding anything (~4 ms for 1.28M samples, warm cache). A record that cannot be a stored image's size
        (length other than num_samples, a side < 1 or > the dataset's max resolution) is a DatasetError
        naming the file and, for a bad value, the sample."""
        if self.sizes is None:
            raise DatasetError(f"{self.root}: split '{self.name}' records no image sizes (a dataset older than "
                               f"format 2); re-run `fastrsb convert` into {self.root}")
        path = self.root / self.sizes
        arr = self._load_array(path, "image sizes")
        if arr.dtype.kind not in "iu" or arr.ndim != 2 or arr.shape[1] != 2:
            raise DatasetError(f"{path}: holds a {arr.dtype} array of shape {arr.shape}, expected integer "
                               f"(num_samples, 2) = (height, width) per sample")
        if len(arr) != self.num_samples:
            raise DatasetError(f"{path}: {len(arr)} image sizes, split '{self.name}' has {self.num_samples} samples")
        bad = arr < 1
        if self.max_resolution is not None:
            bad |= arr > self.max_resolution
        if bad.any():
            i = int(np.flatnonzero(bad.any(axis=1))[0])
            limit = f" (sides must be 1..{self.max_resolution})" if self.max_resolution is not None else ""
            raise DatasetError(f"{path}: {self.describe_sample(i)} records height x width "
                               f"{int(arr[i, 0])}x{int(arr[i, 1])}{limit}")
        return arr.astype(np.int32, copy=False)

    def describe_sample(self, i: int) -> str:
        """'train sample 37 (source S; stored in dali/train-00002.tar as member 000000037.jpg at byte 19968, and in
        train.beton)': the dataset index, the source record it came from (<split>.samples.tsv) and every file that
        holds it, for messages about one sample. Reads one line of the listing (seeking by an index of its line
        offsets, built on the first call: one pass over the file) and one shard's index; what cannot be read is
        left out of the message, which still names the index."""
        where = []
        try:
            where.append(f"source {self.listing_row(i)['source']}")
        except (OSError, IndexError, ValueError, DatasetError):
            pass
        stored = []
        try:
            start = 0
            for sh in self.shards:
                if i < start + sh["num_samples"]:
                    line = (self.root / sh["index"]).read_text().splitlines()[1 + i - start].split()
                    at = line.index("jpg")
                    stored.append(f"{sh['tar']} as member {line[at + 3]} at byte {line[at + 1]}")
                    break
                start += sh["num_samples"]
        except (OSError, IndexError, ValueError):
            pass
        if self.beton is not None:
            stored.append(self.beton)
        if stored:
            where.append("stored in " + ", and in ".join(stored))
        return f"{self.name} sample {i}" + (f" ({'; '.join(where)})" if where else "")

    @cached_property
    def _listing_line_starts(self) -> np.ndarray:
        """Byte offset of every line of <split>.samples.tsv (the header's first), read in 16 MiB pieces: 10 MB for
        ImageNet's 1.28M train samples, so finding a row is a seek."""
        if self.listing is None:
            raise DatasetError(f"{self.root}: split '{self.name}' has no samples listing")
        starts, pos = [np.zeros(1, np.int64)], 0
        with open(self.root / self.listing, "rb") as f:
            while chunk := f.read(1 << 24):
                starts.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == ord("\n")).astype(np.int64) + pos + 1)
                pos += len(chunk)
        return np.concatenate(starts)

    def listing_row(self, i: int) -> dict[str, str]:
        """Row i of <split>.samples.tsv as {column: value} (LISTING_COLUMNS; a format-2 listing has no crc32)."""
        starts = self._listing_line_starts
        if not 0 <= i < len(starts) - 2:
            raise IndexError(f"{self.root / self.listing}: no row for sample {i}")
        with open(self.root / self.listing, "rb") as f:
            f.seek(int(starts[i + 1]))
            return _listing_fields(f.readline().decode().rstrip("\n"))

    def checksums(self) -> np.ndarray | None:
        """uint32 (num_samples,): the crc32 of each stored JPEG as the converter wrote it (the shards' bytes, and the
        .beton's in its jpg write mode); None for a format-2 dataset, whose listing has none."""
        if self.listing is None:
            return None
        path = self.root / self.listing
        with open(path, encoding="utf-8") as f:
            if "crc32" not in f.readline().rstrip("\n").split("\t"):
                return None
            crcs = np.fromiter((int(_listing_fields(line.rstrip("\n"))["crc32"], 16) for line in f), np.uint32)
        if len(crcs) != self.num_samples:
            raise DatasetError(f"{path}: {len(crcs)} rows, split '{self.name}' has {self.num_samples} samples")
        return crcs

    def size_mismatch(self, i: int, height: int, width: int) -> DatasetError:
        """The error for sample i decoding to another size than its record: every backend that reads the shards
        places its crops by the record (image_sizes)."""
        h, w = (int(v) for v in self.image_sizes()[i])
        return DatasetError(f"{self.describe_sample(i)}: the JPEG is {height}x{width} (height x width), "
                            f"{self.root / self.sizes} says {h}x{w}; run `fastrsb verify`")

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


def _listing_fields(line: str) -> dict[str, str]:
    """A row of <split>.samples.tsv by column; the source (a file name) is what lies between label and crc32."""
    index, key, label, rest = line.split("\t", 3)
    source, _, crc = rest.rpartition("\t") if rest.count("\t") else (rest, "", "")
    return {"index": index, "key": key, "label": label, "source": source, "crc32": crc}


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
        return SplitInfo(self.root, name, s["num_samples"], s["per_class"], s.get("dali_shards", []), s.get("ffcv"),
                         s.get("sizes"), s.get("samples"), self.manifest.get("settings", {}).get("max_resolution"),
                         s.get("labels"))


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
    version = manifest.get("format_version")
    if version not in READABLE_FORMATS:
        raise DatasetError(_version_message(root, mpath, manifest, version))
    for rel, meta in manifest.get("files", {}).items():
        p = root / rel
        if not p.is_file():
            raise DatasetError(f"{p} is listed in the manifest but missing")
        if p.stat().st_size != meta["size"]:
            raise DatasetError(f"{p} has {p.stat().st_size} bytes, manifest says {meta['size']}")
    return ConvertedDataset(root, manifest)


def _version_message(root: Path, mpath: Path, manifest: dict, version) -> str:
    if isinstance(version, int) and version > FORMAT_VERSION:
        return (f"{mpath}: dataset format {version} was written by a newer fastrsb; this one reads formats "
                f"{' and '.join(map(str, READABLE_FORMATS))}: upgrade fastrsb, or re-run `fastrsb convert` with this one into a new directory")
    if not isinstance(version, int):
        return f"{mpath}: no format_version ({version!r}): not a manifest written by `fastrsb convert`"
    return (f"{mpath}: dataset format {version}, this fastrsb reads formats {' and '.join(map(str, READABLE_FORMATS))} "
            f"(which record every stored image's height and width, <split>.sizes.npy). Re-run the conversion into the "
            f"same directory: "
            f"{convert_command(root, manifest)}. It rebuilds the dataset in place (nothing of the format-{version} "
            f"conversion is re-used), and a re-run that is interrupted resumes like any conversion")


def convert_command(root: Path, manifest: dict) -> str:
    """The `fastrsb convert` command line that repeats a manifest's settings (for messages)."""
    import shlex
    from dataclasses import fields

    from dataprep.settings import Settings

    given = manifest.get("settings", {})
    args = []
    for f in fields(Settings):  # each field is the flag of the same name
        value = given.get(f.name, f.default)
        if f.name == "formats":
            value = tuple(value)
        if value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if value is True:  # a switch (--reencode, --shuffle-store)
            args.append(flag)
        else:
            args.append(f"{flag} {','.join(value) if f.name == 'formats' else value}")
    src = shlex.quote(manifest["source"]) if manifest.get("source") else "SRC"
    return (f"`fastrsb convert {src} {shlex.quote(str(root))}{''.join(' ' + a for a in args)}` (plus the --class-list "
            f"or --val-* options it was first run with, if any)")
