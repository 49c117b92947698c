"""Loaders: one contract (fastrsb.data.base: Batch, SplitLoader), one sampler, four backends."""
from __future__ import annotations

import warnings

import numpy as np

from dataprep.layout import open_dataset
from fastrsb.config import DataConfig, allowed
from fastrsb.data.base import Batch, SplitLoader
from fastrsb.dist import DistInfo

BACKENDS = allowed(DataConfig, "backend")
_EXTRA = {"ffcv": "ffcv", "dali": "dali"}


class LoaderError(RuntimeError):
    """A loader cannot be built: unknown backend, missing library, missing or mismatched data."""


def _warn_if_sorted_by_label(blocks, labels: np.ndarray, num_classes: int, path: str) -> None:
    """Block order's batches mix the window's blocks; on a store in label order those are a few classes."""
    if num_classes > 1 and np.all(np.diff(labels) >= 0):
        window = blocks.window_blocks * blocks.block_samples
        classes = min(num_classes, window / (len(labels) / num_classes) + 1)
        warnings.warn(f"data.order=block on {path}, whose samples are stored in label order: a window of {window} "
                      f"samples holds about {classes:.0f} of its {num_classes} classes, and so does every batch. "
                      f"Convert with --shuffle-store (docs/data.md, block order)", stacklevel=3)


def create_loader(cfg, split: str, dist: DistInfo) -> SplitLoader:
    """The loader for `split` ('train' or 'val') of cfg.data on this rank.

    Every check that can fail (library, dataset files, manifest) runs here, before any work starts;
    the config's own values were checked when it was made (fastrsb.config)."""
    data = cfg.data
    if split not in ("train", "val"):
        raise LoaderError(f"split must be 'train' or 'val', got {split!r}")
    if data.backend == "synthetic":
        from fastrsb.data.synthetic import SyntheticLoader

        return SyntheticLoader(data, split, dist)
    if not data.path:
        raise LoaderError(f"data.path is empty: backend {data.backend!r} reads a dataset written by `fastrsb convert`")
    try:
        if data.backend == "ffcv":
            from fastrsb.data.ffcv_loader import FfcvLoader as cls
        elif data.backend == "dali":
            from fastrsb.data.dali_loader import DaliLoader as cls
        elif data.torch_decode == "device":
            from fastrsb.data.torch_device_decode import TorchDeviceLoader as cls
        else:
            from fastrsb.data.torch_loader import TorchLoader as cls
    except ImportError as e:
        extra = _EXTRA.get(data.backend)
        hint = f" (pip install -e '.[{extra}]')" if extra else ""
        raise LoaderError(f"backend {data.backend!r} needs a library that is not installed: {e}{hint}") from e
    from dataprep.layout import DatasetError

    try:
        ds = open_dataset(data.path)
        info = ds.split(split)
        if data.backend == "ffcv" and not info.beton_path.is_file():
            raise DatasetError(f"{info.beton_path} not found")
        loader = cls(data, split, dist, info, ds.num_classes)
        if loader.blocks is not None:
            _warn_if_sorted_by_label(loader.blocks, info.labels, ds.num_classes, data.path)
        return loader
    except DatasetError as e:
        raise LoaderError(f"backend {data.backend!r}, split {split!r}: {e}") from e


__all__ = ["Batch", "SplitLoader", "LoaderError", "create_loader", "BACKENDS"]
