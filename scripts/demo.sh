#!/usr/bin/env bash
# Main job: set up, then ask about a real MRI volume (the MNI152 T1 template) and write the answer's masks
# as a 3D Slicer segmentation and an overlay PNG (--overwrite: a rerun replaces the outputs of the last run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
MODEL=${MEDSIGHT_MODEL:-demo}
mkdir -p outputs
python -c "import nibabel, nilearn.datasets as d; nibabel.save(d.load_mni152_template(resolution=2), 'outputs/mni152_t1.nii.gz')"
medsight ask outputs/mni152_t1.nii.gz "Please segment the white matter." --model "$MODEL" --plane axial \
  --max-new-tokens 32 --out outputs/demo_answer.seg.nrrd --overlay outputs/demo_overlay.png --overwrite
