"""data.torch_decode=device on its CPU twin: torchvision.io.decode_jpeg of whole batches on train.device, the
one crop program's boxes, antialiased resize there. The same batch contract and order as every backend, the
same images as the reference (PIL in DataLoader workers), clear errors, counted fallbacks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dataprep.layout import DatasetError
from fastrsb.data import create_loader
from fastrsb.data.sampler import epoch_samples
from fastrsb.dist import DistInfo
from tests.test_loaders import collect, make_cfg

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def messy_dataset(tmp_path_factory):
    """The converter's output for the messy tree: odd sizes, grayscale, CMYK, PNG/GIF in disguise, progressive."""
    from dataprep.convert import Settings, convert
    from tests.datagen import make_messy_tree

    root = tmp_path_factory.mktemp("messy_device")
    make_messy_tree(root / "src")
    convert(root / "src", root / "data", Settings(max_resolution=256, shard_size=5), workers=2, progress=False,
            log=lambda s: None)
    return root / "data"


def _loader(data, decode, split="train", **over):
    return create_loader(make_cfg(data, "torch", torch_decode=decode, **over), split, DistInfo())


@pytest.mark.parametrize("split", ["train", "val"])
def test_batch_contract_and_the_samplers_order(small_dataset, split):
    from dataprep.layout import open_dataset

    loader = _loader(small_dataset, "device", split)
    imgs, tgts = collect(loader)
    assert len(imgs) == len(loader) > 0
    for x, y in zip(imgs, tgts):
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32)
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert y.dtype == torch.int64 and y.shape == (x.shape[0],)
    info = open_dataset(small_dataset).split(split)
    expect = epoch_samples(info.num_samples, seed=5, epoch=0, rank=0, world_size=1, batch_size=8,
                           shuffle=split == "train", drop_last=split == "train")[0]
    assert torch.cat(tgts).tolist() == info.labels[expect].tolist()


@pytest.mark.parametrize("split", ["train", "val"])
def test_device_decode_gives_the_reference_images(messy_dataset, split):
    """For one seed, device and workers decode show the same crops of the same images (the messy sources as the
    converter stores them) at 96 px: what is left is the device resize's float matmuls against Pillow's fixed-point
    arithmetic (the same taps), one level at most. Measured: train mean 0.010 max 1, val mean 0.009 max 1 grey
    levels; the same batches mirrored are 17-19 levels off on average. The issue's bound is 3; held here at 0.1."""
    over = dict(train_res=96, val_res=96, batch_size=4)
    device = torch.cat(collect(_loader(messy_dataset, "device", split, **over))[0]).float()
    workers = torch.cat(collect(_loader(messy_dataset, "workers", split, **over))[0]).float()
    assert device.shape == workers.shape
    diff = (device - workers).abs()
    assert diff.mean().item() < 0.1 and diff.max().item() <= 2, (split, diff.mean().item(), diff.max().item())
    assert (device - workers.flip(-1)).abs().mean().item() > 5 * diff.mean().item()


def test_the_same_seed_repeats_and_a_resumed_epoch_continues(small_dataset):
    a = _loader(small_dataset, "device")
    a.set_epoch(2)
    whole = collect(a)[0]
    b = _loader(small_dataset, "device")
    b.set_epoch(2, start_batch=3)
    rest = collect(b)[0]
    assert all(torch.equal(x, y) for x, y in zip(whole[3:], rest)) and len(rest) == len(whole) - 3


def test_a_size_record_that_disagrees_with_its_jpeg_names_the_sample(small_dataset, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(small_dataset, data)
    sizes = np.load(data / "train.sizes.npy")
    sizes[:, 1] += 1
    np.save(data / "train.sizes.npy", sizes)
    with pytest.raises(DatasetError, match=r"train sample \d+ \(source [^;]+; stored in dali/train-\d+\.tar as member \d+\.jpg at byte \d+, and in train\.beton\): the JPEG is 90x120.* "
                                           r"says 90x121"):
        collect(_loader(data, "device"))


def test_jpegs_the_device_decoder_refuses_are_decoded_on_the_host_and_counted(small_dataset):
    """nvjpeg refuses some JPEGs that libjpeg-turbo decodes (which ones depends on the nvjpeg build); the CPU has no
    nvjpeg, so a stand-in for it refuses every batch, and one sample's bytes at its first (device) try; the host
    decode after it succeeds. The epoch completes with the same pixels, and the one host decode is counted."""
    reference = collect(_loader(small_dataset, "device"))[0]
    loader = _loader(small_dataset, "device")
    real, tries = loader.jpeg_decoder._decode, {}

    def device_decoder(data, device):
        if isinstance(data, list):
            raise RuntimeError("nvjpeg: unsupported JPEG")
        first = tries.setdefault("bytes", bytes(data))
        if first == bytes(data) and tries.setdefault("refused", 0) == 0:
            tries["refused"] = 1
            raise RuntimeError("nvjpeg: unsupported JPEG")
        return real(data, device)

    loader.jpeg_decoder._decode = device_decoder
    again = collect(loader)[0]
    assert all(torch.equal(x, y) for x, y in zip(reference, again))
    stats = loader.decode_stats.as_dict()
    assert stats["fallbacks"] == 1 and stats["images"] == sum(len(x) for x in again)


def _decoded_batch(data, n=8, res=32):
    """One train batch's decoded images, params and labels as the reader thread has them before the resize."""
    from fastrsb.data.crops import crop_boxes
    from fastrsb.data.device_resize import resize_params

    loader = _loader(data, "device")
    plan = loader.plan()
    idx = plan.indices[:n]
    sizes = loader.shards.sizes[idx]
    boxes, flips = crop_boxes(sizes, plan.keys[:n], loader.cfg.scale, loader.cfg.ratio)
    return loader.decode(idx)[0], torch.from_numpy(resize_params(sizes, boxes, flips, res, loader.cfg.crop_pct))


def test_the_device_resize_never_waits_on_the_host(small_dataset):
    """The batch's work once its images are on the device (padding copies, tap matrices, the two matmuls, the
    contract's layout) with DeviceTensors standing in for device memory: no read-back, no data-dependent shape,
    no host tensor, no copy from the host. Each batch's host->device traffic is the two pinned non_blocking copies
    of to_device (resize parameters, labels); torchvision's decode_jpeg returns its images' shapes as host
    metadata, so the shape check after it reads nothing back either."""
    from fastrsb.data.device_resize import resize_batch
    from fastrsb.data.staging import nhwc_to_batch
    from fastrsb.sync_audit import SyncAudit, to_device_memory

    images, params = _decoded_batch(small_dataset)
    images, params = [to_device_memory(im) for im in images], to_device_memory(params)
    labels = to_device_memory(torch.zeros(len(images), dtype=torch.int64))
    with SyncAudit() as audit:
        batch = nhwc_to_batch(resize_batch(images, params, 32, "bilinear", torch.float32), labels)
    assert audit.syncs == [] and audit.host_to_device_copies == [], audit.where()
    assert isinstance(batch.images, torch.Tensor) and batch.images.shape == (8, 3, 32, 32)


def test_float16_matmuls_as_on_cuda_stay_within_a_level(small_dataset):
    """cuda runs the resize's matmuls in float16 (tensor cores, float32 accumulation): the same batch as float32
    to within one grey level (the taps are rounded to 11 bits; the pixel values stay exact)."""
    from fastrsb.data.device_resize import resize_batch

    images, params = _decoded_batch(small_dataset)
    for interpolation in ("bilinear", "bicubic"):
        exact = resize_batch(images, params, 32, interpolation, torch.float32).float()
        half = resize_batch(images, params, 32, interpolation, torch.float16).float()
        diff = (exact - half).abs()
        assert diff.max().item() <= 1 and diff.mean().item() < 0.1, (interpolation, diff.mean().item())


@pytest.mark.parametrize("split", ["train", "val"])
def test_torchcodec_and_torchvision_decode_the_same_pixels(messy_dataset, split):
    """data.torch_device_decoder: torchcodec (auto's choice where it is installed) and torchvision (the lent GPU
    machine's) give the same batches to the bit on the messy sources as stored; each loader names its library."""
    pytest.importorskip("torchcodec")  # installed by the set-up ([all]); the GPU machine may lack it
    over = dict(train_res=64, val_res=64, batch_size=4)
    auto = _loader(messy_dataset, "device", split, **over)
    torchvision = _loader(messy_dataset, "device", split, torch_device_decoder="torchvision", **over)
    assert auto.decoder_name.startswith("torchcodec 0.") and torchvision.decoder_name.startswith("torchvision 0.")
    a, b = collect(auto)[0], collect(torchvision)[0]
    assert len(a) == len(b) == len(auto)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert auto.decode_stats.as_dict()["decoder"] == auto.jpeg_decoder.name


BROKEN_TORCHCODEC = """
from fastrsb.config import load_config
from fastrsb.data import create_loader
from fastrsb.dist import DistInfo
cfg = load_config(values={"data": {"path": %r, "backend": "torch", "torch_decode": "device", "batch_size": 4,
                                   "train_res": 32}, "train": {"device": "cpu"}})
loader = create_loader(cfg, "train", DistInfo())
print(tuple(next(iter(loader)).images.shape), loader.decoder_name)
cfg.data.torch_device_decoder = "torchcodec"
try:
    create_loader(cfg, "train", DistInfo())
except ValueError as e:
    print("ASKED", e)
"""


def test_a_torchcodec_that_cannot_decode_warns_once_and_torchvision_takes_over(small_dataset, tmp_path):
    """A real broken install: torchcodec's package without its native libraries (as after a build for another torch,
    or missing FFmpeg/CUDA libraries), first on the path of a child process. auto: one warning naming why, torchvision
    decodes, the batch arrives; asking for torchcodec by name is an error naming why."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    torchcodec = pytest.importorskip("torchcodec")
    broken = tmp_path / "site" / "torchcodec"
    shutil.copytree(Path(torchcodec.__file__).parent, broken)
    for lib in broken.glob("*.so"):
        lib.unlink()
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(broken.parent), str(root)])}
    code = BROKEN_TORCHCODEC % str(small_dataset)
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("(4, 3, 32, 32) torchvision 0."), r.stdout
    warned = [ln for ln in r.stderr.splitlines() if "Warning" in ln]  # as a user sees them: the default filters
    assert len(warned) == 1, r.stderr
    assert "UserWarning: torchcodec is installed but cannot decode JPEGs on cpu (ImportError: " in warned[0]
    assert "decodes with torchvision" in warned[0]
    assert lines[1].startswith("ASKED data.torch_device_decoder=torchcodec cannot decode on cpu: ImportError"), r.stdout
