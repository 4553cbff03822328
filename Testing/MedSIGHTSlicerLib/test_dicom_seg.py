"""DICOM SEG export from real MRML nodes, referencing pydicom's real CT series; read back with highdicom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")
hd = pytest.importorskip("highdicom")

from medsight.imaging import read_volume  # noqa: E402
from medsight_testing.mrml import make_volume, pixel_to_ijk  # noqa: E402
from MedSIGHTSlicerLib.dicom_seg import INSTANCE_UIDS_ATTRIBUTE, export_dicom_seg, source_files  # noqa: E402
from MedSIGHTSlicerLib.export import ExportError, export_labelmap_file  # noqa: E402
from MedSIGHTSlicerLib.geometry import segment_array  # noqa: E402
from MedSIGHTSlicerLib.protocol import Region, SliceAnswer  # noqa: E402
from MedSIGHTSlicerLib.suggestions import SuggestionManager  # noqa: E402


class DicomDatabase:
    """The one call of Slicer's ctkDICOMDatabase that the export uses: SOP Instance UID -> file path."""

    def __init__(self, files: dict[str, str]) -> None:
        self.files = files

    def fileForInstance(self, uid: str) -> str:  # noqa: N802 (Slicer's name)
        return self.files.get(uid, "")


@pytest.fixture
def ct(ct_series_dir):
    return read_volume(ct_series_dir)


@pytest.fixture
def ct_series_dir():
    import pydicom.data

    return Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "98892001" / "CT5N"


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def loaded_as_slicer_does(scene, ct):
    """The volume node Slicer's DICOM plugin would make: same grid, instance UIDs in slice order."""
    node = make_volume(scene, ct.array.astype(np.int16), ct.ijk_to_ras, name="CT5N")
    node.SetAttribute(INSTANCE_UIDS_ATTRIBUTE, " ".join(ct.sop_instance_uids))
    database = DicomDatabase({uid: str(f) for uid, f in zip(ct.sop_instance_uids, ct.source_files, strict=True)})
    return node, database


def accepted_user_segmentation(scene, volume):
    """Liver on slice 1 and a lesion on slice 3, suggested by the model and accepted; returns (node, masks)."""
    manager = SuggestionManager(scene, volume, model="medsight-demo 0.3")
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    ijk_to_ras = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    liver = np.zeros((16, 16), bool)
    liver[3:9, 2:12] = True
    lesion = np.zeros((16, 16), bool)
    lesion[10:13, 5:7] = True
    for k, code, label, mask in ((1, "[M0_1]", "liver", liver), (3, "[M0_2]", "lesion", lesion)):
        answer = SliceAnswer("axial", k, f"{label} {code}", [Region(code, label, 0, mask, 0.9, None)],
                             ijk_to_ras @ pixel_to_ijk(2, k, 0, 1))
        manager.add_answer(answer, question=f"Segment the {label}.")
    manager.accept()
    return manager, manager.user_segmentation_node()


def test_seg_references_each_source_image_and_holds_the_accepted_voxels(scene, ct, tmp_path):
    volume, database = loaded_as_slicer_does(scene, ct)
    _, user = accepted_user_segmentation(scene, volume)
    files = source_files(volume, database)
    assert [str(f) for f in files] == [str(f) for f in ct.source_files]
    path = export_dicom_seg(user, volume, files, tmp_path / "out" / "seg.dcm", version="0.3")

    seg = hd.seg.segread(str(path))
    assert [str(d.SegmentLabel) for d in seg.SegmentSequence] == ["Liver", "Lesion"]
    liver_type = seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]
    assert (liver_type.CodeValue, liver_type.CodingSchemeDesignator) == ("10200004", "SCT")
    assert [str(d.TrackingID) for d in seg.SegmentSequence] == ["[M0_1]", "[M0_2]"]
    assert all(d.SegmentAlgorithmType == "SEMIAUTOMATIC" for d in seg.SegmentSequence)
    assert seg.SeriesInstanceUID != ct.series_uid and seg.StudyInstanceUID  # a new series in the same study
    # Frame by frame against the source images: exactly the user's voxels (Dice 1.0).
    ids = vtk.vtkStringArray()
    user.GetSegmentation().GetSegmentIDs(ids)
    expected = np.stack([segment_array(user, ids.GetValue(n), volume) for n in range(2)], -1)
    got = seg.get_pixels_by_source_instance(source_sop_instance_uids=list(ct.sop_instance_uids),
                                            segment_numbers=[1, 2])
    assert got.shape == expected.shape == (5, 16, 16, 2)
    assert np.array_equal(got.astype(bool), expected) and expected[1, ..., 0].sum() == 60
    # The module's Export button: the .dcm name picks this writer and the database supplies the files.
    again = hd.seg.segread(str(export_labelmap_file(user, volume, tmp_path / "button.dcm", database)))
    assert np.array_equal(again.get_pixels_by_source_instance(list(ct.sop_instance_uids), segment_numbers=[1, 2]),
                          got)


def test_volumes_not_from_dicom_or_moved_since_are_refused_plainly(scene, ct, tmp_path):
    volume, database = loaded_as_slicer_does(scene, ct)
    _, user = accepted_user_segmentation(scene, volume)
    files = source_files(volume, database)
    with pytest.raises(ExportError, match=r"must end in \.dcm"):
        export_dicom_seg(user, volume, files, tmp_path / "seg.nrrd")
    with pytest.raises(ExportError, match="has 5 slices but its DICOM series has 4 images"):
        export_dicom_seg(user, volume, files[:4], tmp_path / "seg.dcm")
    moved = make_volume(scene, ct.array.astype(np.int16), ct.ijk_to_ras + _shift(1.5), name="moved")
    with pytest.raises(ExportError, match="resampled or cropped"):
        export_dicom_seg(user, moved, files, tmp_path / "seg.dcm")
    plain = make_volume(scene, ct.array.astype(np.int16), ct.ijk_to_ras, name="from NIfTI")
    with pytest.raises(ExportError, match="was not loaded from DICOM"):
        source_files(plain, database)
    database.files.pop(ct.sop_instance_uids[0])
    with pytest.raises(ExportError, match="1 of the 5 source DICOM files are no longer in the DICOM database"):
        source_files(volume, database)
    assert not (tmp_path / "seg.dcm").exists()


def test_source_files_are_opened_through_slicers_long_path(scene, ct, tmp_path):
    """On Windows a DICOM database file deeper than 260 characters is reached only with the prefix
    ``slicer.util.longPath`` adds (Slicer v5.8.0 Base/Python/slicer/util.py:3982; DICOMUtils.py:141 reads the
    database's files through it). Here the database's stored paths of the odd slices reach nothing as written, as
    such a path on Windows; ``long_path`` stands in for the prefixing. The old code checked and read the stored paths:
    "2 of the 5 source DICOM files are no longer in the DICOM database", and no SEG. A file found as stored is read
    so: longPath prefixes every absolute path, and a network path (\\\\server\\share) prefixed so names no file;
    here ``long_path`` knows only the long paths (a KeyError for any other)."""
    volume, database = loaded_as_slicer_does(scene, ct)
    _, user = accepted_user_segmentation(scene, volume)
    stored = "C:/Users/a.radiologist/Documents/SlicerDICOMDatabase/dicom/" + "1.2.840.113619" * 20
    prefixed = {f"{stored}/{Path(f).name}": str(f) for f in ct.source_files[1::2]}
    assert min(len(p) for p in prefixed) > 260
    unreachable = {str(f): p for p, f in prefixed.items()}
    database.files = {uid: unreachable.get(str(f), str(f))
                      for uid, f in zip(ct.sop_instance_uids, ct.source_files, strict=True)}
    files = source_files(volume, database, prefixed.__getitem__)
    assert [str(f) for f in files] == [str(f) for f in ct.source_files]
    path = export_labelmap_file(user, volume, tmp_path / "long.dcm", database, prefixed.__getitem__)
    seg = hd.seg.segread(str(path))
    referenced = {r.ReferencedSOPInstanceUID for series in seg.ReferencedSeriesSequence
                  for r in series.ReferencedInstanceSequence}
    assert referenced == set(ct.sop_instance_uids) and len(referenced) == len(ct.source_files)
    # A file neither as stored nor through long_path: still counted as gone from the database.
    database.files[ct.sop_instance_uids[1]] += ".moved"
    gone = f"1 of the {len(ct.source_files)} source DICOM files are no longer in the DICOM database"
    with pytest.raises(ExportError, match=gone):
        source_files(volume, database, lambda p: prefixed.get(p, p))


def test_a_segmentation_without_voxels_is_refused_in_the_other_formats_words(scene, ct, tmp_path):
    # With no segments at all the DICOM SEG export said "every segment is empty" (there were none), where the other
    # formats say the segmentation has no segments and what to do; neither message named the segmentation.
    volume, database = loaded_as_slicer_does(scene, ct)
    _manager, user = accepted_user_segmentation(scene, volume)
    files = source_files(volume, database)
    segments = user.GetSegmentation()
    count = segments.GetNumberOfSegments()
    for n in range(count):  # every accepted segment kept, its voxels erased
        segment_id = segments.GetNthSegmentID(n)
        empty = np.zeros_like(segment_array(user, segment_id, volume))
        slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            _labelmap_image(empty, volume), user, segment_id)
    assert count > 0 and not any(segment_array(user, segments.GetNthSegmentID(n), volume).any() for n in range(count))
    with pytest.raises(ExportError, match=f"the {count} segment\\(s\\) of '{user.GetName()}' are all empty"):
        export_dicom_seg(user, volume, files, tmp_path / "seg.dcm")
    segments.RemoveAllSegments()
    with pytest.raises(ExportError, match=f"nothing to export: '{user.GetName()}' has no segments"):
        export_dicom_seg(user, volume, files, tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()


def test_engine_and_module_leave_the_same_empty_segments_out_of_a_dicom_seg(scene, ct, tmp_path):
    """The contract between the two DICOM SEG writers on empty segments: the module left a segment without voxels
    out and refused a segmentation with none, the engine (`medsight ask --out x.dcm`) wrote the empty segment as a
    described segment with no frames, and an all-empty one as a SEG of empty frames. Both now keep the segments
    with voxels and refuse one with none."""
    from medsight.imaging import ImagingError, Segment, Segmentation, write_dicom_seg

    volume, database = loaded_as_slicer_does(scene, ct)
    _, user = accepted_user_segmentation(scene, volume)
    files = source_files(volume, database)
    segments = user.GetSegmentation()
    ids = [segments.GetNthSegmentID(n) for n in range(segments.GetNumberOfSegments())]

    def erase(segment_id: str) -> None:
        empty = np.zeros_like(segment_array(user, segment_id, volume))
        slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            _labelmap_image(empty, volume), user, segment_id)

    def engine_write(path):
        """The engine's writer on the same voxels and names as the user's segmentation."""
        labelmap = np.zeros(ct.shape, np.uint8)
        kept = []
        for n, segment_id in enumerate(ids, start=1):
            labelmap[segment_array(user, segment_id, volume)] = n
            kept.append(Segment(n, segments.GetSegment(segment_id).GetName()))
        return write_dicom_seg(Segmentation(ct, labelmap, kept), path)

    erase(ids[-1])
    module = hd.seg.segread(str(export_dicom_seg(user, volume, files, tmp_path / "module.dcm")))
    engine = hd.seg.segread(str(engine_write(tmp_path / "engine.dcm")))
    kept_names = [segments.GetSegment(i).GetName() for i in ids if segment_array(user, i, volume).any()]
    assert len(kept_names) == len(ids) - 1
    for seg in (module, engine):
        assert [str(d.SegmentLabel) for d in seg.SegmentSequence] == kept_names
    numbers = list(range(1, len(kept_names) + 1))
    assert np.array_equal(
        module.get_pixels_by_source_instance(list(ct.sop_instance_uids), segment_numbers=numbers),
        engine.get_pixels_by_source_instance(list(ct.sop_instance_uids), segment_numbers=numbers))
    assert module.NumberOfFrames == engine.NumberOfFrames
    for segment_id in ids:
        erase(segment_id)
    with pytest.raises(ExportError, match="are all empty"):
        export_dicom_seg(user, volume, files, tmp_path / "module_empty.dcm")
    with pytest.raises(ImagingError, match=f"the {len(ids)} segment\\(s\\) are all empty"):
        engine_write(tmp_path / "engine_empty.dcm")
    assert not (tmp_path / "module_empty.dcm").exists() and not (tmp_path / "engine_empty.dcm").exists()


def _labelmap_image(array_kji: np.ndarray, volume):
    """An oriented image of ``array_kji`` on ``volume``'s grid, as SetBinaryLabelmapToSegment takes it."""
    from vtk.util import numpy_support

    image = slicer.vtkOrientedImageData()
    k, j, i = array_kji.shape
    image.SetDimensions(i, j, k)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = array_kji.reshape(-1).astype(np.uint8)
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    image.SetImageToWorldMatrix(matrix)
    return image


def _shift(mm: float) -> np.ndarray:
    out = np.zeros((4, 4))
    out[0, 3] = mm
    return out


def test_a_de_identified_series_exports_with_empty_patient_and_study_attributes(scene, ct_series_dir, tmp_path):
    """A series whose de-identification deleted the patient and study attributes (DICOM Type 2) failed to export
    ("cannot build the DICOM SEG ('FileDataset' object has no attribute 'PatientID')"): the SEG now repeats them
    empty and holds the accepted voxels; the source files are left byte for byte."""
    import pydicom

    from MedSIGHTSlicerLib.seg_writer import TYPE2_COPIED

    folder = tmp_path / "de-identified"
    folder.mkdir()
    for f in sorted(ct_series_dir.iterdir()):
        ds = pydicom.dcmread(f)
        for name in TYPE2_COPIED:
            if name in ds:
                delattr(ds, name)
        ds.save_as(folder / f.name)
    before = {f.name: f.read_bytes() for f in folder.iterdir()}
    ct = read_volume(folder)
    volume, database = loaded_as_slicer_does(scene, ct)
    _, user = accepted_user_segmentation(scene, volume)
    path = export_dicom_seg(user, volume, source_files(volume, database), tmp_path / "seg.dcm")
    seg = hd.seg.segread(str(path))
    assert all(seg.get(name) == "" for name in TYPE2_COPIED)
    got = seg.get_pixels_by_source_instance(list(ct.sop_instance_uids), segment_numbers=[1, 2])
    for n, segment_id in enumerate(("liver", "lesion")):
        ids = user.GetSegmentation().GetSegmentIdBySegmentName(segment_id)
        assert np.array_equal(got[..., n].astype(bool), segment_array(user, ids, volume))
    assert int(got.sum()) > 0
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before
