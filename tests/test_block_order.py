"""data.order=block: a pure, seeded order of the store's blocks through a sliding window, dealt like the random order
(a global batch is the same set of samples whatever the world size), read by every backend with the same crops, with
the store's pages dropped behind it so its resident share stays near the window's."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from fastrsb.config import ConfigError, load_config
from fastrsb.data import parse_backend_spec
from fastrsb.data import create_loader
from fastrsb.data.block_order import BlockLayout, block_order
from fastrsb.data.sampler import epoch_samples
from fastrsb.dist import DistInfo
from tests.datagen import make_good_tree, sample_ids
from tests.test_loaders import batched, make_cfg
from tests.test_no_hangs import guarded

pytestmark = pytest.mark.timeout(300)


def test_the_block_order_is_a_seeded_permutation_that_holds_at_most_a_window_of_blocks_open():
    layout = BlockLayout(num_samples=1000, block_samples=37, window_blocks=4)
    a, b = block_order(layout, seed=3, epoch=5), block_order(layout, seed=3, epoch=5)
    assert np.array_equal(a, b) and np.array_equal(np.sort(a), np.arange(1000))
    assert not np.array_equal(a, block_order(layout, seed=3, epoch=6))
    blocks = layout.block_of(a)
    first = {k: np.flatnonzero(blocks == k)[0] for k in range(layout.num_blocks)}
    last = {k: np.flatnonzero(blocks == k)[-1] for k in range(layout.num_blocks)}
    open_at = [sum(first[k] <= p <= last[k] for k in first) for p in range(0, 1000, 7)]
    assert max(open_at) == 4  # the window, and no more: what is resident
    # within the window the samples mix: no block runs alone for long
    runs = np.diff(np.flatnonzero(np.diff(blocks) != 0))
    assert np.median(runs) <= 2


@pytest.mark.parametrize("order", ["random", "block"])
@pytest.mark.parametrize("repeats", [1, 3])
def test_a_global_step_takes_the_same_samples_whatever_the_world_size(order, repeats):
    """At a constant global batch (16), every global step of an epoch is the same set of (sample, copy) pairs on 1, 2
    and 4 ranks: what lets a run stopped on one world size continue on another."""
    n, global_batch = 997, 16
    layout = BlockLayout(n, 29, 3) if order == "block" else None

    def steps(world: int) -> list[set]:
        per_rank = [epoch_samples(n, seed=7, epoch=2, rank=r, world_size=world, batch_size=global_batch // world,
                                  num_repeats=repeats, blocks=layout) for r in range(world)]
        b = global_batch // world
        return [{(int(i), int(c)) for idx, cp in per_rank for i, c in zip(idx[s * b:(s + 1) * b], cp[s * b:(s + 1) * b])}
                for s in range(len(per_rank[0][0]) // b)]

    one = steps(1)
    assert len(one) > 10 and steps(2) == one and steps(4) == one


BLOCK = dict(order="block", block_mb=0.0025, window_blocks=3)  # 4 samples a block of the coded dataset, 1 of small
SORTED_STORE = pytest.mark.filterwarnings("ignore:data.order=block on .* stored in label order")  # the fixtures: label order


@SORTED_STORE
@pytest.mark.parametrize("spec", ["ffcv", "dali", "torch", "torch:device", "synthetic"])
def test_every_backend_reads_the_block_order_and_resumes_in_it(coded_dataset, spec):
    backend, decoder = parse_backend_spec(spec)
    block = {**BLOCK, "block_mb": 0.012} if spec == "synthetic" else BLOCK  # its blocks: 3 KB uint8 images
    loader = create_loader(make_cfg(coded_dataset, backend, **decoder, **block), "train", DistInfo())
    assert loader.blocks is not None and loader.blocks.block_samples < 10
    loader.set_epoch(1)
    images = guarded(f"{spec}: a block-order epoch", lambda: [b.images.clone() for b in loader])
    indices = loader.plan().indices
    assert not np.array_equal(indices, create_loader(make_cfg(coded_dataset, backend, **decoder), "train",
                                                     DistInfo()).plan(1).indices)  # another order than random
    if spec != "synthetic":
        assert sample_ids(coded_dataset, "train", images) == batched(indices, loader.batch_size)
    loader.set_epoch(1, start_batch=2)
    rest = guarded(f"{spec}: a resumed block-order epoch", lambda: [b.images.clone() for b in loader])
    assert all(torch.equal(x, y) for x, y in zip(images[2:], rest)) and len(rest) == len(images) - 2


@SORTED_STORE
@pytest.mark.parametrize("backend", ["ffcv", "dali", "torch"])
def test_a_sample_gets_the_same_crop_in_block_and_random_order(small_dataset, backend):
    """The crop is keyed on (seed, epoch, sample, copy), not on the sample's place in the order."""
    def by_sample(**over) -> dict[int, torch.Tensor]:
        loader = create_loader(make_cfg(small_dataset, backend, **over), "train", DistInfo())
        images = torch.cat([b.images.clone() for b in loader])
        return dict(zip(loader.plan().indices.tolist(), images))

    random, block = by_sample(), by_sample(order="block", block_mb=0.01, window_blocks=3)
    common = sorted(set(random) & set(block))
    assert len(common) > 30 and all(torch.equal(random[i], block[i]) for i in common)


@pytest.fixture(scope="module")
def bigger_dataset(tmp_path_factory):
    """~3.6 MB of train samples (1,200 images of ~3 KB): enough of the page cache's 64 KiB chunks to see a bound."""
    from dataprep.convert import Settings, convert

    root = tmp_path_factory.mktemp("bigger")
    make_good_tree(root / "src" / "train", 600, classes=("cat", "dog"), size=(80, 60))
    make_good_tree(root / "src" / "val", 2, classes=("cat", "dog"), size=(80, 60), seed=1)
    convert(root / "src", root / "data", Settings(shard_size=400), workers=2, progress=False, log=lambda s: None)
    return root / "data"


def _peak_resident(loader) -> tuple[int, int]:
    """(the most of the store resident during an epoch, resident after it), from a cold start."""
    from fastrsb.data.page_cache import ResidentPeak, evict, resident_bytes

    paths = loader.store.paths
    evict(paths)
    with ResidentPeak(paths, interval=0.002) as resident:
        guarded("an epoch from a cold store", lambda: [b.images.shape for b in loader])
    return resident.peak, sum(resident_bytes(p) for p in paths)


@SORTED_STORE
@pytest.mark.parametrize("backend", ["ffcv", "dali", "torch"])
def test_block_order_keeps_the_store_out_of_the_page_cache_behind_it(bigger_dataset, backend):
    """From a cold store: in random order all the store an epoch reads stays resident; in block order at most half
    of that is resident at any time (the window, the steps the loader reads ahead and the DROP_LAG behind, in 64 KiB
    chunks), and none after the epoch. (ffcv's process cache, data.ffcv_os_cache=false, reads whole ffcv pages of 4 MB: a store this
    small is one or two of them; benchmarks/results/cpu-2core/cold_store.json measures it at size.)"""
    over = dict(batch_size=16, workers=1)
    # block order first: pages another loader of the same file still maps (ffcv's os_cache) cannot be dropped
    peak, after = _peak_resident(create_loader(make_cfg(bigger_dataset, backend, **over, order="block", block_mb=0.1,
                                                        window_blocks=2), "train", DistInfo()))
    store_peak, store = _peak_resident(create_loader(make_cfg(bigger_dataset, backend, **over), "train", DistInfo()))
    assert store >= store_peak > 0  # random order: what an epoch reads of the store stays
    assert peak < 0.5 * store and after == 0, (store, peak, after)


@pytest.mark.parametrize("over, message", [
    ({"block_mb": 1.0}, r"data.block_mb=1 makes blocks of \d+ samples, more than a rank's share"),
    ({"block_mb": 0.01, "window_blocks": 99}, r"data.window_blocks=99 is more than the split's \d+ blocks"),
    ({"block_mb": 0.005, "window_blocks": 1}, r"data.window_blocks=1 x 2 samples per block is less than a global "
                                              r"batch \(8\): a batch could not mix blocks; at least 4"),
])
def test_block_sizes_the_store_cannot_hold_are_refused_naming_the_key(small_dataset, over, message):
    with pytest.raises(ValueError, match=message):
        create_loader(make_cfg(small_dataset, "torch", order="block", **over), "train", DistInfo())


def test_the_removed_quasi_random_key_points_to_block_order():
    with pytest.raises(ConfigError, match=r"config key 'data.ffcv_quasi_random' was removed: data.order=block"):
        load_config(None, ["data.ffcv_quasi_random=true"])


def test_a_shuffled_store_holds_the_same_samples_in_random_order_and_block_order_warns_without_it(tmp_path):
    """--shuffle-store: the folder route's samples in a seeded random order (the same stored bytes per label, the
    labels recorded with them), a rerun re-uses every shard; block order on a label-sorted store warns, naming it."""
    from dataprep.convert import Settings, convert
    from dataprep.layout import open_dataset

    make_good_tree(tmp_path / "src" / "train", 30, size=(48, 40))
    make_good_tree(tmp_path / "src" / "val", 2, size=(48, 40), seed=1)
    logs: list[str] = []
    for name, shuffle in (("sorted", False), ("shuffled", True), ("shuffled", True)):
        convert(tmp_path / "src", tmp_path / name, Settings(shard_size=16, shuffle_store=shuffle), workers=1,
                progress=False, log=logs.append)
    assert "re-using 6 finished shard(s) of 6" in " ".join(logs)

    def per_label(name):
        info = open_dataset(tmp_path / name).split("train")
        rows = (tmp_path / name / "train.samples.tsv").read_text().splitlines()[1:]
        return info.labels, {(int(r.split("\t")[2]), r.split("\t")[4]) for r in rows}

    (sorted_labels, sorted_set), (shuffled_labels, shuffled_set) = per_label("sorted"), per_label("shuffled")
    assert shuffled_set == sorted_set and np.all(np.diff(sorted_labels) >= 0) and np.any(np.diff(shuffled_labels) < 0)
    block = dict(order="block", block_mb=0.005, window_blocks=2)
    with pytest.warns(UserWarning, match=r"stored in label order: a window of \d+ samples holds about \d of its 3 "
                                         r"classes.*--shuffle-store"):
        create_loader(make_cfg(tmp_path / "sorted", "torch", **block), "train", DistInfo())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_loader(make_cfg(tmp_path / "shuffled", "torch", **block), "train", DistInfo())
