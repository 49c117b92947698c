"""Run fastrsb with stop signals sent to itself at chosen moments, so a test hits exactly the step,
evaluation or checkpoint write it names (a signal sent from outside lands wherever the run happens to be):

    python -m tests.stop_at MOMENT=SIG [MOMENT=SIG ...] -- train --config ... (fastrsb's arguments)

MOMENT: step:N (as the Nth training step of this process starts), eval:N (as the Nth evaluation starts),
save:N (halfway through writing the Nth checkpoint: the file is written, not yet renamed into place).
SIG: TERM or INT. Each send is logged to stderr as `[stop_at] SIGTERM at step:7 t=<time.time()>`."""
from __future__ import annotations

import os
import signal
import sys
import time

import torch

from fastrsb import checkpoint as ckpt
from fastrsb.cli import main
from fastrsb.trainer import Trainer


def _at(moment: str, sig: signal.Signals, wrapped):
    kind, n = moment.split(":")
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == int(n) and kind != "save":
            _send(sig, moment)
        out = wrapped(*args, **kwargs)
        if calls == int(n) and kind == "save":
            _send(sig, moment)
        return out

    return wrapper


def _send(sig: signal.Signals, moment: str) -> None:
    print(f"[stop_at] {sig.name} at {moment} t={time.time():.3f}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), sig)


class _TorchWithSave:
    """torch, as fastrsb.checkpoint sees it, with another save."""

    def __init__(self, save):
        self.save = save

    def __getattr__(self, name):
        return getattr(torch, name)


def install(spec: list[str]) -> None:
    for item in spec:
        moment, sig_name = item.split("=")
        sig = signal.Signals[f"SIG{sig_name}"]
        kind = moment.split(":")[0]
        if kind == "step":
            Trainer._train_step = _at(moment, sig, Trainer._train_step)
        elif kind == "eval":
            Trainer.evaluate = _at(moment, sig, Trainer.evaluate)
        elif kind == "save":  # checkpoint.save_atomic's write callback calls torch.save on the temporary file
            ckpt.torch = _TorchWithSave(_at(moment, sig, torch.save))
        else:
            raise SystemExit(f"stop_at: unknown moment {moment!r} (step:N, eval:N, save:N)")


if __name__ == "__main__":
    sep = sys.argv.index("--")
    install(sys.argv[1:sep])
    sys.exit(main(sys.argv[sep + 1:]))
