"""One screen of what a GPU benchmark run measured.

    python -m benchmarks.device_summary check JSON_DIR OUT_JSON [FAILED_STEP ...]   (device_check.sh)
    python -m benchmarks.device_summary table RESULTS_DIR [FAILED_STEP ...]         (run_gpu_node.sh)

`check` also writes OUT_JSON, every step's results in one file; `table` lists every row of the result
files (fastrsb.bench.report format) in RESULTS_DIR. A step that failed shows as FAILED, never as a figure.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

# the goals the GPU path is held to (issue: one H100/H200, RN50 bf16 channels-last 224)
MODEL_ONLY_GOAL = 5000.0  # images/sec
E2E_OVERHEAD_GOAL = 0.03  # e2e on synthetic data at most 3% below the same run without the batch stage


def _row(docs: dict, name: str) -> dict | None:
    doc = docs.get(name)
    return doc["results"][0] if doc and doc.get("results") else None


def summarize(docs: dict, failed: list[str]) -> list[str]:
    lines = []
    machine = next(iter(docs.values()))["machine"] if docs else {}
    gpu = (machine.get("gpu") or {}).get("name", "no GPU (CPU run at tiny sizes)")
    versions = machine.get("versions", {})
    lines.append(f"device check on {gpu}; torch {versions.get('torch')}, timm {versions.get('timm')}; "
                 f"{machine.get('cpu_cores')} CPU cores")

    def fmt(name: str, key: str = "images_per_sec", unit: str = " img/s") -> str:
        row = _row(docs, name)
        if row is None or name in failed:
            return "FAILED"
        return f"{row[key]:,.0f}{unit} (min {row['min']:,.0f}, max {row['max']:,.0f})"

    lines.append("tests (augment parity + sync audit): " + ("FAILED" if "tests" in failed else "passed"))
    for variant in ("channels_last", "no_channels_last", "compile"):
        row = _row(docs, f"model_{variant}")
        extra = f", {row['achieved_tflops']:.0f} TFLOP/s" if row and row.get("achieved_tflops") else ""
        model = row["model"] if row else "model"
        lines.append(f"model only, {model} {variant}: {fmt(f'model_{variant}')}{extra if row else ''}")
    ra = docs.get("randaug")
    if ra and "randaug" not in failed:
        for r in ra["results"]:
            lines.append(f"RandAugment, {r['implementation']}: {r['images_per_sec']:,.0f} img/s "
                         f"({r['vs_timm_1_process']:.1f}x timm in 1 process)")
    else:
        lines.append("RandAugment: FAILED")
    for name in sorted(n for n in docs.keys() | set(failed) if n.startswith("loader_")):
        doc = docs.get(name)
        if doc is None or name in failed:
            lines.append(f"{name}: FAILED")
            continue
        for r in doc["results"]:
            fallback = r.get("decode", {}).get("fallbacks")
            lines.append(f"{name}, {r['backend']} ({r.get('decoder', '?')}): {r['images_per_sec']:,.0f} img/s (min "
                         f"{r['min']:,.0f}, max {r['max']:,.0f})"
                         + (f", {fallback} host-decode fallbacks" if fallback is not None else ""))
    for name in ("e2e_synthetic", "e2e_synthetic_no_augment", "e2e_torch", "e2e_torch_device_decode",
                 "e2e_torch_device_decode_160"):
        row = _row(docs, name)
        stall = f", data stall {row['data_stall']:.1%}" if row and name not in failed else ""
        lines.append(f"{name}: {fmt(name)}{stall}")
    lines.extend(_ops_per_step(docs, failed))
    real, synthetic, model = (_row(docs, n) for n in ("e2e_torch_device_decode", "e2e_synthetic", "model_channels_last"))
    if real and "e2e_torch_device_decode" not in failed:  # same recipe and resolution, real JPEGs vs no data path
        parts = [f"{real['images_per_sec'] / ref['images_per_sec']:.2f}x {what}"
                 for ref, what, step in ((synthetic, "e2e_synthetic", "e2e_synthetic"), (model, "model only", "model_channels_last"))
                 if ref and step not in failed]
        lines.append("e2e_torch_device_decode: " + ", ".join(parts))
    cl = _row(docs, "model_channels_last")
    if cl and "model_channels_last" not in failed and cl["device"].startswith("cuda"):  # goals are for GPUs
        lines.append(f"model only >= {MODEL_ONLY_GOAL:,.0f} img/s: "
                     f"{'met' if cl['images_per_sec'] >= MODEL_ONLY_GOAL else 'MISSED'}")
        full, bare = _row(docs, "e2e_synthetic"), _row(docs, "e2e_synthetic_no_augment")
        if full and bare and not {"e2e_synthetic", "e2e_synthetic_no_augment"} & set(failed):
            cost = 1 - full["images_per_sec"] / bare["images_per_sec"]
            lines.append(f"batch stage costs {cost:.1%} of synthetic e2e throughput (goal <= {E2E_OVERHEAD_GOAL:.0%}): "
                         f"{'met' if cost <= E2E_OVERHEAD_GOAL else 'MISSED'}")
    if failed:
        lines.append("FAILED steps: " + ", ".join(failed))
    return lines


def _ops_per_step(docs: dict, failed: list[str]) -> list[str]:
    """bench step's ops per step by part, and beside them e2e_synthetic's time per step (the same recipe and
    batch): the host time the GPU step leaves for each dispatched op."""
    ops = _row(docs, "step_ops")
    if ops is None or "step_ops" in failed:
        return ["ops per step: FAILED"]
    parts = ", ".join(f"{part} {ops[part]:,.0f}" for part in ("batch stage", "forward + backward", "optimizer", "EMA"))
    lines = [f"ops per step, {ops['config']} ({ops['model']}, {ops['optim']}, batch {ops['batch_size']}, {ops['amp']}): "
             f"{parts}; {ops['total']:,.0f} in all"]
    e2e = _row(docs, "e2e_synthetic")
    if e2e and "e2e_synthetic" not in failed:
        ms = 1000 * e2e["batch_size"] * e2e["world_size"] / e2e["images_per_sec"]
        lines.append(f"e2e_synthetic: {ms:,.1f} ms per step, {1000 * ms / ops['total']:,.1f} us per dispatched op")
    return lines


def table(results: Path, failed: list[str]) -> list[str]:
    """Every row of every result file: file, row label, images/sec (median, min-max), data stall."""
    out = []
    for p in sorted(results.glob("*.json")):
        doc = json.loads(p.read_text())
        for r in doc.get("results", []):
            label = next((f"{k} {r[k]}" for k in ("backend", "implementation", "model", "processes", "workers") if k in r), "")
            stall = f"  data stall {r['data_stall']:.1%}" if "data_stall" in r else ""
            out.append(f"{p.stem:28} {label:44} {r['images_per_sec']:>10,.0f} img/s "
                       f"({r['min']:,.0f}-{r['max']:,.0f}){stall}")
    return out + ([f"FAILED steps (no results shown): {', '.join(failed)}"] if failed else [])


def main(argv: list[str]) -> int:
    if argv[:1] == ["table"]:
        print("\n".join(table(Path(argv[1]), argv[2:])))
        return 0
    if argv[:1] != ["check"] or len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    json_dir, out, failed = Path(argv[1]), Path(argv[2]), argv[3:]
    docs = {p.stem: json.loads(p.read_text()) for p in sorted(json_dir.glob("*.json"))}
    lines = summarize(docs, failed)
    out.write_text(json.dumps({"failed_steps": failed, "summary": lines, "steps": docs}, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
