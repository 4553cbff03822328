"""A DiagSeg-format mini benchmark from the demo data (`medsight.demo.build_demo_data`), for tests and smoke runs."""

from __future__ import annotations

import json
from pathlib import Path

from medsight.demo.catalog import LESION_FINDING, SOURCES
from medsight.demo.qa import PLACEHOLDER

#: Demo DICOM modality -> the DiagSeg file's modality spelling (so paper references line up).
DIAGSEG_MODALITY = {"CT": "CT", "MR": "MRI", "DX": "X-ray"}


def _short_answer(source_key: str, structure: str) -> str:
    if structure == "lesion":
        finding = LESION_FINDING[source_key]
        return finding.split(" ", 1)[1] if finding.split(" ", 1)[0] in ("a", "an") else finding
    return structure


def demo_to_diagseg(demo_dir: str | Path, split: str = "test") -> tuple[Path, Path]:
    """Write ``diagseg/SegVQA_Diagnostic_{split}_v2.json`` and ``..._vqa.json`` under ``demo_dir``.

    One DiagSeg item per demo question/answer turn that grounds exactly one mask: the answer's placeholder
    becomes ``<mask>``, the short answer is the finding (lesions) or the structure name, and image and mask
    paths are absolute like the official file's. Returns (seg_json, vqa_json).
    """
    root = Path(demo_dir).resolve()
    items = json.loads((root / "lvlm" / f"{split}.json").read_text(encoding="utf-8"))
    by_label = {s.modality_label: s for s in SOURCES}
    seg, vqa = [], []
    for item in items:
        source = by_label[item["modality_label"]]
        sample_id = item["id"].rsplit("_q", 1)[0]
        conv = item["conversations"]
        for t in range(0, len(conv) - 1, 2):
            question = conv[t]["value"].replace("<image>\n", "").strip()
            answer = conv[t + 1]["value"]
            ids = list(dict.fromkeys(PLACEHOLDER.findall(answer)))
            if len(ids) != 1:
                continue  # DiagSeg items ground one finding
            structure = ids[0][len(sample_id) + 1 :].replace("_", " ")
            short = _short_answer(source.key, structure)
            common = {
                "qa_id": f"{item['id']}_t{t // 2}", "question": question,
                "answer": PLACEHOLDER.sub("<mask>", answer), "short_answer": short,
                "image_file": str(root / item["image"]), "answer_type": "open",
                "modality": DIAGSEG_MODALITY[source.dicom_modality],
            }
            seg.append({**common, "mask_ids": [0], "masks": [[0, str(root / item["mask_files"][ids[0]])]]})
            vqa.append(common)
    out = root / "diagseg"
    out.mkdir(exist_ok=True)
    seg_path, vqa_path = out / f"SegVQA_Diagnostic_{split}_v2.json", out / f"SegVQA_Diagnostic_{split}_vqa.json"
    seg_path.write_text(json.dumps(seg, indent=1) + "\n", encoding="utf-8")
    vqa_path.write_text(json.dumps(vqa, indent=1) + "\n", encoding="utf-8")
    return seg_path, vqa_path
