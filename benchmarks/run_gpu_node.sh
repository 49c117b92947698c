#!/usr/bin/env bash
# The whole benchmark suite on a GPU node, writing the same JSON/PNG files as the CPU results.
#
#   benchmarks/run_gpu_node.sh DATA RESULTS_DIR [NPROC]
#
# DATA: a dataset written by `fastrsb convert` (ImageNet for figures worth quoting), or the word
# `imagenet-like` to generate 3,000 ImageNet-sized JPEGs and convert them (a smoke test of the suite).
# NPROC: GPUs to use (default: all). Backends whose library is not installed are skipped with a note.
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?DATA}; RES=${2:?RESULTS_DIR}; NPROC=${3:-$(python3 -c 'import torch; print(torch.cuda.device_count())')}
PY=${PYTHON:-python3}
REFERENCE=()
mkdir -p "$RES"
run() { echo "+ $*"; "$@" || echo "!! failed: $*"; }
if [ "$DATA" = imagenet-like ]; then
  DATA=/tmp/fastrsb_imagenet_like
  run $PY -c "from benchmarks.imagenet_like import make_imagenet_like as m; m('$DATA/src', 3000, with_val=500)"
  run $PY -m fastrsb convert "$DATA/src" "$DATA/out" --formats "$($PY -c 'import ffcv' 2>/dev/null && echo ffcv,dali || echo dali)" --no-progress
  REFERENCE=(--reference "$DATA/src")  # torchvision ImageFolder on the originals, beside our backends
  DATA=$DATA/out
fi
BACKENDS=torch
$PY -c 'import ffcv' 2>/dev/null && BACKENDS="ffcv,$BACKENDS" || echo "note: ffcv not installed, skipped"
$PY -c 'import nvidia.dali' 2>/dev/null && BACKENDS="dali,$BACKENDS" || echo "note: nvidia-dali not installed, skipped"
W=$(( $(nproc) / NPROC ))

# model only: the ceiling any data path can reach (channels-last vs not, compile)
for extra in "" "--no-channels-last" "--compile"; do
  tag=$(echo "rn50_bf16 $extra" | tr -d ' -')
  run $PY -m fastrsb bench model --model resnet50 --res 224 --batch-size 256 --amp bf16 $extra --device cuda \
      --steps 30 --repeats 3 --json "$RES/model_$tag.json" --plot "$RES/model_$tag.png"
done
# device-side RandAugment vs timm's PIL per image
run $PY -m benchmarks.bench_randaugment --device cuda --batch-size 256 --json "$RES/randaugment_cuda.json"
# loader only, side by side (one process)
run $PY -m fastrsb bench loader --data "$DATA" "${REFERENCE[@]}" --backends "$BACKENDS" --batch-size 256 --res 224 \
    --workers "$W" --device cuda --repeats 3 --json "$RES/loader.json" --plot "$RES/loader.png"
# end to end with the RSB A3 recipe (RandAugment + Mixup/CutMix on the GPU), each backend
for b in ${BACKENDS//,/ } synthetic; do
  run $PY -m fastrsb bench e2e --config configs/rsb_a3.yaml --data "$DATA" --backend "$b" --device cuda --steps 20 \
      --repeats 3 --data.workers="$W" --data.synthetic_num_samples=50000 --json "$RES/e2e_rsb_a3_$b.json"
done
# scaling over GPUs (torchrun, nccl)
if [ "$NPROC" -gt 1 ]; then
  run $PY -m fastrsb bench scaling --config configs/rsb_a3.yaml --data "$DATA" --backend "${BACKENDS%%,*}" \
      --nprocs "1,$NPROC" --device cuda --steps 20 --repeats 3 --json "$RES/scaling.json" --plot "$RES/scaling.png"
fi
