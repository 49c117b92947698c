"""Find the records of a source and their labels: the one module that knows source layouts.

Layouts understood (`scan_source` detects which; `--source-format folder|parquet|wds` names it):
  folder   SRC/<class>/<img>                      one class-per-folder tree, converted as split `train`
           SRC/train/<class>/<img> + SRC/val/...  val class-per-folder, or ImageNet's flat val/ with either
      - LOC_val_solution.csv (Kaggle layout: ImageId,PredictionString whose first token is the wnid), or
      - ILSVRC2012_validation_ground_truth.txt (devkit: ILSVRC2012_ID per line, in sorted file order)
        plus the devkit's meta.mat (or a text file of 'ILSVRC2012_ID wnid' lines) mapping ids to wnids.
      Class indices are the sorted folder names (torchvision ImageFolder order) unless a class-list
      file (one name per line) is given; val always uses train's mapping. A split is ordered by
      (label, path).
  parquet  SRC/data/{train,validation,test}-NNNNN-of-NNNNN.parquet (or the same names in SRC): the Hub's
           `datasets` layout, columns `image` (struct of `bytes`, `path`) and `label` (int); class names from
           the ClassLabel names in the schema's `huggingface` metadata, else --class-list, else the integers.
  wds      SRC/*-{train,validation}-NNNN.tar (also *-val-*.tar, *-test-*.tar, or in SRC/data): WebDataset
           tars as timm publishes them, members KEY.jpg|jpeg|png|webp + KEY.cls (the label in ASCII digits)
           + an optional KEY.json; class names from --class-list, else the integers.
The Hub's `validation` is fastrsb's `val`. A hub split keeps its source order (file by file, row by row or
member by member: the shards are shuffled already, and reading them in order is what makes them fast), and
its labels are the integers the source gives. Records labelled -1 (the Hub's unlabeled `test`) are counted,
not converted.

A record is one input: an image file, a parquet row or a tar member (`Record`, named for messages and the
manifest, e.g. `.../train-00000-of-00003.parquet row 17`). `Source.payloads` streams what the converter's
workers decode: a file's path (the worker reads it), or the bytes of a row or member read here in order
(parquet row groups streamed, tar members by offset from one pass over the headers).
"""
from __future__ import annotations

import csv
import json
import os
import re
import tarfile
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

LAYOUTS = ("folder", "parquet", "wds")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # a WebDataset sample's image member, in order of preference
_HUB_SPLITS = {"train": "train", "validation": "val", "val": "val", "test": "test"}
_HUB_SPLIT_IN_NAME = re.compile(r"(?:^|[-_.])(train|validation|val|test)(?=[-_.])")
UNLABELED = -1  # the Hub's label of a record without one (its `test` split)


class SourceError(ValueError):
    """The source tree or a label file cannot be understood."""


@dataclass(frozen=True)
class Skipped:
    """An input that is not in the dataset, and why: the manifest's `skipped` and a shard sidecar's list it."""

    path: str  # the record's name: its source file, or 'FILE row N' / 'FILE member KEY'
    reason: str


@dataclass(frozen=True, slots=True)
class Record:
    """One input of a split: an image file (folder layout), a parquet row or a tar member (the Hub's layouts)."""

    container: str  # the file that holds it: the image itself, a .parquet or a .tar
    label: int
    row: int = -1  # parquet: its row in the file
    key: str = ""  # tar: the WebDataset key of its members
    offset: int = -1  # tar: where its image member's bytes start, and how many there are
    size: int = -1

    @property
    def name(self) -> str:
        """How messages, the manifest and <split>.samples.tsv name it."""
        if self.key:
            return f"{self.container} member {self.key}"
        if self.row >= 0:
            return f"{self.container} row {self.row}"
        return self.container


@dataclass
class Source:
    layout: str  # one of LAYOUTS
    description: str  # the converter's first line says what it found
    classes: list[str]
    splits: dict[str, list[Record]]  # split -> its records in dataset order
    unusable: list[Skipped] = field(default_factory=list)  # records that are not candidates at all
    unlabeled: dict[str, int] = field(default_factory=dict)  # split -> records labelled -1, not converted
    reader: _Reader = None  # type: ignore[assignment]

    def payloads(self, records: Iterable[Record]) -> Iterator[str | bytes]:
        """What a worker decodes for each record, in order: a path to read, or the record's bytes."""
        return self.reader.stream(records)

    def payload(self, record: Record) -> str | bytes:
        """The same for one record out of order (ffcv's raw write modes re-read their sources)."""
        return self.reader.read(record)


class _Reader(ABC):
    @abstractmethod
    def stream(self, records: Iterable[Record]) -> Iterator[str | bytes]:
        """Each record's payload, in order."""

    def read(self, record: Record) -> str | bytes:
        return next(iter(self.stream([record])))


class _FileReader(_Reader):
    """Folder layout: the worker reads each file itself (one task per file, as before the hub layouts)."""

    def stream(self, records):
        return (record.container for record in records)


class _TarReader(_Reader):
    """Tar members by the offsets the header scan found: one pread each, one open file per tar at a time."""

    def stream(self, records):
        for container, group in groupby(records, key=lambda record: record.container):
            fd = os.open(container, os.O_RDONLY)
            try:
                for record in group:
                    yield os.pread(fd, record.size, record.offset)
            finally:
                os.close(fd)


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise SourceError(f"reading parquet shards needs pyarrow ({e}): pip install -e '.[hub]'") from None
    return pq


def _row_group_starts(pf) -> np.ndarray:
    """The first row of each row group of a parquet file, and its row count at the end."""
    return np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])


def _row_group_of(starts: np.ndarray, rows):
    return np.searchsorted(starts, rows, side="right") - 1


class _ParquetReader(_Reader):
    """Rows' image bytes, streamed with pyarrow a few rows at a time from the row groups that hold the wanted rows
    (only the `image.bytes` column is read; never a whole file in memory)."""

    BATCH_ROWS = 32

    def __init__(self):
        self._cached_key: tuple | None = None  # (pid, file, row group) of _cached, read() 's last row group
        self._cached: list[bytes | None] = []

    def stream(self, records):
        pq = _pyarrow_parquet()

        for container, group in groupby(records, key=lambda record: record.container):
            rows = [record.row for record in group]  # ascending: records come in file order
            with pq.ParquetFile(container) as pf:
                starts = _row_group_starts(pf)
                groups = sorted(set(_row_group_of(starts, np.asarray(rows)).tolist()))
                row_ids = iter(np.concatenate([np.arange(starts[g], starts[g + 1]) for g in groups]).tolist())
                wanted = iter(rows)
                want = next(wanted, None)
                for batch in pf.iter_batches(batch_size=self.BATCH_ROWS, row_groups=groups, columns=["image.bytes"]):
                    for data in batch.column(0).field("bytes").to_pylist():
                        if next(row_ids) == want:
                            yield data or b""  # a null image: the worker reports it empty
                            want = next(wanted, None)
                    if want is None:
                        break

    def read(self, record):
        """One row, by way of its whole row group's image bytes, kept for the next call: ffcv's writer asks for
        consecutive samples. Per process (the writer's workers are forked)."""
        pq = _pyarrow_parquet()

        with pq.ParquetFile(record.container) as pf:
            starts = _row_group_starts(pf)
            group = int(_row_group_of(starts, record.row))
            cache_key = (os.getpid(), record.container, group)
            if self._cached_key != cache_key:
                column = pf.read_row_group(group, columns=["image.bytes"]).column(0)
                self._cached_key, self._cached = cache_key, column.combine_chunks().field("bytes").to_pylist()
        return self._cached[record.row - int(starts[group])] or b""


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _files_under(folder: Path) -> list[Path]:
    """Every regular file below folder (nested junk included: the decode check sorts it out)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if not _is_hidden(f))
    return out


def _class_dirs(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not _is_hidden(d.name))


def _read_class_list(path: Path) -> list[str]:
    names = [ln.split()[0] for ln in path.read_text().splitlines() if ln.strip()]
    if len(set(names)) != len(names):
        raise SourceError(f"class list {path} names a class twice")
    return names


def _folder_split(folder: Path, classes: list[str]) -> list[tuple[Path, int]]:
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for name in _class_dirs(folder):
        if name not in index:
            raise SourceError(f"{folder / name}: class folder not in the class list (train's classes)")
        samples.extend((p, index[name]) for p in _files_under(folder / name))
    return samples


def _find(root: Path, names: list[str]) -> Path | None:
    for name in names:
        for cand in (root / name, root / "val" / name, root / "ILSVRC2012_devkit_t12" / "data" / name):
            if cand.is_file():
                return cand
    return None


def _devkit_id_to_wnid(path: Path) -> dict[int, str]:
    if path.suffix == ".mat":
        from scipy.io import loadmat  # scipy ships with scikit-learn

        synsets = loadmat(str(path), squeeze_me=True)["synsets"]
        return {int(s[0]): str(s[1]) for s in synsets if int(s[4]) == 0}  # num_children == 0: the 1000 leaves
    mapping = {}
    for ln in path.read_text().splitlines():
        if ln.strip():
            i, wnid = ln.split()[:2]
            mapping[int(i)] = wnid
    return mapping


def _flat_val(val_dir: Path, root: Path, classes: list[str], gt_file: Path | None, id_map: Path | None) -> tuple[list, list]:
    index = {c: i for i, c in enumerate(classes)}
    files = _files_under(val_dir)
    by_name: dict[str, str] = {}
    loc = _find(root, ["LOC_val_solution.csv"])
    if gt_file is None and loc is not None:
        with open(loc, newline="") as f:
            for row in csv.DictReader(f):
                by_name[row["ImageId"]] = row["PredictionString"].split()[0]
        key = lambda p: p.stem  # noqa: E731
    else:
        gt_file = gt_file or _find(root, ["ILSVRC2012_validation_ground_truth.txt"])
        if gt_file is None:
            raise SourceError(
                f"{val_dir} holds images but no class folders, and no LOC_val_solution.csv or "
                "ILSVRC2012_validation_ground_truth.txt was found (pass --val-ground-truth)"
            )
        id_map = id_map or _find(root, ["meta.mat", "ILSVRC2012_mapping.txt"])
        if id_map is None:
            raise SourceError(f"{gt_file}: needs the devkit's meta.mat or an 'ILSVRC2012_ID wnid' file (pass --val-id-mapping)")
        id_to_wnid = _devkit_id_to_wnid(id_map)
        ids = [int(x) for x in gt_file.read_text().split()]
        # The devkit lists labels in the order of the sorted file names ILSVRC2012_val_%08d.JPEG.
        names = sorted(p.name for p in files if p.name.startswith("ILSVRC2012_val_"))
        if len(names) != len(ids):
            raise SourceError(f"{gt_file} has {len(ids)} labels but {val_dir} has {len(names)} ILSVRC2012_val_* files")
        for name, i in zip(names, ids):
            if i not in id_to_wnid:
                raise SourceError(f"{gt_file}: ILSVRC2012_ID {i} is not in {id_map}")
            by_name[name] = id_to_wnid[i]
        key = lambda p: p.name  # noqa: E731
    samples, unusable = [], []
    for p in files:
        wnid = by_name.get(key(p))
        if wnid is None:
            unusable.append(Skipped(str(p), "no ground-truth label for this file"))
        elif wnid not in index:
            raise SourceError(f"ground truth gives {p.name} class '{wnid}', which is not among train's classes")
        else:
            samples.append((p, index[wnid]))
    return samples, unusable


def scan_source(src: str | Path, class_list: str | Path | None = None, val_ground_truth: str | Path | None = None,
                val_id_mapping: str | Path | None = None, source_format: str | None = None) -> Source:
    """Find the layout of SRC (or take source_format), then its records and classes; every error here comes before
    any output is written."""
    root = Path(src)
    if not root.is_dir():
        raise SourceError(f"source directory not found: {root}")
    if source_format is not None and source_format not in LAYOUTS:
        raise SourceError(f"--source-format must be one of {', '.join(LAYOUTS)}, got {source_format!r}")
    layout = source_format or _detect_layout(root)
    classes_given = _read_class_list(Path(class_list)) if class_list is not None else None
    if layout == "folder":
        return _scan_folder(root, classes_given, class_list, val_ground_truth, val_id_mapping)
    if val_ground_truth or val_id_mapping:
        raise SourceError(f"--val-ground-truth/--val-id-mapping are for ImageNet's flat val/ folder; {root} is read as "
                          f"{layout} (its labels come with its records)")
    files = _hub_files(root, ".parquet" if layout == "parquet" else ".tar")
    if layout == "parquet":
        return _scan_parquet(root, files, classes_given, class_list)
    return _scan_wds(root, files, classes_given, class_list)


def _detect_layout(root: Path) -> str:
    """parquet or wds when SRC (or SRC/data) holds such files, else folder (whose own errors say what it expected)."""
    found = [layout for layout, suffix in (("parquet", ".parquet"), ("wds", ".tar")) if _hub_candidates(root, suffix)]
    if len(found) > 1:
        raise SourceError(f"{root} holds both parquet and tar files: name the layout with --source-format")
    return found[0] if found else "folder"


def _hub_candidates(root: Path, suffix: str) -> list[Path]:
    return [p for folder in (root, root / "data") if folder.is_dir()
            for p in sorted(folder.iterdir()) if p.suffix == suffix and p.is_file() and not _is_hidden(p.name)]


def _hub_files(root: Path, suffix: str) -> dict[str, list[Path]]:
    """fastrsb split -> its files in name order (NNNNN-numbered: the Hub's order), from the split in each name."""
    files: dict[str, list[Path]] = {}
    for p in _hub_candidates(root, suffix):
        m = _HUB_SPLIT_IN_NAME.search(p.name)
        if m is None:
            raise SourceError(f"{p}: cannot tell its split from its name (expected train-, validation- or test- in it, "
                              f"e.g. train-00000-of-00004{suffix} or imagenet1k-train-0000{suffix})")
        files.setdefault(_HUB_SPLITS[m.group(1)], []).append(p)
    if not files:
        raise SourceError(f"{root}: no {suffix} files in it or in {root / 'data'}")
    if "train" not in files:
        raise SourceError(f"{root}: no train file (e.g. train-00000-of-00004{suffix}); found {', '.join(sorted(files))} "
                          f"files only")
    return {split: files[split] for split in ("train", "val", "test") if split in files}


def _describe(kind: str, root: Path, files: dict[str, list[Path]], classes: list[str], names_from: str) -> str:
    count = sum(len(f) for f in files.values())
    folders = sorted({str(p.parent) for f in files.values() for p in f})
    per_split = ", ".join(f"{split} {len(f)}" for split, f in files.items())
    return f"{kind} ({count} files) in {', '.join(folders)}: {per_split}; {len(classes)} classes ({names_from})"


def _classes(found: list[str] | None, found_in: str, given: list[str] | None, given_path,
             max_label: int) -> tuple[list[str], str]:
    """The class names and where they came from: the source's own names (a ClassLabel list), else --class-list, else
    the integers 0..max label. Names from both must agree."""
    if found is not None and given is not None and found != given:
        k = next((i for i, (a, b) in enumerate(zip(found, given)) if a != b), min(len(found), len(given)))
        first = lambda names: repr(names[k]) if k < len(names) else "nothing"  # noqa: E731
        raise SourceError(f"{found_in}: the schema's ClassLabel names ({len(found)}) disagree with --class-list "
                          f"{given_path} ({len(given)} names): class {k} is {first(found)} in the schema, "
                          f"{first(given)} in the list")
    if found is not None:
        return found, "the schema's ClassLabel names"
    if given is not None:
        return given, f"--class-list {given_path}"
    return [str(i) for i in range(max_label + 1)], "no names in the source: the integer labels"


def _check_labels(labels: np.ndarray, num_classes: int, where, names_from: str) -> None:
    """Every label is a class index or -1 (unlabeled); where(k) names the record of labels[k]."""
    bad = np.flatnonzero((labels < UNLABELED) | (labels >= num_classes))
    if len(bad):
        k = int(bad[0])
        raise SourceError(f"{where(k)}: label {int(labels[k])} is outside the {num_classes} classes (expected 0.."
                          f"{num_classes - 1} from {names_from}, or -1 for unlabeled)"
                          + (f" ({len(bad) - 1} more such record(s))" if len(bad) > 1 else ""))


def _split_records(records: dict[str, list[Record]], files: dict[str, list[Path]]) -> tuple[dict, dict]:
    """(split -> its labelled records, split -> how many are unlabeled): a split of unlabeled records only (the Hub's
    test) is counted, not converted."""
    splits, unlabeled = {}, {}
    for split, all_records in records.items():
        if not all_records:
            raise SourceError(f"split '{split}' ({', '.join(map(str, files[split]))}) holds no usable records")
        kept = [r for r in all_records if r.label != UNLABELED]
        if len(kept) < len(all_records):
            unlabeled[split] = len(all_records) - len(kept)
        if kept:
            splits[split] = kept
    if "train" not in splits:
        raise SourceError(f"split 'train' ({', '.join(map(str, files['train']))}) has no labelled records")
    return splits, unlabeled


# ---- parquet: the Hub's `datasets` layout --------------------------------------------------------------------------

def _parquet_columns(pf, path: Path) -> None:
    """The image struct with its bytes, and an integer label: or one error saying what was expected."""
    import pyarrow as pa

    schema = pf.schema_arrow
    image = schema.field("image").type if "image" in schema.names else None
    label = schema.field("label").type if "label" in schema.names else None
    ok_image = (image is not None and pa.types.is_struct(image) and image.get_field_index("bytes") >= 0
                and (pa.types.is_binary(image.field("bytes").type) or pa.types.is_large_binary(image.field("bytes").type)))
    if not (ok_image and label is not None and pa.types.is_integer(label)):
        found = ", ".join(f"{f.name}: {f.type}" for f in schema)
        raise SourceError(f"{path}: expected the Hub's image columns, image (struct<bytes: binary, path: string>) and "
                          f"label (an integer), found {found}")


def _classlabel_names(pf) -> list[str] | None:
    meta = (pf.schema_arrow.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        label = json.loads(meta)["info"]["features"]["label"]
    except (ValueError, KeyError, TypeError):
        return None
    if label.get("_type") != "ClassLabel" or not label.get("names"):
        return None
    return [str(n) for n in label["names"]]


def _scan_parquet(root: Path, files: dict[str, list[Path]], given: list[str] | None, given_path) -> Source:
    """Each file's schema, ClassLabel names and label column (pyarrow reads just that column), before any work."""
    pq = _pyarrow_parquet()

    labels_of: dict[Path, np.ndarray] = {}
    names, names_in = None, None
    for path in (p for f in files.values() for p in f):
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError on a file that is not parquet
            raise SourceError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
        with pf:
            _parquet_columns(pf, path)
            found = _classlabel_names(pf)
            if found is not None and names is not None and found != names:
                raise SourceError(f"{path}: its ClassLabel names differ from those of {names_in}")
            if found is not None and names is None:
                names, names_in = found, path
            column = pf.read(columns=["label"]).column("label")
            labels_of[path] = column.fill_null(UNLABELED).to_numpy().astype(np.int64)
    max_label = max((int(labels.max()) for labels in labels_of.values() if len(labels)), default=-1)
    classes, names_from = _classes(names, str(names_in), given, given_path, max_label)
    records: dict[str, list[Record]] = {}
    for split, paths in files.items():
        for path in paths:
            labels = labels_of[path]
            _check_labels(labels, len(classes), lambda k: f"{path} row {k}", names_from)
            container = str(path)  # one string for all the file's records (ImageNet: 1.28M of them)
            records.setdefault(split, []).extend(Record(container, label, row=row)
                                                 for row, label in enumerate(labels.tolist()))
    splits, unlabeled = _split_records(records, files)
    return Source("parquet", _describe("parquet shards", root, files, classes, names_from), classes, splits,
                  unlabeled=unlabeled, reader=_ParquetReader())


# ---- wds: WebDataset tars (timm's layout) ---------------------------------------------------------------------------

def _key_and_extension(name: str) -> tuple[str, str]:
    """WebDataset's member naming: the key is the path up to the first dot of the file name, the rest its extension
    (lower-cased). Written here rather than importing webdataset for one rule."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def _scan_tar(path: Path) -> tuple[list[Record], list[Skipped]]:
    """One pass over a tar's headers (tarfile): its samples' image members by offset and their labels (the .cls
    members, read as they pass), and the keys that cannot be samples, each with the reason."""
    members: dict[str, dict[str, tarfile.TarInfo]] = {}  # key -> {extension: member}, keys in order of appearance
    seen: list[str] = []
    try:
        with tarfile.open(path, "r:") as tar:
            size = path.stat().st_size
            labels: dict[str, bytes] = {}
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _key_and_extension(member.name)
                members.setdefault(key, {})[ext] = member
                if ext == "cls" and member.offset_data + member.size <= size:
                    labels[key] = tar.extractfile(member).read()
                if len(seen) < 5:
                    seen.append(member.name)
    except (tarfile.TarError, OSError) as e:
        raise SourceError(f"{path}: not a readable tar ({type(e).__name__}: {e})") from None
    records, skipped, container = [], [], str(path)
    for key, parts in members.items():
        image = next((parts[ext] for ext in IMAGE_EXTENSIONS if ext in parts), None)
        name = f"{path} member {key}"
        if image is None:
            if "cls" in parts:  # a key without .cls or image at all (e.g. a stray file) is no sample
                skipped.append(Skipped(name, f"no image member ({', '.join('.' + e for e in IMAGE_EXTENSIONS[:-1])} or "
                                             f".{IMAGE_EXTENSIONS[-1]})"))
            continue
        if "cls" not in parts:
            skipped.append(Skipped(name, "no .cls member (the label)"))
            continue
        text = labels.get(key, b"").strip()
        if image.offset_data + image.size > size or key not in labels:
            skipped.append(Skipped(name, "the tar ends inside this sample's members (a truncated file)"))
        elif not re.fullmatch(rb"-?[0-9]+", text):
            skipped.append(Skipped(name, f".cls is not an integer label: {text[:20]!r}"))
        else:
            records.append(Record(container, int(text), key=key, offset=image.offset_data, size=image.size))
    if not records and not skipped:
        raise SourceError(f"{path}: no WebDataset samples (expected KEY.jpg|jpeg|png|webp + KEY.cls members; "
                          f"its first members: {', '.join(seen) or 'none'})")
    return records, skipped


def _scan_wds(root: Path, files: dict[str, list[Path]], given: list[str] | None, given_path) -> Source:
    records: dict[str, list[Record]] = {}
    unusable: list[Skipped] = []
    for split, paths in files.items():
        for path in paths:
            found, skipped = _scan_tar(path)
            records.setdefault(split, []).extend(found)
            unusable.extend(skipped)
    max_label = max((r.label for rs in records.values() for r in rs), default=-1)
    classes, names_from = _classes(None, "", given, given_path, max_label)
    for split, rs in records.items():
        _check_labels(np.array([r.label for r in rs], np.int64), len(classes), lambda k: rs[k].name, names_from)
    splits, unlabeled = _split_records(records, files)
    return Source("wds", _describe("WebDataset tars", root, files, classes, names_from), classes, splits, unusable,
                  unlabeled, _TarReader())


# ---- folder: class-per-folder trees -------------------------------------------------------------------------------

def _scan_folder(root: Path, given: list[str] | None, given_path, val_ground_truth, val_id_mapping) -> Source:
    has_splits = (root / "train").is_dir()
    train_dir = root / "train" if has_splits else root
    classes = given if given is not None else _class_dirs(train_dir)
    if not classes:
        raise SourceError(f"{train_dir}: no class folders found (expected <class>/<image> folders, or the Hub's "
                          f"parquet or WebDataset files)")
    splits = {"train": _folder_split(train_dir, classes)}
    unusable: list[Skipped] = []
    val_dir = root / "val"
    if has_splits and val_dir.is_dir():
        if _class_dirs(val_dir):
            splits["val"] = _folder_split(val_dir, classes)
        else:
            splits["val"], unusable = _flat_val(
                val_dir, root, classes,
                Path(val_ground_truth) if val_ground_truth else None,
                Path(val_id_mapping) if val_id_mapping else None,
            )
    for name, samples in splits.items():
        samples.sort(key=lambda s: (s[1], str(s[0])))
        if not samples:
            raise SourceError(f"split '{name}' of {root} has no files")
    counts = ", ".join(f"{name} {len(samples)}" for name, samples in splits.items())
    names_from = f"--class-list {given_path}" if given is not None else "the folder names"
    return Source("folder", f"class folders in {root}: {counts} files; {len(classes)} classes ({names_from})", classes,
                  {name: [Record(str(path), label) for path, label in samples] for name, samples in splits.items()},
                  unusable, reader=_FileReader())
