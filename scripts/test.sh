#!/usr/bin/env bash
# Set up everything (system libs, .venv, packages) and run the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest -q --durations=10 "$@"  # the slowest tests, to keep the suite inside its time
