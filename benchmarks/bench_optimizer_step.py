"""The optimizer step and the EMA update alone, on a recipe model's parameters: the multi-tensor (foreach)
implementation fastrsb asks for on every device against the per-tensor one torch and timm pick on a CPU
when left to choose. Dispatched ops and milliseconds per call; the two are timed back to back in each round
and their ratio is the median over rounds.

    python -m benchmarks.bench_optimizer_step --json benchmarks/results/cpu-2core/optimizer_step.json
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from timm.utils import ModelEmaV3

from fastrsb.bench.report import paired_ratio, print_table, summarize, write_result
from fastrsb.config import EmaConfig, ModelConfig, OptimConfig
from fastrsb.model import create_ema, create_model
from fastrsb.op_count import OpCount
from fastrsb.optim import create_optimizer


def per_tensor(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    for group in optimizer.param_groups:
        group["foreach"] = False
    return optimizer


def candidates(model: torch.nn.Module, name: str):
    """(label, model, update) pairs: fastrsb's and the per-tensor twin, each on its own copy of the weights."""
    twin = copy.deepcopy(model)
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()
    if name == "ema":
        fast, slow = create_ema(model, EmaConfig(enabled=True, decay=0.9998)), ModelEmaV3(twin, decay=0.9998, foreach=False)
        return [("foreach", lambda: fast.update(model, step=10)), ("per-tensor", lambda: slow.update(twin, step=10))]
    cfg = OptimConfig(name=name, weight_decay=1e-4)
    fast, slow = create_optimizer(model, cfg, 1e-3), per_tensor(create_optimizer(twin, cfg, 1e-3))
    return [("foreach", fast.step), ("per-tensor", slow.step)]


def measure(update, calls: int, sync) -> float:
    """ms per call over `calls` back-to-back calls."""
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        update()
    sync()
    return (time.perf_counter() - t0) * 1000 / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--updates", default="lamb,sgd,momentum,adamw,ema", help="optimizer names and/or ema")
    ap.add_argument("--calls", type=int, default=5, help="calls timed per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.manual_seed(0)
    model = create_model(ModelConfig(name=args.model), 1000, device)
    for p in model.parameters():  # the update's cost does not depend on the gradients' values
        p.grad = torch.randn_like(p) * 1e-3
    rows = []
    for name in args.updates.split(","):
        pair = candidates(model, name)
        ops = {}
        for label, update in pair:
            update()  # warm-up: optimizer state
            with OpCount() as count:
                update()
            ops[label] = count.total()
        times = {label: [] for label, _ in pair}
        for _ in range(args.rounds):
            for label, update in pair:
                times[label].append(measure(update, args.calls, sync))
        for label, _ in pair:
            s = summarize(times[label])
            rows.append({"update": name, "path": label, "ops": ops[label], "ms": s["median"], "min": s["min"],
                         "max": s["max"], "repeats": s["repeats"], "per_round": [round(t, 2) for t in times[label]],
                         "vs_per_tensor": paired_ratio(times[label], times["per-tensor"])})
    print_table(rows, ["update", "path", "ops", "ms", "min", "max", "vs_per_tensor"])
    if args.json:
        write_result(args.json, "optimizer_step", rows, {"settings": {"model": args.model, "calls": args.calls,
                                                                       "device": str(device)}})


if __name__ == "__main__":
    main()
