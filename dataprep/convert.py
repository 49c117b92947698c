"""`fastrsb convert`: a source (class folders, the Hub's parquet shards or WebDataset tars) -> FFCV .beton + DALI tar
shards + manifest.

The source (dataprep.sources) gives each split's records in dataset order and streams what the workers decode: a
file's path, or a parquet row's / tar member's bytes read in the main process. The converter does not know layouts.
Two passes per split (`_Converter._convert_split` lists them in order):
 1. `_write_shards`: decode-check every record in a process pool; keep an eligible JPEG's own bytes
    (dataprep.images: YCbCr, 8-bit, baseline, within max_resolution, decodes cleanly) or
    re-encode it as RGB JPEG (longer side <= max_resolution, given quality; always with
    --reencode), and write shards of `shard_size` records. Each
    finished shard gets a sidecar in OUT/.work/ (fingerprint of its inputs and settings, its files' sha256,
    each sample's crc32), which is what makes a killed conversion resumable shard by shard.
 2. `_write_ffcv`: a DatasetWriter over the checked samples. In `jpg` mode it stores the very JPEG
    bytes of the shards (no second decode or lossy re-encode); raw/smart/proportion modes
    re-read the checked sources so raw pixels stay lossless.
Then per split the listing (<split>.samples.tsv, with each stored JPEG's crc32), the labels (<split>.labels.npy) and
the stored images' sizes (<split>.sizes.npy, height and width as the sidecars recorded them when the shard was written).
A rerun re-uses a finished shard or .beton only if its content still hashes to what was written, so rerunning the
same command also repairs damaged outputs, and rewrites nothing else.
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
import zlib
from collections import deque
from itertools import islice
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from dataprep.files import atomic_write, atomic_write_bytes, atomic_write_json, sha256_file
from dataprep.images import BadImage, PreparedImage, load_rgb, prepare_image
from dataprep.layout import (FORMAT_VERSION, LISTING_COLUMNS, MANIFEST, ShardLocations, ShardReader, read_wds_index,
                             shard_stem)
from dataprep.settings import ConversionError, Settings
from dataprep.shards import ShardMember, write_shard
from dataprep.sources import Record, Skipped, Source, scan_source

_SIDECAR_VERSION = 3  # 3: each sample's crc32; 2: samples as named records (StoredSample); another version is redone


def _fingerprint(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:32]


# A task: (candidate, the record's name, its payload: a path or its bytes, max_resolution, jpeg_quality, reencode)
_Task = tuple[int, str, "str | bytes", int, int, bool]


def _prepare_one(candidate: int, name: str, payload: str | bytes, max_res: int, quality: int, reencode: bool):
    """(candidate, PreparedImage | Skipped) for one record."""
    try:
        return candidate, prepare_image(payload, max_res, quality, reencode)
    except BadImage as e:
        return candidate, Skipped(name, str(e))
    except Exception as e:  # an unforeseen decoder failure must not stop the conversion
        return candidate, Skipped(name, f"decoder error: {type(e).__name__}: {e}")


def _prepare_chunk(tasks: list[_Task]):
    return [_prepare_one(*t) for t in tasks]


def _prepare_isolated(task: _Task):
    """Run one record in a throw-away process: a decoder that kills its process (a segfault in a
    codec, the OOM killer) costs that record, not the conversion."""
    ctx = mp.get_context("fork")
    with ProcessPoolExecutor(1, mp_context=ctx) as ex:
        try:
            return ex.submit(_prepare_one, *task).result()
        except BrokenProcessPool:
            candidate, name = task[:2]
            return candidate, Skipped(name, "the decoder crashed its process on this record")


def _prepared_in_order(tasks: Iterable[_Task], workers: int, chunk: int = 8):
    """Yield (candidate, PreparedImage | Skipped) for tasks in order, on `workers` processes with a bounded window
    in flight: tasks is consumed lazily (a hub source reads each record's bytes as its task is taken), so at most
    4 * workers chunks of records are in memory. If a worker process dies, the chunks that were in flight are
    redone one record at a time in isolation, so only the record that kills its decoder is lost (a
    multiprocessing.Pool would wait forever for the lost task)."""
    tasks = iter(tasks)
    chunks = iter(lambda: list(islice(tasks, chunk)), [])
    ctx = mp.get_context("fork")
    while True:
        redo: list[list[_Task]] = []
        with ProcessPoolExecutor(workers, mp_context=ctx) as ex:
            inflight: deque = deque()
            try:
                while True:
                    while len(inflight) < 4 * workers and (next_chunk := next(chunks, None)) is not None:
                        inflight.append((next_chunk, ex.submit(_prepare_chunk, next_chunk)))
                    if not inflight:
                        return
                    results = inflight[0][1].result()
                    inflight.popleft()
                    yield from results
            except BrokenProcessPool:
                redo = [tasks_of_chunk for tasks_of_chunk, _ in inflight]
        for tasks_of_chunk in redo:
            for task in tasks_of_chunk:
                yield _prepare_isolated(task)


@dataclass(frozen=True)
class StoredSample:
    """One converted sample, as its shard's sidecar (OUT/.work/STEM.json) records it."""

    key: str  # its name in the tar shard (the candidate number)
    source: str  # the source record's name (dataprep.sources.Record.name)
    label: int
    height: int  # of the JPEG as stored (after any re-encode/resize): OUT/<split>.sizes.npy
    width: int
    reencode_reason: str  # "" when the source's own bytes are stored (dataprep.images.reencode_reason)
    offset: int = -1  # of its JPEG bytes in the shard's tar
    size: int = -1
    crc32: int = -1  # of its JPEG bytes: OUT/<split>.samples.tsv, what verify checks each stored copy by


@dataclass(frozen=True)
class _ShardJob:
    """A shard still to be checked or written: its inputs, and the fingerprint a finished shard must match."""

    stem: str
    start: int  # candidate number of its first input (a split's records are candidates 0, 1, ...)
    inputs: list[Record]
    fingerprint: str

    @property
    def last(self) -> int:
        return self.start + len(self.inputs) - 1

    def candidates(self) -> Iterator[tuple[int, Record]]:
        """(candidate, record) of each input."""
        return ((self.start + k, record) for k, record in enumerate(self.inputs))


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

    def __init__(self, samples: list[tuple[Path, StoredSample]], from_shards: bool, source: Source,
                 records: list[Record]):
        self.samples = samples  # (its shard's tar, the sample)
        self.from_shards = from_shards
        tars = sorted({tar for tar, _ in samples})
        shard_of = {tar: j for j, tar in enumerate(tars)}
        self.shards = ShardReader(ShardLocations(
            tars, np.array([shard_of[tar] for tar, _ in samples], np.int32),
            np.array([s.offset for _, s in samples], np.int64), np.array([s.size for _, s in samples], np.int64)))
        self.source, self.records = source, records  # a sample's record is records[int(sample.key)]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        _, sample = self.samples[i]
        if self.from_shards:
            return PreparedImage(self.shards.read(i), sample.height, sample.width), sample.label
        return load_rgb(self.source.payload(self.records[int(sample.key)])), sample.label


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
    """One conversion of a source into OUT; `run` lists its steps in order."""

    def __init__(self, src, out: Path, settings: Settings, workers: int, progress: bool, log: Callable[[str], None]):
        self.src, self.out, self.settings = src, out, settings
        self.workers, self.progress, self.log = workers, progress, log
        self.work = out / ".work"
        self.shard_dir = out / "dali" if "dali" in settings.formats else self.work / "staging"
        self.files: dict[str, dict] = {}  # the manifest's `files`: {path relative to OUT: {"size", "sha256"}}
        self.skipped: list[Skipped] = []
        self.source: Source | None = None

    def run(self, class_list=None, val_ground_truth=None, val_id_mapping=None, strict=False,
            source_format=None) -> dict:
        """Scan the source, convert each split, account for the skipped inputs, then write the manifest."""
        source = self.source = scan_source(self.src, class_list, val_ground_truth, val_id_mapping, source_format)
        if self.settings.shuffle_store:
            if source.layout != "folder":
                raise ConversionError(f"--shuffle-store: a {source.layout} source is stored in its own order, which "
                                      "reads its files in sequence (the Hub's shards come shuffled already)")
            # one fixed seed: a rerun cuts the same shards and resumes
            for split, records in source.splits.items():
                source.splits[split] = [records[i] for i in np.random.default_rng(0).permutation(len(records))]
        self.log(f"[convert] source: {source.description}"
                 + (", stored in a seeded random order" if self.settings.shuffle_store else ""))
        self._open_output()
        self.skipped.extend(source.unusable)
        started = time.time()
        splits = {split: self._convert_split(split, records, len(source.classes))
                  for split, records in source.splits.items()}
        self._remove_staging()
        self.skipped.sort(key=lambda skip: skip.path)  # the log and the manifest list them by record
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

    def _convert_split(self, split: str, records: list[Record], num_classes: int) -> dict:
        """Both passes over one split, then its listing, labels and sizes; returns the split's manifest entry."""
        shards = self._write_shards(split, records)
        self._remove_stale_shards(split, len(shards))
        self.skipped.extend(skip for shard in shards for skip in shard.skipped)
        info = self._count_samples(split, shards, num_classes)
        if "dali" in self.settings.formats:
            info["dali_shards"] = self._record_dali_shards(shards)
        if "ffcv" in self.settings.formats:
            info["ffcv"] = self._write_ffcv(split, shards, records)
        info["samples"] = self._write_listing(split, shards)
        info["labels"] = self._write_labels(split, shards)
        info["sizes"] = self._write_sizes(split, shards)
        return info

    def _write_shards(self, split: str, records: list[Record]) -> list[_Shard]:
        """Pass 1: decode-check every record and write the checked ones as tar shards, re-using each finished
        shard whose sidecar still matches (what makes a killed conversion resumable shard by shard)."""
        jobs = self._shard_jobs(split, records)
        shards: list[_Shard | None] = [self._finished_shard(split, job) for job in jobs]
        waiting = deque(i for i, shard in enumerate(shards) if shard is None)
        if len(waiting) < len(jobs):
            self.log(f"[convert] {split}: re-using {len(jobs) - len(waiting)} finished shard(s) of {len(jobs)}")
        todo = [jobs[i] for i in waiting]
        bar = tqdm(total=len(records), initial=len(records) - sum(len(job.inputs) for job in todo), unit="img",
                   desc=f"convert {split}", disable=not self.progress, dynamic_ncols=True, smoothing=0.05)
        results: dict[int, PreparedImage | Skipped] = {}
        for candidate, result in _prepared_in_order(self._tasks(todo), self.workers):
            results[candidate] = result
            bar.update(1)
            if candidate == jobs[waiting[0]].last:  # results arrive in order: that shard is complete
                i = waiting.popleft()
                shards[i] = self._finish_shard(jobs[i], results)
        bar.close()
        return shards  # type: ignore[return-value]

    def _tasks(self, jobs: list[_ShardJob]) -> Iterator[_Task]:
        """The workers' tasks for the jobs' records, built as they are taken: the source reads a record's bytes
        (or hands over its path) only then."""
        numbered = (numbered for job in jobs for numbered in job.candidates())
        payloads = self.source.payloads(record for job in jobs for record in job.inputs)
        s = self.settings
        return ((candidate, record.name, payload, s.max_resolution, s.jpeg_quality, s.reencode)
                for (candidate, record), payload in zip(numbered, payloads, strict=True))

    def _shard_jobs(self, split: str, records: list[Record]) -> list[_ShardJob]:
        """Cut a split's records into shards of shard_size, each fingerprinted by its records (the container file's
        path, size and mtime, the record's place in it, its label) and the settings that change its bytes: a
        finished shard is re-used only while nothing of that changed."""
        stats: dict[str, tuple[int, int]] = {}  # container -> (size, mtime): a parquet or tar is stat'ed once

        def stat(container: str) -> tuple[int, int]:
            if container not in stats:
                try:
                    st = os.stat(container)
                    stats[container] = (st.st_size, st.st_mtime_ns)
                except OSError:
                    stats[container] = (-1, -1)
            return stats[container]

        jobs = []
        for j, start in enumerate(range(0, len(records), self.settings.shard_size)):
            shard_records = records[start:start + self.settings.shard_size]
            identity = [[r.container, *stat(r.container), r.row, r.key, r.label] for r in shard_records]
            # "v": a conversion into an OUT of another format version redoes every shard (and so the beton), it
            # never mixes the two (tests/test_convert.py::test_a_format_1_dataset_is_refused_and_rebuilt_in_place)
            fingerprint = _fingerprint({"v": FORMAT_VERSION, "sidecar": _SIDECAR_VERSION,
                                        "max_res": self.settings.max_resolution, "q": self.settings.jpeg_quality,
                                        "as_is": not self.settings.reencode, "start": start, "inputs": identity})
            jobs.append(_ShardJob(shard_stem(split, j), start, shard_records, fingerprint))
        return jobs

    def _sidecar(self, stem: str) -> Path:
        return self.work / f"{stem}.json"

    def _finished_shard(self, split: str, job: _ShardJob) -> _Shard | None:
        """The shard a previous run finished for this job, if its sidecar matches and its files are whole: their
        content is hashed (a damaged shard keeps its size), and a shard whose files differ is rewritten."""
        try:
            sidecar = json.loads(self._sidecar(job.stem).read_text())
            if sidecar.get("fingerprint") != job.fingerprint:
                return None
            shard = _Shard.from_json(sidecar)
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            return None
        for f in (shard.tar, shard.index):
            if not self._is_intact(split, f.path, f.size, f.sha256):
                return None
        return shard

    def _is_intact(self, split: str, rel: str, size: int, sha256: str) -> bool:
        """Whether OUT/rel is the file a previous run wrote (size, then content); says so when it is not."""
        p = self.out / rel
        if not p.is_file():
            return False
        if p.stat().st_size != size or sha256_file(p) != sha256:
            self.log(f"[convert] {split}: {rel} is not the file that was written (damaged or modified): rewriting it")
            return False
        return True

    def _finish_shard(self, job: _ShardJob, results: dict[int, PreparedImage | Skipped]) -> _Shard:
        """Write a shard's tar and index from its inputs' results, then its sidecar (last: it marks the shard done)."""
        members, samples, skipped = [], [], []
        tar_rel = os.path.relpath(self.shard_dir / f"{job.stem}.tar", self.out)
        idx_rel = os.path.relpath(self.shard_dir / f"{job.stem}.idx", self.out)
        for candidate, record in job.candidates():
            match results.pop(candidate):
                case Skipped() as skip:
                    skipped.append(skip)
                case PreparedImage() as image:
                    key = f"{candidate:09d}"
                    members.append(ShardMember(key, image.jpeg, record.label))
                    samples.append(StoredSample(key, record.name, record.label, image.height, image.width,
                                                image.reencode_reason, crc32=zlib.crc32(image.jpeg)))
        tar_bytes, idx_bytes = write_shard(self.out / tar_rel, self.out / idx_rel, members)
        offsets = read_wds_index(self.out / idx_rel)
        shard = _Shard(
            fingerprint=job.fingerprint,
            tar=ShardFile.of(tar_rel, tar_bytes),
            index=ShardFile.of(idx_rel, idx_bytes),
            samples=[replace(sample, offset=comp["jpg"][0], size=comp["jpg"][1])
                     for sample, comp in zip(samples, offsets)],
            skipped=skipped,
        )
        atomic_write_json(self._sidecar(job.stem), shard.to_json())
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

    def _write_ffcv(self, split: str, shards: list[_Shard], records: list[Record]) -> str:
        """Pass 2: OUT/<split>.beton over the checked samples, unless its sidecar shows one finished from the same
        shards and settings whose content is still what was written (ffcv's writer is the slow part of a resumed
        run; a damaged .beton keeps its size, so it is hashed)."""
        beton = self.out / f"{split}.beton"
        rel = beton.name
        fingerprint = _fingerprint({"shards": [shard.fingerprint for shard in shards], **asdict(self.settings),
                                    "formats": None})
        sidecar_path = self.work / f"{split}.beton.json"
        try:
            sidecar = json.loads(sidecar_path.read_text())
            if sidecar["fingerprint"] == fingerprint and self._is_intact(split, rel, sidecar["size"], sidecar["sha256"]):
                self.log(f"[convert] {split}: re-using finished {rel}")
                self._record_file(rel, sidecar["size"], sidecar["sha256"])
                return rel
        except (OSError, json.JSONDecodeError, KeyError):
            pass
        stored = [(self.out / shard.tar.path, sample) for shard in shards for sample in shard.samples]
        self.log(f"[convert] {split}: writing {rel} ({len(stored)} samples, write mode {self.settings.write_mode})")
        t0 = time.time()
        _write_beton(beton, _FfcvSamples(stored, self.settings.write_mode == "jpg", self.source, records), self.settings,
                     self.workers)
        size, sha = beton.stat().st_size, sha256_file(beton)
        atomic_write_json(sidecar_path, {"fingerprint": fingerprint, "size": size, "sha256": sha})
        self._record_file(rel, size, sha)
        self.log(f"[convert] {split}: {rel} done in {time.time() - t0:.1f}s")
        return rel

    def _write_listing(self, split: str, shards: list[_Shard]) -> str:
        """OUT/<split>.samples.tsv: the key, label, source record and the stored JPEG's crc32 (8 hex digits) of each
        dataset index (dataprep.layout.read_listing reads it)."""
        rows = ["\t".join(LISTING_COLUMNS)]
        rows += (f"{i}\t{sample.key}\t{sample.label}\t{sample.source}\t{sample.crc32:08x}"
                 for i, sample in enumerate(_samples_in_order(shards)))
        return self._write_recorded(f"{split}.samples.tsv", ("\n".join(rows) + "\n").encode())

    def _write_labels(self, split: str, shards: list[_Shard]) -> str:
        """OUT/<split>.labels.npy: int64 (num_samples,), the label of each dataset index (SplitInfo.labels)."""
        labels = np.fromiter((sample.label for sample in _samples_in_order(shards)), dtype="<i8")
        return self._write_recorded(f"{split}.labels.npy", _npy_bytes(labels))

    def _write_sizes(self, split: str, shards: list[_Shard]) -> str:
        """OUT/<split>.sizes.npy: int32 (num_samples, 2), the stored JPEG's (height, width) per dataset index
        (dataprep.layout.SplitInfo.image_sizes reads it)."""
        sizes = np.array([(sample.height, sample.width) for sample in _samples_in_order(shards)], dtype="<i4")
        return self._write_recorded(f"{split}.sizes.npy", _npy_bytes(sizes.reshape(-1, 2)))

    def _write_recorded(self, rel: str, data: bytes) -> str:
        """Write OUT/rel and list it in the manifest; a file that already holds these bytes is left as it is (a rerun
        rewrites only what changed)."""
        path, sha = self.out / rel, hashlib.sha256(data).hexdigest()
        if not (path.is_file() and path.stat().st_size == len(data) and sha256_file(path) == sha):
            atomic_write_bytes(path, data)
        self._record_file(rel, len(data), sha)
        return rel

    def _record_file(self, rel: str, size: int, sha: str) -> None:
        self.files[rel] = {"size": size, "sha256": sha}

    def _remove_staging(self) -> None:
        """Without the dali format the shards were only the beton's staging: remove them."""
        if "dali" not in self.settings.formats:
            shutil.rmtree(self.shard_dir, ignore_errors=True)

    def _log_summary(self, source: Source, splits: dict, seconds: float) -> None:
        """What was written, every skipped input with its reason, and the unlabeled records left out."""
        num_inputs = sum(len(records) for records in source.splits.values()) + len(source.unusable)
        summary = ", ".join(f"{k}: {v['num_samples']} ({v['stored_as_is']} stored as is, {v['reencoded']} re-encoded)"
                            for k, v in splits.items())
        self.log(f"[convert] wrote {summary} samples; skipped {len(self.skipped)} of {num_inputs} "
                 f"inputs in {seconds:.1f}s")
        for skip in self.skipped:
            self.log(f"[convert]   skipped {skip.path}: {skip.reason}")
        if source.unlabeled:
            self.log("[convert] not converted, unlabeled (label -1): "
                     + ", ".join(f"{split}: {n} records" for split, n in source.unlabeled.items()))

    def _write_manifest(self, source: Source, splits: dict) -> dict:
        """OUT/manifest.json, last and atomically: the file that makes OUT a complete dataset."""
        manifest = {
            "format_version": FORMAT_VERSION,
            "classes": source.classes,
            "splits": splits,
            "settings": {**asdict(self.settings), "formats": list(self.settings.formats)},
            "source": str(Path(self.src).resolve()),
            "source_format": source.layout,
            "unlabeled": source.unlabeled,  # split -> records labelled -1 (the Hub's test), not converted
            "files": self.files,
            "skipped": [asdict(skip) for skip in self.skipped],
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "tool": {"fastrsb": _version(), "python": sys.version.split()[0]},
        }
        atomic_write_json(self.out / MANIFEST, manifest)
        return manifest


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fastrsb")
    except PackageNotFoundError:
        return "unknown"


def convert(src, out, settings: Settings = Settings(), *, workers: int | None = None, class_list=None,
            val_ground_truth=None, val_id_mapping=None, source_format: str | None = None, strict: bool = False,
            progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Convert the source at src into OUT (what `fastrsb convert` runs); returns the manifest. settings is
    what the output depends on (its fingerprint decides which finished shards a re-run re-uses); the rest
    is how to run. Sources: dataprep.sources.scan_source (class_list, val_ground_truth, val_id_mapping,
    source_format: folder, parquet or wds, detected when None)."""
    settings.validate()
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise ConversionError(f"--workers must be >= 1, got {workers}")
    converter = _Converter(src, Path(out), settings, workers, progress, log)
    return converter.run(class_list, val_ground_truth, val_id_mapping, strict, source_format)
