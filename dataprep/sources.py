"""Find the images of a source tree and their labels.

Layouts understood:
  SRC/<class>/<img>                       one class-per-folder tree, converted as split `train`
  SRC/train/<class>/<img> + SRC/val/...   val class-per-folder, or ImageNet's flat val/ with either
      - LOC_val_solution.csv (Kaggle layout: ImageId,PredictionString whose first token is the wnid), or
      - ILSVRC2012_validation_ground_truth.txt (devkit: ILSVRC2012_ID per line, in sorted file order)
        plus the devkit's meta.mat (or a text file of 'ILSVRC2012_ID wnid' lines) mapping ids to wnids.
Class indices are the sorted folder names (torchvision ImageFolder order) unless a class-list
file (one name per line) is given; val always uses train's mapping.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path


class SourceError(ValueError):
    """The source tree or a label file cannot be understood."""


@dataclass(frozen=True)
class Skipped:
    """An input that is not in the dataset, and why: the manifest's `skipped` and a shard sidecar's list it."""

    path: str  # the source file
    reason: str


@dataclass
class Source:
    classes: list[str]
    # split -> [(absolute path, label)], ordered by (label, path): the canonical sample order
    splits: dict[str, list[tuple[Path, int]]]
    # files that are not candidates at all (e.g. unlabeled flat val files)
    unusable: list[Skipped] = field(default_factory=list)


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
                val_id_mapping: str | Path | None = None) -> Source:
    root = Path(src)
    if not root.is_dir():
        raise SourceError(f"source directory not found: {root}")
    has_splits = (root / "train").is_dir()
    train_dir = root / "train" if has_splits else root
    if class_list is not None:
        classes = _read_class_list(Path(class_list))
    else:
        classes = _class_dirs(train_dir)
    if not classes:
        raise SourceError(f"{train_dir}: no class folders found (expected <class>/<image> folders)")
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
    return Source(classes, splits, unusable)
