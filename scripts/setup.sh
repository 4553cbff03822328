#!/usr/bin/env bash
# Create .venv (if needed) and install the medsight package with every extra. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch, torchvision" 2>/dev/null; then
  # torch and torchvision must be a matching pair for open_clip/timm to import; override for other CUDA builds.
  python -m pip install -q ${MEDSIGHT_TORCH_SPEC:-"torch==2.14.1" "torchvision==0.29.1"}
fi
python -m pip install -q -e ".[server,onnx,slicer-test,dev]"
