"""`fastrsb convert`: a source tree -> FFCV .beton + DALI tar shards + manifest.

Two passes per split (`_Converter._convert_split` lists them in order):
 1. `_write_shards`: decode-check every candidate in a process pool; keep an eligible JPEG's own bytes
    (dataprep.images: YCbCr, 8-bit, baseline, within max_resolution, decodes cleanly) or
    re-encode it as RGB JPEG (longer side <= max_resolution, given quality; always with
    --reencode), and write shards of `shard_size` candidates. Each
    finished shard gets a sidecar in OUT/.work/ (fingerprint of its inputs and settings),
    which is what makes a killed conversion resumable shard by shard.
 2. `_write_ffcv`: a DatasetWriter over the checked samples. In `jpg` mode it stores the very JPEG
    bytes of the shards (no second decode or lossy re-encode); raw/smart/proportion modes
    re-read the checked originals so raw pixels stay lossless.
Then per split the listing (<split>.samples.tsv) and the stored images' sizes (<split>.sizes.npy,
height and width as the sidecars recorded them when the shard was written).
Nothing undecodable reaches either writer (ffcv's writer hangs and DALI pipelines die on one
bad sample). The manifest is written last and atomically: without it a dataset is incomplete.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
import types
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from dataprep.images import BadImage, PreparedImage, load_rgb, prepare_image
from dataprep.layout import (
    FORMAT_VERSION,
    MANIFEST,
    atomic_write,
    atomic_write_bytes,
    read_wds_index,
    atomic_write_json,
    sha256_file,
    shard_stem,
)
from dataprep.shards import ShardMember, write_shard
from dataprep.sources import Skipped, Source, scan_source

FORMATS = ("ffcv", "dali")
_SIDECAR_VERSION = 2  # 2: samples as named records (StoredSample); a sidecar of another version is redone
WRITE_MODES = ("jpg", "raw", "smart", "proportion")


class ConversionError(RuntimeError):
    """The conversion cannot proceed, or (with strict) found files it had to skip."""


@dataclass(frozen=True)
class Settings:
    formats: tuple[str, ...] = FORMATS
    max_resolution: int = 512
    jpeg_quality: int = 90
    write_mode: str = "jpg"
    compress_probability: float = 0.5
    smart_threshold: int | None = None
    shard_size: int = 1024
    reencode: bool = False  # re-encode every image, even JPEGs that could be stored as they are

    def __post_init__(self):
        object.__setattr__(self, "formats", tuple(self.formats))  # a list from a caller: hashable, and JSON alike

    def validate(self) -> None:
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise ConversionError(f"--formats: unknown format {bad or '(none)'}; choose from {', '.join(FORMATS)}")
        if self.max_resolution < 8:
            raise ConversionError(f"--max-resolution must be >= 8 pixels, got {self.max_resolution}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConversionError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")
        if self.write_mode not in WRITE_MODES:
            raise ConversionError(f"--write-mode must be one of {', '.join(WRITE_MODES)}, got {self.write_mode!r}")
        if not 0.0 <= self.compress_probability <= 1.0:
            raise ConversionError(f"--compress-probability must be in [0, 1], got {self.compress_probability}")
        if self.shard_size < 1:
            raise ConversionError(f"--shard-size must be >= 1, got {self.shard_size}")


def _fingerprint(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:32]


def _prepare_one(candidate: int, path: str, max_res: int, quality: int, reencode: bool):
    """(candidate, PreparedImage | Skipped) for one source file."""
    try:
        return candidate, prepare_image(path, max_res, quality, reencode)
    except BadImage as e:
        return candidate, Skipped(path, str(e))
    except Exception as e:  # an unforeseen decoder failure must not stop the conversion
        return candidate, Skipped(path, f"decoder error: {type(e).__name__}: {e}")


def _prepare_chunk(tasks: list[tuple[int, str, int, int, bool]]):
    return [_prepare_one(*t) for t in tasks]


def _prepare_isolated(task: tuple[int, str, int, int, bool]):
    """Run one file in a throw-away process: a decoder that kills its process (a segfault in a
    codec, the OOM killer) costs that file, not the conversion."""
    ctx = mp.get_context("fork")
    with ProcessPoolExecutor(1, mp_context=ctx) as ex:
        try:
            return ex.submit(_prepare_one, *task).result()
        except BrokenProcessPool:
            candidate, path = task[:2]
            return candidate, Skipped(path, "the decoder crashed its process on this file")


def _prepared_in_order(todo: list, workers: int, chunk: int = 8):
    """Yield (candidate, PreparedImage | Skipped) for todo in order, on `workers` processes with a bounded window
    in flight. If a worker process dies, the chunks that were in flight are redone one file at a
    time in isolation, so only the file that kills its decoder is lost (a multiprocessing.Pool
    would wait forever for the lost task)."""
    chunks = [todo[i:i + chunk] for i in range(0, len(todo), chunk)]
    ctx = mp.get_context("fork")
    next_chunk = 0
    while next_chunk < len(chunks):
        redo: list[int] = []
        with ProcessPoolExecutor(workers, mp_context=ctx) as ex:
            inflight: deque = deque()
            try:
                while next_chunk < len(chunks) or inflight:
                    while next_chunk < len(chunks) and len(inflight) < 4 * workers:
                        inflight.append((next_chunk, ex.submit(_prepare_chunk, chunks[next_chunk])))
                        next_chunk += 1
                    results = inflight[0][1].result()
                    inflight.popleft()
                    yield from results
            except BrokenProcessPool:
                redo = [k for k, _ in inflight]
        for k in redo:
            for task in chunks[k]:
                yield _prepare_isolated(task)


@dataclass(frozen=True)
class StoredSample:
    """One converted sample, as its shard's sidecar (OUT/.work/STEM.json) records it."""

    key: str  # its name in the tar shard (the candidate number)
    source: str  # the source file
    label: int
    height: int  # of the JPEG as stored (after any re-encode/resize): OUT/<split>.sizes.npy
    width: int
    reencode_reason: str  # "" when the source's own bytes are stored (dataprep.images.reencode_reason)
    offset: int = -1  # of its JPEG bytes in the shard's tar
    size: int = -1


@dataclass(frozen=True)
class _ShardPlan:
    """A shard still to be checked or written: its inputs, and the fingerprint a finished shard must match."""

    stem: str
    start: int  # candidate number of its first input (a split's inputs are candidates 0, 1, ...)
    inputs: list[tuple[Path, int]]  # (source file, label)
    fingerprint: str

    @property
    def last(self) -> int:
        return self.start + len(self.inputs) - 1

    def candidates(self):
        """(candidate, source file, label) of each input."""
        return ((self.start + k, path, label) for k, (path, label) in enumerate(self.inputs))


@dataclass(frozen=True)
class ShardFile:
    """One file of a finished shard, as its sidecar records it."""

    path: str  # relative to OUT
    size: int
    sha256: str

    @classmethod
    def of(cls, rel: str, data: bytes) -> ShardFile:
        return cls(rel, len(data), hashlib.sha256(data).hexdigest())


@dataclass(frozen=True)
class _Shard:
    """A finished shard: its files and its samples, the unit a resumed conversion re-uses."""

    fingerprint: str
    tar: ShardFile
    index: ShardFile
    samples: list[StoredSample]
    skipped: list[Skipped]

    def to_json(self) -> dict:
        return asdict(self)  # the samples and skips too: asdict recurses into dataclasses in lists

    @classmethod
    def from_json(cls, d: dict) -> _Shard:
        return cls(d["fingerprint"], ShardFile(**d["tar"]), ShardFile(**d["index"]),
                   [StoredSample(**e) for e in d["samples"]], [Skipped(**e) for e in d["skipped"]])


def _samples_in_order(shards: list[_Shard]):
    """A split's stored samples in dataset-index order."""
    return (sample for shard in shards for sample in shard.samples)


class _FfcvSamples:
    """Indexable (image, label) source for ffcv's DatasetWriter over the checked samples: the stored JPEG
    bytes read back from the shards (jpg mode), or the source decoded again (raw pixels for the other modes)."""

    def __init__(self, samples: list[tuple[Path, StoredSample]], from_shards: bool):
        self.samples = samples  # (its shard's tar, the sample)
        self.from_shards = from_shards

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        tar, sample = self.samples[i]
        if self.from_shards:
            fd = os.open(tar, os.O_RDONLY)
            try:
                data = os.pread(fd, sample.size, sample.offset)
            finally:
                os.close(fd)
            return PreparedImage(data, sample.height, sample.width), sample.label
        return load_rgb(sample.source), sample.label


def _encode_prepared(self, destination, image, malloc):
    """RGBImageField.encode that stores already-encoded JPEG bytes as they are.

    Bound on the instance, not a subclass: ffcv records a field's type id by exact class,
    so a subclass would be written as an unknown field and could not be read back.
    """
    from ffcv.fields.rgb_image import IMAGE_MODES

    data = np.frombuffer(image.jpeg, np.uint8)
    destination["mode"] = IMAGE_MODES["jpg"]
    destination["height"], destination["width"] = image.height, image.width
    destination["data_ptr"], storage = malloc(data.nbytes)
    storage[:] = data


def _write_beton(path: Path, samples: _FfcvSamples, settings: Settings, workers: int) -> None:
    try:
        from ffcv.fields import IntField, RGBImageField
        from ffcv.writer import DatasetWriter
    except ImportError as e:
        raise ConversionError(f"format 'ffcv' needs the ffcv package ({e}); install with pip install -e '.[ffcv]'") from e
    image = RGBImageField(
        write_mode=settings.write_mode,
        max_resolution=settings.max_resolution,
        smart_threshold=settings.smart_threshold,
        jpeg_quality=settings.jpeg_quality,
        compress_probability=settings.compress_probability,
    )
    if samples.from_shards:
        image.encode = types.MethodType(_encode_prepared, image)
    atomic_write(path, lambda tmp: DatasetWriter(str(tmp), {"image": image, "label": IntField()}, num_workers=workers)
                 .from_indexed_dataset(samples, chunksize=64))


class _Converter:
    """One conversion of a source tree into OUT; `run` lists its steps in order."""

    def __init__(self, src, out: Path, settings: Settings, workers: int, progress: bool, log: Callable[[str], None]):
        self.src, self.out, self.settings = src, out, settings
        self.workers, self.progress, self.log = workers, progress, log
        self.work = out / ".work"
        self.shard_dir = out / "dali" if "dali" in settings.formats else self.work / "staging"
        self.files: dict[str, dict] = {}  # the manifest's `files`: {path relative to OUT: {"size", "sha256"}}
        self.skipped: list[Skipped] = []

    def run(self, class_list=None, val_ground_truth=None, val_id_mapping=None, strict=False) -> dict:
        """Scan the source, convert each split, account for the skipped inputs, then write the manifest."""
        source = scan_source(self.src, class_list, val_ground_truth, val_id_mapping)
        self._open_output()
        self.skipped.extend(source.unusable)
        started = time.time()
        splits = {split: self._convert_split(split, inputs, len(source.classes))
                  for split, inputs in source.splits.items()}
        self._remove_staging()
        self.skipped.sort(key=lambda skip: skip.path)  # the log and the manifest list them by file
        self._log_summary(source, splits, time.time() - started)
        if strict and self.skipped:
            raise ConversionError(f"--strict: {len(self.skipped)} input(s) could not be converted (listed above); "
                                  "no manifest written")
        return self._write_manifest(source, splits)

    def _open_output(self) -> None:
        """Create OUT and drop its old manifest before touching anything: a dataset is complete only with one."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / MANIFEST).unlink(missing_ok=True)
        self.work.mkdir(exist_ok=True)
        self.shard_dir.mkdir(parents=True, exist_ok=True)

    def _convert_split(self, split: str, inputs: list[tuple[Path, int]], num_classes: int) -> dict:
        """Both passes over one split, then its listing and sizes; returns the split's manifest entry."""
        shards = self._write_shards(split, inputs)
        self._remove_stale_shards(split, len(shards))
        self.skipped.extend(skip for shard in shards for skip in shard.skipped)
        info = self._count_samples(split, shards, num_classes)
        if "dali" in self.settings.formats:
            info["dali_shards"] = self._record_dali_shards(shards)
        if "ffcv" in self.settings.formats:
            info["ffcv"] = self._write_ffcv(split, shards)
        info["samples"] = self._write_listing(split, shards)
        info["sizes"] = self._write_sizes(split, shards)
        return info

    def _write_shards(self, split: str, inputs: list[tuple[Path, int]]) -> list[_Shard]:
        """Pass 1: decode-check every input and write the checked ones as tar shards, re-using each finished
        shard whose sidecar still matches (what makes a killed conversion resumable shard by shard)."""
        plans = self._plan_shards(split, inputs)
        shards: list[_Shard | None] = [self._finished_shard(plan) for plan in plans]
        waiting = deque(i for i, shard in enumerate(shards) if shard is None)
        if len(waiting) < len(plans):
            self.log(f"[convert] {split}: re-using {len(plans) - len(waiting)} finished shard(s) of {len(plans)}")
        todo = [(candidate, str(path), self.settings.max_resolution, self.settings.jpeg_quality, self.settings.reencode)
                for i in waiting for candidate, path, _ in plans[i].candidates()]
        bar = tqdm(total=len(inputs), initial=len(inputs) - len(todo), unit="img", desc=f"convert {split}",
                   disable=not self.progress, dynamic_ncols=True, smoothing=0.05)
        results: dict[int, PreparedImage | Skipped] = {}
        for candidate, result in _prepared_in_order(todo, self.workers):
            results[candidate] = result
            bar.update(1)
            if candidate == plans[waiting[0]].last:  # results arrive in order: that shard is complete
                i = waiting.popleft()
                shards[i] = self._finish_shard(plans[i], results)
        bar.close()
        return shards  # type: ignore[return-value]

    def _plan_shards(self, split: str, inputs: list[tuple[Path, int]]) -> list[_ShardPlan]:
        """Cut a split's inputs into shards of shard_size, each fingerprinted by its inputs and the settings that
        change its bytes: a finished shard is re-used only while nothing of that changed."""
        plans = []
        for j, start in enumerate(range(0, len(inputs), self.settings.shard_size)):
            shard_inputs = inputs[start:start + self.settings.shard_size]
            stats = []
            for path, label in shard_inputs:
                try:
                    stat = path.stat()
                    stats.append([str(path), label, stat.st_size, stat.st_mtime_ns])
                except OSError:
                    stats.append([str(path), label, -1, -1])
            # "v": a conversion into an OUT of another format version redoes every shard (and so the beton), it
            # never mixes the two (tests/test_convert.py::test_a_format_1_dataset_is_refused_and_rebuilt_in_place)
            fingerprint = _fingerprint({"v": FORMAT_VERSION, "sidecar": _SIDECAR_VERSION,
                                        "max_res": self.settings.max_resolution, "q": self.settings.jpeg_quality,
                                        "as_is": not self.settings.reencode, "start": start, "inputs": stats})
            plans.append(_ShardPlan(shard_stem(split, j), start, shard_inputs, fingerprint))
        return plans

    def _sidecar(self, stem: str) -> Path:
        return self.work / f"{stem}.json"

    def _finished_shard(self, plan: _ShardPlan) -> _Shard | None:
        """The shard a previous run finished for this plan, if its sidecar matches and its files are whole."""
        try:
            sidecar = json.loads(self._sidecar(plan.stem).read_text())
            if sidecar.get("fingerprint") != plan.fingerprint:
                return None
            shard = _Shard.from_json(sidecar)
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            return None
        for f in (shard.tar, shard.index):
            p = self.out / f.path
            if not p.is_file() or p.stat().st_size != f.size:
                return None
        return shard

    def _finish_shard(self, plan: _ShardPlan, results: dict[int, PreparedImage | Skipped]) -> _Shard:
        """Write a shard's tar and index from its inputs' results, then its sidecar (last: it marks the shard done)."""
        members, samples, skipped = [], [], []
        tar_rel = os.path.relpath(self.shard_dir / f"{plan.stem}.tar", self.out)
        idx_rel = os.path.relpath(self.shard_dir / f"{plan.stem}.idx", self.out)
        for candidate, path, label in plan.candidates():
            match results.pop(candidate):
                case Skipped() as skip:
                    skipped.append(skip)
                case PreparedImage() as image:
                    key = f"{candidate:09d}"
                    members.append(ShardMember(key, image.jpeg, label))
                    samples.append(StoredSample(key, str(path), label, image.height, image.width,
                                                image.reencode_reason))
        tar_bytes, idx_bytes = write_shard(self.out / tar_rel, self.out / idx_rel, members)
        offsets = read_wds_index(self.out / idx_rel)
        shard = _Shard(
            fingerprint=plan.fingerprint,
            tar=ShardFile.of(tar_rel, tar_bytes),
            index=ShardFile.of(idx_rel, idx_bytes),
            samples=[replace(sample, offset=comp["jpg"][0], size=comp["jpg"][1])
                     for sample, comp in zip(samples, offsets)],
            skipped=skipped,
        )
        atomic_write_json(self._sidecar(plan.stem), shard.to_json())
        return shard

    def _remove_stale_shards(self, split: str, count: int) -> None:
        """Delete shard files numbered count and up: left by an earlier run over more inputs."""
        for p in self.shard_dir.glob(f"{split}-*"):
            stem = p.name.split(".")[0]
            try:
                j = int(stem.rsplit("-", 1)[1])
            except ValueError:
                continue
            if j >= count:
                p.unlink()

    def _count_samples(self, split: str, shards: list[_Shard], num_classes: int) -> dict:
        """The split's counts for the manifest (per class; stored as is or re-encoded, and why); a split with no
        sample left is an error, not an empty dataset."""
        per_class = [0] * num_classes
        reasons: dict[str, int] = {}
        for sample in _samples_in_order(shards):
            per_class[sample.label] += 1
            if sample.reencode_reason:
                reasons[sample.reencode_reason] = reasons.get(sample.reencode_reason, 0) + 1
        num = sum(per_class)
        if num == 0:
            raise ConversionError(f"split '{split}': every input was skipped; nothing to write")
        reencoded = sum(reasons.values())
        return {"num_samples": num, "per_class": per_class, "stored_as_is": num - reencoded,
                "reencoded": reencoded, "reencode_reasons": dict(sorted(reasons.items()))}

    def _record_dali_shards(self, shards: list[_Shard]) -> list[dict]:
        """The split's `dali_shards` entry; its tars and indexes join the manifest's files (with dali they are
        output, not staging)."""
        for shard in shards:
            for f in (shard.tar, shard.index):
                self._record_file(f.path, f.size, f.sha256)
        return [{"tar": shard.tar.path, "index": shard.index.path, "num_samples": len(shard.samples)}
                for shard in shards]

    def _write_ffcv(self, split: str, shards: list[_Shard]) -> str:
        """Pass 2: OUT/<split>.beton over the checked samples, unless its sidecar shows one finished from the same
        shards and settings (ffcv's writer is the slow part of a resumed run)."""
        beton = self.out / f"{split}.beton"
        rel = beton.name
        fingerprint = _fingerprint({"shards": [shard.fingerprint for shard in shards], **asdict(self.settings),
                                    "formats": None})
        sidecar_path = self.work / f"{split}.beton.json"
        try:
            sidecar = json.loads(sidecar_path.read_text())
            if sidecar["fingerprint"] == fingerprint and beton.is_file() and beton.stat().st_size == sidecar["size"]:
                self.log(f"[convert] {split}: re-using finished {rel}")
                self._record_file(rel, sidecar["size"], sidecar["sha256"])
                return rel
        except (OSError, json.JSONDecodeError, KeyError):
            pass
        stored = [(self.out / shard.tar.path, sample) for shard in shards for sample in shard.samples]
        self.log(f"[convert] {split}: writing {rel} ({len(stored)} samples, write mode {self.settings.write_mode})")
        t0 = time.time()
        _write_beton(beton, _FfcvSamples(stored, from_shards=self.settings.write_mode == "jpg"), self.settings,
                     self.workers)
        size, sha = beton.stat().st_size, sha256_file(beton)
        atomic_write_json(sidecar_path, {"fingerprint": fingerprint, "size": size, "sha256": sha})
        self._record_file(rel, size, sha)
        self.log(f"[convert] {split}: {rel} done in {time.time() - t0:.1f}s")
        return rel

    def _write_listing(self, split: str, shards: list[_Shard]) -> str:
        """OUT/<split>.samples.tsv: the key, label and source file of each dataset index."""
        rows = ["index\tkey\tlabel\tsource"]
        rows += (f"{i}\t{sample.key}\t{sample.label}\t{sample.source}"
                 for i, sample in enumerate(_samples_in_order(shards)))
        return self._write_recorded(f"{split}.samples.tsv", ("\n".join(rows) + "\n").encode())

    def _write_sizes(self, split: str, shards: list[_Shard]) -> str:
        """OUT/<split>.sizes.npy: int32 (num_samples, 2), the stored JPEG's (height, width) per dataset index
        (dataprep.layout.SplitInfo.image_sizes reads it)."""
        sizes = np.array([(sample.height, sample.width) for sample in _samples_in_order(shards)], dtype="<i4")
        sizes = sizes.reshape(-1, 2)
        buf = io.BytesIO()
        np.save(buf, sizes, allow_pickle=False)
        return self._write_recorded(f"{split}.sizes.npy", buf.getvalue())

    def _write_recorded(self, rel: str, data: bytes) -> str:
        atomic_write_bytes(self.out / rel, data)
        self._record_file(rel, len(data), hashlib.sha256(data).hexdigest())
        return rel

    def _record_file(self, rel: str, size: int, sha: str) -> None:
        self.files[rel] = {"size": size, "sha256": sha}

    def _remove_staging(self) -> None:
        """Without the dali format the shards were only the beton's staging: remove them."""
        if "dali" not in self.settings.formats:
            shutil.rmtree(self.shard_dir, ignore_errors=True)

    def _log_summary(self, source: Source, splits: dict, seconds: float) -> None:
        """What was written, and every skipped input with its reason."""
        num_inputs = sum(len(inputs) for inputs in source.splits.values()) + len(source.unusable)
        summary = ", ".join(f"{k}: {v['num_samples']} ({v['stored_as_is']} stored as is, {v['reencoded']} re-encoded)"
                            for k, v in splits.items())
        self.log(f"[convert] wrote {summary} samples; skipped {len(self.skipped)} of {num_inputs} "
                 f"inputs in {seconds:.1f}s")
        for skip in self.skipped:
            self.log(f"[convert]   skipped {skip.path}: {skip.reason}")

    def _write_manifest(self, source: Source, splits: dict) -> dict:
        """OUT/manifest.json, last and atomically: the file that makes OUT a complete dataset."""
        manifest = {
            "format_version": FORMAT_VERSION,
            "classes": source.classes,
            "splits": splits,
            "settings": {**asdict(self.settings), "formats": list(self.settings.formats)},
            "source": str(Path(self.src).resolve()),
            "files": self.files,
            "skipped": [asdict(skip) for skip in self.skipped],
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "tool": {"fastrsb": _version(), "python": sys.version.split()[0]},
        }
        atomic_write_json(self.out / MANIFEST, manifest)
        return manifest


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fastrsb")
    except PackageNotFoundError:
        return "unknown"


def convert(src, out, settings: Settings = Settings(), *, workers: int | None = None, class_list=None,
            val_ground_truth=None, val_id_mapping=None, strict: bool = False, progress: bool = True,
            log: Callable[[str], None] = print) -> dict:
    """Convert the tree at src into OUT (what `fastrsb convert` runs); returns the manifest. settings is
    what the output depends on (its fingerprint decides which finished shards a re-run re-uses); the rest
    is how to run. Sources: dataprep.sources.scan_source (class_list, val_ground_truth, val_id_mapping)."""
    settings.validate()
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise ConversionError(f"--workers must be >= 1, got {workers}")
    converter = _Converter(src, Path(out), settings, workers, progress, log)
    return converter.run(class_list, val_ground_truth, val_id_mapping, strict)
