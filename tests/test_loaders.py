"""One contract for every loader backend, checked on real converted data with the real libraries."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dataprep.layout import open_dataset
from fastrsb.config import ConfigError, load_config
from fastrsb.data import BACKENDS, LoaderError, create_loader
from fastrsb.data.sampler import epoch_samples
from fastrsb.dist import DistInfo
from tests.datagen import sample_ids

pytestmark = pytest.mark.timeout(300)
FILE_BACKENDS = ["ffcv", "dali", "torch"]
BS = 8


def make_cfg(path, backend, **over):
    items = {"backend": backend, "path": str(path), "batch_size": BS, "train_res": 32, "val_res": 32,
             "workers": 2, "seed": 5, "synthetic_num_classes": 3, "synthetic_num_samples": 60, **over}
    return load_config(None, [f"data.{k}={v}" for k, v in items.items()])


def collect(loader):
    """(images, targets) of an epoch, cloned: ffcv reuses its buffers."""
    imgs, tgts = [], []
    for b in loader:
        imgs.append(b.images.clone())
        tgts.append(b.targets.clone())
    return imgs, tgts


def batched(indices: np.ndarray, bs: int) -> list[list[int]]:
    return [indices[k:k + bs].tolist() for k in range(0, len(indices), bs)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", ["train", "val"])
def test_batch_contract(small_dataset, backend, split):
    cfg = make_cfg(small_dataset, backend)
    loader = create_loader(cfg, split, DistInfo())
    imgs, tgts = collect(loader)
    assert len(imgs) == len(loader) > 0
    for x, y in zip(imgs, tgts):
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32) and x.device.type == "cpu"
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert y.dtype == torch.int64 and y.shape == (x.shape[0],)
    sizes = [x.shape[0] for x in imgs]
    if split == "train":
        assert all(s == BS for s in sizes)
    if backend == "synthetic":
        return
    info = open_dataset(small_dataset).split(split)
    expect = epoch_samples(info.num_samples, seed=5, epoch=0, rank=0, world_size=1, batch_size=BS,
                           shuffle=split == "train", drop_last=split == "train")[0]
    # the label sequence is the shared sampler's order, in every backend
    assert torch.cat(tgts).tolist() == info.labels[expect].tolist()
    if split == "val":
        assert sum(sizes) == info.num_samples  # every sample once, no padding


@pytest.mark.parametrize("backend", [*FILE_BACKENDS, "ffcv:ffcv"])
def test_pixels_show_their_class_and_repeat_for_a_seed(small_dataset, backend):
    """Generated images carry their class colour: decoded pixels must agree with the labels.
    Two loaders with one seed augment alike (textured images: a different crop shows).
    "ffcv:ffcv" is data.ffcv_decoder=ffcv, ffcv's own decoders, kept for comparison."""
    from tests.datagen import CLASS_COLOURS

    backend, _, decoder = backend.partition(":")
    over = {"ffcv_decoder": decoder} if decoder else {}
    colours = torch.tensor([CLASS_COLOURS[c] for c in ("cat", "dog", "eel")], dtype=torch.float32)
    imgs, tgts = collect(create_loader(make_cfg(small_dataset, backend, **over), "train", DistInfo()))
    x = torch.cat(imgs).float().mean(dim=(2, 3))
    nearest = torch.cdist(x, colours).argmin(1)
    assert torch.equal(nearest, torch.cat(tgts))
    again, _ = collect(create_loader(make_cfg(small_dataset, backend, **over), "train", DistInfo()))
    same_pixels = all(torch.equal(a, b) for a, b in zip(imgs, again))
    # every backend's crops and flips come from the sample copy's key (fastrsb.data.crops); ffcv's own decoders draw from numba's unseeded np.random in their threads
    assert same_pixels == (decoder != "ffcv"), "same seed, same augmented pixels"


def test_backends_agree_on_val_images(small_dataset):
    """Same geometry in every backend: resize shorter side to res/crop_pct, center crop res, bilinear.
    fastrsb's ffcv decoder reproduces torchvision's Resize + CenterCrop to the bit on the same decoded
    pixels, so what is left is the JPEG decode: TurboJPEG's fast integer IDCT (libffcv's flag) against
    Pillow's accurate one. Measured on these images: ffcv-torch mean 0.73, max 4 grey levels; dali-torch
    0.23, max 3 (ffcv's own decoder, cv2 INTER_AREA: mean 1.6, max 13)."""
    val = {b: torch.cat(collect(create_loader(make_cfg(small_dataset, b, crop_pct=0.875), "val", DistInfo()))[0]).float()
           for b in FILE_BACKENDS}
    for a, b, mean_bound in [("ffcv", "torch", 1.0), ("ffcv", "dali", 1.0), ("dali", "torch", 0.5)]:
        diff = (val[a] - val[b]).abs()
        assert diff.mean().item() < mean_bound and diff.max().item() <= 6, (a, b, diff.mean().item(), diff.max().item())
    # and a wrong geometry would be far off: flipping one backend's crops breaks the agreement
    assert (val["ffcv"] - val["torch"].flip(-1)).abs().mean().item() > 10 * (val["ffcv"] - val["torch"]).abs().mean().item()


def test_backends_agree_on_train_crops_for_one_seed(small_dataset):
    """One crop program (fastrsb.data.crops) for every backend: for one seed the train batches show the
    same crops and flips, so what is left is the decoders' arithmetic. ffcv vs torch: the same box resized
    by the same antialiased filter (fastrsb's ffcv decoder matches Pillow's resize to the bit), so only
    TurboJPEG's fast IDCT against Pillow's differs; DALI decodes only the window and resizes with its own
    antialiased filter. Measured here (120x90 textured JPEGs, 32 px): ffcv-torch mean 0.81 max 5, dali-torch
    0.14 max 2, ffcv-dali 0.80 max 5 grey levels; before the crops were shared these were 59, 62, 60."""
    train = {b: torch.cat(collect(create_loader(make_cfg(small_dataset, b), "train", DistInfo()))[0]).float()
             for b in FILE_BACKENDS}
    for a, b, mean_bound in [("ffcv", "torch", 1.0), ("dali", "torch", 0.5), ("ffcv", "dali", 1.0)]:
        diff = (train[a] - train[b]).abs()
        assert diff.mean().item() < mean_bound and diff.max().item() <= 8, (a, b, diff.mean().item(), diff.max().item())
    # and other keys for the same images in the same order give other crops, far off
    loader = create_loader(make_cfg(small_dataset, "torch"), "train", DistInfo())
    plan = loader.plan()
    other = torch.cat([b.images.float() for b in loader._epoch(plan._replace(keys=plan.keys + np.uint64(1)))])
    assert (other - train["torch"]).abs().mean().item() > 10


@pytest.mark.parametrize("before,after", [("torch", "ffcv"), ("ffcv", "dali"), ("dali", "torch")])
def test_an_epoch_resumed_on_another_backend_continues_the_same_crops(small_dataset, before, after):
    """A run checkpointed on one backend and resumed on another (the checkpoint holds epoch and batch; the
    trainer calls set_epoch(epoch, start_batch)): the rest of the epoch shows the crops the first backend
    would have shown, within the pair's decoder tolerance (test_backends_agree_on_train_crops_for_one_seed)."""
    first = create_loader(make_cfg(small_dataset, before, num_repeats=2), "train", DistInfo())
    first.set_epoch(1)
    whole = torch.cat(collect(first)[0][3:]).float()
    second = create_loader(make_cfg(small_dataset, after, num_repeats=2), "train", DistInfo())
    second.set_epoch(1, start_batch=3)
    rest = torch.cat(collect(second)[0]).float()
    assert rest.shape == whole.shape
    diff = (rest - whole).abs()
    assert diff.mean().item() < 1.0 and diff.max().item() <= 8, (before, after, diff.mean().item(), diff.max().item())


@pytest.mark.parametrize("num_repeats", [1, 3])
def test_every_backend_visits_the_same_images_in_the_same_order_on_every_rank(coded_dataset, num_repeats):
    """Simulated world of 2: per rank and backend, the images (identified by colour) batch by batch
    are the shared sampler's. Seed 0 is timm's RepeatAugSampler order, checked against timm itself;
    with repeats the copies of an image land on different ranks, without them ranks are disjoint."""
    from timm.data.distributed_sampler import RepeatAugSampler

    n = open_dataset(coded_dataset).split("train").num_samples
    per_rank = []
    for rank in range(2):
        d = DistInfo(rank=rank, world_size=2, local_rank=rank, local_world_size=2)
        idx = epoch_samples(n, seed=0, epoch=3, rank=rank, world_size=2, batch_size=4, num_repeats=num_repeats)[0]
        if num_repeats > 1:
            timm_s = RepeatAugSampler(range(n), num_replicas=2, rank=rank, num_repeats=num_repeats)
            timm_s.set_epoch(3)
            assert idx.tolist() == list(timm_s)[: len(idx)]
        for backend in FILE_BACKENDS:
            loader = create_loader(make_cfg(coded_dataset, backend, seed=0, batch_size=4, num_repeats=num_repeats),
                                   "train", d)
            loader.set_epoch(3)
            imgs, _ = collect(loader)
            assert sample_ids(coded_dataset, "train", imgs) == batched(idx, 4), (backend, rank)
        per_rank.append(idx.tolist())
    if num_repeats == 1:
        assert not set(per_rank[0]) & set(per_rank[1])
    else:  # world 2, 3 repeats: copy j of an image goes to rank (3i + j) % 2, so both ranks see most images
        assert len(set(per_rank[0]) & set(per_rank[1])) > 0.5 * len(set(per_rank[0]))


@pytest.mark.parametrize("backend", FILE_BACKENDS)
def test_determinism_resume_and_epochs(coded_dataset, backend):
    cfg = make_cfg(coded_dataset, backend, batch_size=4)
    ids = lambda imgs: sample_ids(coded_dataset, "train", imgs)  # noqa: E731
    a = create_loader(cfg, "train", DistInfo())
    a.set_epoch(1)
    imgs_a, _ = collect(a)
    b = create_loader(cfg, "train", DistInfo())
    b.set_epoch(1)
    imgs_b, _ = collect(b)
    assert ids(imgs_a) == ids(imgs_b) == batched(epoch_samples(42, seed=5, epoch=1, rank=0, world_size=1, batch_size=4)[0], 4)
    # resume mid-epoch: the remaining batches are the images an uninterrupted run sees
    b.set_epoch(1, start_batch=3)
    imgs_r, _ = collect(b)
    assert ids(imgs_r) == ids(imgs_a)[3:]
    # an epoch abandoned half way leaves nothing behind for the next one
    it = iter(b)
    next(it)
    b.set_epoch(1)
    imgs_again, _ = collect(b)
    assert ids(imgs_again) == ids(imgs_a)
    # the offset applies once; the next epoch is whole and in its own order
    b.set_epoch(2)
    imgs_next, _ = collect(b)
    assert ids(imgs_next) == batched(epoch_samples(42, seed=5, epoch=2, rank=0, world_size=1, batch_size=4)[0], 4)
    if backend == "dali":  # epoch 2 followed epoch 1: it ran on the pipeline primed at the end of epoch 1
        pipeline = b._iter
        b.set_epoch(3)
        imgs_3, _ = collect(b)
        assert b._iter is pipeline and ids(imgs_3)[0] == epoch_samples(42, seed=5, epoch=3, rank=0, world_size=1,
                                                                        batch_size=4)[0][:4].tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_set_resolution(small_dataset, backend):
    loader = create_loader(make_cfg(small_dataset, backend), "train", DistInfo())
    loader.set_resolution(24)
    assert next(iter(loader)).images.shape[-2:] == (24, 24)
    loader.set_resolution(40)
    imgs, _ = collect(loader)
    assert all(x.shape[-2:] == (40, 40) for x in imgs)


def test_clear_errors_before_work(small_dataset, tmp_path):
    with pytest.raises(ConfigError, match="data.backend"):  # allowed values are checked as the config is made
        make_cfg(small_dataset, "webdataset")
    with pytest.raises(LoaderError, match="manifest.json"):
        create_loader(make_cfg(tmp_path, "dali"), "train", DistInfo())
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(small_dataset, broken)
    os.remove(broken / "train.beton")
    with pytest.raises(LoaderError, match="train.beton"):
        create_loader(make_cfg(broken, "ffcv"), "train", DistInfo())
    mismatched = tmp_path / "mismatched"
    shutil.copytree(small_dataset, mismatched)
    m = json.loads((mismatched / "manifest.json").read_text())
    shard = m["splits"]["val"]["dali_shards"][0]["tar"]
    with open(mismatched / shard, "ab") as f:
        f.write(b"x")
    with pytest.raises(LoaderError, match="manifest says"):
        create_loader(make_cfg(mismatched, "dali"), "val", DistInfo())


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_a_size_record_that_disagrees_with_its_jpeg_names_the_sample(small_dataset, tmp_path, backend):
    """The torch and DALI backends place their crops by the stored size record: a wrong record (here: every
    train image's recorded twice its size, so windows fall outside the JPEGs) is a DatasetError naming a sample
    and its shard, not a wrong crop or a bare decoder error. (`fastrsb verify` checks every record up front:
    tests/test_convert.py.)"""
    import shutil

    from dataprep.layout import DatasetError

    data = tmp_path / "data"
    shutil.copytree(small_dataset, data)
    sizes = np.load(data / "train.sizes.npy")
    np.save(data / "train.sizes.npy", sizes * 2)
    loader = create_loader(make_cfg(data, backend), "train", DistInfo())
    with pytest.raises(DatasetError, match=r"train sample \d+ \(source [^;]+; stored in dali/train-\d+\.tar as member \d+\.jpg at byte \d+, and in train\.beton\): the JPEG is 90x120.* says 180x240"):
        collect(loader)


def test_missing_library_names_the_backend(small_dataset):
    code = ("import sys; sys.modules['ffcv'] = None\n"
            "from fastrsb.config import load_config\nfrom fastrsb.data import create_loader, LoaderError\n"
            "from fastrsb.dist import DistInfo\n"
            f"cfg = load_config(None, ['data.backend=ffcv', 'data.path={small_dataset}'])\n"
            "try:\n    create_loader(cfg, 'train', DistInfo())\nexcept LoaderError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "backend 'ffcv' needs a library that is not installed" in r.stdout, r.stderr


_TWO_PROC = r"""
import json, sys, torch, torch.distributed as tdist
from fastrsb.config import load_config
from fastrsb.data import create_loader
from fastrsb.dist import init_distributed
d = init_distributed("cpu")
out = {}
for backend in ("ffcv", "dali", "torch"):
    cfg = load_config(None, ["data.backend=" + backend, "data.path=" + sys.argv[1], "data.batch_size=4",
                             "data.train_res=32", "data.val_res=32", "data.workers=1", "data.seed=5"])
    for split in ("train", "val"):
        loader = create_loader(cfg, split, d)
        loader.set_epoch(2)
        # mean colour of every image, batch by batch: the parent reads the image identities from it
        out[backend + "/" + split] = [b.images.float().mean(dim=(2, 3)).tolist() for b in loader]
gathered = [None, None]
tdist.all_gather_object(gathered, out)
if d.rank == 0:
    print("RESULT" + json.dumps(gathered))
tdist.destroy_process_group()
"""


def test_two_process_gloo_run(coded_dataset, tmp_path):
    """A real torchrun world of 2 (gloo): on each rank, ffcv, dali and torch yield the shared
    sampler's images in its order; val covers every image exactly once across the ranks."""
    script = tmp_path / "two_proc.py"
    script.write_text(_TWO_PROC)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), str(coded_dataset)], capture_output=True, text=True, timeout=240, cwd=os.getcwd())
    assert r.returncode == 0, r.stderr[-3000:]
    per_rank = json.loads(r.stdout.split("RESULT", 1)[1].splitlines()[0])

    def ids(split, means):
        return sample_ids(coded_dataset, split, [torch.tensor(m).view(-1, 3, 1, 1) for m in means])

    n_train = open_dataset(coded_dataset).split("train").num_samples
    n_val = open_dataset(coded_dataset).split("val").num_samples
    val_seen = []
    for rank, got in enumerate(per_rank):
        expect = batched(epoch_samples(n_train, seed=5, epoch=2, rank=rank, world_size=2, batch_size=4)[0], 4)
        val = ids("val", got["ffcv/val"])
        for backend in FILE_BACKENDS:
            assert ids("train", got[backend + "/train"]) == expect, (backend, rank)
            assert ids("val", got[backend + "/val"]) == val, (backend, rank)
        val_seen += sum(val, [])
    assert sorted(val_seen) == list(range(n_val))


@pytest.fixture(scope="session")
def two_tone_dataset(tmp_path_factory):
    """Images red on the left half, blue on the right: a horizontal flip shows in the first column."""
    from PIL import Image

    from dataprep.convert import Settings, convert

    root = tmp_path_factory.mktemp("twotone")
    for k in range(48):
        img = Image.new("RGB", (48, 36), (220, 20, 20))
        img.paste((20, 20, 220), (24, 0, 48, 36))
        path = root / "src" / "train" / ("a" if k % 2 else "b") / f"{k:03d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=95)
    convert(root / "src", root / "data", Settings(shard_size=16), workers=2, progress=False, log=lambda s: None)
    return root / "data"


@pytest.mark.parametrize("backend", FILE_BACKENDS)
def test_train_batches_are_flipped_half_the_time(two_tone_dataset, backend):
    """RandomResizedCrop of the whole image (scale and ratio pinned) plus a random horizontal flip:
    about half the images come out blue on the left, and the rest red on the left."""
    cfg = make_cfg(two_tone_dataset, backend, scale="[1.0,1.0]", ratio="[1.3333333,1.3333334]")
    flipped = []
    for epoch in range(2):
        loader = create_loader(cfg, "train", DistInfo())
        loader.set_epoch(epoch)
        for x, _ in zip(*collect(loader)):
            left, right = x[:, :, :, :4].float().mean(dim=(2, 3)), x[:, :, :, -4:].float().mean(dim=(2, 3))
            red_left = (left[:, 0] > 150) & (left[:, 2] < 80) & (right[:, 2] > 150)
            blue_left = (left[:, 2] > 150) & (left[:, 0] < 80) & (right[:, 0] > 150)
            assert bool((red_left | blue_left).all()), "the whole image must be in the crop, one half per side"
            flipped += blue_left.tolist()
    assert 0.25 <= sum(flipped) / len(flipped) <= 0.75, sum(flipped) / len(flipped)


def test_one_interpolation_table_names_every_allowed_value_in_every_library():
    """data.interpolation's allowed values and the table's rows are the same set, and each row names a
    filter the library has (a value added to the config without its row, or a misspelt name, fails here)."""
    from nvidia.dali import types
    from PIL import Image
    from torchvision.transforms import InterpolationMode

    from fastrsb.config import DataConfig, allowed
    from fastrsb.data.base import FILTERS

    assert set(FILTERS) == set(allowed(DataConfig, "interpolation"))
    for name, names in FILTERS.items():
        assert InterpolationMode[names["torchvision"]].value == name
        assert isinstance(getattr(types, names["dali"]), types.DALIInterpType)
        assert getattr(Image.Resampling, names["pillow"]).name.lower() == name
