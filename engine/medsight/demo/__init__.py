"""Offline, seeded demo data for training a small MedSIGHT model on CPU.

Sources: abdominal CT phantoms (HU), MNI152-based T1 brain MRI with synthetic lesions, chest X-ray-like images.
Outputs: BiomedParse-style stage-1/2 folders and LLaVA-style stage-3-5 JSON with ``{code:<mask_id>}``
placeholders that `fill_codes` later turns into ``[M{m}_{k}]`` region codes.
"""

from .build import SIZES, DemoDataset, DemoSize, build_demo_data, generate_samples, main, statistics, write_dataset
from .catalog import CLASS_IDS, SOURCES, SPLITS, STRUCTURES, Source
from .qa import fill_codes, make_items, mask_id, placeholder, placeholder_order
from .samples import Sample2D
from .sources import Image2D, MNITemplate, Phantom, load_mni, make_brain_subject, make_ct_phantom, make_cxr

__all__ = [
    "CLASS_IDS",
    "SIZES",
    "SOURCES",
    "SPLITS",
    "STRUCTURES",
    "DemoDataset",
    "DemoSize",
    "Image2D",
    "MNITemplate",
    "Phantom",
    "Sample2D",
    "Source",
    "build_demo_data",
    "fill_codes",
    "generate_samples",
    "load_mni",
    "main",
    "make_brain_subject",
    "make_ct_phantom",
    "make_cxr",
    "make_items",
    "mask_id",
    "placeholder",
    "placeholder_order",
    "statistics",
    "write_dataset",
]
