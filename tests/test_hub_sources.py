"""`fastrsb convert` from the Hub's layouts: parquet shards (pyarrow writes them here) and WebDataset tars, against the
folder route of the same images."""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from benchmarks.imagenet_like import shuffled_records, write_parquet_shards, write_wds_shards
from dataprep.convert import Settings, convert
from dataprep.layout import MANIFEST, DatasetError, open_dataset
from dataprep.sources import SourceError, scan_source
from dataprep.verify import verify
from tests.datagen import CLASS_COLOURS, make_good_tree, make_messy_tree, textured
from tests.test_convert import _wait_for

pytestmark = pytest.mark.timeout(300)
CLASSES = ["cat", "dog", "eel"]
SETTINGS = Settings(max_resolution=256, shard_size=5)


def _quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The messy tree (plus a WebP) converted three ways: as class folders, re-packed as parquet shards (with an
    unlabeled test split) and as WebDataset tars (with a member that has no .cls and a .cls that has no image)."""
    root = tmp_path_factory.mktemp("hub")
    truth = make_messy_tree(root / "folder")
    textured(72, 50, CLASS_COLOURS["dog"], 60).save(root / "folder" / "train" / "dog" / "photo.webp", format="WEBP")
    records = shuffled_records(root / "folder")
    write_parquet_shards(root / "parquet", records, CLASSES, rows_per_group=4)
    test_rows = [(p, -1) for p, _ in records["val"][:3]]
    write_parquet_shards(root / "parquet", {"test": test_rows}, CLASSES, files_per_split=1)
    tars = write_wds_shards(root / "wds", records)
    with tarfile.open(tars[0], "a") as tar:  # what a damaged or hand-made tar holds
        for name, data in (("orphan.jpg", (root / "folder" / "val" / "cat" / "v_cat_0.JPEG").read_bytes()),
                           ("lonely.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    logs: dict[str, list[str]] = {}
    manifests = {}
    for route in ("folder", "parquet", "wds"):
        logs[route] = []
        manifests[route] = convert(root / route, root / f"out_{route}", SETTINGS, workers=2, progress=False,
                                   log=logs[route].append)
    return root, truth, manifests, logs, tars


def _stored(out: Path, split: str) -> Counter:
    """Counter of (label, sha256 of the stored JPEG) over a split, read from the DALI shards."""
    info = open_dataset(out).split(split)
    loc = info.shard_locations()
    found = Counter()
    for i in range(info.num_samples):
        with open(loc.tar_paths[loc.shard[i]], "rb") as f:
            f.seek(int(loc.offset[i]))
            found[int(info.labels[i]), hashlib.sha256(f.read(int(loc.size[i]))).hexdigest()] += 1
    return found


def test_hub_routes_store_what_the_folder_route_stores(hub):
    """The same images through parquet and WebDataset give the folder route's stored bytes per label (as is or
    re-encoded by the same rules), the same counts and skip reasons; hub records keep their source order and name
    their shard and row or key; the Hub's unlabeled test rows are counted, not converted or skipped."""
    root, truth, manifests, logs, tars = hub
    assert logs["parquet"][0].startswith(f"[convert] source: parquet shards (5 files) in {root / 'parquet' / 'data'}: "
                                         f"train 2, val 2, test 1; 3 classes (the schema's ClassLabel names)")
    assert logs["wds"][0].startswith(f"[convert] source: WebDataset tars (4 files) in {root / 'wds'}")
    assert logs["folder"][0].startswith(f"[convert] source: class folders in {root / 'folder'}")
    assert manifests["parquet"]["classes"] == CLASSES and manifests["wds"]["classes"] == ["0", "1", "2"]
    folder = manifests["folder"]
    for route in ("parquet", "wds"):
        m = manifests[route]
        assert m["source_format"] == route
        for split in ("train", "val"):
            assert _stored(root / f"out_{route}", split) == _stored(root / "out_folder", split), (route, split)
            for count in ("num_samples", "per_class", "stored_as_is", "reencoded", "reencode_reasons"):
                assert m["splits"][split][count] == folder["splits"][split][count], (route, split, count)
        reasons = sorted(s["reason"] for s in m["skipped"] if "orphan" not in s["path"] and "lonely" not in s["path"])
        assert reasons == sorted(s["reason"] for s in folder["skipped"]), route
        verify(root / f"out_{route}", log=_quiet)
    assert folder["splits"]["train"]["reencode_reasons"]["not a JPEG"] == 3  # the PNG, the GIF and the WebP
    assert manifests["parquet"]["unlabeled"] == {"test": 3} and "test" not in manifests["parquet"]["splits"]
    assert not any("/test-0000" in s["path"] for s in manifests["parquet"]["skipped"])
    assert any("unlabeled (label -1): test: 3 records" in line for line in logs["parquet"])
    wds_skips = {s["path"]: s["reason"] for s in manifests["wds"]["skipped"]}
    assert wds_skips[f"{tars[0]} member orphan"] == "no .cls member (the label)"
    assert wds_skips[f"{tars[0]} member lonely"].startswith("no image member (.jpg, .jpeg, .png or .webp)")
    truncated = next(s for s in manifests["parquet"]["skipped"] if "truncated" in s["reason"])
    assert truncated["path"].startswith(str(root / "parquet" / "data" / "train-")) and " row " in truncated["path"]
    # source order: file by file, row by row; every sample's label is the row's
    import pyarrow.parquet as pq

    info = open_dataset(root / "out_parquet").split("train")
    rows = [info.listing_row(i)["source"] for i in range(info.num_samples)]
    order = [(Path(r.split(" row ")[0]).name, int(r.split(" row ")[1])) for r in rows]
    assert order == sorted(order)
    row_labels = {(p.name, k): label for p in sorted((root / "parquet" / "data").glob("train-*.parquet"))
                  for k, label in enumerate(pq.read_table(p, columns=["label"]).column("label").to_pylist())}
    assert info.labels.tolist() == [row_labels[o] for o in order]
    assert info.labels.tolist() != sorted(info.labels.tolist())  # not the folder route's label order


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_loaders_give_a_hub_datasets_own_labels(hub, backend):
    """A hub dataset is not in label order: the shard-reading backends' targets are <split>.labels.npy's, in the
    sampler's order (ffcv's come from the .beton, written in the same order: verify checks the two agree)."""
    import torch

    from fastrsb.data import create_loader
    from fastrsb.data.sampler import epoch_samples
    from fastrsb.dist import DistInfo
    from tests.test_loaders import collect, make_cfg

    out = hub[0] / "out_wds"
    info = open_dataset(out).split("val")
    _, targets = collect(create_loader(make_cfg(out, backend), "val", DistInfo()))
    expect = epoch_samples(info.num_samples, seed=5, epoch=0, rank=0, world_size=1, batch_size=8, shuffle=False,
                           drop_last=False)[0]
    source_labels = np.array([int(info.listing_row(i)["label"]) for i in range(info.num_samples)])
    assert source_labels.tolist() != sorted(source_labels.tolist())
    assert torch.cat(targets).tolist() == source_labels[expect].tolist()


def test_raw_write_mode_rereads_the_parquet_rows(hub, tmp_path):
    """ffcv's raw write mode decodes each source record again: parquet rows read back by row group give the
    folder route's pixels, label for label."""
    from ffcv.reader import Reader

    root = hub[0]

    def raw_pixels(src: Path, out: Path) -> Counter:
        convert(src, out, Settings(formats=("ffcv",), max_resolution=256, write_mode="raw"), workers=2,
                progress=False, log=_quiet)
        info = open_dataset(out).split("train")
        reader = Reader(str(info.beton_path))
        sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
        image = reader.metadata[f"f{reader.field_names.index('image')}"]
        assert (image["mode"] == 1).all()
        found = Counter()
        with open(info.beton_path, "rb") as f:
            for label, ptr in zip(info.labels.tolist(), image["data_ptr"].tolist()):
                f.seek(ptr)
                found[label, hashlib.sha256(f.read(sizes[ptr])).hexdigest()] += 1
        return found

    assert raw_pixels(root / "parquet", tmp_path / "pq") == raw_pixels(root / "folder", tmp_path / "folder")


def _parquet(path: Path, columns: dict, names: list[str] | None = CLASSES) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = {"huggingface": json.dumps({"info": {"features": {"label": {"names": names, "_type": "ClassLabel"}}}})}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns).replace_schema_metadata(meta if names else None), path)
    return path


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_bad_hub_input_is_one_clear_error_before_any_work(hub, tmp_path):
    """Other column names, a tar without samples, a label outside the classes and ClassLabel names that disagree with
    --class-list: each one error naming the file (and record) and what was expected, and OUT is never created."""
    jpeg = (hub[0] / "folder" / "val" / "cat" / "v_cat_0.JPEG").read_bytes()
    image = {"bytes": jpeg, "path": "a.JPEG"}
    (tmp_path / "classes.txt").write_text("cat\ndog\nemu\n")
    cases = [
        (_parquet(tmp_path / "cols" / "train-00000-of-00001.parquet", {"img": [jpeg], "cls": [0]}), {},
         r"cols/train-00000-of-00001.parquet: expected the Hub's image columns, image \(struct<bytes: binary, path: "
         r"string>\) and label \(an integer\), found img: binary, cls: int64"),
        (_tar(tmp_path / "junk" / "x-train-0000.tar", {"README.txt": b"hi", "data.bin": b"\0"}), {},
         r"junk/x-train-0000.tar: no WebDataset samples \(expected KEY.jpg\|jpeg\|png\|webp \+ KEY.cls members; its "
         r"first members: README.txt, data.bin\)"),
        (_parquet(tmp_path / "range" / "data" / "train-00000-of-00001.parquet",
                  {"image": [image, image], "label": [2, 3]}), {},
         r"range/data/train-00000-of-00001.parquet row 1: label 3 is outside the 3 classes \(expected 0..2 from the "
         r"schema's ClassLabel names, or -1 for unlabeled\)"),
        (_tar(tmp_path / "wrange" / "x-train-0000.tar", {"a.jpg": jpeg, "a.cls": b"0", "b.jpg": jpeg, "b.cls": b"7"}),
         {"class_list": tmp_path / "classes.txt"},
         r"wrange/x-train-0000.tar member b: label 7 is outside the 3 classes \(expected 0..2 from --class-list"),
        (_parquet(tmp_path / "names" / "train-00000-of-00001.parquet", {"image": [image], "label": [0]}),
         {"class_list": tmp_path / "classes.txt"},
         r"names/train-00000-of-00001.parquet: the schema's ClassLabel names \(3\) disagree with --class-list .*"
         r"classes.txt \(3 names\): class 2 is 'eel' in the schema, 'emu' in the list"),
    ]
    for src, options, message in cases:
        out = tmp_path / f"out_{src.parent.name}"
        with pytest.raises(SourceError, match=message):
            convert(src.parent if src.parent.name != "data" else src.parent.parent, out, SETTINGS, workers=1,
                    progress=False, log=_quiet, **options)
        assert not out.exists()
    _tar(tmp_path / "cols" / "x-train-0000.tar", {"a.jpg": jpeg, "a.cls": b"0"})
    with pytest.raises(SourceError, match="holds both parquet and tar files: name the layout with --source-format"):
        scan_source(tmp_path / "cols")
    assert scan_source(tmp_path / "cols", source_format="wds").splits["train"][0].name.endswith("tar member a")
    r = subprocess.run([sys.executable, "-m", "fastrsb", "convert", str(tmp_path / "names"), str(tmp_path / "o"),
                        "--class-list", str(tmp_path / "classes.txt")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "disagree with --class-list" in r.stderr and not (tmp_path / "o").exists()


def test_a_parquet_conversion_killed_midway_resumes(tmp_path):
    """SIGKILL after a few shards: the rerun of the same command re-uses them and ends with the dataset a clean
    conversion gives."""
    make_good_tree(tmp_path / "tree" / "train", 30, size=(160, 120))
    write_parquet_shards(tmp_path / "src", shuffled_records(tmp_path / "tree"), CLASSES, files_per_split=3,
                         rows_per_group=10)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fastrsb", "convert", str(tmp_path / "src"), str(out), "--workers", "1",
           "--shard-size", "6", "--formats", "dali", "--no-progress"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for(lambda: len(list((out / ".work").glob("train-*.json"))) >= 3, p)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    done = {q.name: q.stat().st_mtime_ns for q in (out / ".work").glob("train-*.json")}
    assert 3 <= len(done) < 15 and not (out / MANIFEST).exists()
    with pytest.raises(DatasetError):
        open_dataset(out)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("[convert] source: parquet shards (3 files)")
    assert f"re-using {len(done)} finished shard(s) of 15" in r.stdout
    for name, mtime in done.items():
        assert (out / ".work" / name).stat().st_mtime_ns == mtime
    verify(out, log=_quiet)
    clean = convert(tmp_path / "src", tmp_path / "clean", Settings(formats=("dali",), shard_size=6), workers=1,
                    progress=False, log=_quiet)
    resumed = json.loads((out / MANIFEST).read_text())
    assert resumed["splits"] == clean["splits"] and resumed["files"] == clean["files"]
    assert np.array_equal(open_dataset(out).split("train").labels, open_dataset(tmp_path / "clean").split("train").labels)
