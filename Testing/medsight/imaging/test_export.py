"""Exports read back by 3D Slicer's MRML, nibabel and highdicom, on real data."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from medsight.imaging import (
    UNCODED,
    WRITERS,
    Code,
    ImagingError,
    Segment,
    Segmentation,
    SegmentationBuilder,
    Term,
    iter_slices,
    read_dicom_seg,
    read_nifti_labelmap,
    read_seg_nrrd,
    read_volume,
    write_dicom_seg,
    write_nifti_labelmap,
    write_seg_nrrd,
    write_segmentation,
)
from medsight_testing.dicom_series import write_tilted_series, write_uneven_series
from medsight_testing.disk import file_size_limit

GM = Segment(
    1, "grey matter", (0.8, 0.4, 0.3), "[M1_0]", Term(UNCODED.category, Code("SCT", "14271001", "Grey matter"))
)
WM = Segment(
    2, "white matter", (0.9, 0.9, 0.7), "[M1_1]", Term(UNCODED.category, Code("SCT", "33835003", "White matter"))
)


@pytest.fixture(scope="module")
def mni_segmentation(mni_t1, mni_gm, mni_wm) -> Segmentation:
    t1 = read_volume(mni_t1, modality="MR")
    gm, wm = read_volume(mni_gm), read_volume(mni_wm)
    assert gm.same_geometry(t1) and wm.same_geometry(t1)
    labelmap = np.where(wm.array > 0, 2, np.where(gm.array > 0, 1, 0)).astype(np.uint8)
    return Segmentation(t1, labelmap, [GM, WM])


def _mrml_read(path):
    import slicer
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    out = []
    segmentation = node.GetSegmentation()
    for n in range(segmentation.GetNumberOfSegments()):
        seg = segmentation.GetNthSegment(n)
        tags = {}
        for key in ("MedSIGHT.RegionCode", "TerminologyEntry"):
            ref = vtk.reference("")
            if seg.GetTag(key, ref):
                tags[key] = str(ref)
        image = seg.GetRepresentation("Binary labelmap")
        m = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(m)
        ext = image.GetExtent()
        dims = [ext[1] - ext[0] + 1, ext[3] - ext[2] + 1, ext[5] - ext[4] + 1]
        arr = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])
        out.append(
            {
                "name": seg.GetName(),
                "color": seg.GetColor(),
                "label": seg.GetLabelValue(),
                "tags": tags,
                "matrix": np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)]),
                "extent": ext,
                "array": arr,
            }
        )
    # Keep the scene alive until the numpy copies are made.
    return [dict(d, array=d["array"].copy()) for d in out]


def test_seg_nrrd_loads_in_slicer_mrml(mni_segmentation, tmp_path):
    path = write_seg_nrrd(mni_segmentation, tmp_path / "brain.seg.nrrd")
    segs = _mrml_read(path)
    ref = mni_segmentation.reference
    assert [s["name"] for s in segs] == ["grey matter", "white matter"]
    for s, ours in zip(segs, [GM, WM], strict=True):
        assert np.allclose(s["color"], ours.color, atol=1e-6)
        assert s["tags"]["MedSIGHT.RegionCode"] == ours.region_code
        assert (
            f"SCT^{ours.terminology.type.value}^{ours.terminology.type.meaning}"
            in s["tags"]["TerminologyEntry"]
        )
        assert np.allclose(s["matrix"], ref.ijk_to_ras, atol=1e-6)
        i0, _, j0, _, k0, _ = s["extent"]
        full = np.zeros(ref.shape, np.uint8)
        kk, jj, ii = s["array"].shape
        full[k0 : k0 + kk, j0 : j0 + jj, i0 : i0 + ii] = s["array"]
        assert np.array_equal(full == s["label"], mni_segmentation.labelmap == ours.label)
    back = read_seg_nrrd(path)
    assert back.segments == [GM, WM] and back.reference.same_geometry(ref)
    assert np.array_equal(back.labelmap, mni_segmentation.labelmap)


def test_nifti_labelmap_with_sidecar(mni_segmentation, tmp_path, mni_gm):
    import nibabel as nib

    nii, side = write_nifti_labelmap(mni_segmentation, tmp_path / "brain.nii.gz")
    img = nib.load(nii)
    assert np.allclose(img.affine, nib.load(mni_gm).affine)
    meta = json.loads(Path(side).read_text())
    assert [(d["value"], d["name"], d["region_code"]) for d in meta["labels"]] == [
        (1, "grey matter", "[M1_0]"),
        (2, "white matter", "[M1_1]"),
    ]
    back = read_nifti_labelmap(nii)
    assert back.segments == [GM, WM] and np.array_equal(back.labelmap, mni_segmentation.labelmap)


def _header_spaces(path) -> tuple[int, int, np.ndarray, np.ndarray]:
    import nibabel as nib

    h = nib.load(path).header
    return int(h["qform_code"]), int(h["sform_code"]), h.get_qform(), h.get_sform()


def test_nifti_labelmap_keeps_the_input_nifti_space(mni_segmentation, mni_t1, tmp_path):
    """A mask of a NIfTI image carries the image's qform/sform and their codes (nilearn's MNI152: qform 0, sform 2,
    aligned; the same header relabelled 4, MNI152): labelled scanner space (1), tools that go by the codes put it in
    another space than its image."""
    import nibabel as nib

    q_code, s_code, qform, sform = _header_spaces(mni_t1)
    assert (q_code, s_code) == (0, 2)  # what nilearn ships: the test below must not pass on a scanner-space header
    nii, _ = write_nifti_labelmap(mni_segmentation, tmp_path / "brain.nii.gz")
    got = _header_spaces(nii)
    assert got[:2] == (q_code, s_code) and np.allclose(got[2], qform) and np.allclose(got[3], sform)
    t1 = nib.load(mni_t1)
    mni = nib.Nifti1Image(np.asanyarray(t1.dataobj), None, t1.header.copy())
    mni.set_qform(t1.affine, code=4)
    mni.set_sform(t1.affine, code=4)
    nib.save(mni, tmp_path / "t1_mni.nii.gz")
    ref = read_volume(tmp_path / "t1_mni.nii.gz", modality="MR")
    nii, _ = write_nifti_labelmap(Segmentation(ref, mni_segmentation.labelmap, [GM, WM]), tmp_path / "mni.nii.gz")
    q_code, s_code, qform, sform = _header_spaces(nii)
    assert (q_code, s_code) == (4, 4) and np.allclose(qform, t1.affine) and np.allclose(sform, t1.affine)
    assert np.allclose(nib.load(nii).affine, t1.affine)


def _itk_ijk_to_lps(path) -> np.ndarray:
    import SimpleITK as sitk  # noqa: N813  (the universal alias)

    img = sitk.ReadImage(str(path))
    m = np.eye(4)
    m[:3, :3] = np.asarray(img.GetDirection()).reshape(3, 3) * np.asarray(img.GetSpacing())
    m[:3, 3] = img.GetOrigin()
    return m


def test_masks_of_a_nifti_without_qform_and_sform_or_analyze_sit_where_itk_shows_it(nibabel_data, tmp_path):
    # With both codes 0, nibabel makes up an x-flipped grid centred on 0, ITK (so 3D Slicer) lays the voxel sizes
    # along the LPS axes from 0. The reader took nibabel's: masks written for such an image (nibabel's
    # anatomical.nii with its codes cleared) sat flipped in i and j and tens of mm away from it in Slicer.
    img = nib.load(nibabel_data / "anatomical.nii")
    img.set_sform(img.affine, code=0)
    img.set_qform(img.affine, code=0)
    path = tmp_path / "uncoded.nii"
    nib.save(img, path)
    vol = read_volume(path)
    image_in_itk = _itk_ijk_to_lps(path)
    assert not vol.has_patient_geometry and np.abs(vol.ijk_to_lps - image_in_itk).max() < 1e-4
    k, j, i = vol.shape
    labelmap = np.zeros(vol.shape, np.uint8)
    labelmap[: k // 2, : j // 3, : i // 4] = 1
    seg = Segmentation(vol, labelmap, [GM])
    for name in ("mask.seg.nrrd", "mask.nii.gz"):
        write_segmentation(seg, tmp_path / name)
        assert np.abs(_itk_ijk_to_lps(tmp_path / name) - image_in_itk).max() < 1e-4, name
    # The NIfTI mask keeps the codes 0, so nibabel too places it as it places the image.
    mask = nib.load(tmp_path / "mask.nii.gz")
    assert (int(mask.header["qform_code"]), int(mask.header["sform_code"])) == (0, 0)
    assert np.allclose(mask.affine, nib.load(path).affine)
    # Analyze (no transforms at all) alike.
    analyze = tmp_path / "analyze.hdr"
    nib.save(nib.AnalyzeImage(np.asanyarray(img.dataobj), img.affine), analyze)
    vol = read_volume(analyze)
    assert not vol.has_patient_geometry and np.abs(vol.ijk_to_lps - _itk_ijk_to_lps(analyze)).max() < 1e-4
    write_segmentation(Segmentation(vol, labelmap, [GM]), tmp_path / "analyze_mask.seg.nrrd")
    assert np.abs(_itk_ijk_to_lps(tmp_path / "analyze_mask.seg.nrrd") - _itk_ijk_to_lps(analyze)).max() < 1e-4


def test_nifti_labelmap_of_dicom_is_in_scanner_space(ct_series, tmp_path):
    ref = read_volume(ct_series)
    labelmap = np.zeros(ref.shape, np.uint8)
    labelmap[:, :4, :4] = 1
    nii, _ = write_nifti_labelmap(Segmentation(ref, labelmap, [GM]), tmp_path / "ct.nii.gz")
    q_code, s_code, qform, sform = _header_spaces(nii)
    assert (q_code, s_code) == (1, 1) and np.allclose(qform, ref.ijk_to_ras, atol=1e-4)
    assert np.allclose(sform, ref.ijk_to_ras, atol=1e-4)


def test_liver_seg_to_slicer(dicom_store, tmp_path):
    liver = read_dicom_seg(dicom_store / "liver.dcm")
    assert [s.name for s in liver.segments] == ["Liver"] and liver.labelmap.shape == (3, 512, 512)
    assert liver.reference.series_uid == "1.2.392.200103.20080913.113635.1.2009.6.22.21.43.10.23430.1"
    src = hd.seg.segread(dicom_store / "liver.dcm")
    assert liver.labelmap.sum() == int((src.pixel_array > 0).sum())
    path = write_seg_nrrd(liver, tmp_path / "liver.seg.nrrd")
    (s,) = _mrml_read(path)
    assert s["name"] == "Liver" and np.allclose(s["matrix"], liver.reference.ijk_to_ras, atol=1e-6)
    assert int((s["array"] == s["label"]).sum()) == int(liver.labelmap.sum())
    back = read_seg_nrrd(path)
    assert np.array_equal(back.labelmap, liver.labelmap) and back.reference.same_geometry(liver.reference)


@pytest.mark.parametrize("fractional", [False, True])
def test_dicom_seg_references_the_source_series(ct_series, tmp_path, fractional):
    vol = read_volume(ct_series)
    b = SegmentationBuilder(vol)
    for s in iter_slices(vol, "axial"):
        b.add(s, s.pixels > -100, Segment(1, "soft tissue", (1, 0, 0), "[M1_0]"))
        b.add(s, (s.pixels < -500) * 0.8, Segment(3, "air", (0, 0, 1), "[M1_1]"))
    seg = b.build(keep_probabilities=True)
    path = write_dicom_seg(seg, tmp_path / "seg.dcm", fractional=fractional)
    dseg = hd.seg.segread(path)
    assert dseg.ReferencedSeriesSequence[0].SeriesInstanceUID == vol.series_uid
    refs = {r.ReferencedSOPInstanceUID for r in dseg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs == set(vol.sop_instance_uids)
    non_empty = (
        sum(int((seg.labelmap[k] == lab).any()) for k in range(5) for lab in (1, 3))
        if not fractional
        else sum(int(seg.probabilities[lab][k].any()) for k in range(5) for lab in (1, 3))
    )
    assert dseg.NumberOfFrames == non_empty
    assert dseg.SegmentationType == ("FRACTIONAL" if fractional else "BINARY")
    assert [d.TrackingID for d in dseg.SegmentSequence] == ["[M1_0]", "[M1_1]"]
    back = read_dicom_seg(path, reference=vol)
    assert np.array_equal(back.labelmap, np.where(seg.labelmap == 3, 2, seg.labelmap))
    if fractional:
        assert np.abs(back.probabilities[2].astype(int) - seg.probabilities[3]).max() <= 1


def test_any_segment_name_becomes_a_valid_segment_label_that_reads_back(ct_series, tmp_path):
    # A name is the model's phrase (or the user's text): "肝" was written as "?", "L\\R kidney" became two values,
    # and a name over 64 characters made a file that breaks DICOM's LO limit.
    vol = read_volume(ct_series)
    names = ["Leber Läsion 肝", "L\\R kidney", "lesion " * 12]
    labelmap = np.zeros(vol.shape, np.uint8)
    segments = [Segment(n + 1, name, (0.8, 0.2, 0.1), f"[M1_{n}]") for n, name in enumerate(names)]
    for n in range(len(names)):
        labelmap[n % vol.shape[0], n : n + 2, 2 * n : 2 * n + 3] = n + 1
    path = write_dicom_seg(Segmentation(vol, labelmap, segments), tmp_path / "names.dcm")
    labels = [d.SegmentLabel for d in pydicom.dcmread(path).SegmentSequence]
    assert labels[0] == names[0]
    assert labels[1] == "L/R kidney"  # one value, not ["L", "R kidney"]
    assert len(names[2]) > 64 and labels[2] == names[2][:64]
    assert [s.name for s in read_dicom_seg(path, reference=vol).segments] == labels


def test_dicom_seg_of_an_enhanced_multiframe_ct_reads_back_against_it(dicom_store, tmp_path):
    # write_dicom_seg references the frames of an enhanced multi-frame image, but reading the SEG back against that
    # image was refused ("reference must be a single-frame DICOM series").
    vol = read_volume(dicom_store / "eCT_Supplemental.dcm")
    assert len(vol.sop_instance_uids) == 1 and len(vol.frame_numbers) == vol.shape[0] > 1
    assert vol.frame_numbers != tuple(sorted(vol.frame_numbers))  # position order is not file order here
    k, j, i = vol.shape
    labelmap = np.zeros(vol.shape, np.uint8)
    labelmap[0, : j // 4, : i // 8] = 1
    labelmap[k - 1, j // 2 :, i // 2 :] = 2
    path = write_dicom_seg(Segmentation(vol, labelmap, [GM, WM]), tmp_path / "ect_seg.dcm")
    back = read_dicom_seg(path, reference=vol)
    assert np.array_equal(back.labelmap, labelmap) and back.reference.same_geometry(vol)


def test_dicom_seg_read_against_images_it_does_not_reference(ct_series, pydicom_files, tmp_path):
    # Read against another series, the error spoke of "frames that do not map onto a regular 3D grid" and of
    # highdicom's "assert_missing_frames_are_empty" parameter, not of the SEG being made on other images.
    vol = read_volume(ct_series)
    labelmap = np.zeros(vol.shape, np.uint8)
    labelmap[vol.shape[0] // 2] = 1
    path = write_dicom_seg(Segmentation(vol, labelmap, [GM]), tmp_path / "seg.dcm")
    other = read_volume(pydicom_files / "CT_small.dcm")
    with pytest.raises(ImagingError, match=f"does not reference 1 of the reference's 1 images: it was made on series "
                                           f"{vol.series_uid}, the reference is series {other.series_uid}") as info:
        read_dicom_seg(path, reference=other)
    assert "assert_missing_frames_are_empty" not in str(info.value)
    assert np.array_equal(read_dicom_seg(path, reference=vol).labelmap, labelmap)


def test_write_segmentation_picks_the_writer_by_file_name(mni_segmentation, tmp_path):
    """One suffix -> writer table: each ending gives the file its reader reads back; others are refused."""
    readers = {".seg.nrrd": read_seg_nrrd, ".nii.gz": read_nifti_labelmap, ".nii": read_nifti_labelmap}
    for suffix, read in readers.items():
        path = tmp_path / f"answer{suffix.upper() if suffix == '.nii' else suffix}"
        write_segmentation(mni_segmentation, path)
        back = read(path)
        assert np.array_equal(back.labelmap, mni_segmentation.labelmap), suffix
        assert [s.name for s in back.segments] == ["grey matter", "white matter"]
    assert [s for s, _ in WRITERS] == [".seg.nrrd", ".nii.gz", ".nii", ".dcm"]
    with pytest.raises(ImagingError, match=r"unknown segmentation format; use \.seg\.nrrd, \.nii\.gz, \.nii, \.dcm"):
        write_segmentation(mni_segmentation, tmp_path / "answer.nrrd")


def test_dicom_seg_of_an_rt_dose_is_refused_before_any_work(pydicom_files, tmp_path):
    # pydicom's RT Dose: multi-frame with patient geometry but no functional groups, which a SEG needs to reference
    # its frames. check_reference let it through, so `ask --out x.dcm` ran the model, then failed inside highdicom
    # ("'FileDataset' object has no attribute 'SharedFunctionalGroupsSequence'").
    from medsight.imaging import read_dicom
    from medsight.imaging.export import check_reference

    dose = read_dicom(pydicom_files / "rtdose.dcm")
    with pytest.raises(ImagingError, match=r"only with functional groups .* RT Dose Storage has none; use \.seg\.nrrd"):
        check_reference(tmp_path / "dose.dcm", dose)
    check_reference(tmp_path / "dose.nii.gz", dose)  # other formats still fine
    seg = Segmentation(dose, np.zeros(dose.shape, np.uint8), [Segment(1, "PTV")])
    with pytest.raises(ImagingError, match="only with functional groups"):
        write_dicom_seg(seg, tmp_path / "dose.dcm")


@pytest.mark.parametrize("suffix", [".seg.nrrd", ".nii.gz", ".dcm"])
def test_a_failed_write_keeps_the_files_it_would_replace(mni_segmentation, ct_series, tmp_path, suffix):
    """A write that fails partway (here: past the file-size limit, as on a full disk or when the user presses
    Ctrl+C) used to leave a torn file in place of the user's earlier one, and it read back as a segmentation
    file of the right name. Now the old file (and a NIfTI's sidecar) stay byte for byte, with no temporary left."""
    if suffix == ".dcm":
        vol = read_volume(ct_series)
        seg = Segmentation(vol, (vol.array > -100).astype(np.uint8), [GM])
        # (voxels above the median: a DICOM SEG refuses a segmentation without any)
        other = Segmentation(vol, np.where(vol.array > np.median(vol.array), WM.label, 0).astype(np.uint8), [WM])
    else:
        seg = mni_segmentation
        other = Segmentation(seg.reference, np.where(seg.labelmap > 0, WM.label, 0).astype(np.uint8), [WM])
    (tmp_path / "new").mkdir()
    path, new_path = tmp_path / f"answer{suffix}", tmp_path / "new" / f"answer{suffix}"
    write_segmentation(seg, path)
    write_segmentation(other, new_path)  # its size: the limit must cut the new file short
    limit = min(path.stat().st_size, new_path.stat().st_size) // 2
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with file_size_limit(limit), pytest.raises(ImagingError, match="File too large"):
        write_segmentation(other, path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


#: (write the series, the option that reads it, what the volume's `resampled` says) of a series off a regular grid.
REGULARIZED = [
    (lambda template, folder: write_tilted_series(template, folder, 8, 2.5, 15.0), "regularize_tilt",
     r"gantry tilt of 15\.0 degrees"),
    (lambda template, folder: write_uneven_series(template, folder, np.delete(np.arange(9) * 2.5, 4)),
     "regularize_spacing", r"uneven slice spacing \(steps of 2\.500 to 5\.000 mm\)"),
]


@pytest.mark.parametrize(("write", "option", "said"), REGULARIZED, ids=["tilt", "spacing"])
def test_masks_of_a_regularized_series_keep_its_grid_and_no_dicom_seg_is_written(ct_series, tmp_path, write, option,
                                                                                 said):
    """A gantry-tilted series read with regularize_tilt, or one with a missing slice read with regularize_spacing,
    lies on a resampled grid: .seg.nrrd and NIfTI masks read back on it exactly, and a DICOM SEG, which must lie on
    its source images' grid (highdicom failed on the shapes: "cannot build the DICOM SEG"; with the slices' count
    it would have written masks at interpolated positions), is refused before any work, naming why."""
    from medsight.imaging.export import check_reference

    folder = write(sorted(ct_series.iterdir())[0], tmp_path / "irregular")
    vol = read_volume(folder, **{option: True})
    labelmap = (vol.array > np.median(vol.array)).astype(np.uint8)
    seg = Segmentation(vol, labelmap, [GM])
    for name, read in (("mask.seg.nrrd", read_seg_nrrd), ("mask.nii.gz", read_nifti_labelmap)):
        write_segmentation(seg, tmp_path / name)
        back = read(tmp_path / name)
        assert back.reference.same_geometry(vol) and np.array_equal(back.labelmap, labelmap), name
    with pytest.raises(ImagingError, match=rf"resampled from its DICOM images \({said}"):
        check_reference(tmp_path / "mask.dcm", vol)
    with pytest.raises(ImagingError, match="resampled from its DICOM images"):
        write_dicom_seg(seg, tmp_path / "mask.dcm")
    assert not (tmp_path / "mask.dcm").exists()


@pytest.mark.parametrize(("write", "option", "said"), REGULARIZED, ids=["tilt", "spacing"])
def test_a_dicom_seg_of_the_acquired_images_is_not_read_onto_a_regularized_series(ct_series, tmp_path, write, option,
                                                                                  said):
    """A DICOM SEG drawn on the acquired images (3D Slicer's export of the series, another tool's) read against the
    series read with regularize_spacing or regularize_tilt had its frames placed by source image onto the resampled
    slices of the same index, with no word: a mask drawn on the acquired slice farthest from the grid came back 1.07 mm
    beside where it was drawn (the missing slice), 3.24 mm (the tilt: on the widened grid's first rows, its labelmap not
    even the volume's shape). Such a reference is refused, naming why, as writing a SEG for it is."""
    folder = write(sorted(ct_series.iterdir())[0], tmp_path / "irregular")
    vol = read_volume(folder, **{option: True})
    sources = [pydicom.dcmread(f) for f in vol.source_files]
    distances = np.array([np.asarray(ds.ImagePositionPatient, dtype=float) for ds in sources]) @ vol.direction[:, 2]
    off_grid = np.abs(distances - distances[0] - vol.spacing[2] * np.arange(len(sources)))
    farthest = int(np.argmax(off_grid))
    # The SEG as drawn on the acquired images: their own pixel grid, slice k on the k-th image.
    acquired = dataclasses.replace(vol, array=np.stack([ds.pixel_array for ds in sources]), resampled=None)
    labelmap = np.zeros(acquired.shape, np.uint8)
    labelmap[farthest, 1:4, 1:4] = 1
    path = write_dicom_seg(Segmentation(acquired, labelmap, [GM]), tmp_path / "drawn.dcm")
    with pytest.raises(ImagingError, match=rf"reference volume was resampled from its DICOM images \({said}"):
        read_dicom_seg(path, reference=vol)


#: Patient and study attributes that de-identification tools often delete rather than empty.
DELETED_BY_ANONYMIZERS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                          "StudyDate", "StudyTime", "ReferringPhysicianName")


def _series_without(ct_series, folder, names):
    folder.mkdir()
    for f in sorted(ct_series.iterdir()):
        ds = pydicom.dcmread(f)
        for name in names:
            if name in ds:
                delattr(ds, name)
        ds.save_as(folder / f.name)
    return folder


def test_dicom_seg_of_an_anonymized_series_without_type2_patient_and_study_attributes(ct_series, tmp_path):
    """Anonymizers often delete the patient and study attributes (DICOM Type 2: present, possibly empty) rather than
    empty them: highdicom then failed after the model had run ("cannot build the DICOM SEG ('FileDataset' object has
    no attribute 'PatientID')"). The SEG now repeats them empty, reads back on the series exactly, and the source
    files are left as they were."""
    folder = _series_without(ct_series, tmp_path / "anonymized", DELETED_BY_ANONYMIZERS)
    before = {f.name: f.read_bytes() for f in folder.iterdir()}
    vol = read_volume(folder)
    labelmap = (vol.array > np.median(vol.array)).astype(np.uint8)
    path = write_dicom_seg(Segmentation(vol, labelmap, [GM]), tmp_path / "seg.dcm")
    assert np.array_equal(read_dicom_seg(path, vol).labelmap, labelmap)
    written = hd.seg.segread(path)
    assert all(written.get(name) == "" for name in DELETED_BY_ANONYMIZERS)
    assert written.StudyInstanceUID == vol.study_uid and written.FrameOfReferenceUID == vol.frame_of_reference_uid
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before


@pytest.mark.parametrize("name", ["FrameOfReferenceUID", "StudyInstanceUID"])
def test_dicom_seg_of_images_without_the_uids_it_must_repeat_is_refused_before_any_work(ct_series, tmp_path, name):
    """Images without a frame of reference or study UID (Type 1 in a SEG: nothing to fill in) let `ask --out x.dcm`
    run the model, then highdicom failed ("Source images have no Frame Of Reference UID" or "no attribute
    'StudyInstanceUID'")."""
    from medsight.imaging.export import check_reference

    vol = read_volume(_series_without(ct_series, tmp_path / "series", [name]))
    with pytest.raises(ImagingError, match=rf"source images have no {name}, which a DICOM SEG must repeat; use "):
        check_reference(tmp_path / "seg.dcm", vol)
    with pytest.raises(ImagingError, match=f"source images have no {name}"):
        write_dicom_seg(Segmentation(vol, np.ones(vol.shape, np.uint8), [GM]), tmp_path / "seg.dcm")
