#!/usr/bin/env bash
# Set up everything (system libs, .venv, packages) and run the demo on the embedded dataset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
out=${1:-demo_out}
.venv/bin/fastrsb demo-data "$out/digits"
.venv/bin/fastrsb convert "$out/digits" "$out/data"
.venv/bin/fastrsb verify "$out/data"
