from __future__ import annotations

import pytest

from tests.datagen import make_coded_tree, make_good_tree


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """A converted 3-class dataset (both formats): 20 train + 6 val images per class."""
    from dataprep.convert import Settings, convert

    root = tmp_path_factory.mktemp("small")
    make_good_tree(root / "src" / "train", 20, size=(120, 90))
    make_good_tree(root / "src" / "val", 6, size=(120, 90), seed=1)
    convert(root / "src", root / "data", Settings(shard_size=16), workers=2, progress=False, log=lambda s: None)
    return root / "data"


@pytest.fixture(scope="session")
def coded_dataset(tmp_path_factory):
    """Colour-coded images (tests.datagen.CODES: pixels say which image they are): 14 train and 5 val
    images per class, odd sizes."""
    from dataprep.convert import Settings, convert

    root = tmp_path_factory.mktemp("coded")
    make_coded_tree(root / "src", {"train": 14, "val": 5})
    convert(root / "src", root / "data", Settings(shard_size=16), workers=2, progress=False, log=lambda s: None)
    return root / "data"
