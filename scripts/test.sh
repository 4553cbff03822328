#!/usr/bin/env bash
# Set up, lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 QT_QPA_PLATFORM=offscreen
ruff check .
python -m pytest "$@"
