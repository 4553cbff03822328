#!/usr/bin/env bash
# Main job: set up, then ask a question about a real CT slice and write the answer's masks as an overlay.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
MODEL=${MEDSIGHT_MODEL:-tiny}
CT=$(python -c "from pydicom.data import get_testdata_file; print(get_testdata_file('CT_small.dcm'))")
mkdir -p outputs
medsight ask "$CT" "Please segment the liver." --model "$MODEL" --max-new-tokens 32 \
  --overlay outputs/demo_overlay.png
