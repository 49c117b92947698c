"""`fastrsb convert`: a source tree -> FFCV .beton + DALI tar shards + manifest.

Two passes per split:
 1. Decode-check every candidate in a process pool; keep an eligible JPEG's own bytes
    (dataprep.images: YCbCr, 8-bit, baseline, within max_resolution, decodes cleanly) or
    re-encode it as RGB JPEG (longer side <= max_resolution, given quality; always with
    --reencode), and write shards of `shard_size` candidates. Each
    finished shard gets a sidecar in OUT/.work/ (fingerprint of its inputs and settings),
    which is what makes a killed conversion resumable shard by shard.
 2. FFCV: a DatasetWriter over the checked samples. In `jpg` mode it stores the very JPEG
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
from dataprep.sources import scan_source

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


def _prepare_one(cand: int, path: str, max_res: int, quality: int, reencode: bool):
    """(candidate, PreparedImage | reason str) for one source file."""
    try:
        return cand, prepare_image(path, max_res, quality, reencode)
    except BadImage as e:
        return cand, str(e)
    except Exception as e:  # an unforeseen decoder failure must not stop the conversion
        return cand, f"decoder error: {type(e).__name__}: {e}"


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
            return task[0], "the decoder crashed its process on this file"


def _prepared_in_order(todo: list, workers: int, chunk: int = 8):
    """Yield (candidate, result) for todo in order, on `workers` processes with a bounded window
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
class _Shard:
    """A finished shard: its files and its samples, the unit a resumed conversion re-uses."""

    fingerprint: str
    tar: dict  # {"path" (relative to OUT), "size", "sha256"}
    index: dict
    samples: list[StoredSample]
    skipped: list[dict]  # {"path", "reason"}

    def to_json(self) -> dict:
        return asdict(self)  # the samples too: asdict recurses into dataclasses in lists

    @classmethod
    def from_json(cls, d: dict) -> _Shard:
        return cls(**{**d, "samples": [StoredSample(**e) for e in d["samples"]]})


class _FfcvSamples:
    """Indexable (image, label) source for ffcv's DatasetWriter over the checked samples: the stored JPEG
    bytes read back from the shards (jpg mode), or the source decoded again (raw pixels for the other modes)."""

    def __init__(self, samples: list[tuple[Path, StoredSample]], from_shards: bool):
        self.samples = samples  # (its shard's tar, the sample)
        self.from_shards = from_shards

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        tar, e = self.samples[i]
        if self.from_shards:
            fd = os.open(tar, os.O_RDONLY)
            try:
                data = os.pread(fd, e.size, e.offset)
            finally:
                os.close(fd)
            return PreparedImage(data, e.height, e.width), e.label
        return load_rgb(e.source), e.label


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


def _write_beton(path: Path, samples: _FfcvSamples, s: Settings, workers: int) -> None:
    try:
        from ffcv.fields import IntField, RGBImageField
        from ffcv.writer import DatasetWriter
    except ImportError as e:
        raise ConversionError(f"format 'ffcv' needs the ffcv package ({e}); install with pip install -e '.[ffcv]'") from e
    image = RGBImageField(
        write_mode=s.write_mode,
        max_resolution=s.max_resolution,
        smart_threshold=s.smart_threshold,
        jpeg_quality=s.jpeg_quality,
        compress_probability=s.compress_probability,
    )
    if samples.from_shards:
        image.encode = types.MethodType(_encode_prepared, image)
    atomic_write(path, lambda tmp: DatasetWriter(str(tmp), {"image": image, "label": IntField()}, num_workers=workers)
                 .from_indexed_dataset(samples, chunksize=64))


class _Converter:
    def __init__(self, src, out: Path, s: Settings, workers: int, progress: bool, log: Callable[[str], None]):
        self.src, self.out, self.s, self.workers, self.progress, self.log = src, out, s, workers, progress, log
        self.work = out / ".work"
        self.shard_dir = out / "dali" if "dali" in s.formats else self.work / "staging"
        self.files: dict[str, dict] = {}
        self.skipped: list[dict] = []

    def _record(self, rel: str, size: int, sha: str) -> None:
        self.files[rel] = {"size": size, "sha256": sha}

    def _sidecar(self, stem: str) -> Path:
        return self.work / f"{stem}.json"

    def _reusable(self, stem: str, fp: str) -> _Shard | None:
        try:
            side = json.loads(self._sidecar(stem).read_text())
            if side.get("fingerprint") != fp:
                return None
            shard = _Shard.from_json(side)
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            return None
        for f in (shard.tar, shard.index):
            p = self.out / f["path"]
            if not p.is_file() or p.stat().st_size != f["size"]:
                return None
        return shard

    def _plan(self, split: str, samples: list[tuple[Path, int]]) -> list[dict]:
        plan = []
        for j, start in enumerate(range(0, len(samples), self.s.shard_size)):
            chunk = samples[start:start + self.s.shard_size]
            inputs = []
            for p, label in chunk:
                try:
                    st = p.stat()
                    inputs.append([str(p), label, st.st_size, st.st_mtime_ns])
                except OSError:
                    inputs.append([str(p), label, -1, -1])
            # "v": a conversion into an OUT of another format version redoes every shard (and so the beton), it
            # never mixes the two (tests/test_convert.py::test_a_format_1_dataset_is_refused_and_rebuilt_in_place)
            fp = _fingerprint({"v": FORMAT_VERSION, "sidecar": _SIDECAR_VERSION, "max_res": self.s.max_resolution,
                               "q": self.s.jpeg_quality, "as_is": not self.s.reencode, "start": start, "inputs": inputs})
            plan.append({"stem": shard_stem(split, j), "start": start, "chunk": chunk, "fingerprint": fp})
        return plan

    def _finish_shard(self, shard: dict, results: dict[int, object]) -> _Shard:
        members, samples, skipped = [], [], []
        tar_rel = os.path.relpath(self.shard_dir / f"{shard['stem']}.tar", self.out)
        idx_rel = os.path.relpath(self.shard_dir / f"{shard['stem']}.idx", self.out)
        for k, (path, label) in enumerate(shard["chunk"]):
            cand = shard["start"] + k
            r = results.pop(cand)
            if isinstance(r, str):
                skipped.append({"path": str(path), "reason": r})
                continue
            key = f"{cand:09d}"
            members.append(ShardMember(key, r.jpeg, label))
            samples.append(StoredSample(key, str(path), label, r.height, r.width, r.reencode_reason))
        tar_bytes, idx_bytes = write_shard(self.out / tar_rel, self.out / idx_rel, members)
        offsets = read_wds_index(self.out / idx_rel)
        done = _Shard(
            fingerprint=shard["fingerprint"],
            tar={"path": tar_rel, "size": len(tar_bytes), "sha256": hashlib.sha256(tar_bytes).hexdigest()},
            index={"path": idx_rel, "size": len(idx_bytes), "sha256": hashlib.sha256(idx_bytes).hexdigest()},
            samples=[replace(e, offset=comp["jpg"][0], size=comp["jpg"][1]) for e, comp in zip(samples, offsets)],
            skipped=skipped,
        )
        atomic_write_json(self._sidecar(shard["stem"]), done.to_json())
        return done

    def _pass1(self, split: str, samples: list[tuple[Path, int]]) -> list[_Shard]:
        plan = self._plan(split, samples)
        sides: list[_Shard | None] = [self._reusable(sh["stem"], sh["fingerprint"]) for sh in plan]
        pending = [sh for sh, side in zip(plan, sides) if side is None]
        reused = len(plan) - len(pending)
        todo = [(sh["start"] + k, str(p), self.s.max_resolution, self.s.jpeg_quality, self.s.reencode)
                for sh in pending for k, (p, _) in enumerate(sh["chunk"])]
        if reused:
            self.log(f"[convert] {split}: re-using {reused} finished shard(s) of {len(plan)}")
        bar = tqdm(total=len(samples), initial=len(samples) - len(todo), unit="img", desc=f"convert {split}",
                   disable=not self.progress, dynamic_ncols=True, smoothing=0.05)
        results: dict[int, object] = {}
        by_stem = {sh["stem"]: i for i, sh in enumerate(plan)}
        queue = list(pending)
        for cand, r in _prepared_in_order(todo, self.workers):
            results[cand] = r
            bar.update(1)
            head = queue[0]
            if cand == head["start"] + len(head["chunk"]) - 1:  # results arrive in order: shard complete
                sides[by_stem[head["stem"]]] = self._finish_shard(head, results)
                queue.pop(0)
        bar.close()
        return sides  # type: ignore[return-value]

    def _pass_ffcv(self, split: str, sides: list[_Shard]) -> str:
        beton = self.out / f"{split}.beton"
        rel = beton.name
        fp = _fingerprint({"shards": [sd.fingerprint for sd in sides], **asdict(self.s), "formats": None})
        side_path = self.work / f"{split}.beton.json"
        try:
            side = json.loads(side_path.read_text())
            if side["fingerprint"] == fp and beton.is_file() and beton.stat().st_size == side["size"]:
                self.log(f"[convert] {split}: re-using finished {rel}")
                self._record(rel, side["size"], side["sha256"])
                return rel
        except (OSError, json.JSONDecodeError, KeyError):
            pass
        stored = [(self.out / sd.tar["path"], e) for sd in sides for e in sd.samples]
        self.log(f"[convert] {split}: writing {rel} ({len(stored)} samples, write mode {self.s.write_mode})")
        t0 = time.time()
        _write_beton(beton, _FfcvSamples(stored, from_shards=self.s.write_mode == "jpg"), self.s, self.workers)
        size, sha = beton.stat().st_size, sha256_file(beton)
        atomic_write_json(side_path, {"fingerprint": fp, "size": size, "sha256": sha})
        self._record(rel, size, sha)
        self.log(f"[convert] {split}: {rel} done in {time.time() - t0:.1f}s")
        return rel

    def _write_sizes(self, split: str, sides: list[_Shard]) -> str:
        """OUT/<split>.sizes.npy: int32 (num_samples, 2), the stored JPEG's (height, width) per dataset index
        (dataprep.layout.SplitInfo.image_sizes reads it)."""
        rel = f"{split}.sizes.npy"
        sizes = np.array([(e.height, e.width) for sd in sides for e in sd.samples], dtype="<i4").reshape(-1, 2)
        buf = io.BytesIO()
        np.save(buf, sizes, allow_pickle=False)
        data = buf.getvalue()
        atomic_write_bytes(self.out / rel, data)
        self._record(rel, len(data), hashlib.sha256(data).hexdigest())
        return rel

    def _remove_stale_shards(self, split: str, count: int) -> None:
        for p in self.shard_dir.glob(f"{split}-*"):
            stem = p.name.split(".")[0]
            try:
                j = int(stem.rsplit("-", 1)[1])
            except ValueError:
                continue
            if j >= count:
                p.unlink()

    def run(self, class_list=None, val_ground_truth=None, val_id_mapping=None, strict=False) -> dict:
        source = scan_source(self.src, class_list, val_ground_truth, val_id_mapping)
        self.out.mkdir(parents=True, exist_ok=True)
        # A dataset is complete only with its manifest: drop the old one before touching anything.
        (self.out / MANIFEST).unlink(missing_ok=True)
        self.work.mkdir(exist_ok=True)
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self.skipped.extend(source.unusable)
        splits = {}
        t0 = time.time()
        total_in = 0
        for split, samples in source.splits.items():
            total_in += len(samples)
            sides = self._pass1(split, samples)
            self._remove_stale_shards(split, len(sides))
            per_class = [0] * len(source.classes)
            reencoded: dict[str, int] = {}
            rows = ["index\tkey\tlabel\tsource"]
            for sd in sides:
                self.skipped.extend(sd.skipped)
                for e in sd.samples:
                    per_class[e.label] += 1
                    rows.append(f"{len(rows) - 1}\t{e.key}\t{e.label}\t{e.source}")
                    if e.reencode_reason:
                        reencoded[e.reencode_reason] = reencoded.get(e.reencode_reason, 0) + 1
            num = sum(per_class)
            if num == 0:
                raise ConversionError(f"split '{split}': every input was skipped; nothing to write")
            info: dict = {"num_samples": num, "per_class": per_class, "stored_as_is": num - sum(reencoded.values()),
                          "reencoded": sum(reencoded.values()), "reencode_reasons": dict(sorted(reencoded.items()))}
            if "dali" in self.s.formats:
                info["dali_shards"] = [{"tar": sd.tar["path"], "index": sd.index["path"],
                                        "num_samples": len(sd.samples)} for sd in sides]
                for sd in sides:
                    for f in (sd.tar, sd.index):
                        self._record(f["path"], f["size"], f["sha256"])
            if "ffcv" in self.s.formats:
                info["ffcv"] = self._pass_ffcv(split, sides)
            listing = f"{split}.samples.tsv"
            data = ("\n".join(rows) + "\n").encode()
            atomic_write_bytes(self.out / listing, data)
            self._record(listing, len(data), hashlib.sha256(data).hexdigest())
            info["samples"] = listing
            info["sizes"] = self._write_sizes(split, sides)
            splits[split] = info
        if "dali" not in self.s.formats:
            shutil.rmtree(self.shard_dir, ignore_errors=True)
        self.skipped.sort(key=lambda d: d["path"])
        elapsed = time.time() - t0
        summary = ", ".join(f"{k}: {v['num_samples']} ({v['stored_as_is']} stored as is, {v['reencoded']} re-encoded)"
                            for k, v in splits.items())
        self.log(f"[convert] wrote {summary} samples; skipped {len(self.skipped)} of {total_in + len(source.unusable)} "
                 f"inputs in {elapsed:.1f}s")
        for sk in self.skipped:
            self.log(f"[convert]   skipped {sk['path']}: {sk['reason']}")
        if strict and self.skipped:
            raise ConversionError(f"--strict: {len(self.skipped)} input(s) could not be converted (listed above); "
                                  "no manifest written")
        manifest = {
            "format_version": FORMAT_VERSION,
            "classes": source.classes,
            "splits": splits,
            "settings": {**asdict(self.s), "formats": list(self.s.formats)},
            "source": str(Path(self.src).resolve()),
            "files": self.files,
            "skipped": self.skipped,
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
    s = settings
    s.validate()
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise ConversionError(f"--workers must be >= 1, got {workers}")
    return _Converter(src, Path(out), s, workers, progress, log).run(class_list, val_ground_truth, val_id_mapping, strict)
