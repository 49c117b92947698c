"""Loaders: one contract (fastrsb.data.base: Batch, SplitLoader), one sampler, four backends."""
from __future__ import annotations

import warnings

import numpy as np

from dataprep.layout import open_dataset
from fastrsb.config import Config, DataConfig, allowed
from fastrsb.data.base import Batch, SplitLoader
from fastrsb.dist import DistInfo

BACKENDS = allowed(DataConfig, "backend")

# the data.* key that chooses each backend's decoder (BACKEND:DECODE in `fastrsb bench` and the tests), and the
# one decoder with a choice of library (BACKEND:DECODE:LIBRARY)
DECODER_KEY = {"ffcv": "ffcv_decoder", "dali": "dali_decode", "torch": "torch_decode"}
LIBRARY_KEY = {("torch", "device"): "torch_device_decoder"}


def parse_backend_spec(spec: str) -> tuple[str, dict[str, str]]:
    """'BACKEND[:DECODE[:LIBRARY]]' -> (backend, {data key: value}), e.g. 'torch:device' -> ('torch', {'torch_decode':
    'device'}), 'torch:device:torchvision' also sets data.torch_device_decoder."""
    backend, _, rest = spec.partition(":")
    decode, _, library = rest.partition(":")
    if not decode:
        return backend, {}
    if backend not in DECODER_KEY:
        raise ValueError(f"{spec!r}: only {', '.join(f'{b}:DECODE' for b in DECODER_KEY)} name a decoder")
    keys = {DECODER_KEY[backend]: decode}
    if library:
        if (backend, decode) not in LIBRARY_KEY:
            raise ValueError(f"{spec!r}: only {', '.join(f'{b}:{d}:LIBRARY' for b, d in LIBRARY_KEY)} name a library")
        keys[LIBRARY_KEY[backend, decode]] = library
    return backend, keys

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


def create_loader(cfg: Config, split: str, dist: DistInfo) -> SplitLoader:
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
