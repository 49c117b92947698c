"""What every benchmark result carries: the machine, the versions, the command, and
repeats summarised as min/median/max (warm-up runs are never part of them)."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, Sequence


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _pkg(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def machine_info() -> dict:
    info = {
        "hostname": platform.node(),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        # 1/5/15-minute load when the result was written: other work on a shared machine shows here
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": sys.version.split()[0],
        "versions": {n: _pkg(n) for n in ("fastrsb", "torch", "torchvision", "timm", "ffcv", "nvidia-dali-cuda130",
                                          "numpy", "numba", "pillow", "pyarrow")},
        "gpu": None,
    }
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                           "cuda": torch.version.cuda}
    except ImportError:
        pass
    return info


def summarize(values: Sequence[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "repeats": len(values)}


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of a[i] / b[i], for measurements of two candidates timed back to back in each
    round: load from other work on a shared machine drifts slowly, so it cancels within a pair."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def repeat(fn: Callable[[], float], repeats: int = 3, warmup: int = 1) -> list[float]:
    """Call fn (which returns a measurement) warmup + repeats times; keep the measured ones."""
    for _ in range(warmup):
        fn()
    return [fn() for _ in range(repeats)]


def command_line() -> str:
    """How this process was started, as a user would retype it."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    prog = f"python -m {spec.name}" if spec is not None and spec.name != "__main__" else Path(sys.argv[0]).name
    return " ".join([prog.removesuffix(".__main__"), *sys.argv[1:]])


def write_result(path: str | Path, kind: str, results: list[dict], extra: dict | None = None) -> dict:
    doc = {
        "benchmark": kind,
        "command": command_line(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        **(extra or {}),
        "results": results,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def plot_bars(path: str | Path, labels: list[str], values: list[float], errors: list[tuple[float, float]] | None,
              ylabel: str, title: str) -> None:
    """A side-by-side bar chart (median, with min..max whiskers when given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(labels) + 2), 3.5))
    yerr = None
    if errors:
        yerr = [[v - lo for v, (lo, _) in zip(values, errors)], [hi - v for v, (_, hi) in zip(values, errors)]]
    ax.bar(labels, values, yerr=yerr, capsize=4, color="#4C72B0")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.1f}"
    return "" if v is None else str(v)
