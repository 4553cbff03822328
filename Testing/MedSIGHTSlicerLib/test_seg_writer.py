"""The DICOM SEG writer without MRML, on pydicom's real CT series: runs with whichever highdicom generation the
interpreter has (0.22 with pydicom 2.4 under Slicer's Pythons via scripts/test_slicer_pythons.sh, 0.23+ here)."""

from __future__ import annotations

from dataclasses import astuple
from pathlib import Path

import numpy as np
import pytest

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")

from MedSIGHTSlicerLib.naming import UNCODED, Term  # noqa: E402
from MedSIGHTSlicerLib.seg_writer import (  # noqa: E402
    TYPE2_COPIED,
    SegmentInfo,
    SegWriteError,
    display_colour,
    order_sources,
    write_seg,
)

LIVER_ENTRY = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
               "~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^")


def _ct_folder() -> Path:
    import pydicom.data

    return Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "98892001" / "CT5N"


@pytest.fixture
def series():
    return _series_in(_ct_folder())


def _series_in(folder: Path):
    """(datasets in slice order, IJK-to-RAS, dims) of the series in ``folder``, as Slicer would load it."""
    datasets = [pydicom.dcmread(str(f)) for f in sorted(folder.iterdir())]
    # The volume Slicer would load: k along the slice normal, from the lowest position up.
    normal = np.cross(*np.reshape([float(v) for v in datasets[0].ImageOrientationPatient], (2, 3)))
    datasets.sort(key=lambda ds: float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])))
    first = datasets[0]
    row, col = np.reshape([float(v) for v in first.ImageOrientationPatient], (2, 3))
    dy, dx = (float(v) for v in first.PixelSpacing)
    step = np.subtract([float(v) for v in datasets[1].ImagePositionPatient],
                       [float(v) for v in first.ImagePositionPatient])
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, 0], ijk_to_lps[:3, 1], ijk_to_lps[:3, 2] = row * dx, col * dy, step
    ijk_to_lps[:3, 3] = [float(v) for v in first.ImagePositionPatient]
    dims = (int(first.Columns), int(first.Rows), len(datasets))
    return datasets, np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_lps, dims


def _lab(value) -> tuple[float, float, float]:
    return value[0] * 100 / 65535, value[1] * 255 / 65535 - 128, value[2] * 255 / 65535 - 128


def test_seg_holds_the_voxels_names_codes_and_colours(series, tmp_path):
    datasets, ijk_to_ras, dims = series
    shuffled = datasets[::-1]  # order_sources puts them back in the volume's slice order
    ordered = order_sources(shuffled, ijk_to_ras, dims)
    assert [ds.SOPInstanceUID for ds in ordered] == [ds.SOPInstanceUID for ds in datasets]
    shape = (dims[2], dims[1], dims[0])
    liver = np.zeros(shape, bool)
    liver[1, 3:9, 2:12] = True
    manual = np.zeros(shape, bool)
    manual[3, 10:13, 5:7] = True
    infos = [SegmentInfo("Liver", (0.8, 0.2, 0.1), LIVER_ENTRY, "medsight-demo 0.3", "[M0_1]"),
             SegmentInfo("Drawn", (0.1, 0.5, 1.0))]
    path = write_seg(ordered, [liver, manual], infos, tmp_path / "out" / "seg.dcm", version="0.3")

    seg = hd.seg.segread(str(path))
    described = seg.SegmentSequence
    assert [str(d.SegmentLabel) for d in described] == ["Liver", "Drawn"]
    kind = described[0].SegmentedPropertyTypeCodeSequence[0]
    assert (kind.CodeValue, kind.CodingSchemeDesignator) == ("10200004", "SCT")
    assert described[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "85756007"  # no terminology: Tissue
    assert [d.SegmentAlgorithmType for d in described] == ["SEMIAUTOMATIC", "MANUAL"]
    assert str(described[0].TrackingID) == "[M0_1]"
    # The recommended display colour on either highdicom generation: sRGB (204, 51, 26) and (26, 128, 255) in CIELab
    # as highdicom 0.23+ converts them (D65), within the difference of lcms' D50 conversion used with 0.22.
    for d, expected in zip(described, ((46.0, 58.4, 49.8), (54.9, 19.6, -70.5))):
        lab = _lab([int(v) for v in d.RecommendedDisplayCIELabValue])
        assert abs(lab[0] - expected[0]) < 2.5 and max(abs(lab[1] - expected[1]), abs(lab[2] - expected[2])) < 12.0, lab
    uids = [ds.SOPInstanceUID for ds in datasets]
    got = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2])
    assert got.shape == (*shape, 2)
    assert np.array_equal(got[..., 0].astype(bool), liver) and np.array_equal(got[..., 1].astype(bool), manual)


def test_any_segment_name_becomes_a_valid_label_that_reads_back(series, tmp_path):
    """Names are the user's text (or the model's whole phrase): any script, a backslash, more than 64 characters."""
    datasets, ijk_to_ras, dims = series
    ordered = order_sources(datasets, ijk_to_ras, dims)
    shape = (dims[2], dims[1], dims[0])
    names = ["Leber Läsion 肝", "L\\R kidney", "lesion " * 12]
    masks = [np.zeros(shape, bool) for _ in names]
    for n, mask in enumerate(masks):
        mask[n, 2:5, 3:7] = True
    infos = [SegmentInfo(name, (0.8, 0.2, 0.1)) for name in names]
    path = write_seg(ordered, masks, infos, tmp_path / "labels.dcm")
    described = pydicom.dcmread(str(path)).SegmentSequence
    labels = [d.SegmentLabel for d in described]
    assert labels[0] == "Leber Läsion 肝"
    assert labels[1] == "L/R kidney"  # one value, not ["L", "R kidney"]
    assert labels[2] == names[2][:64] and len(names[2]) > 64
    assert all(isinstance(label, str) for label in labels)
    # ASCII names from a model whose name is not ASCII: the algorithm name (LO too) was written with "?".
    model = SegmentInfo("liver", (0.8, 0.2, 0.1), model="MedSIGHT-肝臓", region_code="[M0_1]")
    path = write_seg(ordered, masks[:1], [model], tmp_path / "model.dcm")
    algorithm = pydicom.dcmread(str(path)).SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == model.model


def test_grid_mismatches_are_refused_plainly(series, tmp_path):
    datasets, ijk_to_ras, dims = series
    with pytest.raises(SegWriteError, match="has 5 slices but its DICOM series has 4 images"):
        order_sources(datasets[:4], ijk_to_ras, dims)
    moved = ijk_to_ras.copy()
    moved[0, 3] += 1.5
    with pytest.raises(SegWriteError, match="resampled or cropped"):
        order_sources(datasets, moved, dims)
    with pytest.raises(SegWriteError, match="rows, columns or orientation"):
        order_sources(datasets, ijk_to_ras, (dims[0] - 1, dims[1], dims[2]))


def test_a_volume_from_one_multi_frame_image_is_refused_by_name(series):
    # A volume loaded from an enhanced multi-frame CT (one file, one SOP instance) was refused as "the volume has 5
    # slices but its DICOM series has 1 images", as if files had gone missing.
    datasets, ijk_to_ras, dims = series
    multi_frame = pydicom.Dataset()
    multi_frame.update(datasets[0])
    multi_frame.NumberOfFrames = dims[2]
    with pytest.raises(SegWriteError, match=f"one multi-frame DICOM image \\({dims[2]} frames\\).*export .seg.nrrd"):
        order_sources([multi_frame], ijk_to_ras, dims)


def test_terminology_and_colour_helpers():
    liver = Term.parse(LIVER_ENTRY)
    category, kind = astuple(liver.category), astuple(liver.type)
    assert category == ("SCT", "123037004", "Anatomical Structure") and kind == ("SCT", "10200004", "Liver")
    assert Term.parse("") is None and UNCODED.type.value == "85756007"
    white = _lab(display_colour((1.0, 1.0, 1.0)).value)
    assert abs(white[0] - 100) < 0.5 and abs(white[1]) < 1 and abs(white[2]) < 1


def test_laterality_and_anatomic_region_reach_the_seg(series, tmp_path):
    """A TerminologyEntry's type modifier (laterality) and anatomic region are written where DICOM keeps them: the
    modifier inside the property type's code item, the region as the segment's anatomic region."""
    datasets, ijk_to_ras, dims = series
    entry = ("Segmentation category and type - MedSIGHT~SCT^123037004^Anatomical Structure~SCT^64033007^Kidney"
             "~SCT^7771000^Left~Anatomic codes - DICOM master list~SCT^818981001^Abdomen~^^")
    mask = np.zeros((dims[2], dims[1], dims[0]), bool)
    mask[2, 4:8, 4:8] = True
    path = write_seg(order_sources(datasets, ijk_to_ras, dims), [mask],
                     [SegmentInfo("Left kidney", (0.3, 0.75, 0.35), entry, "MedSIGHT", "[M0_4]")], tmp_path / "k.dcm")
    (described,) = pydicom.dcmread(str(path)).SegmentSequence
    kind = described.SegmentedPropertyTypeCodeSequence[0]
    assert (kind.CodeValue, kind.CodeMeaning) == ("64033007", "Kidney")
    (modifier,) = kind.SegmentedPropertyTypeModifierCodeSequence
    assert (modifier.CodingSchemeDesignator, modifier.CodeValue, modifier.CodeMeaning) == ("SCT", "7771000", "Left")
    (region,) = described.AnatomicRegionSequence
    assert (region.CodeValue, region.CodeMeaning) == ("818981001", "Abdomen")


def test_a_volume_with_edited_pixel_spacing_is_refused(series):
    # Same slice origins, rows, columns and orientation, but columns 5% wider: the SEG, written on the images' grid,
    # would put the far column's mask several mm from where it was drawn.
    datasets, ijk_to_ras, dims = series
    stretched = ijk_to_ras.copy()
    stretched[:3, 0] *= 1.05
    dx = float(datasets[0].PixelSpacing[1])
    with pytest.raises(SegWriteError, match=rf"pixel spacing \({dx * 1.05:.4g} x .* is not its DICOM image's "
                                            rf"\({dx:.4g} x "):
        order_sources(datasets, stretched, dims)


def test_numpys_old_float_alias_is_lent_to_highdicom_022_for_the_call_only():
    """highdicom 0.22 (the one for pydicom 2) names ``np.float_``, which NumPy 2 removed: every SEG failed under
    Slicer 5.10's NumPy 2.0.2 and pydicom 2.4.4 (scripts/test_slicer_pythons.sh runs the SEG tests there). The alias
    is lent only to that generation and only while it builds the SEG; NumPy's namespace is as it was afterwards."""
    from MedSIGHTSlicerLib.seg_writer import _numpy1_alias

    had = "float_" in vars(np)
    with _numpy1_alias("0.22.0"):
        assert np.dtype(np.float_) == np.float64
    with _numpy1_alias("0.28.2"):
        assert ("float_" in vars(np)) == had  # a newer highdicom needs nothing lent
    assert ("float_" in vars(np)) == had


#: Patient and study attributes that de-identification tools often delete rather than empty.
DELETED_BY_ANONYMIZERS = (*TYPE2_COPIED, "ReferringPhysicianName")


def _copy_without(folder: Path, names: tuple[str, ...]) -> Path:
    """The CT series saved to ``folder`` without the attributes ``names``, as a de-identification tool leaves it."""
    folder.mkdir()
    for f in sorted(_ct_folder().iterdir()):
        ds = pydicom.dcmread(str(f))
        for name in names:
            if name in ds:
                delattr(ds, name)
        ds.save_as(str(folder / f.name))
    return folder


def test_a_seg_of_an_anonymized_series_without_type2_patient_and_study_attributes(tmp_path):
    """Anonymizers often delete the patient and study attributes (DICOM Type 2: present, possibly empty) rather than
    empty them: the export failed "cannot build the DICOM SEG ('FileDataset' object has no attribute 'PatientID')".
    The SEG now repeats them empty and holds the voxels on the series; the files are left as they were."""
    folder = _copy_without(tmp_path / "anonymized", DELETED_BY_ANONYMIZERS)
    before = {f.name: f.read_bytes() for f in folder.iterdir()}
    datasets, ijk_to_ras, dims = _series_in(folder)
    assert not any(name in ds for ds in datasets for name in DELETED_BY_ANONYMIZERS)
    mask = np.zeros((dims[2], dims[1], dims[0]), bool)
    mask[1, 3:9, 2:12] = True
    path = write_seg(order_sources(datasets, ijk_to_ras, dims), [mask], [SegmentInfo("Liver", (0.8, 0.2, 0.1))],
                     tmp_path / "seg.dcm")
    seg = hd.seg.segread(str(path))
    assert all(seg.get(name) == "" for name in DELETED_BY_ANONYMIZERS)
    assert (seg.StudyInstanceUID, seg.FrameOfReferenceUID) == (datasets[0].StudyInstanceUID,
                                                               datasets[0].FrameOfReferenceUID)
    uids = [ds.SOPInstanceUID for ds in datasets]
    got = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])
    assert np.array_equal(got[..., 0].astype(bool), mask)
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before


@pytest.mark.parametrize("name", ["StudyInstanceUID", "FrameOfReferenceUID"])
def test_images_without_a_uid_the_seg_must_repeat_are_refused_by_name(tmp_path, name):
    """A SEG repeats its images' study and frame of reference (Type 1: nothing to fill in); without one highdicom
    failed ("no attribute 'StudyInstanceUID'", "Source images have no Frame Of Reference UID")."""
    datasets, ijk_to_ras, dims = _series_in(_copy_without(tmp_path / "series", (name,)))
    with pytest.raises(SegWriteError, match=f"the source DICOM images have no {name}, which a DICOM SEG must repeat: "
                                            "export .seg.nrrd or NIfTI instead"):
        order_sources(datasets, ijk_to_ras, dims)
    datasets, ijk_to_ras, dims = _series_in(_ct_folder())
    setattr(datasets[len(datasets) // 2], name, "")  # present, but empty in one image of the series
    with pytest.raises(SegWriteError, match=f"the source DICOM images have no {name}"):
        order_sources(datasets, ijk_to_ras, dims)
