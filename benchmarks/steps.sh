# Sourced by device_check.sh and run_gpu_node.sh: run benchmark steps so that one failing step neither
# stops the others nor passes for a result.
#   step NAME COMMAND...   runs COMMAND under $LIMIT seconds, appends its output to $LOG, and adds NAME to
#                          the array `failed` when it fails or times out; returns COMMAND's status.
failed=()

step() {
  local name=$1 start=$SECONDS rc
  shift
  echo "== $name: $*" | tee -a "$LOG"
  timeout "$LIMIT" "$@" >> "$LOG" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then
    echo "   ok, $((SECONDS - start)) s" | tee -a "$LOG"
  else
    echo "!! $name failed (exit $rc$([ $rc -eq 124 ] && echo ", over ${LIMIT} s")), $((SECONDS - start)) s; see $LOG" | tee -a "$LOG"
    failed+=("$name")
  fi
  return $rc
}

# model_flags VARIANT: the `fastrsb bench model` flags of the variants both GPU scripts compare
MODEL_VARIANTS="channels_last no_channels_last compile"
model_flags() {
  case $1 in
    no_channels_last) echo --no-channels-last ;;
    compile) echo --compile ;;
  esac
}
