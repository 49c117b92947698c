"""`fastrsb plot`: training curves of one or more runs (a sweep's seeds too) from their metrics.jsonl."""
from __future__ import annotations

import json
from pathlib import Path

METRICS = "metrics.jsonl"
# (title, metrics.jsonl keys drawn in the panel: solid line, then a dashed EMA line); train figures come from the
# interval lines (every log interval), val figures from the epoch lines
PANELS = (
    ("train loss", ("loss",)),
    ("learning rate", ("lr",)),
    ("val top-1 (%)", ("val_top1", "ema_val_top1")),
    ("images/sec", ("images_per_sec",)),
    ("data stall (fraction of wall time)", ("data_stall",)),
)
_VAL_KEYS = {"val_top1", "ema_val_top1"}


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories: each path is a run (holds metrics.jsonl) or a folder of runs (a sweep)."""
    runs = []
    for p in map(Path, paths):
        if (p / METRICS).is_file():
            runs.append(p)
            continue
        inner = sorted(d for d in p.iterdir() if (d / METRICS).is_file()) if p.is_dir() else []
        if not inner:
            raise FileNotFoundError(f"{p}: no {METRICS} in it or in its subfolders (not a run or a sweep)")
        runs.extend(inner)
    return runs


def read_metrics(run: Path) -> list[dict]:
    lines = []
    for n, text in enumerate((run / METRICS).read_text().splitlines(), 1):
        if text.strip():
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError:  # a run killed mid-write leaves a torn last line
                raise ValueError(f"{run / METRICS}: line {n} is not JSON") from None
    return lines


def _label(run: Path, runs: list[Path]) -> str:
    """The shortest distinct name: the folder, with its parent when two runs share a folder name."""
    names = [r.name for r in runs]
    return f"{run.parent.name}/{run.name}" if names.count(run.name) > 1 else run.name


def plot_runs(paths: list[str | Path], out: str | Path) -> dict:
    """Draw every run into one figure, one panel per quantity, against (fractional) epochs; save a PNG.
    Returns what was drawn: {panel title: {line label: (epochs, values)}}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = find_runs(paths)
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(8, 2.4 * len(PANELS)), sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        lines = read_metrics(run)
        label = _label(run, runs)
        intervals = [r for r in lines if r.get("kind") == "interval"]
        epochs = [r for r in lines if r.get("kind") == "epoch"]
        for ax, (_, keys) in zip(axes, PANELS):
            for style, key in zip(("-", "--"), keys):
                source = epochs if key in _VAL_KEYS or not intervals else intervals
                pts = [(r["epoch"], r[key]) for r in source if r.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts), style, color=colours[i % len(colours)],
                            label=label if style == "-" else f"{label} EMA",
                            marker="o" if key in _VAL_KEYS else None, markersize=3)
    for ax, (title, _) in zip(axes, PANELS):
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
    axes[-1].set_xlabel("epoch")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    drawn = {ax.get_title(): {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()}
             for ax in axes}
    plt.close(fig)
    return drawn
