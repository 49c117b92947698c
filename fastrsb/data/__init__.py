"""Loaders: one contract (fastrsb.data.base: Batch, SplitLoader), one sampler, four backends."""
from __future__ import annotations

from dataprep.layout import open_dataset
from fastrsb.config import DataConfig, allowed
from fastrsb.data.base import Batch, SplitLoader
from fastrsb.dist import DistInfo

BACKENDS = allowed(DataConfig, "backend")
_EXTRA = {"ffcv": "ffcv", "dali": "dali"}


class LoaderError(RuntimeError):
    """A loader cannot be built: unknown backend, missing library, missing or mismatched data."""


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
        return cls(data, split, dist, info, ds.num_classes)
    except DatasetError as e:
        raise LoaderError(f"backend {data.backend!r}, split {split!r}: {e}") from e


__all__ = ["Batch", "SplitLoader", "LoaderError", "create_loader", "BACKENDS"]
