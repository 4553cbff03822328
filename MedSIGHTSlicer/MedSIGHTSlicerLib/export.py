"""Writing the user's segmentation to files.

- ``.seg.nrrd``: Slicer's own format (vtkMRMLSegmentationStorageNode); keeps names, colours, tags (including the
  MedSIGHT provenance tags and TerminologyEntry) and reloads in any Slicer.
- NIfTI (``.nii`` / ``.nii.gz``): a single labelmap on the reference volume's grid, label value n = n-th segment;
  NIfTI stores no names or colours, so ``export_nifti`` writes them (with region codes and terminology codes) to
  the engine's JSON sidecar beside the file (`nifti_sidecar`).
- DICOM SEG (``.dcm``): `dicom_seg.export_dicom_seg`, referencing the DICOM series the volume was loaded from
  (found through Slicer's DICOM database).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .settings import PREFIX, _as_text

log = logging.getLogger(__name__)

__all__ = ["EXPORT_FOLDER_KEY", "EXPORT_FORMATS", "EXPORT_SUFFIXES", "ExportError", "export_file_name",
           "export_labelmap_file", "export_nifti", "export_path", "export_report", "export_seg_nrrd", "export_suffix",
           "nifti_overlaps", "proposed_path", "read_seg_nrrd", "remember_folder", "seg_nrrd_losses",
           "volume_grid_losses"]

#: What the module's format combo box offers, in its order: (file dialog filter, suffixes; the first is the
#: default). `export_labelmap_file` accepts exactly these suffixes, the same as the engine's suffix -> writer table
#: (``medsight.imaging.export.WRITERS``; Testing/test_contracts.py checks that they agree).
EXPORT_FORMATS = (
    ("3D Slicer segmentation (*.seg.nrrd)", (".seg.nrrd",)),
    ("NIfTI labelmap (*.nii.gz *.nii)", (".nii.gz", ".nii")),
    ("DICOM SEG (*.dcm)", (".dcm",)),
)
EXPORT_SUFFIXES = tuple(suffix for _, suffixes in EXPORT_FORMATS for suffix in suffixes)


def export_suffix(path: str | Path) -> str | None:
    """The export suffix ``path``'s name ends in (lower-case, ".nii.gz" before ".nii"), None when it ends in none:
    the one rule for which writer a file name picks. Only these count as a suffix: "liver.v2" has none."""
    name = Path(path).name.lower()
    return next((suffix for suffix in EXPORT_SUFFIXES if name.endswith(suffix)), None)


def export_path(path: str | Path, format_index: int) -> str:
    """The file an export chosen as ``path`` in the format box's ``format_index`` goes to: ``path`` when its name
    ends in an export suffix (the name picks the writer: "liver.nii" stays NIfTI), else ``path`` with that format's
    suffix. Qt's save dialog appends its default suffix only to a name with no dot at all, so "liver.v2" came back
    as typed and the export was refused ("choose a file name ending in ..."); it is now liver.v2.seg.nrrd."""
    path = str(path)
    if export_suffix(path):
        return path
    suffix = EXPORT_FORMATS[int(format_index)][1][0]
    folder, name = os.path.split(path)
    # "liver." is "liver" (Windows drops a name's trailing dots itself), not "liver..seg.nrrd".
    name = name.rstrip(".") or name
    # A name ending in the format suffix's last part is completed: "liver.nrrd" -> liver.seg.nrrd, not
    # liver.nrrd.seg.nrrd (Qt hands macOS' save panel only that last part, "nrrd" or "gz", to append).
    last = suffix[suffix.rfind("."):]
    if name.lower().endswith(last) and len(name) > len(last):
        name = name[:-len(last)]
    return os.path.join(folder, name + suffix)

#: Characters no file name may hold on Windows (the strictest of the systems Slicer runs on), path separators and
#: control characters included.
_UNSAFE_IN_FILE_NAME = re.compile(r'[<>:"/\\|?*\x00-\x1f]+')


def export_file_name(node_name: str, suffix: str) -> str:
    """The file name the save dialog proposes for ``node_name``'s export.

    Slicer names a volume loaded from DICOM "<series number>: <series description>" (DICOMLib's
    ``DICOMPlugin.defaultSeriesNodeName``), and a description may hold a "/": taken as it is, the proposed name was
    one Windows refuses (":"), and a "/" made it a path: "3: AX T1/POST" was written as POST.seg.nrrd in a new folder
    "3: AX T1". As Slicer's own Save dialog does
    (``qSlicerCoreIOManager::forceFileNameValidCharacters``), those characters are left out of the name (here each
    run of them becomes "_", and letters of any script stay).
    """
    stem = " ".join(_UNSAFE_IN_FILE_NAME.sub("_", str(node_name)).split()).strip(" .")
    return (stem or "Segmentation") + suffix


#: Where the last export went (Slicer's settings file, kept across sessions), so the next one is proposed there.
EXPORT_FOLDER_KEY = PREFIX + "exportFolder"


def proposed_path(store: Any, default_folder: str, node_name: str, suffix: str) -> str:
    """The file the Export dialog proposes: ``node_name``'s file name in the folder the last export went to (kept in
    ``store``, Slicer's QSettings), else in ``default_folder`` (Slicer's default scene folder), also when that folder
    was removed or renamed since. A bare name would be proposed in Slicer's working directory (its install folder
    when started from its Windows shortcut, "/" from the macOS Finder)."""
    folder = _as_text(store.value(EXPORT_FOLDER_KEY, ""), "")
    if not folder or not os.path.isdir(folder):
        folder = default_folder
    return os.path.join(folder, export_file_name(node_name, suffix))


def remember_folder(store: Any, path: str | Path) -> None:
    """Keep the folder of an export just written, for the next one's proposal."""
    store.setValue(EXPORT_FOLDER_KEY, os.path.dirname(os.path.abspath(path)))


class ExportError(RuntimeError):
    """A segmentation could not be written or read."""


def _scene_of(node):
    scene = node.GetScene()
    if scene is None:
        raise ExportError(f"{node.GetName()!r} is not in a scene")
    return scene


def _require_segments(segmentation_node) -> None:
    """The module makes the user's segmentation as soon as suggestions arrive, so it may still be empty: say so,
    instead of an empty .seg.nrrd or Slicer's NIfTI writer failing as if the disk were at fault."""
    if segmentation_node.GetSegmentation().GetNumberOfSegments() == 0:
        raise ExportError(f"nothing to export: {segmentation_node.GetName()!r} has no segments (accept suggestions "
                          "or draw segments first)")


def export_seg_nrrd(segmentation_node, path: str | Path) -> Path:
    """Write a segmentation node to ``path`` (must end in .seg.nrrd). Returns the path.

    Always written through a copy, so the user's node stays as it is: Slicer's writer first collapses the node's
    labelmap layers in place, moving segments onto another layer's voxel lattice, where voxels of a segment finer
    than it or turned against it are lost (in the scene, not only in the file). And it stores a segmentation in its
    source representation, so one kept as closed surfaces (imported models) would come out as a VTK multi-block file
    under the .seg.nrrd name: the copy of such a node is converted to labelmaps.
    """
    import slicer

    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        raise ExportError(f"{path.name}: a segmentation file name must end in .seg.nrrd")
    _require_segments(segmentation_node)
    path.parent.mkdir(parents=True, exist_ok=True)
    scene = _scene_of(segmentation_node)
    with _temporary_nodes(scene):
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        node.GetSegmentation().DeepCopy(segmentation_node.GetSegmentation())
        labelmap = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
        if node.GetSegmentation().GetSourceRepresentationName() != labelmap:
            if not node.GetSegmentation().CreateRepresentation(labelmap):
                raise ExportError(f"could not convert {segmentation_node.GetName()!r} to labelmaps for {path.name}")
            node.GetSegmentation().SetSourceRepresentationName(labelmap)
        # A temporary storage node: the user's node keeps whatever storage it had.
        storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
        storage.SetFileName(str(path))
        if not storage.WriteData(node):
            raise ExportError(f"could not write {path}")
    return path


@contextmanager
def _temporary_nodes(scene) -> Iterator[None]:
    """Every node added to ``scene`` inside the block is removed after it (Slicer's exporters add helper nodes,
    such as a colour table and a display node, that the user did not ask for)."""
    before = {scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())}
    try:
        yield
    finally:
        added = [scene.GetNthNode(n) for n in range(scene.GetNumberOfNodes())]
        for node in added:
            # Removing a node may take its display nodes with it: only what is still in the scene is removed.
            if node.GetID() not in before and node.GetScene() is scene:
                scene.RemoveNode(node)


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
    """Write all segments as one labelmap on ``volume_node``'s grid and its ``<name>.json`` label sidecar (the
    engine's format). Returns {label value: segment name}.

    Overlapping segments: the later segment's value wins (a single-label image cannot hold both).
    """
    import slicer
    import vtk

    path = Path(path)
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        raise ExportError(f"{path.name}: a NIfTI file name must end in .nii or .nii.gz")
    _require_segments(segmentation_node)
    path.parent.mkdir(parents=True, exist_ok=True)
    scene = _scene_of(segmentation_node)
    segmentation = segmentation_node.GetSegmentation()
    id_array = vtk.vtkStringArray()
    segmentation.GetSegmentIDs(id_array)
    ids = [id_array.GetValue(n) for n in range(id_array.GetNumberOfValues())]
    segments = [segmentation.GetSegment(segment_id) for segment_id in ids]
    names = {n + 1: segment.GetName() for n, segment in enumerate(segments)}
    with _temporary_nodes(scene):
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        # The reference volume fixes the grid: the file then overlays the image voxel for voxel.
        full_grid = slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
        if not logic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, volume_node, full_grid):
            raise ExportError("could not convert the segments to a labelmap")
        storage.SetFileName(str(path))
        storage.SetUseCompression(path.name.lower().endswith(".gz"))
        if not storage.WriteData(labelmap):
            raise ExportError(f"could not write {path}")
    _write_sidecar(segments, volume_node, path)
    return names


def nifti_overlaps(segmentation_node, volume_node) -> dict[str, int]:
    """{segment name: how many of its voxels carry a later segment's label} in the NIfTI labelmap ``export_nifti``
    writes of these segments ({} when none overlap). A lesion drawn inside its organ is the usual case."""
    from .geometry import segment_array

    segmentation = segmentation_node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
    covered, hidden = None, {}
    for segment_id in reversed(ids):  # the later segment's value wins
        mask = segment_array(segmentation_node, segment_id, volume_node)
        if covered is None:
            covered = np.zeros_like(mask)
        count = int((mask & covered).sum())
        if count:
            name = segmentation.GetSegment(segment_id).GetName()
            hidden[name] = hidden.get(name, 0) + count
        covered |= mask
    return dict(reversed(hidden.items()))


def _segment_losses(segmentation_node, volume_node, held: Callable[[str, Any], np.ndarray],
                    file_lattice: Callable[[str, np.ndarray, Any], Any]) -> dict[str, int]:
    """{segment name: how many of its own voxels a file leaves out} ({} when none). ``held(segment_id, grid)``: the
    segment as the file holds it, on ``grid`` (the segment's own lattice and box, in the node's frame).
    ``file_lattice(segment_id, nothing, volume_grid)``: the lattice and box the file holds it on (None: unknown); a
    segment whose own voxels are all voxels of it loses none, and is not resampled to count (a second a segment on a
    512 x 512 x 300 CT, after every export)."""
    from .geometry import grid_within, lattice_grid, segment_array, voxel_grid

    grid = voxel_grid(volume_node, segmentation_node)
    nothing = np.zeros(grid[1], dtype=bool)
    segmentation = segmentation_node.GetSegmentation()
    lost: dict[str, int] = {}
    for n in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(n)
        own = lattice_grid(segmentation_node, segment_id, nothing, grid)
        kept = file_lattice(segment_id, nothing, grid)
        if kept is not None and grid_within(own, kept):
            continue
        count = int(np.count_nonzero(segment_array(segmentation_node, segment_id, None, own)
                                     & ~held(segment_id, own)))
        if count:
            name = segmentation.GetNthSegment(n).GetName()
            lost[name] = lost.get(name, 0) + count
    return lost


def volume_grid_losses(segmentation_node, volume_node) -> dict[str, int]:
    """{segment name: how many of its own voxels a file on the volume's grid (NIfTI labelmap, DICOM SEG) leaves out}
    ({} when none): voxels of a segment finer than the volume's that hold no volume voxel centre, and those outside
    the volume (a segment drawn on a finer geometry, on another image, or reaching beyond the volume)."""
    from .geometry import mask_on_grid, segment_array, voxel_grid

    grid = voxel_grid(volume_node, segmentation_node)
    return _segment_losses(segmentation_node, volume_node, lambda segment_id, own: mask_on_grid(
        segment_array(segmentation_node, segment_id, volume_node), grid, own), lambda *_: grid)


def seg_nrrd_losses(segmentation_node, volume_node, path: str | Path) -> dict[str, int]:
    """{segment name: how many of its own voxels the written .seg.nrrd ``path`` leaves out} ({} when none), read back
    from the file: it holds every segment on one voxel grid (the segmentation's reference geometry), which drops
    voxels of a segment finer than it or turned against it."""
    import slicer

    from .geometry import lattice_grid, segment_array

    scene = _scene_of(segmentation_node)
    labelmap = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()

    def file_lattice(segment_id: str, nothing: np.ndarray, grid):
        # The written segment's layer: only one holding voxels is a lattice the file keeps the segment on.
        segment = segmentation.GetSegment(segment_id)
        layer = None if segment is None else segment.GetRepresentation(labelmap)
        if layer is None or any(layer.GetExtent()[2 * n] > layer.GetExtent()[2 * n + 1] for n in range(3)):
            return None
        return lattice_grid(written, segment_id, nothing, grid)

    with _temporary_nodes(scene):
        written = read_seg_nrrd(path, scene)
        segmentation = written.GetSegmentation()
        return _segment_losses(segmentation_node, volume_node, lambda segment_id, own: (
            segment_array(written, segment_id, None, own) if segmentation.GetSegment(segment_id) is not None
            else np.zeros(own[1], dtype=bool)), file_lattice)


def export_report(segmentation_node, volume_node, written: str | Path) -> str:
    """What the module says after an export: where it went, which segments have voxels the file cannot hold (a file
    holds every segment on one voxel grid: the volume's for a NIfTI labelmap and a DICOM SEG, the segmentation's for
    a .seg.nrrd; a segment finer than it, turned against it or outside it loses voxels there), and for a NIfTI
    labelmap which segments lost voxels to a later one (the file holds one label per voxel). The segmentation in the
    scene keeps them all.

    It is called once the file is written, so it never raises: when the voxels cannot be counted (a segmentation
    under a warping transform its volume is not under), the module said "Export failed" of a file on disk; it then
    says only where the file went."""
    text = f"Exported to {written}"
    suffix = export_suffix(written)
    nifti = suffix in (".nii", ".nii.gz")
    try:
        hidden = nifti_overlaps(segmentation_node, volume_node) if nifti else {}
        if suffix == ".seg.nrrd":
            left_out, where = seg_nrrd_losses(segmentation_node, volume_node, written), "all segments on one voxel grid"
        elif nifti or suffix == ".dcm":
            left_out, where = volume_grid_losses(segmentation_node, volume_node), "the segments on the volume's grid"
        else:
            left_out, where = {}, ""
    except Exception as err:  # any failure to count leaves the written file written
        log.info("voxels of an export not counted (%s)", type(err).__name__)  # names stay out
        return text
    notes = [text]
    if left_out:
        which = ", ".join(f"{count} voxels of {name!r}" for name, count in left_out.items())
        notes.append(f"The file holds {where}, which cannot hold {which} (finer than it, turned against it or outside "
                     "it): the segmentation in the scene keeps them")
    if hidden:
        which = ", ".join(f"{count} voxels of {name!r}" for name, count in hidden.items())
        notes.append(f"Segments overlap: a NIfTI labelmap holds one label per voxel, so {which} carry the label of a "
                     "segment after it (.seg.nrrd and DICOM SEG keep overlapping segments whole)")
    return ". ".join(notes)


def _write_sidecar(segments, volume_node, path: Path) -> Path:
    import slicer

    from .geometry import ijk_to_ras
    from .nifti_sidecar import label_record, sidecar, sidecar_path
    from .suggestions import TAG_REGION_CODE, get_tag

    terminology_tag = slicer.vtkSegment.GetTerminologyEntryTagName()
    labels = [label_record(n + 1, s.GetName(), s.GetColor(), get_tag(s, terminology_tag), get_tag(s, TAG_REGION_CODE))
              for n, s in enumerate(segments)]
    document = sidecar(labels, ijk_to_ras(volume_node).tolist())
    json_path = sidecar_path(path)
    try:
        json_path.write_text(json.dumps(document, indent=2), encoding="utf-8")
    except OSError as exc:
        raise ExportError(f"could not write the label sidecar {json_path.name} ({exc})") from exc
    return json_path


def export_labelmap_file(segmentation_node, volume_node, path: str | Path, dicom_database=None,
                         long_path: Callable[[str], str] = str) -> Path:
    """One entry point for the module's Export button: the format follows the file name.

    ``.seg.nrrd`` keeps names, colours and tags; ``.nii``/``.nii.gz`` writes a labelmap on the volume's grid and
    the engine's ``<name>.json`` label sidecar beside it; ``.dcm`` writes a DICOM SEG referencing
    the volume's source series, looked up in ``dicom_database`` (Slicer's ``slicer.dicomDatabase``) and opened
    through ``long_path`` (``slicer.util.longPath``, see `dicom_seg.source_files`).
    """
    path = Path(path)
    suffix = export_suffix(path)
    if suffix == ".dcm":
        from .dicom_seg import export_dicom_seg, source_files

        return export_dicom_seg(segmentation_node, volume_node, source_files(volume_node, dicom_database, long_path),
                                path)
    if suffix == ".seg.nrrd":
        return export_seg_nrrd(segmentation_node, path)
    if suffix in (".nii", ".nii.gz"):
        export_nifti(segmentation_node, volume_node, path)
        return path
    raise ExportError(f"{path.name}: choose a file name ending in {', '.join(EXPORT_SUFFIXES)} "
                      "(.dcm writes a DICOM SEG)")
