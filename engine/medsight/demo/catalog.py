"""Fixed vocabularies of the demo data: sources (one modality label each) and structures (global class ids)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    """One demo sub-dataset: BiomedParse groups modality labels by sub-dataset, so each source gets one label."""

    key: str  # folder name and sample-id prefix
    modality_label: int
    modality_name: str  # as spoken in answers ("This is {article} {modality_name}.")
    dicom_modality: str  # what medsight.imaging.to_rgb is told, as the product would be
    structures: tuple[str, ...]


CT_ABDOMEN = Source(
    "ct_abdomen", 0, "abdominal CT scan", "CT", ("liver", "spleen", "left kidney", "right kidney", "lesion")
)
MRI_BRAIN = Source("mri_brain", 1, "T1-weighted brain MRI", "MR", ("grey matter", "white matter", "lesion"))
CXR = Source("cxr", 2, "chest X-ray", "DX", ("right lung", "left lung", "heart", "lesion"))

SOURCES: tuple[Source, ...] = (CT_ABDOMEN, MRI_BRAIN, CXR)

#: Global class list; the index is the COCO ``category_id`` (0-based so it is directly a class-head target).
STRUCTURES: tuple[str, ...] = (
    "liver",
    "spleen",
    "left kidney",
    "right kidney",
    "lesion",
    "grey matter",
    "white matter",
    "right lung",
    "left lung",
    "heart",
    # Whole organs, each the union of parts above (`WHOLES`); appended so the parts keep their class ids.
    "kidneys",
    "brain",
    "lungs",
)
#: Whole organs a user naturally asks for, per source: the union of the source's parts (a brain MRI's lesion is
#: brain too). Their masks are built from the parts' masks (`samples.add_wholes`), never drawn on their own.
WHOLES: dict[str, dict[str, tuple[str, ...]]] = {
    "ct_abdomen": {"kidneys": ("left kidney", "right kidney")},
    "mri_brain": {"brain": ("grey matter", "white matter", "lesion")},
    "cxr": {"lungs": ("right lung", "left lung")},
}
#: Names spoken in the plural ("The kidneys are ...").
PLURAL: frozenset[str] = frozenset({"kidneys", "lungs"})
#: Structures the demo data never shows, asked about so that the model learns to answer "... is not visible in this
#: image." instead of inventing a mask. None is drawn in any phantom (no aorta, spine or stomach: the CT phantom
#: paints vessels, vertebrae and bowel gas).
UNKNOWN_STRUCTURES: tuple[str, ...] = (
    "pancreas", "gallbladder", "bladder", "thyroid", "prostate", "uterus", "appendix",
)
CLASS_IDS: dict[str, int] = {name: i for i, name in enumerate(STRUCTURES)}

#: Where a lesion sits, per source, for questions and answers ("Is there a lesion in the liver?").
LESION_SITE: dict[str, str] = {"ct_abdomen": "liver", "mri_brain": "brain", "cxr": "lungs"}
#: How a lesion is described in diagnosis answers, per source.
LESION_FINDING: dict[str, str] = {
    "ct_abdomen": "a hypodense focal liver lesion",
    "mri_brain": "a focal brain lesion with abnormal signal",
    "cxr": "a rounded pulmonary nodule",
}

SPLITS: tuple[str, ...] = ("train", "val", "test")
