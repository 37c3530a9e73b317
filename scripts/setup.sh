#!/usr/bin/env bash
# Create .venv and install facemine with the tested, pinned dependency set.
# Usage: bash scripts/setup.sh [extras]   default `cpu`; e.g. `cpu,test`, or `gpu` on CUDA machines
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
extras=${1:-cpu}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
spec=".[$extras]"
.venv/bin/python -m pip install --quiet -c constraints.txt -e "$spec"
