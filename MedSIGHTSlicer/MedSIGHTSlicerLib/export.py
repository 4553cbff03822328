"""Writing the user's segmentation to files.

- ``.seg.nrrd``: Slicer's own format (vtkMRMLSegmentationStorageNode); keeps names, colours, tags (including the
  MedSIGHT provenance tags and TerminologyEntry) and reloads in any Slicer.
- NIfTI (``.nii`` / ``.nii.gz``): a single labelmap on the reference volume's grid, label value n = n-th segment;
  names and colours are not stored in NIfTI, so ``export_nifti`` returns the value -> name table (the caller may
  save it next to the file).
- DICOM SEG (``.dcm``): `dicom_seg.export_dicom_seg`, referencing the DICOM series the volume was loaded from
  (found through Slicer's DICOM database).
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["ExportError", "export_nifti", "export_seg_nrrd", "read_seg_nrrd"]


class ExportError(RuntimeError):
    """A segmentation could not be written or read."""


def _scene_of(node):
    scene = node.GetScene()
    if scene is None:
        raise ExportError(f"{node.GetName()!r} is not in a scene")
    return scene


def export_seg_nrrd(segmentation_node, path: str | Path) -> Path:
    """Write a segmentation node to ``path`` (must end in .seg.nrrd). Returns the path."""
    import slicer

    path = Path(path)
    if not path.name.endswith(".seg.nrrd"):
        raise ExportError(f"{path.name}: a segmentation file name must end in .seg.nrrd")
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene = _scene_of(segmentation_node)
    scene.AddNode(storage)
    try:
        storage.SetFileName(str(path))
        if not storage.WriteData(segmentation_node):
            raise ExportError(f"could not write {path}")
    finally:
        # A temporary storage node: the user's node keeps whatever storage it had.
        scene.RemoveNode(storage)
    return path


def read_seg_nrrd(path: str | Path, scene, name: str | None = None):
    """Read a .seg.nrrd into a new segmentation node added to ``scene``. Returns the node."""
    import slicer

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} does not exist")
    node = slicer.vtkMRMLSegmentationNode()
    node.SetName(name or path.name[: -len(".seg.nrrd")])
    scene.AddNode(node)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    try:
        storage.SetFileName(str(path))
        if not storage.ReadData(node):
            scene.RemoveNode(node)
            raise ExportError(f"could not read {path}")
    finally:
        scene.RemoveNode(storage)
    return node


def export_nifti(segmentation_node, volume_node, path: str | Path) -> dict[int, str]:
    """Write all segments as one labelmap on ``volume_node``'s grid. Returns {label value: segment name}.

    Overlapping segments: the later segment's value wins (a single-label image cannot hold both).
    """
    import slicer
    import vtk

    path = Path(path)
    if not (path.name.endswith(".nii") or path.name.endswith(".nii.gz")):
        raise ExportError(f"{path.name}: a NIfTI file name must end in .nii or .nii.gz")
    path.parent.mkdir(parents=True, exist_ok=True)
    scene = _scene_of(segmentation_node)
    segmentation = segmentation_node.GetSegmentation()
    id_array = vtk.vtkStringArray()
    segmentation.GetSegmentIDs(id_array)
    ids = [id_array.GetValue(n) for n in range(id_array.GetNumberOfValues())]
    names = {n + 1: segmentation.GetSegment(segment_id).GetName() for n, segment_id in enumerate(ids)}
    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    scene.AddNode(labelmap)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    try:
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        # The reference volume fixes the grid: the file then overlays the image voxel for voxel.
        full_grid = slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
        if not logic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, volume_node, full_grid):
            raise ExportError("could not convert the segments to a labelmap")
        storage.SetFileName(str(path))
        storage.SetUseCompression(path.name.endswith(".gz"))
        if not storage.WriteData(labelmap):
            raise ExportError(f"could not write {path}")
    finally:
        scene.RemoveNode(storage)
        scene.RemoveNode(labelmap)
    return names


def export_labelmap_file(segmentation_node, volume_node, path: str | Path, dicom_database=None) -> Path:
    """One entry point for the module's Export button: the format follows the file name.

    ``.seg.nrrd`` keeps names, colours and tags; ``.nii``/``.nii.gz`` writes a labelmap on the volume's grid and
    a ``<name>.json`` beside it mapping label values to segment names; ``.dcm`` writes a DICOM SEG referencing
    the volume's source series, looked up in ``dicom_database`` (Slicer's ``slicer.dicomDatabase``).
    """
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        from .dicom_seg import export_dicom_seg, source_files

        return export_dicom_seg(segmentation_node, volume_node, source_files(volume_node, dicom_database), path)
    if path.name.endswith(".seg.nrrd"):
        return export_seg_nrrd(segmentation_node, path)
    if path.name.endswith((".nii", ".nii.gz")):
        labels = export_nifti(segmentation_node, volume_node, path)
        stem = path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.name[: -len(".nii")]
        sidecar = path.with_name(stem + ".json")
        sidecar.write_text(json.dumps({"labels": {str(k): v for k, v in labels.items()}}, indent=2))
        return path
    raise ExportError(f"{path.name}: choose a .seg.nrrd, .nii, .nii.gz or .dcm (DICOM SEG) file name")
