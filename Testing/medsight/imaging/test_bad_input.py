"""Every kind of bad input raises ImagingError naming the file and the problem."""

from __future__ import annotations

import gzip
import os
import re
import shutil

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest

from medsight.imaging import ImagingError, read_dicom, read_dicom_series, read_nifti, read_volume
from medsight.imaging.read_dicom import MAX_UNFLAGGED_LOCALIZERS
from medsight_testing.dicom_series import add_localizers


def _raises(path, match, **kw):
    with pytest.raises(ImagingError, match=match) as info:
        read_volume(path, **kw)
    assert str(path) in str(info.value) and info.value.path == str(path)
    assert isinstance(info.value, ValueError)
    return info.value


def test_missing_and_unreadable_files(tmp_path):
    _raises(tmp_path / "nope.nii.gz", "no such file or folder")
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00\x01not dicom at all" * 10)
    _raises(junk, "unreadable DICOM file")
    fake = tmp_path / "fake.nii.gz"
    fake.write_text("hello")
    _raises(fake, "unreadable or corrupt NIfTI")
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    _raises(other, "unsupported file type")
    for suffix in (".nrrd", ".nii.gz", ".dcm", ".png"):  # empty files: an empty .nrrd raised StopIteration
        empty = tmp_path / f"empty{suffix}"
        empty.write_bytes(b"")
        _raises(empty, "unreadable")
    pic = tmp_path / "broken.png"
    pic.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    _raises(pic, "unreadable or corrupt image")
    (tmp_path / "empty").mkdir()
    _raises(tmp_path / "empty", "no DICOM image series found")


def test_a_fifo_or_device_is_named_for_what_it_is(tmp_path):
    # Both were "no such file or folder": the path is there, it is no file.
    fifo = tmp_path / "scan.nii.gz"
    os.mkfifo(fifo)
    _raises(fifo, r"is a named pipe \(FIFO\), not a file")
    _raises("/dev/null", "is a character device, not a file")
    for reader in (read_dicom, read_nifti):  # the readers called directly say it too
        with pytest.raises(ImagingError, match=r"is a named pipe \(FIFO\), not a file"):
            reader(fifo)


def test_corrupt_files(pydicom_files, mni_t1, tmp_path):
    _raises(pydicom_files / "MR_truncated.dcm", "corrupt or unreadable pixel data")
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(mni_t1.read_bytes()[:200_000])
    _raises(cut, "unreadable or corrupt NIfTI")
    nrrd.write(str(tmp_path / "v.nrrd"), np.zeros((8, 8, 8), np.int16), {"encoding": "raw"})
    cut_nrrd = tmp_path / "cut.nrrd"
    cut_nrrd.write_bytes((tmp_path / "v.nrrd").read_bytes()[:-100])
    _raises(cut_nrrd, "unreadable or corrupt NRRD data")


def test_mixed_series(dicomdir):
    folder = dicomdir / "98892003" / "MR2"
    err = _raises(folder, "3 series found; choose one with series_uid")
    assert "1.3.6.1.4.1.5962.1.1.0.0.0.1196533885.18148.0.481" in str(err)  # the listing
    # A scout series of axial, sagittal and coronal images cannot be one volume.
    _raises(
        folder, "mixed series: orientations", series_uid="1.3.6.1.4.1.5962.1.1.0.0.0.1196533885.18148.0.136"
    )
    _raises(folder, "series 1.2.3 not found", series_uid="1.2.3")
    _raises(dicomdir / "98892003" / "MR700", "mixed series: orientations")  # radial slices


def test_more_images_in_other_orientations_than_a_scout_is_a_mixed_series(ct_series, tmp_path):
    # Up to three unflagged images of other orientations are left out as a localizer; one more is no scout.
    shutil.copytree(ct_series, tmp_path, dirs_exist_ok=True)
    add_localizers(tmp_path, MAX_UNFLAGGED_LOCALIZERS + 1, flagged=False)
    _raises(tmp_path, "mixed series: rows")


@pytest.mark.parametrize("degrees", [0.01, 10.0])
def test_end_slice_tilted_from_the_stack_is_a_mixed_series_not_a_localizer(ct_series, tmp_path, degrees):
    # An end slice whose orientation differs from the others' by a little (0.01 or 10 degrees about the row axis) is no
    # scout, taken across the stack: it was left out as 'a localizer?' and the rest read, where before (and now) the
    # series is refused as mixed.
    shutil.copytree(ct_series, tmp_path, dirs_exist_ok=True)
    last = max(tmp_path.iterdir(), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    ds = pydicom.dcmread(last)
    row, col = np.asarray(ds.ImageOrientationPatient[:3], float), np.asarray(ds.ImageOrientationPatient[3:], float)
    normal, angle = np.cross(row, col), np.deg2rad(degrees)
    ds.ImageOrientationPatient = [f"{x:.6f}" for x in (*row, *(np.cos(angle) * col + np.sin(angle) * normal))]
    ds.save_as(last)
    _raises(tmp_path, "mixed series: orientations")


@pytest.mark.parametrize(("frame", "group"), [(1, "PlanePositionSequence"), (0, "PlaneOrientationSequence")])
def test_multiframe_file_with_a_frame_not_placed_is_refused(dicom_store, tmp_path, frame, group):
    # pydicom-data's enhanced CT with one frame's position (or orientation) taken out was read as an unplaced 1 mm grid
    # (the frames' pixels are 0.39 mm) without a word, its frames in file order: the reverse of their order along the
    # normal here.
    ds = pydicom.dcmread(dicom_store / "eCT_Supplemental.dcm")
    groups = ds.PerFrameFunctionalGroupsSequence[frame]
    if group in groups:
        delattr(groups, group)
    else:  # shared by all frames: give the others their own copy
        shared = ds.SharedFunctionalGroupsSequence[0].pop(group).value
        for k, other in enumerate(ds.PerFrameFunctionalGroupsSequence):
            if k != frame:
                setattr(other, group, shared)
    ds.save_as(tmp_path / "ect.dcm")
    _raises(tmp_path / "ect.dcm", f"frame {frame + 1} of {len(ds.PerFrameFunctionalGroupsSequence)} has no {group}, "
                                  "though the file gives frame positions")


def test_mixed_sizes(ct_series, pydicom_files, tmp_path):
    for f in sorted(ct_series.iterdir())[:2]:
        shutil.copy(f, tmp_path / f.name)
    ds = pydicom.dcmread(pydicom_files / "CT_small.dcm")
    first = pydicom.dcmread(sorted(ct_series.iterdir())[0])
    ds.SeriesInstanceUID = first.SeriesInstanceUID
    ds.ImagePositionPatient = [float(x) for x in first.ImagePositionPatient[:2]] + [-3.7375]
    ds.ImageOrientationPatient = first.ImageOrientationPatient
    ds.save_as(tmp_path / "bigger.dcm")
    _raises(tmp_path, "mixed series: rows")


@pytest.mark.parametrize("inverted", ["first", "middle"])
def test_series_mixing_monochrome1_and_monochrome2_is_refused(ct_series, tmp_path, inverted):
    # GDCM inverted the stored values of the MONOCHROME1 slices only: pydicom's CT series with its middle slice
    # relabelled MONOCHROME1 read with that slice 2149 HU off its rescaled values, and without a word; with the
    # first relabelled, every slice was marked to be shown inverted.
    files = sorted(ct_series.iterdir())
    relabelled = files[0 if inverted == "first" else len(files) // 2]
    for f in files:
        ds = pydicom.dcmread(f)
        if f == relabelled:
            ds.PhotometricInterpretation = "MONOCHROME1"
        ds.save_as(tmp_path / f.name)
    error = _raises(tmp_path, "mixed series: photometric interpretation MONOCHROME[12] in .* but MONOCHROME[12] in")
    assert relabelled.name in str(error)


def test_missing_slices_and_duplicates(dicomdir, ct_series, tmp_path):
    err = _raises(dicomdir / "77654033" / "CT2", "uneven slice spacing: 202.500 mm between 17106 and 17136")
    assert "missing slices" in str(err)
    # Dropping a middle slice of a good series is caught too.
    files = sorted(ct_series.iterdir(), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    gap = tmp_path / "gap"
    gap.mkdir()
    for f in files[:2] + files[3:]:
        shutil.copy(f, gap / f.name)
    _raises(gap, "uneven slice spacing: 5.000 mm")
    dup = tmp_path / "dup"
    dup.mkdir()
    for f in files:
        shutil.copy(f, dup / f.name)
    ds = pydicom.dcmread(files[0])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(dup / "copy")
    _raises(dup, "duplicate slice position")


def test_series_of_two_echoes_is_refused_naming_what_tells_them_apart(ct_series, tmp_path):
    # A multi-echo series (each position once per echo) was refused as duplicate positions without saying what the
    # stacks were; the error now names the attribute and its values, so that the files can be split.
    files = sorted(ct_series.iterdir())
    for echo in (1, 2):
        for f in files:
            ds = pydicom.dcmread(f)
            ds.EchoNumbers, ds.SOPInstanceUID = echo, pydicom.uid.generate_uid()
            ds.save_as(tmp_path / f"echo{echo}_{f.name}")
    _raises(tmp_path, f"{len(files)} duplicate slice position\\(s\\) .* \\(the files differ in EchoNumbers: 1, 2\\); "
                      "put each stack's files in a folder of their own")


def test_slice_spacing_that_drifts_is_refused(restacked_series):
    # Each step passed the 1 % step check (2.5 mm, then 2.52 mm), so the series was read as evenly spaced: the middle
    # slice sat 0.2 mm from where it was taken, and its masks with it (3D Slicer adds a regularization transform for
    # a slice 0.001 mm off its grid).
    steps = [2.5] * 20 + [2.52] * 20
    distances = np.concatenate([[0.0], np.cumsum(steps)])
    folder = restacked_series(distances)
    # ITK's grid (first to last slice over n - 1) and the slice farthest off it: the fixture names slices in order.
    grid = (distances[-1] - distances[0]) / (len(distances) - 1)
    off = np.abs(distances - distances[0] - grid * np.arange(len(distances)))
    worst = int(np.argmax(off))
    error = _raises(folder, re.escape(f"uneven slice spacing: steps drift from {min(steps):.3f} to {max(steps):.3f} "
                                      f"mm, so slice{worst:04d}.dcm lies {off[worst]:.3f} mm"))
    assert f"evenly spaced grid of {grid:.4f} mm" in str(error)


def test_positions_written_with_few_decimals_still_refuse_missing_and_duplicate_slices(restacked_series):
    # Positions written to 0.1 mm are allowed their rounding (0.625 mm slices step 0.6 and 0.7 mm), not more: a
    # missing, duplicated or half-spacing-off slice is still refused, and positions too coarse to tell a missing slice
    # (whole mm at 1.25 mm slices) are refused saying so.
    spacing, count = 0.625, 40
    distances = np.arange(count) * spacing
    middle = count // 2
    _raises(restacked_series(np.delete(distances, middle), "missing", decimals=1), "uneven slice spacing: 1.[23]00 mm")
    _raises(restacked_series(np.insert(distances, middle, distances[middle]), "duplicate", decimals=1),
            "duplicate slice position")
    shifted = distances + np.where(np.arange(count) == middle, spacing / 2, 0)
    _raises(restacked_series(shifted, "shifted", decimals=1), "uneven slice spacing")
    error = _raises(restacked_series(np.arange(count) * 2 * spacing, "whole_mm", decimals=0), "uneven slice spacing")
    assert "ImagePositionPatient is rounded by up to 0.5 mm, too coarse for" in str(error)


def _write_stack_stripping_zeros(template_file, folder, positions) -> None:
    """Copies of ``template_file`` at LPS ``positions``, written exactly but with trailing zeros stripped, as many
    scanners write them: a whole value reads "40" or "-143", beside "41.3"."""
    template = pydicom.dcmread(template_file)
    template.SeriesInstanceUID = pydicom.uid.generate_uid()
    folder.mkdir()
    for k, position in enumerate(positions):
        template.SOPInstanceUID, template.InstanceNumber = pydicom.uid.generate_uid(), k + 1
        template.ImagePositionPatient = [f"{x:.6f}".rstrip("0").rstrip(".") for x in position]
        template.save_as(folder / f"slice{k:04d}.dcm")


@pytest.mark.parametrize("irregularity", ["gap", "tilt"])
def test_whole_mm_positions_written_without_decimals_do_not_widen_the_spacing_checks(ct_series, tmp_path,
                                                                                      irregularity):
    # A position that happens to be whole ("40", "-143", as in pydicom's CT5N) was taken as rounded to 1 mm, so the
    # step and grid checks allowed a spacing over POSITION_ROUNDING_MAX_FRACTION of rounding per position, and the
    # shear check 1.4 mm: a 1 mm series with one step of 1.3 mm, or a 1 degree gantry tilt, read without a word.
    # The series' other positions show they are written to finer steps.
    template = sorted(ct_series.iterdir())[0]
    count, spacing = 20, 1.0
    positions = np.zeros((count, 3))
    positions[:, 0] = float(pydicom.dcmread(template).ImagePositionPatient[0])
    positions[:, 1] = -143.0
    positions[:, 2] = 40.0 + spacing * np.arange(count)
    if irregularity == "gap":
        positions[count // 2:, 2] += 0.3 * spacing
        match = f"uneven slice spacing: {1.3 * spacing:.3f} mm"
    else:
        positions[:, 1] += spacing * np.arange(count) * np.tan(np.deg2rad(1.0))
        match = "slices are not stacked along their normal"
    folder = tmp_path / irregularity
    _write_stack_stripping_zeros(template, folder, positions)
    _raises(folder, match)


@pytest.mark.parametrize("kept", [0.98, 0.5, 0.1])
def test_truncated_end_slice_of_a_series_is_named_not_dropped(ct_series, pydicom_files, tmp_path, kept):
    # GDCM leaves out files it cannot parse: with the first or last slice truncated (pixel data cut at 98 %, header
    # cut at 50 % or at 10 %, before it names its series), the series read one slice short and nothing said so.
    files = sorted(ct_series.iterdir(), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    for end in (files[0], files[-1]):
        folder = tmp_path / f"{end.name}_{kept}"
        shutil.copytree(ct_series, folder)
        data = end.read_bytes()
        (folder / end.name).write_bytes(data[: int(len(data) * kept)])
        _raises(folder, f"{end.name} .*cannot be read as an image \\(truncated or damaged file\\?\\)")
    # Other objects GDCM does not list (an RT Structure Set, a DICOMDIR, a text file) still do not count.
    extras = tmp_path / "extras"
    shutil.copytree(ct_series, extras)
    shutil.copy(pydicom_files / "rtstruct.dcm", extras / "rtstruct.dcm")
    shutil.copy(pydicom_files / "dicomdirtests" / "DICOMDIR", extras / "DICOMDIR")
    (extras / "README.txt").write_text("notes")
    assert read_volume(extras).shape[0] == len(files)


def test_folder_that_gdcm_cannot_scan(ct_series, pydicom_files, tmp_path):
    # GDCM's series scan stops with a RuntimeError (no folder, no advice) at pydicom's rtdose_1frame.dcm: the whole
    # pydicom test folder, or a series folder holding it, gave `medsight ask` a traceback.
    folder = tmp_path / "with_dose"
    shutil.copytree(ct_series, folder)
    shutil.copy(pydicom_files / "rtdose_1frame.dcm", folder / "dose.dcm")
    _raises(folder, "GDCM cannot scan this folder for series: a file in it is malformed")
    assert read_volume(folder / "dose.dcm").shape[0] == 1  # the advice holds: the file itself reads


def test_four_d_data(nibabel_data, tmp_path):
    _raises(nibabel_data / "example4d.nii.gz", r"4D data \(shape \(128, 96, 24, 2\)\)")
    nrrd.write(str(tmp_path / "t.nrrd"), np.zeros((4, 5, 6, 2), np.int16))
    _raises(tmp_path / "t.nrrd", "4D data")


def test_cifti_file_is_refused_as_no_volume(nibabel_data):
    # nibabel loads a .nii holding CIFTI-2 (surface vertices x vertices) as a Cifti2Image, which has no affine:
    # the reader raised AttributeError ("'Cifti2Image' object has no attribute 'affine'"), a traceback in `ask`.
    _raises(nibabel_data / "row_major.dconn.nii", r"a Cifti2 file \(shape \(10, 10\)\) holds no voxel grid")


def test_complex_nifti_is_refused(mni_t1, tmp_path):
    # A complex64 NIfTI (MR raw data) was read, then windowing it raised numpy's TypeError ("a must be an array of
    # real numbers"): a traceback in `ask`.
    img = nib.load(mni_t1)
    data = np.asanyarray(img.dataobj)[::8, ::8, ::8].astype(np.complex64)
    path = tmp_path / "complex.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), path)
    _raises(path, r"complex-valued NIfTI \(complex64\); save its magnitude")


def test_nan_and_inf(mni_t1, tmp_path):
    img = nib.load(mni_t1)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    data[10, 20, 30] = np.nan
    data[11, 20, 30] = np.inf
    nib.save(nib.Nifti1Image(data, img.affine), tmp_path / "nan.nii.gz")
    # NaN beside infinite values is not filled (no masking convention writes infinities): the message said only how
    # many there were, not what to do.
    _raises(tmp_path / "nan.nii.gz", "1 NaN and 1 infinite voxel values: replace them with finite values")
    nrrd.write(str(tmp_path / "inf.nrrd"), np.full((3, 3, 3), -np.inf))
    _raises(tmp_path / "inf.nrrd", "0 NaN and 27 infinite voxel values: no voxel holds a number")


def test_empty_arrays(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 0, 4), np.float32), np.eye(4)), tmp_path / "e.nii")
    _raises(tmp_path / "e.nii", "empty image")
    nrrd.write(str(tmp_path / "e.nrrd"), np.zeros((3, 0, 2)))
    _raises(tmp_path / "e.nrrd", "empty image")


def test_oversize(mni_t1, ct_series, pydicom_files):
    _raises(mni_t1, "oversize image: 8675289 voxels", max_voxels=1_000_000)
    _raises(ct_series, "oversize image: 1280 voxels", max_voxels=1000)
    _raises(pydicom_files / "CT_small.dcm", "oversize image", max_voxels=1000)


def test_non_image_dicom(pydicom_files, dicom_store):
    _raises(pydicom_files / "test-SR.dcm", r"non-image DICOM \(Comprehensive SR Storage, modality SR\)")
    _raises(pydicom_files / "rtplan.dcm", r"non-image DICOM \(RT Plan Storage")
    _raises(dicom_store / "liver.dcm", "is a DICOM SEG, not an image; read it with read_dicom_seg")


def test_gzip_nifti_in_disguise_and_not_a_folder(mni_t1, tmp_path):
    raw = tmp_path / "raw.nii"
    raw.write_bytes(gzip.decompress(mni_t1.read_bytes())[:1000])
    _raises(raw, "unreadable or corrupt NIfTI")
    with pytest.raises(ImagingError, match="not a folder"):
        read_dicom_series(mni_t1)


def test_malformed_integer_attribute_names_the_file_and_the_attribute(pydicom_files):
    """badVR.dcm holds NumberOfFrames '1A': int() alone said "invalid literal for int()", naming neither."""
    _raises(pydicom_files / "badVR.dcm", r"NumberOfFrames '1A'")


def _with_malformed_number(source, keyword, text, path):
    """``source`` saved with ``keyword`` (a DS attribute) holding ``text``: pydicom will not write such a DS, so the
    value goes in as LO and the VR bytes (explicit VR little endian) are turned into DS."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import DataElement

    ds = pydicom.dcmread(source)
    tag = tag_for_keyword(keyword)
    ds[tag] = DataElement(tag, "LO", text)
    ds.save_as(path)
    key = (tag >> 16).to_bytes(2, "little") + (tag & 0xFFFF).to_bytes(2, "little")
    raw = path.read_bytes()
    at = raw.index(key + b"LO")
    path.write_bytes(raw[:at] + key + b"DS" + raw[at + 6 :])
    assert str(pydicom.dcmread(path)[tag].value) == text


def test_malformed_number_attribute_names_the_file_and_the_attribute(pydicom_files, ct_series, tmp_path):
    # pydicom hands an unparsable DS over as text: float() raised "could not convert string to float: 'abc'" out of
    # the file and series readers, naming neither the file nor the attribute.
    _with_malformed_number(pydicom_files / "CT_small.dcm", "RescaleSlope", "abc", tmp_path / "slope.dcm")
    _raises(tmp_path / "slope.dcm", r"malformed RescaleSlope 'abc' \(a number is expected\)")
    folder = tmp_path / "series"
    folder.mkdir()
    files = sorted(ct_series.iterdir())
    for f in files[1:]:
        shutil.copy(f, folder / f.name)
    _with_malformed_number(files[0], "RescaleIntercept", "x1", folder / files[0].name)
    with pytest.raises(ImagingError, match=rf"{files[0].name}: malformed RescaleIntercept 'x1'"):
        read_volume(folder)


def test_dicom_without_preamble_is_identified(pydicom_files):
    """rtstruct.dcm lacks the 'DICM' prefix: say what it is, not pydicom's "Use force=True" advice."""
    err = _raises(pydicom_files / "rtstruct.dcm", r"non-image DICOM \(RT Structure Set Storage, modality RTSTRUCT\)")
    assert "force=True" not in str(err)


def test_failed_pixel_decode_logs_no_traceback(pydicom_files, caplog):
    """pydicom logs each failed decoder's traceback before raising; the ImagingError is the report."""
    err = _raises(pydicom_files / "JPEG2000-embedded-sequence-delimiter.dcm", "cannot decode the JPEG 2000")
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
    # Neither pydicom nor GDCM decodes it: both reasons, and the ways out (a damaged file, or a missing decoder).
    assert "pydicom: pillow:" in str(err) and "GDCM:" in str(err) and "pip install pylibjpeg" in str(err)


def test_rt_dose_with_one_frame_offset_for_many_frames(pydicom_files, tmp_path):
    # A single GridFrameOffsetVector value is no list: iterating over it raised "'DSfloat' object is not iterable".
    ds = pydicom.dcmread(pydicom_files / "rtdose.dcm")
    ds.GridFrameOffsetVector = 0.0
    ds.save_as(tmp_path / "one_offset.dcm")
    _raises(tmp_path / "one_offset.dcm", f"GridFrameOffsetVector has 1 values for {ds.NumberOfFrames} frames")


def test_nrrd_with_malformed_origin_or_unknown_type(nibabel_data, tmp_path):
    # A 2-value space origin raised numpy's "matmul: Input operand 1 has a mismatch in its core dimension", a NaN one
    # was called a "degenerate voxel-to-patient matrix" (the direction matrix shown was fine), and a type pynrrd does
    # not know raised KeyError: 'quaternion'.
    data = np.asanyarray(nib.load(nibabel_data / "anatomical.nii").dataobj)
    path = tmp_path / "volume.nrrd"
    nrrd.write(str(path), data, {"space": "left-posterior-superior", "space directions": np.diag([2.0, 2.0, 2.0]),
                                 "space origin": [1.0, 2.0, 3.0]})
    head, _, body = path.read_bytes().partition(b"\n\n")
    for line, said in ((b"space origin: (1,2)", r"malformed space origin \[1\. 2\.\] \(3 finite numbers expected\)"),
                       (b"space origin: (nan,2,3)", r"malformed space origin \[nan +2\. +3\.\]"),
                       (b"type: quaternion", "unsupported NRRD type 'quaternion'")):
        key = line.split(b":")[0] + b":"
        lines = [line if old.startswith(key) else old for old in head.split(b"\n")]
        bad = tmp_path / "bad.nrrd"
        bad.write_bytes(b"\n".join(lines) + b"\n\n" + body)
        _raises(bad, said)
