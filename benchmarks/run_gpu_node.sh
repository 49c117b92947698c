#!/usr/bin/env bash
# The whole benchmark suite on a GPU node (1 to 8 GPUs), in the project's environment, writing
# benchmarks/results/<N>x<GPU>/ (one JSON, and a PNG where there is a plot, per benchmark) and summary.txt.
#
#     benchmarks/run_gpu_node.sh DATA [NPROC]
#
# DATA: a dataset written by `fastrsb convert` (ImageNet for figures worth quoting), or the word
# `imagenet-like` to generate 3,000 ImageNet-sized JPEGs and convert them (a smoke test of the suite).
# NPROC: GPUs to use (default: all). Sets up .venv first (scripts/bootstrap.sh) when it is not ready.
# Refuses a machine without a GPU before installing anything. Every step runs even when one fails; the exit
# status is 1 and the summary names each failed step, whose results are left out rather than shown.
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: benchmarks/run_gpu_node.sh DATA [NPROC]}
no_gpu() {  # $1: who saw no GPU, as "nvidia-smi -L lists no GPU"
  echo "run_gpu_node.sh: $1 on $(hostname); this suite measures GPUs. On a CPU use the" \
       "commands in docs/benchmarks.md's Measured table, or benchmarks/device_check.sh for a CPU smoke run." >&2
  exit 2
}
# No GPU, no install: bootstrap takes minutes on a fresh machine, so look before it. nvidia-smi, where there is
# one, decides (no driver: it fails; no device: it lists none); without it, a torch already installed (.venv's,
# else python3's); with neither, a device node. The check after bootstrap stays: it asks the run's own torch.
refuse_without_gpu() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -q '^GPU [0-9]' || no_gpu "nvidia-smi -L lists no GPU"
    return
  fi
  local py
  for py in .venv/bin/python python3; do  # exit 0: a GPU, 4: none; else (no such python, no torch) the next one
    "$py" -c 'import sys
try:
    import torch
except Exception:
    sys.exit(3)
sys.exit(0 if torch.cuda.is_available() else 4)' >/dev/null 2>&1
    case $? in
      0) return ;;
      4) no_gpu "torch sees no GPU" ;;
    esac
  done
  ls /dev/nvidia[0-9]* >/dev/null 2>&1 || no_gpu "no nvidia-smi, torch or /dev/nvidia* shows a GPU"
}
refuse_without_gpu
bash scripts/bootstrap.sh || { echo "run_gpu_node.sh: setting up .venv failed (scripts/bootstrap.sh)" >&2; exit 2; }
PY=.venv/bin/python
GPUS=$($PY -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)') || exit 2
[ "$GPUS" -gt 0 ] || no_gpu "torch sees no GPU"
NPROC=${2:-$GPUS}
GPU=$($PY -c 'import re, torch; print(re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(0).replace("NVIDIA ", "")).strip("-"))')
RES="benchmarks/results/${NPROC}x${GPU}"
mkdir -p "$RES"
LOG="$RES/run.log"
: > "$LOG"
LIMIT=1800
source benchmarks/steps.sh
BENCH=("$PY" -m fastrsb bench)

REFERENCE=()
if [ "$DATA" = imagenet-like ]; then
  DATA=/tmp/fastrsb_imagenet_like
  FORMATS=$($PY -c 'import ffcv' 2>/dev/null && echo ffcv,dali || echo dali)
  step data $PY -c "from benchmarks.imagenet_like import make_imagenet_like as m; m('$DATA/src', 3000, with_val=500)" &&
    step convert $PY -m fastrsb convert "$DATA/src" "$DATA/out" --formats "$FORMATS" --no-progress
  REFERENCE=(--reference "$DATA/src")  # torchvision ImageFolder on the originals, beside our backends
  DATA=$DATA/out
fi
BACKENDS=torch
$PY -c 'import ffcv' 2>/dev/null && BACKENDS="ffcv,$BACKENDS" || echo "note: ffcv not installed, its rows are skipped" | tee -a "$LOG"
$PY -c 'import nvidia.dali' 2>/dev/null && BACKENDS="dali,$BACKENDS" || echo "note: nvidia-dali not installed, its rows are skipped" | tee -a "$LOG"
WORKERS=$(( $(nproc) / NPROC ))

# model only: the ceiling any data path can reach (channels-last vs not, compile)
for variant in $MODEL_VARIANTS; do
  flags=($(model_flags "$variant"))
  step "model_$variant" "${BENCH[@]}" model --device cuda --model resnet50 --res 224 --batch-size 256 --amp bf16 \
    "${flags[@]}" --steps 30 --repeats 3 --json "$RES/model_$variant.json" --plot "$RES/model_$variant.png"
done
# device-side RandAugment vs timm's PIL per image
step randaugment $PY -m benchmarks.bench_randaugment --device cuda --batch-size 256 --json "$RES/randaugment.json"
# loader only, side by side (one process)
step loader "${BENCH[@]}" loader --device cuda --data "$DATA" "${REFERENCE[@]}" --backends "$BACKENDS" --batch-size 256 \
  --res 224 --workers "$WORKERS" --repeats 3 --json "$RES/loader.json" --plot "$RES/loader.png"
# end to end with the RSB A3 recipe (RandAugment + Mixup/CutMix on the GPU), each backend and synthetic data
for b in ${BACKENDS//,/ } synthetic; do
  step "e2e_$b" "${BENCH[@]}" e2e --device cuda --config configs/rsb_a3.yaml --data "$DATA" --backend "$b" --steps 20 \
    --repeats 3 --data.workers="$WORKERS" --data.synthetic_num_samples=50000 --json "$RES/e2e_rsb_a3_$b.json"
done
# scaling over GPUs (torchrun, nccl)
if [ "$NPROC" -gt 1 ]; then
  step scaling "${BENCH[@]}" scaling --device cuda --config configs/rsb_a3.yaml --data "$DATA" \
    --backend "${BACKENDS%%,*}" --nprocs "1,$NPROC" --steps 20 --repeats 3 --json "$RES/scaling.json" --plot "$RES/scaling.png"
fi

$PY -m benchmarks.device_summary table "$RES" "${failed[@]}" | tee "$RES/summary.txt"
if [ ${#failed[@]} -gt 0 ]; then
  echo "run_gpu_node.sh: ${#failed[@]} step(s) failed: ${failed[*]}" | tee -a "$RES/summary.txt" >&2
  exit 1
fi
