#!/usr/bin/env bash
# Set up everything (system libs, .venv, packages) and run the demo on the embedded dataset:
# convert to ffcv + dali, verify, train a small ResNet on the CPU with each backend, evaluate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/fastrsb demo --out "${1:-demo_out}"
