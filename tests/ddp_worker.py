"""Run under torchrun by tests/test_trainer.py: `python -m tests.ddp_worker OUT [--section.key=value ...]`.

Each process trains the demo recipe with the overrides twice from the same start: once as the trainer
runs under DDP, once with the model taken out of its DDP wrapper (the same steps, no gradient
all-reduce: each rank steps on its own half of the global batch). Rank 0 saves its weights after each
as OUT/ddp.pt and OUT/no_allreduce.pt, so the test can show that its equality check discriminates.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from fastrsb.config import load_config
from fastrsb.dist import init_distributed, shutdown
from fastrsb.trainer import Trainer

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def main(out: Path, overrides: list[str]) -> None:
    cfg = load_config(CONFIG, [o.removeprefix("--") for o in overrides])
    dist = init_distributed(cfg.train.device)
    try:
        for mode in ("ddp", "no_allreduce"):
            trainer = Trainer(cfg, out / mode, dist)  # seeds everything: both modes start from the same weights
            if mode == "no_allreduce":
                trainer.model = trainer.raw_model
            trainer.fit()
            if dist.is_main:
                torch.save(trainer.raw_model.state_dict(), out / f"{mode}.pt")
    finally:
        shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
