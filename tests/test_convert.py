"""The converter on messy generated trees: both formats read back by their own libraries."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dataprep.convert import ConversionError, Settings, convert
from dataprep.layout import MANIFEST, DatasetError, open_dataset
from dataprep.sources import SourceError, scan_source
from dataprep.verify import VerifyError, verify
from tests.datagen import CLASS_COLOURS, make_good_tree, make_messy_tree, save_jpeg, textured

pytestmark = pytest.mark.timeout(300)
CLASSES = ["cat", "dog", "eel"]


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    src = root / "src"
    truth = make_messy_tree(src)
    out = root / "out"
    manifest = convert(src, out, Settings(max_resolution=256, shard_size=5), workers=2, progress=False, log=lambda s: None)
    return src, out, manifest, truth


def _dominant_class(img: np.ndarray) -> int | None:
    """Index of the class colour nearest to the image's mean colour (None for the grayscale input)."""
    mean = np.asarray(img, float).reshape(-1, 3).mean(0)
    if mean.max() - mean.min() < 10:
        return None
    return int(np.argmin([np.abs(mean - np.asarray(CLASS_COLOURS[c])).sum() for c in CLASSES]))


def _colour_matches(imgs, labels) -> int:
    """How many colourful samples show their label's colour; asserts at most one grayscale sample."""
    seen = [_dominant_class(np.asarray(im)) for im in imgs]
    assert sum(s is None for s in seen) <= 1
    return sum(s == lab for s, lab in zip(seen, labels) if s is not None) + sum(s is None for s in seen)


def test_manifest_counts_and_skipped(messy):
    src, out, m, truth = messy
    assert m["classes"] == CLASSES
    for split, n in truth["good"].items():
        assert m["splits"][split]["num_samples"] == n
        assert sum(m["splits"][split]["per_class"]) == n
    skipped = {os.path.relpath(s["path"], src): s["reason"] for s in m["skipped"]}
    assert set(skipped) == set(truth["bad"])  # exactly the broken files, hidden files ignored
    for rel, word in truth["bad"].items():
        assert word in skipped[rel], (rel, skipped[rel])
    for rel, meta in m["files"].items():
        assert (out / rel).stat().st_size == meta["size"]
    assert m["settings"]["max_resolution"] == 256 and m["settings"]["formats"] == ["ffcv", "dali"]


def test_samples_listing_names_sources(messy):
    src, out, m, truth = messy
    rows = (out / "train.samples.tsv").read_text().splitlines()[1:]
    assert len(rows) == truth["good"]["train"]
    sources = {Path(r.split("\t")[3]).name for r in rows}
    assert {"gray.JPEG", "cmyk.JPEG", "png_in_disguise.JPEG", "palette.jpg", "ünïcödé_名前.JPEG", "inner.JPEG"} <= sources
    labels = [int(r.split("\t")[2]) for r in rows]
    assert labels == sorted(labels)  # canonical order: by label


def test_ffcv_loader_reads_every_sample_with_its_label(messy):
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    src, out, m, truth = messy
    ds = open_dataset(out)
    for split in ("train", "val"):
        info = ds.split(split)
        loader = Loader(str(info.beton_path), batch_size=1, num_workers=1, order=OrderOption.SEQUENTIAL,
                        pipelines={"image": [CenterCropRGBImageDecoder((32, 32), ratio=1.0)],
                                   "label": [IntDecoder(), ToTensor()]})
        labels, imgs = [], []
        for img, lab in loader:
            labels.append(int(lab[0, 0]))
            assert img.shape == (1, 32, 32, 3)
            imgs.append(np.array(img[0]))  # ffcv reuses its buffers
        assert labels == info.labels.tolist()
        assert _colour_matches(imgs, labels) == len(labels)


def test_dali_cpu_reader_reads_every_sample_with_its_label(messy):
    from nvidia.dali import fn, pipeline_def

    src, out, m, truth = messy
    ds = open_dataset(out)
    for split in ("train", "val"):
        info = ds.split(split)
        shards = info.shards

        @pipeline_def(batch_size=4, num_threads=2, device_id=None)
        def pipe():
            jpg, cls = fn.readers.webdataset(
                paths=[str(out / s["tar"]) for s in shards], index_paths=[str(out / s["index"]) for s in shards],
                ext=["jpg", "cls"], random_shuffle=False, pad_last_batch=True, name="reader")
            return fn.decoders.image(jpg, device="cpu"), cls

        p = pipe()
        p.build()
        n = info.num_samples
        labels, decoded = [], []
        for _ in range((n + 3) // 4):
            imgs, clss = p.run()
            for k in range(len(imgs)):
                if len(labels) == n:
                    break
                labels.append(int(bytes(np.asarray(clss.at(k))).decode()))
                decoded.append(np.array(imgs.at(k)))
        assert labels == info.labels.tolist()
        assert _colour_matches(decoded, labels) == n


def test_all_outputs_are_rgb_jpeg_within_max_resolution(messy):
    import tarfile
    from PIL import Image

    src, out, m, truth = messy
    n = 0
    for tar_path in sorted((out / "dali").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for mem in tar.getmembers():
                if mem.name.endswith(".jpg"):
                    im = Image.open(tar.extractfile(mem))
                    assert im.format == "JPEG" and im.mode == "RGB" and max(im.size) <= 256
                    n += 1
    assert n == sum(truth["good"].values())


def test_verify_accepts_then_catches_tampering(messy, tmp_path):
    import shutil

    src, out, m, truth = messy
    verify(out, log=lambda s: None)
    verify(out, quick=True, log=lambda s: None)
    work = tmp_path / "copy"
    shutil.copytree(out, work)
    tar = work / m["splits"]["train"]["dali_shards"][0]["tar"]
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tar.write_bytes(bytes(data))
    with pytest.raises(VerifyError, match="train-00000.tar"):
        verify(work, log=lambda s: None)
    # the beton's labels: corrupt one and keep its checksum out of the way to hit the label check
    shutil.rmtree(work)
    shutil.copytree(out, work)
    (work / "val.beton").write_bytes(b"\0" * 10)
    with pytest.raises(DatasetError, match="val.beton"):
        verify(work, quick=True, log=lambda s: None)
    (work / MANIFEST).unlink()
    with pytest.raises(DatasetError, match="manifest.json"):
        verify(work, log=lambda s: None)


def test_verify_reaches_the_label_checks_with_a_tampered_label(messy, tmp_path):
    """A label changed in place, size kept and the manifest's checksum updated to match (what a converter bug
    would leave): only verify's label checks stand between it and training, in the DALI shards and in the beton."""
    import shutil

    from dataprep.files import sha256_file
    from dataprep.layout import read_wds_index
    from ffcv.reader import Reader
    from ffcv.types import HeaderType

    src, out, m, truth = messy

    def rehash(root: Path, rel: str) -> None:  # keep the manifest consistent with the tampered file
        manifest = json.loads((root / MANIFEST).read_text())
        manifest["files"][rel]["sha256"] = sha256_file(root / rel)
        (root / MANIFEST).write_text(json.dumps(manifest))

    # DALI: the .cls member of train sample 0 (class 0) says class 1
    work = tmp_path / "dali"
    shutil.copytree(out, work)
    shard = m["splits"]["train"]["dali_shards"][0]
    offset, size = read_wds_index(work / shard["index"])[0]["cls"]
    with open(work / shard["tar"], "r+b") as f:
        f.seek(offset)
        assert f.read(size) == b"0"
        f.seek(offset)
        f.write(b"1")
    rehash(work, shard["tar"])
    for quick in (False, True):
        with pytest.raises(VerifyError, match=r"train-00000.tar: sample 0 \(dataset index 0\) has label b'1', train.labels.npy says 0"):
            verify(work, quick=quick, log=lambda s: None)

    # ffcv: the label column of val sample 0 in the beton's metadata table says class 2
    work = tmp_path / "ffcv"
    shutil.copytree(out, work)
    beton = work / "val.beton"
    reader = Reader(str(beton))
    table = np.memmap(beton, dtype=reader.metadata_type, mode="r+", shape=(reader.num_samples,),
                      offset=HeaderType.itemsize + reader.field_descriptors.nbytes)
    label = f"f{reader.field_names.index('label')}"
    assert table[label][0] == 0
    table[label][0] = 2
    table.flush()
    del table
    rehash(work, "val.beton")
    for quick in (False, True):
        with pytest.raises(VerifyError, match=r"val.beton: sample 0 has label 2, val.labels.npy says 0"):
            verify(work, quick=quick, log=lambda s: None)


def test_cli_verify_exit_codes(messy, tmp_path):
    src, out, m, truth = messy
    ok = subprocess.run([sys.executable, "-m", "fastrsb", "verify", str(out), "--quick"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "fastrsb", "verify", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 1 and "manifest.json" in bad.stderr


def test_strict_fails_without_manifest(tmp_path):
    src = tmp_path / "src"
    make_good_tree(src, 2)
    (src / "cat" / "bad.JPEG").write_bytes(b"")
    r = subprocess.run([sys.executable, "-m", "fastrsb", "convert", str(src), str(tmp_path / "out"), "--strict",
                        "--workers", "1", "--no-progress", "--formats", "dali"], capture_output=True, text=True)
    assert r.returncode == 2 and "--strict" in r.stderr
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_single_tree_dali_only_and_class_list(tmp_path):
    src = tmp_path / "src"
    make_good_tree(src, 3)
    (tmp_path / "classes.txt").write_text("eel\ncat\ndog\n")
    m = convert(src, tmp_path / "out", Settings(formats=("dali",)), workers=1, class_list=tmp_path / "classes.txt",
                progress=False, log=lambda s: None)
    assert list(m["splits"]) == ["train"] and m["classes"] == ["eel", "cat", "dog"]
    assert not (tmp_path / "out" / "train.beton").exists() and "ffcv" not in m["splits"]["train"]
    verify(tmp_path / "out", log=lambda s: None)


def test_flat_val_loc_solution_and_devkit(tmp_path):
    for layout in ("loc", "devkit"):
        src = tmp_path / layout
        make_good_tree(src / "train", 2, classes=("cat", "dog"))
        names = {"cat": "n001", "dog": "n002"}
        for c in ("cat", "dog"):
            (src / "train" / c).rename(src / "train" / names[c])
        val_labels = ["n002", "n001", "n002"]
        for i, wnid in enumerate(val_labels):
            colour = CLASS_COLOURS["dog" if wnid == "n002" else "cat"]
            save_jpeg(textured(50, 40, colour, i), src / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG")
        save_jpeg(textured(50, 40, CLASS_COLOURS["cat"], 9), src / "val" / "stray.JPEG")  # in no label file
        if layout == "loc":
            rows = "".join(f"ILSVRC2012_val_{i + 1:08d},{w} 1 2 3 4\n" for i, w in enumerate(val_labels))
            (src / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + rows)
        else:
            # devkit ids are not in wnid order: id 1 -> n002, id 2 -> n001
            (src / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n2\n1\n")
            (src / "ILSVRC2012_mapping.txt").write_text("1 n002\n2 n001\n")
        m = convert(src, tmp_path / f"out_{layout}", Settings(formats=("dali",)), workers=1, progress=False, log=lambda s: None)
        assert m["classes"] == ["n001", "n002"]
        assert m["splits"]["val"]["per_class"] == [1, 2], layout
        assert m["skipped"] == [{"path": str(src / "val" / "stray.JPEG"), "reason": "no ground-truth label for this file"}]


def test_flat_val_without_ground_truth_is_a_clear_error(tmp_path):
    make_good_tree(tmp_path / "train", 1)
    save_jpeg(textured(20, 20, (1, 2, 3), 0), tmp_path / "val" / "x.JPEG")
    with pytest.raises(SourceError, match="ground_truth"):
        scan_source(tmp_path)


def test_bad_settings_name_the_option(tmp_path):
    make_good_tree(tmp_path / "src", 1)
    with pytest.raises(ConversionError, match="--jpeg-quality"):
        convert(tmp_path / "src", tmp_path / "o", Settings(jpeg_quality=0), progress=False)
    with pytest.raises(ConversionError, match="--formats"):
        convert(tmp_path / "src", tmp_path / "o", Settings(formats=("tfrecord",)), progress=False)


def _wait_for(pred, proc, timeout=120.0):
    t0 = time.time()
    while not pred():
        assert proc.poll() is None, "conversion finished before it could be killed"
        assert time.time() - t0 < timeout, "timed out waiting for the conversion to reach the kill point"
        time.sleep(0.02)


def test_sigkill_then_rerun_resumes(tmp_path):
    src = tmp_path / "src"
    make_good_tree(src, 60, size=(160, 120))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fastrsb", "convert", str(src), str(out), "--workers", "1", "--shard-size", "8",
           "--no-progress"]
    # kill 1: in the middle of the DALI shard pass
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for(lambda: len(list((out / ".work").glob("train-*.json"))) >= 3, p)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    with pytest.raises(DatasetError):
        verify(out, log=lambda s: None)
    done_before = {q.name: q.stat().st_mtime_ns for q in (out / ".work").glob("train-*.json")}
    # kill 2: while the FFCV writer runs
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for(lambda: (out / ".train.beton.partial").exists(), p)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    with pytest.raises(DatasetError):
        verify(out, log=lambda s: None)
    for name, mtime in done_before.items():  # finished shards were re-used, not rewritten
        assert (out / ".work" / name).stat().st_mtime_ns == mtime
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "re-using" in r.stdout
    verify(out, log=lambda s: None)
    # the resumed dataset equals a clean conversion
    clean = convert(src, tmp_path / "clean", Settings(shard_size=8), workers=1, progress=False, log=lambda s: None)
    resumed = json.loads((out / MANIFEST).read_text())
    assert resumed["splits"] == json.loads(json.dumps(clean["splits"]))
    for rel, meta in clean["files"].items():
        if not rel.endswith(".beton"):  # ffcv's page layout depends on worker timing; its samples are verified
            assert resumed["files"][rel] == meta, rel


def test_a_decoder_that_kills_its_process_costs_only_that_file(tmp_path, monkeypatch):
    """Fault injection: a decoder process killed on one file (forked workers inherit the patch)."""
    import dataprep.convert as conv

    src = tmp_path / "src"
    make_good_tree(src, 12)
    real = conv.prepare_image

    def crashing(path, *a):
        if Path(path).name == "dog_0005.JPEG":
            os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would; a segfault ends the same way
        return real(path, *a)

    monkeypatch.setattr(conv, "prepare_image", crashing)
    m = convert(src, tmp_path / "out", Settings(formats=("dali",), shard_size=5), workers=2, progress=False, log=lambda s: None)
    assert [Path(s["path"]).name for s in m["skipped"]] == ["dog_0005.JPEG"]
    assert "crashed" in m["skipped"][0]["reason"]
    assert m["splits"]["train"]["num_samples"] == 35
    verify(tmp_path / "out", log=lambda s: None)


def _stored_bytes(out: Path, split: str) -> list[tuple[bytes, bytes, str]]:
    """(DALI shard bytes, .beton bytes, source path) of every sample of a split, in index order."""
    from ffcv.reader import Reader

    from dataprep.layout import read_wds_index

    info = open_dataset(out).split(split)
    shard = []
    for sh in info.shards:
        with open(out / sh["tar"], "rb") as f:
            for e in read_wds_index(out / sh["index"]):
                f.seek(e["jpg"][0])
                shard.append(f.read(e["jpg"][1]))
    reader = Reader(str(info.beton_path))
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    ptrs = reader.metadata[f"f{reader.field_names.index('image')}"]["data_ptr"]
    with open(info.beton_path, "rb") as f:
        beton = []
        for p in ptrs.tolist():
            f.seek(p)
            beton.append(f.read(sizes[p]))
    sources = [r.split("\t")[3] for r in (out / f"{split}.samples.tsv").read_text().splitlines()[1:]]
    return list(zip(shard, beton, sources))


def test_eligible_jpegs_are_stored_byte_for_byte_and_the_rest_reencoded(messy):
    """Baseline YCbCr JPEGs within max resolution keep their bytes (sha256) in both formats; grayscale, CMYK,
    progressive, oversized and non-JPEG inputs are re-encoded; the manifest counts both kinds by reason."""
    import hashlib

    src, out, m, truth = messy
    as_is_names = {"cat_0.JPEG", "cat_3.JPEG", "dog_0.JPEG", "dog_3.JPEG", "eel_0.JPEG", "eel_3.JPEG",  # 37x53, 64x64
                   "ünïcödé_名前.JPEG", "inner.JPEG"}
    sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    for split in ("train", "val"):
        samples = _stored_bytes(out, split)
        for shard, beton, source in samples:
            assert shard == beton, source  # one set of bytes for both formats
            name = Path(source).name
            as_is = split == "val" or name in as_is_names
            assert (sha(shard) == sha(Path(source).read_bytes())) == as_is, source
        info = m["splits"][split]
        assert info["stored_as_is"] + info["reencoded"] == info["num_samples"] == len(samples)
    assert m["splits"]["val"]["stored_as_is"] == truth["good"]["val"] and m["splits"]["val"]["reencoded"] == 0
    assert m["splits"]["train"]["stored_as_is"] == len(as_is_names)
    assert m["splits"]["train"]["reencode_reasons"] == {"larger than max resolution": 6, "gray JPEG": 1, "cmyk JPEG": 1,
                                                        "not a JPEG": 2, "progressive JPEG": 1}


def test_reencode_flag_and_exif_rotation(tmp_path):
    """--reencode re-encodes everything; a JPEG with an EXIF rotation is re-encoded even without it (DALI
    would rotate its pixels, PIL and TurboJPEG would not). verify decodes every stored sample either way."""
    from PIL import Image

    src = tmp_path / "src"
    make_good_tree(src, 2, size=(80, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    textured(80, 64, CLASS_COLOURS["cat"], 9).save(src / "cat" / "rotated.JPEG", quality=90, exif=exif)
    kept = convert(src, tmp_path / "kept", Settings(formats=("dali",)), workers=1, progress=False, log=lambda s: None)
    assert kept["splits"]["train"]["stored_as_is"] == 6
    assert kept["splits"]["train"]["reencode_reasons"] == {"EXIF-rotated JPEG": 1}
    r = subprocess.run([sys.executable, "-m", "fastrsb", "convert", str(src), str(tmp_path / "all"), "--reencode",
                        "--workers", "1", "--no-progress", "--formats", "ffcv,dali"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    forced = json.loads((tmp_path / "all" / MANIFEST).read_text())
    assert forced["settings"]["reencode"] is True
    assert forced["splits"]["train"]["reencode_reasons"] == {"--reencode": 7}
    assert "0 stored as is, 7 re-encoded" in r.stdout
    for root in (tmp_path / "kept", tmp_path / "all"):
        verify(root, log=lambda s: None)


def test_reencode_reasons_read_the_jpeg_header():
    """The markers decide: frame type (SOF0/1 sequential, SOF2 progressive, SOF9 arithmetic), sample
    precision, colour space (JFIF, Adobe transform, component ids) and size."""
    import io

    from PIL import Image

    from dataprep.images import jpeg_header, reencode_reason

    buf = io.BytesIO()
    textured(64, 48, (90, 120, 60), 0).save(buf, format="JPEG", quality=90)
    good = buf.getvalue()
    assert reencode_reason(good, 512) == "" and jpeg_header(good).coding == "baseline"
    assert reencode_reason(good, 63) == "larger than max resolution"
    sof = good.index(b"\xff\xc0")

    def patched(offset: int, value: int) -> bytes:
        data = bytearray(good)
        data[sof + offset] = value
        return bytes(data)

    assert reencode_reason(patched(1, 0xC9), 512) == "arithmetic JPEG"
    assert reencode_reason(patched(1, 0xC3), 512) == "lossless JPEG"
    assert reencode_reason(patched(4, 12), 512) == "12-bit JPEG"
    assert reencode_reason(b"GIF89a" + good[2:], 512) == "not a JPEG"
    rgb = io.BytesIO()
    Image.open(io.BytesIO(good)).save(rgb, format="JPEG", quality=90, keep_rgb=True)  # components 'R','G','B', no JFIF
    assert jpeg_header(rgb.getvalue()).colorspace == "rgb" and reencode_reason(rgb.getvalue(), 512) == "rgb JPEG"


# ---- stored image sizes (dataset format 2): <split>.sizes.npy ----------------------------------------------------

def _rehash(root: Path, rel: str) -> None:
    """Make the manifest's size and sha256 of `rel` match the (tampered) file, so the check behind them is reached."""
    from dataprep.files import sha256_file

    manifest = json.loads((root / MANIFEST).read_text())
    manifest["files"][rel] = {"size": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)}
    (root / MANIFEST).write_text(json.dumps(manifest))


def described(split: str, i: int, shard: str, key: str) -> str:
    """A regex of SplitInfo.describe_sample(i) for a sample of the messy dataset (both formats)."""
    return (rf"{split} sample {i} \(source [^;]+; stored in dali/{shard}\.tar as member {key}\.jpg at byte \d+, and in "
            rf"{split}\.beton\)")


def sizes_of(out: Path, split: str) -> list[list[int]]:
    return open_dataset(out).split(split).image_sizes().tolist()


def _decoded_sizes(out: Path, split: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(height, width) of every stored JPEG of a split read from the shards: by PIL's header read and by a full decode."""
    import io

    from PIL import Image

    loc = open_dataset(out).split(split).shard_locations()
    header, decoded = [], []
    for j, off, size in zip(loc.shard.tolist(), loc.offset.tolist(), loc.size.tolist()):
        with open(loc.tar_paths[j], "rb") as f:
            f.seek(off)
            data = f.read(size)
        with Image.open(io.BytesIO(data)) as im:
            header.append(im.size[::-1])  # PIL: (width, height), from the header only
            im.load()
            decoded.append(np.asarray(im).shape[:2])
    return header, decoded


def test_recorded_sizes_are_the_stored_jpegs_sizes(messy, tmp_path):
    """image_sizes() is the (height, width) of each stored JPEG, by dataset index: what PIL reads from the header and
    decodes, and the .beton's metadata; the messy inputs land where the converter's rules put them (odd sizes kept,
    oversized ones fitted to max_resolution 256 with sizes truncated, grayscale/CMYK/PNG/GIF re-encoded at their size).
    ffcv's raw write mode, which resizes the originals itself, records the same sizes in its metadata."""
    from ffcv.reader import Reader

    from dataprep.images import fit_size

    src, out, m, truth = messy
    ds = open_dataset(out)
    expected_by_name = {"cat_0.JPEG": (53, 37), "cat_1.JPEG": (192, 256), "cat_2.JPEG": (5, 256), "cat_3.JPEG": (64, 64),
                        "gray.JPEG": (60, 80), "cmyk.JPEG": (60, 80), "png_in_disguise.JPEG": (90, 70),
                        "palette.jpg": (40, 50), "progressive.JPEG": (90, 120), "ünïcödé_名前.JPEG": (44, 66)}
    assert fit_size(1001, 20, 256) == (256, 5) and fit_size(500, 375, 256) == (256, 192)
    for split in ("train", "val"):
        info = ds.split(split)
        sizes = info.image_sizes()
        assert sizes.dtype == np.int32 and sizes.shape == (info.num_samples, 2)
        header, decoded = _decoded_sizes(out, split)
        assert sizes.tolist() == [list(hw) for hw in header] == [list(hw) for hw in decoded]
        reader = Reader(str(info.beton_path))
        meta = reader.metadata[f"f{reader.field_names.index('image')}"]
        assert sizes.tolist() == np.stack([meta["height"], meta["width"]], 1).tolist()
        names = [Path(r.split("\t")[3]).name for r in (out / f"{split}.samples.tsv").read_text().splitlines()[1:]]
        recorded = {name: tuple(hw) for name, hw in zip(names, sizes.tolist()) if name in expected_by_name}
        assert recorded == (expected_by_name if split == "train" else {})
        assert m["splits"][split]["sizes"] == f"{split}.sizes.npy"
        assert m["files"][f"{split}.sizes.npy"]["size"] == (out / f"{split}.sizes.npy").stat().st_size
    # ffcv's raw write mode: pixels re-read from the originals and resized by ffcv, the same sizes
    raw = convert(src, tmp_path / "raw", Settings(max_resolution=256, shard_size=5, write_mode="raw"), workers=2,
                  progress=False, log=lambda s: None)
    assert raw["splits"]["train"]["num_samples"] == truth["good"]["train"]
    info = open_dataset(tmp_path / "raw").split("train")
    reader = Reader(str(info.beton_path))
    meta = reader.metadata[f"f{reader.field_names.index('image')}"]
    assert (meta["mode"] == 1).all()  # raw pixels
    assert info.image_sizes().tolist() == np.stack([meta["height"], meta["width"]], 1).tolist() == sizes_of(out, "train")
    verify(tmp_path / "raw", quick=True, log=lambda s: None)


def test_a_bad_size_record_is_a_dataset_error_naming_the_file_and_sample(messy, tmp_path):
    import shutil

    src, out, m, truth = messy
    work = tmp_path / "copy"
    shutil.copytree(out, work)
    path = work / "train.sizes.npy"
    good = np.load(path)
    for bad, match in [(good[:-1], r"train.sizes.npy: 18 image sizes, split 'train' has 19 samples"),
                       (good[:, :1], r"train.sizes.npy: holds a int32 array of shape \(19, 1\)"),
                       (np.where(np.arange(19)[:, None] == 7, [0, 80], good).astype(np.int32),
                        rf"train.sizes.npy: {described('train', 7, 'train-00001', '000000008')} records height x width "
                        r"0x80 \(sides must be 1..256\)"),
                       (np.where(np.arange(19)[:, None] == 3, [64, 257], good).astype(np.int32), r"sample 3 .* 64x257")]:
        np.save(path, bad)
        _rehash(work, "train.sizes.npy")
        with pytest.raises(DatasetError, match=match):
            open_dataset(work).split("train").image_sizes()
        with pytest.raises(VerifyError, match=match):
            verify(work, quick=True, log=lambda s: None)
    path.write_bytes(b"not an array")
    _rehash(work, "train.sizes.npy")
    with pytest.raises(DatasetError, match=r"train.sizes.npy: not a readable .npy array .* re-run `fastrsb convert`"):
        open_dataset(work).split("train").image_sizes()


def test_verify_catches_a_tampered_size_record(messy, tmp_path):
    """A plausible wrong size (in range, file size kept, manifest sha256 updated: what a converter bug would leave) is
    caught against the JPEG in the shard and, independently, against the .beton's metadata, naming the sample's
    dataset index, key and shard."""
    import shutil

    from ffcv.reader import Reader
    from ffcv.types import HeaderType

    src, out, m, truth = messy
    # the record: train sample 7 (key 000000008, the second sample of shard 1) one row taller
    work = tmp_path / "record"
    shutil.copytree(out, work)
    sizes = np.load(work / "train.sizes.npy")
    h, w = sizes[7]
    sizes[7, 0] += 1
    np.save(work / "train.sizes.npy", sizes)
    _rehash(work, "train.sizes.npy")
    for quick in (False, True):
        with pytest.raises(VerifyError, match=rf"train.sizes.npy: {described('train', 7, 'train-00001', '000000008')} "
                                              rf"is {h}x{w} \(height x width\) as its JPEG decodes, the size record "
                                              rf"says {h + 1}x{w}"):
            verify(work, quick=quick, log=lambda s: None)

    # the beton: val sample 4's width in the metadata table says one column more; shards and record agree
    work = tmp_path / "beton"
    shutil.copytree(out, work)
    beton = work / "val.beton"
    reader = Reader(str(beton))
    table = np.memmap(beton, dtype=reader.metadata_type, mode="r+", shape=(reader.num_samples,),
                      offset=HeaderType.itemsize + reader.field_descriptors.nbytes)
    image = f"f{reader.field_names.index('image')}"
    h, w = int(table[image]["height"][4]), int(table[image]["width"][4])
    table[image]["width"][4] += 1
    table.flush()
    del table
    _rehash(work, "val.beton")
    for quick in (False, True):
        with pytest.raises(VerifyError, match=rf"val.sizes.npy: {described('val', 4, 'val-00000', '000000004')} is "
                                              rf"{h}x{w + 1} \(height x width\) in val.beton's metadata, the size "
                                              rf"record says {h}x{w}"):
            verify(work, quick=quick, log=lambda s: None)


def test_a_format_1_dataset_is_refused_and_rebuilt_in_place(tmp_path, monkeypatch):
    """A dataset written before the sizes were recorded (format 1: no <split>.sizes.npy, shard fingerprints of format
    1) is refused by open_dataset, the loaders and verify with a message that gives the convert command to re-run;
    re-running it into the same OUT redoes every shard and the beton (no format-1 shard is re-used) and gives the
    dataset a clean conversion gives."""
    import dataprep.convert as conv

    src = tmp_path / "src"
    make_good_tree(src, 4)
    out = tmp_path / "out"
    settings = Settings(max_resolution=80, shard_size=5)
    with monkeypatch.context() as mp:  # what fastrsb's format-1 converter wrote: its fingerprints, its manifest ...
        mp.setattr(conv, "FORMAT_VERSION", 1)
        convert(src, out, settings, workers=1, progress=False, log=lambda s: None)
    manifest = json.loads((out / MANIFEST).read_text())  # ... and no sizes
    assert manifest["format_version"] == 1
    del manifest["files"]["train.sizes.npy"], manifest["splits"]["train"]["sizes"]
    (out / "train.sizes.npy").unlink()
    (out / MANIFEST).write_text(json.dumps(manifest))
    old_sidecars = {p.name: p.read_text() for p in (out / ".work").glob("*.json")}
    assert len(old_sidecars) == 4  # 3 shards + the beton's

    command = f"fastrsb convert {src} {out} --max-resolution 80 --shard-size 5"
    msg = (rf"{re.escape(str(out / MANIFEST))}: dataset format 1, this fastrsb reads formats 2 and 3 .* Re-run the conversion "
           rf"into the same directory: `{re.escape(command)}`.* rebuilds the dataset in place")
    with pytest.raises(DatasetError, match=msg):
        open_dataset(out)
    with pytest.raises(DatasetError, match=msg):
        verify(out, log=lambda s: None)
    r = subprocess.run([sys.executable, "-m", "fastrsb", "verify", str(out)], capture_output=True, text=True)
    assert r.returncode == 1 and command in r.stderr

    logs: list[str] = []
    m = convert(src, out, settings, workers=1, progress=False, log=logs.append)
    assert not any("re-using" in line for line in logs), logs
    assert any("writing train.beton" in line for line in logs)
    new_sidecars = {p.name: p.read_text() for p in (out / ".work").glob("*.json")}
    assert set(new_sidecars) == set(old_sidecars)
    assert all(new_sidecars[k] != old_sidecars[k] for k in old_sidecars)  # every fingerprint is format 2's
    assert m["format_version"] == 3 and json.loads((out / MANIFEST).read_text())["format_version"] == 3
    verify(out, log=lambda s: None)
    clean = convert(src, tmp_path / "clean", settings, workers=1, progress=False, log=lambda s: None)
    assert m["splits"] == clean["splits"]
    for rel, meta in clean["files"].items():
        if not rel.endswith(".beton"):  # ffcv's page layout depends on worker timing
            assert m["files"][rel] == meta, rel
    assert open_dataset(out).split("train").image_sizes().tolist() == sizes_of(tmp_path / "clean", "train")


# ---- per-sample checksums (format 3): verify names every damaged sample, a rerun repairs what was damaged ---------

def _beton_sample(beton: Path, i: int) -> tuple[int, int]:
    """(offset, size) of sample i's stored bytes in a .beton."""
    from ffcv.reader import Reader

    reader = Reader(str(beton))
    ptr = int(reader.metadata[f"f{reader.field_names.index('image')}"]["data_ptr"][i])
    return ptr, int(dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))[ptr])


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    """Change bytes in place, as a disk error would: the file keeps its size."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    assert path.stat().st_size == size


def test_describe_sample_names_index_source_and_every_file_that_holds_it(messy):
    from dataprep.layout import read_wds_index

    src, out, m, truth = messy
    info = open_dataset(out).split("val")
    row = (out / "val.samples.tsv").read_text().splitlines()[1 + 4].split("\t")
    jpg = read_wds_index(out / "dali" / "val-00000.idx")[4]["jpg"]
    assert info.describe_sample(4) == (f"val sample 4 (source {row[3]}; stored in dali/val-00000.tar as member "
                                       f"{row[1]}.jpg at byte {jpg[0]}, and in val.beton)")
    assert row[3] == str(src / "val" / "dog" / "v_dog_1.JPEG")
    assert info.listing_row(4) == dict(zip(("index", "key", "label", "source", "crc32"), row))


def test_verify_names_every_damaged_sample_and_a_rerun_rewrites_only_the_damaged_outputs(messy, tmp_path):
    """Two train samples' JPEG markers zeroed in their shards, one of them in train.beton too (sizes kept): verify
    names each (index, source, shard member, .beton) and fails; rerunning the conversion rewrites those two shards and
    train.beton only (the other outputs keep their modification times), and verify passes again."""
    import shutil

    src, out, m, truth = messy
    work = tmp_path / "copy"
    shutil.copytree(out, work)
    info = open_dataset(work).split("train")
    loc = info.shard_locations()
    damaged = {3: "train-00000", 12: "train-00003"}
    for i, stem in damaged.items():
        assert loc.tar_paths[loc.shard[i]].name == f"{stem}.tar"
        _overwrite(loc.tar_paths[loc.shard[i]], int(loc.offset[i]), b"\0" * 4)  # SOI and the APP0 marker
    _overwrite(work / "train.beton", _beton_sample(work / "train.beton", 3)[0], b"\0" * 4)
    with pytest.raises(VerifyError) as failed:
        verify(work, log=lambda s: None)
    report = str(failed.value)
    assert "2 damaged or mismatched sample(s) in 3 damaged file(s)" in report
    for i, stem in damaged.items():
        key = info.listing_row(i)["key"]
        where = described("train", i, stem, key)
        assert re.search(rf"{where}: checksum differs in dali/{stem}\.tar", report), (i, report)
        assert re.search(rf"{where}: does not decode from dali/{stem}\.tar", report), (i, report)
        assert f"(source {info.listing_row(i)['source']};" in report
    assert re.search(rf"{described('train', 3, 'train-00000', info.listing_row(3)['key'])}: checksum differs in "
                     rf"train\.beton", report)
    assert "train sample 12" not in report.split("train.beton")[0].rsplit("\n", 1)[-1]  # only sample 3 in the beton

    outputs = sorted(p for p in work.rglob("*") if p.is_file() and ".work" not in p.parts)
    before = {p: p.stat().st_mtime_ns for p in outputs}
    logs: list[str] = []
    convert(src, work, Settings(max_resolution=256, shard_size=5), workers=2, progress=False, log=logs.append)
    rewritten = {str(p.relative_to(work)) for p in outputs if p.stat().st_mtime_ns != before[p]}
    assert rewritten == {"dali/train-00000.tar", "dali/train-00000.idx", "dali/train-00003.tar",
                         "dali/train-00003.idx", "train.beton", MANIFEST}, rewritten
    assert sorted(line for line in logs if "rewriting" in line) == [
        f"[convert] train: {rel} is not the file that was written (damaged or modified): rewriting it"
        for rel in ("dali/train-00000.tar", "dali/train-00003.tar", "train.beton")]
    verify(work, log=lambda s: None)
    repaired = json.loads((work / MANIFEST).read_text())["files"]
    assert {k: v for k, v in repaired.items() if not k.endswith(".beton")} == \
           {k: v for k, v in m["files"].items() if not k.endswith(".beton")}


def test_verify_checksums_catch_damage_that_still_decodes(messy, tmp_path):
    """One flipped bit in the entropy-coded data of a stored JPEG: PIL still decodes it, the checksum does not match."""
    import shutil

    from dataprep.images import decode_jpeg

    src, out, m, truth = messy
    work = tmp_path / "copy"
    shutil.copytree(out, work)
    info = open_dataset(work).split("train")
    loc = info.shard_locations()
    i = int(np.argmax(loc.size))  # the largest stored JPEG: most entropy-coded data
    tar = loc.tar_paths[loc.shard[i]]
    with open(tar, "rb") as f:
        f.seek(int(loc.offset[i]))
        data = bytearray(f.read(int(loc.size[i])))
    scan = data.index(b"\xff\xda") + 2 + int.from_bytes(data[data.index(b"\xff\xda") + 2:][:2], "big")
    at = next(k for k in range((scan + len(data)) // 2, len(data) - 2)
              if 0xFF not in (data[k - 1], data[k], data[k] ^ 0x10))
    data[at] ^= 0x10
    decode_jpeg(bytes(data))  # still decodes
    _overwrite(tar, int(loc.offset[i]) + at, bytes(data[at:at + 1]))
    with pytest.raises(VerifyError) as failed:
        verify(work, log=lambda s: None)
    report = str(failed.value)
    assert re.search(rf"train sample {i} \(.*\): checksum differs in dali/{tar.stem}\.tar", report), report
    assert "does not decode" not in report and "1 damaged or mismatched sample(s) in 1 damaged file(s)" in report


def test_a_format_2_dataset_is_still_read(messy, tmp_path):
    """Format 2 (a folder source in label order, no labels file, no checksums): open_dataset, the labels and verify
    still work, with labels from the per-class counts."""
    import shutil

    from dataprep.files import sha256_file

    src, out, m, truth = messy
    work = tmp_path / "v2"
    shutil.copytree(out, work)
    manifest = json.loads((work / MANIFEST).read_text())
    manifest["format_version"] = 2
    for split in ("train", "val"):
        labels = open_dataset(out).split(split).labels
        del manifest["splits"][split]["labels"], manifest["files"][f"{split}.labels.npy"]
        (work / f"{split}.labels.npy").unlink()
        listing = work / f"{split}.samples.tsv"
        listing.write_text("".join(line.rsplit("\t", 1)[0] + "\n" for line in listing.read_text().splitlines()))
        manifest["files"][listing.name] = {"size": listing.stat().st_size, "sha256": sha256_file(listing)}
        (work / MANIFEST).write_text(json.dumps(manifest))
        info_v2 = open_dataset(work).split(split)
        assert info_v2.label_file is None and info_v2.checksums() is None
        assert info_v2.labels.tolist() == labels.tolist()
    verify(work, log=lambda s: None)
