#!/usr/bin/env bash
# Set up everything fastrsb needs on a fresh Debian/Ubuntu machine: the system
# libraries ffcv compiles against, a venv in .venv, and the package with all extras.
# Safe and fast to re-run: each step is skipped when it is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
APT_PKGS="build-essential pkg-config libopencv-dev libturbojpeg0-dev libgl1 libglib2.0-0"
missing=""
for p in $APT_PKGS; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "[bootstrap] apt-get install$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv"
  $PY -m venv .venv
fi
# The stamp records what was installed; a changed setup.py triggers a re-install.
stamp=.venv/.fastrsb-installed
want=$(sha256sum setup.py scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[bootstrap] installing python packages (first run: several minutes, torch is ~5 GB)"
  .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
  # torch first and pinned to the tested builds: setup.py states only ranges (so that an existing torch is
  # kept), and ffcv's and timm's resolution must not pull another build.
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" "torchcodec==0.17.0"  # torchcodec: the build for this torch
  .venv/bin/python -m pip install -q -e ".[all]"
  echo "$want" > "$stamp"
fi
echo "[bootstrap] ready: $(.venv/bin/python -c 'from importlib.metadata import version as v; print(*(f"{p} {v(p)}" for p in ("torch", "torchcodec", "ffcv", "nvidia-dali-cuda130", "timm")))')"  # ffcv 1.0.2's __version__ says 0.0.3rc1
