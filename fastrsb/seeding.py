"""Seeds and random-number-generator state: one rule for every seed a run derives, and the RNG state a
checkpoint carries so a resumed run continues every stream."""
from __future__ import annotations

import random
import zlib

import numpy as np
import torch

FOLD = 4_294_967_311  # the first prime above 2**32: keys below 2**32 never spill into a neighbour's slot
MASK = (1 << 63) - 1  # seeds stay below 2**63, which every generator here accepts


def derive_seed(seed, *keys):
    """The seed of one purpose of a run: `seed` (the run's train.seed/data.seed), then each key folded in as
    seed * FOLD + key, mod 2**63. Keys are integers (epoch, rank, sample index; numpy uint64 arrays for many
    samples at once) or names ("randaugment", by their CRC-32). Linear on purpose: derive_seed(0, epoch) is
    epoch, the seed torch's DistributedSampler and timm's RepeatAugSampler give an epoch's permutation, so
    seed 0 reproduces their order. Generators that draw many numbers from one seed (torch, numpy, DALI)
    scramble it themselves; a counter-based draw needs a mixed key (fastrsb.data.sampler.augmentation_keys)."""
    if any(isinstance(k, np.ndarray) for k in keys):
        seed = np.uint64(seed)  # uint64 arithmetic wraps mod 2**64, which the mask turns into mod 2**63
    with np.errstate(over="ignore"):
        for key in keys:
            key = zlib.crc32(key.encode()) if isinstance(key, str) else key
            seed = (seed * FOLD + key) & MASK
    return seed


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global generators (timm's Mixup draws from numpy's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def numpy_rng_state() -> dict:
    """numpy's global RNG state in a weights_only-loadable form."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
            "cached": cached}


def set_numpy_rng_state(state: dict) -> None:
    np.random.set_state((state["name"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                         state["cached"]))


def rng_state() -> dict:
    """This process's global RNG states: Python, numpy, torch and (when present) cuda."""
    state = {"python": random.getstate(), "numpy": numpy_rng_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    set_numpy_rng_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
