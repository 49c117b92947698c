"""One policy for stored samples that cannot be decoded (damaged after conversion: a disk error, a bad copy), the
same on every backend: the sample is replaced by another sample of its batch, its label with it, so the batch keeps
its size and nothing is trained on as garbage; which one replaces it is a pure function of which samples of the
batch failed, so a resumed run sees the same batches. The first time per epoch a sample fails it is named on
stderr; the loader counts them per epoch; past data.max_bad_samples the run checkpoints and stops, naming them.

What each backend can notice is what its decoder reports (docs/data.md, "Damaged samples")."""
from __future__ import annotations

import math
import sys
from typing import Callable

import numpy as np


NO_FRAME = "no JPEG start and frame header where the dataset stores it"  # the header walk's verdict


class BadDataError(RuntimeError):
    """More stored samples could not be decoded than data.max_bad_samples allows."""


def replacement_sources(bad: np.ndarray) -> np.ndarray:
    """For each position of a batch, the position whose sample it shows: its own when it decoded, else the next
    position that did, wrapping around. Raises BadDataError when none did: there is nothing to show."""
    bad = np.asarray(bad, dtype=bool)
    n = len(bad)
    good = np.flatnonzero(~bad)
    if len(good) == 0:
        raise BadDataError(f"none of the {n} samples of a batch could be decoded")
    at = np.searchsorted(good, np.arange(n))  # the first good position at or after each one
    return good[at % len(good)]


def replace_rows(src: np.ndarray, *batch) -> None:
    """Apply replacement_sources to batch tensors (images, labels, ...) in place, row by row: a copy per replaced
    sample and no index tensor, so nothing is read back from or copied to the device."""
    for k, j in enumerate(src.tolist()):
        if j != k:
            for t in batch:
                t[k].copy_(t[j])


def default_limit(num_samples: int) -> int:
    """data.max_bad_samples unset: 0.01% of the split, rounded up (128 of ImageNet's 1.28M train images, 5 of val)."""
    return math.ceil(num_samples * 1e-4)


class BadSamples:
    """The samples of one split that its loader could not decode: each named the first time per pass over the split
    (a train epoch, an evaluation), counted per pass, and held against the limit (distinct samples since the loader
    was made)."""

    def __init__(self, split: str, limit: int, describe: Callable[[int], str]):
        """describe: a sample index -> 'train sample 37 (source ...; stored in ...)' (SplitInfo.describe_sample)."""
        self.split, self.limit, self.describe = split, limit, describe
        self.reasons: dict[int, str] = {}  # sample index -> what its decoder said, first time seen
        self.in_pass: set[int] = set()

    def start_pass(self) -> None:
        self.in_pass = set()

    def replace(self, indices: np.ndarray, failed: dict[int, str]) -> np.ndarray:
        """A batch of samples `indices` in which the positions `failed` (position -> what the decoder said) could
        not be decoded: record each, and return the batch's replacement_sources."""
        self.record_batch(indices, failed)
        bad = np.zeros(len(indices), bool)
        bad[list(failed)] = True
        return replacement_sources(bad)

    def record_batch(self, indices: np.ndarray, failed: dict[int, str]) -> None:
        for k, reason in failed.items():
            self.record(indices[k], reason)

    def record(self, index: int, reason: str) -> None:
        """Sample `index` could not be decoded (and was replaced)."""
        index = int(index)
        if index in self.in_pass:
            return
        self.in_pass.add(index)
        self.reasons.setdefault(index, reason)
        print(f"[data] {self.describe(index)} could not be decoded ({reason}); replaced by another "
              f"sample of its batch ({len(self.in_pass)} in this pass, {len(self.reasons)} in all, "
              f"data.max_bad_samples={self.limit})", file=sys.stderr, flush=True)

    @property
    def over_limit(self) -> bool:
        return len(self.reasons) > self.limit

    def error(self, data_path: str) -> BadDataError:
        """What the run says when it stops for them: every bad sample, and how to repair the dataset."""
        listing = "\n".join(f"  {self.describe(i)}: {reason}" for i, reason in sorted(self.reasons.items()))
        return BadDataError(
            f"{len(self.reasons)} {self.split} sample(s) could not be decoded, more than data.max_bad_samples="
            f"{self.limit}:\n{listing}\nThe run was checkpointed. Run `fastrsb verify {data_path}` to list every "
            f"damaged sample, rerun the `fastrsb convert` command that wrote {data_path} (it rewrites only the "
            f"damaged files), then resume with --resume auto.")
