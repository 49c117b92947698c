#!/usr/bin/env bash
# The GPU path in one short run, for a bare single-GPU machine lent for a few minutes: python3 with torch,
# timm, numba, pillow, numpy, pytest and scikit-image, but no ffcv, no DALI, no network and no install.
#
#     benchmarks/device_check.sh OUT          (from the checkout; fastrsb is imported from it)
#
# Steps (each under its own time limit; on paper about 8 minutes on one H100/H200, not yet measured):
#   tests      the augment and sync tests on cuda: PIL parity of the torch ops, batching, Mixup, and the
#              train step under torch.cuda.set_sync_debug_mode("error")
#   model_*    bench model: resnet50 224 px bf16, channels-last vs not, torch.compile on
#   randaug    RandAugment's torch ops on cuda vs timm's PIL RandAugment
#   data       ImageNet-like JPEGs converted to tar shards (the torch backend's input; no ffcv/DALI needed)
#   loader_*   bench loader on those shards, RRC at 224 and 160 px: the torch backend with data.torch_decode=device
#              (batched nvjpeg decode, crops and resize on the GPU) and =workers (PIL, all cores). The device decode
#              is torchvision's; with a torchcodec wheel for the machine's Python in $TORCHCODEC_WHEELS (default .whl/,
#              ignored by git, carried with the checkout: the machine has no network) it is installed into a private
#              folder and probed on the device first (step torchcodec), then both libraries are timed. Its
#              decode_jpeg needs torchcodec >= 0.16, built for torch >= 2.13: against an older torch the probe fails
#              naming why (the log), the summary marks the step FAILED and torchvision alone is timed.
#   e2e_*      bench e2e, RSB A3: synthetic data with the batch stage on and off at 224 px (what the data
#              path costs beyond the model), the torch backend (PIL in DataLoader workers) at 160 px, and
#              e2e_torch_device_decode(_160): the torch backend decoding on the GPU at 224 and 160 px
#   step_ops   bench step, RSB A3 as e2e_synthetic runs it: aten ops dispatched per step by part, shown
#              beside e2e_synthetic's time per step
# OUT gets three files: device_check.json (every step's results), device_check.log, summary.txt.
# Without cuda the same steps run at tiny sizes on the CPU (tests/test_device_check.py does that).
# A failed step: the others still run, the summary marks it FAILED, and the exit status is 1.
set -uo pipefail
OUT=${1:?usage: benchmarks/device_check.sh OUT}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/json"

if $PY -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  DEV=cuda BS=256 RES=224 RES_LOW=160 STEPS=20 REPEATS=3 IMAGES=6000 LIMIT=240 MODEL=resnet50 AMP=bf16
  TESTS="cuda"
else
  DEV=cpu BS=4 RES=32 RES_LOW=24 STEPS=2 REPEATS=1 IMAGES=48 LIMIT=300 MODEL=resnet10t AMP=none
  TESTS="audit_sees or (batch_stage and batch-cpu) or (parity_with_timm and Rotate-cpu-torch)"
fi
LOG="$OUT/device_check.log"
: > "$LOG"
source benchmarks/steps.sh

BENCH=("$PY" -m fastrsb bench)

step environment $PY -c "import torch, timm, numba, fastrsb; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  'timm', timm.__version__, 'numba', numba.__version__, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
step tests $PY -m pytest -q -x -p no:cacheprovider tests/test_augment.py tests/test_sync.py -k "$TESTS"
for variant in $MODEL_VARIANTS; do
  flags=($(model_flags "$variant"))
  step "model_$variant" "${BENCH[@]}" model --device "$DEV" --model "$MODEL" --res "$RES" --batch-size "$BS" --amp "$AMP" "${flags[@]}" \
    --steps "$STEPS" --repeats "$REPEATS" --json "$WORK/json/model_$variant.json"
done
step randaug $PY -m benchmarks.bench_randaugment --device "$DEV" --batch-size "$BS" --res "$RES" --batches 5 \
  --repeats "$REPEATS" --json "$WORK/json/randaug.json"
step data $PY -c "from benchmarks.imagenet_like import make_imagenet_like as m; m('$WORK/src', $IMAGES, with_val=64)" \
  && step convert $PY -m fastrsb convert "$WORK/src" "$WORK/data" --formats dali --no-progress
DEVICE_DECODERS=torch:device:torchvision
TORCHCODEC_WHEEL=$(ls "${TORCHCODEC_WHEELS:-.whl}"/torchcodec-*.whl 2>/dev/null | tail -n 1)
if [ -n "$TORCHCODEC_WHEEL" ] && step torchcodec bash -c "$PY -m pip install -q --no-deps --target '$WORK/site' \
    '$TORCHCODEC_WHEEL' && PYTHONPATH=\"\$PYTHONPATH:$WORK/site\" $PY -c 'import torch; from fastrsb.data.torch_device_decode \
    import choose_jpeg_decoder as c; print(c(\"torchcodec\", torch.device(\"$DEV\")).name, \"decodes on $DEV\")'"; then
  export PYTHONPATH="$PYTHONPATH:$WORK/site"
  DEVICE_DECODERS=torch:device:torchcodec,$DEVICE_DECODERS
fi
for res in "$RES" "$RES_LOW"; do
  step "loader_torch_$res" "${BENCH[@]}" loader --device "$DEV" --data "$WORK/data" --backends "$DEVICE_DECODERS",torch \
    --batch-size "$BS" --res "$res" --repeats "$REPEATS" --epochs 1 --no-bare --no-decode-limit --json "$WORK/json/loader_torch_$res.json"
done
A3=(--config configs/rsb_a3.yaml --data "$WORK/data" --steps "$STEPS" --repeats "$REPEATS" --model.name="$MODEL"
    --data.batch_size="$BS" --train.amp="$AMP" --data.synthetic_num_samples=$((BS * STEPS * (REPEATS + 2))))
NO_AUG=(--augment.randaugment= --augment.mixup_alpha=0 --augment.cutmix_alpha=0)
step e2e_synthetic "${BENCH[@]}" e2e --device "$DEV" "${A3[@]}" --backend synthetic --data.train_res="$RES" --json "$WORK/json/e2e_synthetic.json"
step step_ops "${BENCH[@]}" step --device "$DEV" --config configs/rsb_a3.yaml --model.name="$MODEL" --data.batch_size="$BS" \
  --train.amp="$AMP" --json "$WORK/json/step_ops.json"
step e2e_synthetic_no_augment "${BENCH[@]}" e2e --device "$DEV" "${A3[@]}" --backend synthetic --data.train_res="$RES" "${NO_AUG[@]}" \
  --json "$WORK/json/e2e_synthetic_no_augment.json"
step e2e_torch "${BENCH[@]}" e2e --device "$DEV" "${A3[@]}" --backend torch --json "$WORK/json/e2e_torch.json"
step e2e_torch_device_decode "${BENCH[@]}" e2e --device "$DEV" "${A3[@]}" --backend torch --data.torch_decode=device \
  --data.train_res="$RES" --json "$WORK/json/e2e_torch_device_decode.json"
step e2e_torch_device_decode_160 "${BENCH[@]}" e2e --device "$DEV" "${A3[@]}" --backend torch --data.torch_decode=device \
  --data.train_res="$RES_LOW" --json "$WORK/json/e2e_torch_device_decode_160.json"

$PY -m benchmarks.device_summary check "$WORK/json" "$OUT/device_check.json" "${failed[@]}" | tee "$OUT/summary.txt"
if [ ${#failed[@]} -gt 0 ]; then
  echo "device check: ${#failed[@]} step(s) failed: ${failed[*]}" | tee -a "$OUT/summary.txt"
  exit 1
fi
