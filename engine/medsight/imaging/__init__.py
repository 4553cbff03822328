"""Medical imaging I/O, windowing, slice geometry and segmentation export.

Read: `read_volume` (DICOM folder or file, NIfTI, NRRD, MetaImage, PNG/JPG/TIFF) -> `Volume`.
Show: `to_rgb` (CT presets or robust percentiles) -> uint8 (H, W, 3).
Slice: `extract_slice` / `iter_slices` -> `Slice` with its exact pixel <-> voxel <-> RAS mapping.
Assemble: `SegmentationBuilder` -> `Segmentation` on the source grid.
Export: `write_segmentation` picks by file name among `write_seg_nrrd` (3D Slicer), `write_nifti_labelmap` (+ JSON)
and `write_dicom_seg` (highdicom).
Bad input raises `ImagingError` naming the file and the problem.
"""

from medsight.naming import UNCODED, Code, Term

from .errors import ImagingError
from .export import WRITERS, write_segmentation, writer_for
from .export_dicom_seg import read_dicom_seg, write_dicom_seg
from .export_nifti import read_nifti_labelmap, write_nifti_labelmap
from .export_nrrd import read_seg_nrrd, write_seg_nrrd
from .labelmap import Segment, Segmentation, SegmentationBuilder
from .read import read_volume
from .read_dicom import SeriesInfo, list_dicom_series, read_dicom, read_dicom_file, read_dicom_series
from .read_files import read_image2d, read_nifti, read_nrrd
from .read_metaimage import read_metaimage
from .slicing import (
    PLANES,
    Slice,
    SliceLayout,
    extract_slice,
    iter_slices,
    plane_layouts,
    slice_at_ras,
    slice_count,
    slice_for_view,
)
from .volume import MAX_VOXELS, Volume
from .window import CT_PRESETS, Window, apply_window, choose_window, robust_window, to_rgb

__all__ = [
    "CT_PRESETS",
    "MAX_VOXELS",
    "PLANES",
    "UNCODED",
    "WRITERS",
    "Code",
    "ImagingError",
    "Segment",
    "Segmentation",
    "SegmentationBuilder",
    "SeriesInfo",
    "Slice",
    "SliceLayout",
    "Term",
    "Volume",
    "Window",
    "apply_window",
    "choose_window",
    "extract_slice",
    "iter_slices",
    "list_dicom_series",
    "plane_layouts",
    "read_dicom",
    "read_dicom_file",
    "read_dicom_seg",
    "read_dicom_series",
    "read_image2d",
    "read_metaimage",
    "read_nifti",
    "read_nifti_labelmap",
    "read_nrrd",
    "read_seg_nrrd",
    "read_volume",
    "robust_window",
    "slice_at_ras",
    "slice_count",
    "slice_for_view",
    "to_rgb",
    "write_dicom_seg",
    "write_nifti_labelmap",
    "write_seg_nrrd",
    "write_segmentation",
    "writer_for",
]
