"""DICOM readers on pydicom's and pydicom-data's real files."""

from __future__ import annotations

import copy
import dataclasses
import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk  # noqa: N813
from pydicom.pixels import apply_modality_lut

from medsight.imaging import ImagingError, list_dicom_series, read_dicom, read_volume
from medsight.imaging.read_dicom import SUBFOLDERS_NAMED, NotAnImageError
from medsight_testing.dicom_series import VALUE_PER_MM, add_localizers, write_tilted_series, write_uneven_series


def test_ct_series_matches_simpleitk_and_pydicom(ct_series):
    vol = read_volume(ct_series)
    assert vol.shape == (5, 16, 16) and vol.modality == "CT" and vol.array.dtype == np.int16
    img = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(ct_series)))
    assert np.array_equal(vol.array, sitk.GetArrayFromImage(img))
    assert np.allclose(vol.spacing, img.GetSpacing()) and np.allclose(vol.origin, img.GetOrigin())
    # Each slice is the pydicom pixel data with slope/intercept applied (Hounsfield units) ...
    for k, f in enumerate(vol.source_files):
        ds = pydicom.dcmread(f)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.array_equal(vol.array[k], hu)
        # ... lying where its ImagePositionPatient says.
        assert np.allclose(
            vol.ijk_to_lps @ [0, 0, k, 1], [*map(float, ds.ImagePositionPatient), 1], atol=1e-4
        )
        assert vol.sop_instance_uids[k] == ds.SOPInstanceUID
    assert np.all(np.diff([vol.ijk_to_lps @ [0, 0, k, 1] for k in range(5)], axis=0)[:, 2] > 0)
    assert vol.series_uid == pydicom.dcmread(vol.source_files[0]).SeriesInstanceUID
    assert np.allclose(vol.ijk_to_ras, np.diag([-1, -1, 1, 1]) @ vol.ijk_to_lps)


def test_slice_spacing_within_tolerance_is_itks_and_quiet(restacked_series, capfd):
    """Slice positions with scanner round-off: the spacing is ITK's (first to last slice over n - 1, the grid 3D
    Slicer shows), not the median step, and ITK's "Non uniform sampling" warning does not reach the user."""
    distances = np.array([0.0, 2.5, 5.01, 7.5, 10.005])
    vol = read_volume(restacked_series(distances))
    assert "Non uniform sampling" not in capfd.readouterr().err
    image = sitk.ReadImage(list(vol.source_files))  # prints the warning: the step deviations are real
    assert vol.spacing[2] == pytest.approx(image.GetSpacing()[2], rel=1e-9)
    assert vol.spacing[2] == pytest.approx((distances[-1] - distances[0]) / (len(distances) - 1), rel=1e-9)
    assert np.array_equal(vol.array, sitk.GetArrayFromImage(image))


@pytest.mark.parametrize("decimals", [1, 2])
@pytest.mark.parametrize(("spacing", "tilt_degrees"), [(0.625, 0), (0.625, 10), (3.0, 10)])
def test_positions_written_with_few_decimals_read_on_itks_grid(
    restacked_series, capfd, decimals, spacing, tilt_degrees
):
    """A CT of 0.625 mm slices whose positions are written to 0.1 mm steps 0.6 and 0.7 mm: it was refused as uneven
    (and an oblique stack of 3 mm slices with 0.01 mm positions as sheared by a gantry tilt), where 3D Slicer loads
    it. Each slice lies on ITK's grid within the rounding of its written position."""
    count = 40
    tilt = np.deg2rad(tilt_degrees)
    orientation = [1, 0, 0, 0, np.cos(tilt), np.sin(tilt)]
    vol = read_volume(restacked_series(np.arange(count) * spacing, decimals=decimals, orientation=orientation))
    assert "Non uniform sampling" not in capfd.readouterr().err
    image = sitk.ReadImage(list(vol.source_files))
    # ITK spans first to last slice with a straight line, this reader along the normal: the rounding of an oblique
    # stack's in-plane coordinates comes between them.
    assert vol.shape[0] == count and vol.spacing[2] == pytest.approx(image.GetSpacing()[2], rel=1e-5)
    assert np.array_equal(vol.array, sitk.GetArrayFromImage(image))
    assert np.allclose(vol.origin, image.GetOrigin()) and np.allclose(vol.direction.ravel(), image.GetDirection())
    rounding = 0.5 * 10.0 ** -decimals
    for k, f in enumerate(vol.source_files):
        written = np.asarray(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient, dtype=float)
        assert np.abs(vol.ijk_to_lps @ [0, 0, k, 1] - [*written, 1]).max() <= 4 * rounding


@pytest.mark.parametrize(("count", "flagged", "said"), [
    (1, True, "1 image flagged LOCALIZER (ImageType)"),
    (2, True, "2 images flagged LOCALIZER (ImageType)"),
    (3, False, "3 images in another orientation than the other {n} (a localizer?)"),
])
def test_localizer_in_the_series_is_left_out_and_said(ct_series, tmp_path, count, flagged, said):
    """A CT series folder holding its scout (another orientation and size, in the same series) was refused as a mixed
    series, where 3D Slicer offers the stack without it: the stack is read, and the volume says what was left out."""
    folder = shutil.copytree(ct_series, tmp_path / "ct")
    scouts = add_localizers(folder, count, flagged)
    vol, alone = read_volume(folder), read_volume(ct_series)
    assert vol.shape == alone.shape and np.array_equal(vol.array, alone.array)
    assert np.allclose(vol.ijk_to_lps, alone.ijk_to_lps) and vol.sop_instance_uids == alone.sop_instance_uids
    assert not {str(s) for s in scouts} & set(vol.source_files)
    assert vol.left_out == said.format(n=alone.shape[0]) and alone.left_out is None


@pytest.mark.parametrize("varies", ["rescale", "signedness"])
def test_series_whose_slices_rescale_or_store_differently_reads_each_slice_in_its_own_units(ct_series, tmp_path,
                                                                                            varies):
    """Real exports vary the rescale per slice (PET, some CT) or store some slices signed, others unsigned: every
    slice is read through its own header into the same units, as pydicom's modality LUT gives them."""
    files = sorted(ct_series.iterdir())
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        if varies == "rescale":
            ds.RescaleSlope, ds.RescaleIntercept = f"{1 + 0.25 * k:g}", str(-1024 + 7 * k)
        elif k % 2:  # the same values stored unsigned
            ds.PixelRepresentation, ds.PixelData = 0, ds.pixel_array.astype(np.uint16).tobytes()
        ds.save_as(tmp_path / f.name)
    vol = read_volume(tmp_path)
    for k, f in enumerate(vol.source_files):
        ds = pydicom.dcmread(f)
        assert np.abs(vol.array[k] - apply_modality_lut(ds.pixel_array, ds)).max() == 0


def test_volume_keeps_no_patient_identifiers(ct_series):
    vol = read_volume(ct_series)
    names = {f.name for f in dataclasses.fields(vol)}
    assert not {n for n in names if n.lower().startswith("patient") or "birth" in n.lower()}
    ds = pydicom.dcmread(vol.source_files[0])
    text = repr({n: getattr(vol, n) for n in names if n != "array"})
    for tag in ("PatientName", "PatientID"):
        if ds.get(tag):
            assert str(ds.get(tag)) not in text


def test_single_ct_and_mr_files(pydicom_files):
    ct = read_dicom(pydicom_files / "CT_small.dcm")
    ds = pydicom.dcmread(pydicom_files / "CT_small.dcm")
    assert ct.shape == (1, 128, 128)
    assert np.array_equal(ct.array[0], ds.pixel_array.astype(np.int32) - 1024)
    assert ct.array.min() == -896  # HU, as GDCM reads it too
    assert np.allclose(ct.origin, [float(x) for x in ds.ImagePositionPatient])
    mr = read_dicom(pydicom_files / "MR_small.dcm")
    assert mr.modality == "MR" and mr.shape == (1, 64, 64)
    assert np.array_equal(mr.array[0], pydicom.dcmread(pydicom_files / "MR_small.dcm").pixel_array)
    # The same image in other transfer syntaxes reads identically.
    for name in ("MR_small_bigendian.dcm", "MR_small_RLE.dcm", "MR_small_implicit.dcm"):
        assert np.array_equal(read_dicom(pydicom_files / name).array, mr.array)


def test_images_without_a_sop_instance_uid_in_the_data_set_take_the_meta_headers(nibabel_data, ct_series, tmp_path):
    """nibabel's decimal_rescale.dcm (a Siemens MR whose data set lacks its SOP Class and Instance UIDs; its meta header
    has them) and a series of such copies were an AttributeError traceback: read, with the meta header's UIDs."""
    path = nibabel_data.parent.parent / "nicom" / "tests" / "data" / "decimal_rescale.dcm"
    vol, ds = read_dicom(path), pydicom.dcmread(path)
    assert "SOPInstanceUID" not in ds and vol.sop_instance_uids == (ds.file_meta.MediaStorageSOPInstanceUID,)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.abs(vol.array[0] - hu).max() == 0
    for f in sorted(ct_series.iterdir()):
        copy = pydicom.dcmread(f)
        del copy.SOPInstanceUID
        copy.save_as(tmp_path / f.name)
    series, alone = read_volume(tmp_path), read_volume(ct_series)
    assert series.sop_instance_uids == alone.sop_instance_uids and np.array_equal(series.array, alone.array)


def test_enhanced_multiframe_ct_geometry(dicom_store):
    path = dicom_store / "eCT_Supplemental.dcm"
    vol = read_dicom(path)
    ds = pydicom.dcmread(path)
    assert vol.shape == (2, 512, 512) and vol.has_patient_geometry
    for k, frame in enumerate(vol.frame_numbers):
        ipp = ds.PerFrameFunctionalGroupsSequence[frame - 1].PlanePositionSequence[0].ImagePositionPatient
        assert np.allclose(vol.ijk_to_lps @ [0, 0, k, 1], [*map(float, ipp), 1], atol=1e-4)


def test_enhanced_multiframe_with_positions_written_to_one_decimal(dicom_store, tmp_path):
    """pydicom-data's enhanced CT made a 40-frame stack of 0.625 mm frames whose positions are written to 0.1 mm: it
    was refused as uneven ('0.700 mm between frame 3 and frame 4'); each frame now lies within its rounding."""
    ds = pydicom.dcmread(dicom_store / "eCT_Supplemental.dcm")
    crop = ds.pixel_array[:, :64, :64]  # real CT samples, a corner of each frame
    count, spacing = 40, 0.625
    groups = ds.PerFrameFunctionalGroupsSequence
    start = np.asarray(groups[0].PlanePositionSequence[0].ImagePositionPatient, dtype=float)
    iop = np.asarray(ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    frames = []
    for k in range(count):
        frames.append(copy.deepcopy(groups[k % len(groups)]))
        frames[-1].PlanePositionSequence[0].ImagePositionPatient = [f"{x:.1f}" for x in start + k * spacing * normal]
    ds.PerFrameFunctionalGroupsSequence, ds.NumberOfFrames = frames, count
    ds.Rows, ds.Columns = crop.shape[1:]
    ds.PixelData = np.ascontiguousarray(crop[np.arange(count) % len(crop)]).tobytes()
    ds.save_as(tmp_path / "ect.dcm")
    vol = read_dicom(tmp_path / "ect.dcm")
    rescale = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    slope, intercept = float(rescale.RescaleSlope), float(rescale.RescaleIntercept)
    assert vol.shape == (count, *crop.shape[1:]) and sorted(vol.frame_numbers) == list(range(1, count + 1))
    for k, frame in enumerate(vol.frame_numbers):
        written = np.asarray(frames[frame - 1].PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        assert np.abs(vol.ijk_to_lps @ [0, 0, k, 1] - [*written, 1]).max() <= 4 * 0.05
        assert np.array_equal(vol.array[k], crop[(frame - 1) % len(crop)] * slope + intercept)


def test_multiframe_without_positions_is_flagged(dicom_store):
    vol = read_dicom(dicom_store / "emri_small.dcm")
    assert vol.shape == (10, 64, 64) and not vol.has_patient_geometry


def test_rt_dose_grid_scaling_and_offsets(pydicom_files):
    vol = read_dicom(pydicom_files / "rtdose.dcm")
    ds = pydicom.dcmread(pydicom_files / "rtdose.dcm")
    assert vol.shape == (15, 10, 10) and vol.spacing[2] == 5.0
    assert np.allclose(vol.array, ds.pixel_array * float(ds.DoseGridScaling), rtol=1e-6)


def test_colour_ultrasound_is_rgb(dicom_store):
    vol = read_dicom(dicom_store / "US1_UNCR.dcm")
    assert vol.is_rgb and vol.array.shape == (1, 480, 640, 3) and vol.modality == "US"


def test_series_listing_and_choice(dicomdir):
    folder = dicomdir / "98892003" / "MR1"
    series = list_dicom_series(folder)
    assert len(series) == 3 and {s.modality for s in series} == {"MR"}
    vol = read_volume(folder, series_uid=series[1].series_uid)
    assert vol.series_uid == series[1].series_uid and vol.shape[0] == 1


def test_a_seg_beside_its_series_is_no_series_to_choose(ct_series, dicom_store, tmp_path):
    """A DICOM SEG saved in the series' folder made it "2 series found; choose one" listing the SEG, which is no
    image to ask about: the image series is read, the SEG said to be left out; a folder of the SEG alone, or the
    SEG chosen by its uid, is still refused as not an image."""
    folder = tmp_path / "series"
    shutil.copytree(ct_series, folder)
    shutil.copy(dicom_store / "liver.dcm", folder)
    seg_uid = pydicom.dcmread(dicom_store / "liver.dcm", stop_before_pixels=True).SeriesInstanceUID
    assert len(list_dicom_series(folder)) == 2  # GDCM lists the SEG as a series
    vol, alone = read_volume(folder), read_volume(ct_series)
    assert vol.series_uid == alone.series_uid and np.array_equal(vol.array, alone.array)
    assert f"a DICOM SEG (a segmentation), series {seg_uid}" in vol.left_out and alone.left_out is None
    only_seg = tmp_path / "seg"
    only_seg.mkdir()
    shutil.copy(dicom_store / "liver.dcm", only_seg)
    for path, uid in ((only_seg, None), (folder, seg_uid)):
        with pytest.raises(NotAnImageError, match="is a DICOM SEG, not an image"):
            read_volume(path, series_uid=uid)


def test_user_modality_overrides(ct_series):
    assert read_volume(ct_series, modality="mr").modality == "MR"


def test_monochrome1_series_keeps_its_rescaled_values(ct_series, tmp_path):
    # pydicom's real CT series relabelled MONOCHROME1 (low values shown white): GDCM inverted the stored values, so
    # the series reader returned e.g. -2038 where the file reader and the rescale give -11.
    for f in sorted(ct_series.iterdir()):
        ds = pydicom.dcmread(f)
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.save_as(tmp_path / f.name)
    vol = read_volume(tmp_path)
    assert vol.invert_display and vol.shape[0] == len(list(ct_series.iterdir()))
    for k, f in enumerate(vol.source_files):
        ds = pydicom.dcmread(f)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.array_equal(vol.array[k], hu), f
        assert np.array_equal(vol.array[k], read_dicom(f).array[0])


def test_modality_lut_file_reads_in_the_tables_values(dicom_store):
    # pydicom-data's mlut_18.dcm maps its stored values through a Modality LUT (no rescale): the reader ignored the
    # table and returned the stored values, up to 63,488 off pydicom's apply_modality_lut.
    from pydicom.pixels import apply_modality_lut

    path = dicom_store / "mlut_18.dcm"
    ds = pydicom.dcmread(path)
    assert "ModalityLUTSequence" in ds and "RescaleSlope" not in ds
    expected = apply_modality_lut(ds.pixel_array, ds).astype(np.int64)
    assert not np.array_equal(expected, ds.pixel_array)  # the table changes the values
    assert np.array_equal(read_volume(path).array[0], expected)


def test_modality_lut_series_reads_in_the_tables_values(ct_series, tmp_path):
    # GDCM's series reader ignores the Modality LUT as well: pydicom's CT series given a table (stored value x ->
    # 3x) read 2218 off the table's values.
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_modality_lut

    for f in sorted(ct_series.iterdir()):
        ds = pydicom.dcmread(f)
        for tag in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
            ds.pop(tag, None)
        lut = Dataset()
        lut.LUTDescriptor = [4096, 0, 16]
        lut.ModalityLUTType = "HU"
        lut.add_new(0x00283006, "OW", (3 * np.arange(4096, dtype="<u2")).tobytes())  # LUTData
        ds.ModalityLUTSequence = [lut]
        ds.save_as(tmp_path / f.name)
    vol = read_volume(tmp_path)
    assert vol.shape[0] == len(list(ct_series.iterdir()))
    for k, f in enumerate(vol.source_files):
        ds = pydicom.dcmread(f)
        expected = apply_modality_lut(ds.pixel_array, ds)
        assert np.array_equal(expected, 3 * ds.pixel_array)
        assert np.array_equal(vol.array[k], expected), f


def test_rt_dose_with_absolute_frame_offsets(pydicom_files, tmp_path):
    # DICOM's other GridFrameOffsetVector kind: the frames' z coordinates (first value = ImagePositionPatient z).
    # Taken as offsets, it put pydicom's dose grid 761.87 mm below the patient.
    relative = read_dicom(pydicom_files / "rtdose.dcm")
    ds = pydicom.dcmread(pydicom_files / "rtdose.dcm")
    z = float(ds.ImagePositionPatient[2])
    ds.GridFrameOffsetVector = [z + float(o) for o in ds.GridFrameOffsetVector]
    ds.save_as(tmp_path / "absolute.dcm")
    absolute = read_dicom(tmp_path / "absolute.dcm")
    assert absolute.same_geometry(relative) and np.array_equal(absolute.array, relative.array)
    assert np.allclose(absolute.origin, [float(v) for v in ds.ImagePositionPatient])
    ds.GridFrameOffsetVector = [o + 7.0 for o in ds.GridFrameOffsetVector]  # neither kind: refused, not guessed
    ds.save_as(tmp_path / "neither.dcm")
    with pytest.raises(ImagingError, match=r"GridFrameOffsetVector starts at -754\.87: neither 0"):
        read_dicom(tmp_path / "neither.dcm")



def _testdata(name, pydicom_files, dicom_store):
    """A file of pydicom's test files or of pydicom-data."""
    return next(p for p in (pydicom_files / name, dicom_store / name) if p.exists())


# JPEG Lossless (PACS exports) and 12-bit JPEG Extended have no decoder among pydicom's installed plugins; GDCM
# (SimpleITK) decodes them. Each compressed file is compared with its uncompressed (or lossless) twin.
@pytest.mark.parametrize(
    ("compressed", "twin", "lossless"),
    [
        ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm", True),  # JPEG Lossless SV1, RGB, uncompressed twin
        ("JPGExtended.dcm", "JPEG-LL.dcm", False),  # JPEG Extended, 12-bit grayscale (lossy), lossless twin
    ],
)
def test_jpeg_files_pydicom_cannot_decode_read_like_their_twin(
    compressed, twin, lossless, pydicom_files, dicom_store
):
    vol = read_volume(_testdata(compressed, pydicom_files, dicom_store))
    ref = read_volume(_testdata(twin, pydicom_files, dicom_store))
    assert vol.shape == ref.shape and vol.array.dtype == ref.array.dtype
    assert vol.spacing == ref.spacing and vol.origin == ref.origin and np.array_equal(vol.direction, ref.direction)
    assert vol.invert_display == ref.invert_display and vol.has_patient_geometry == ref.has_patient_geometry
    if lossless:
        assert np.abs(vol.array.astype(float) - ref.array.astype(float)).max() == 0
    else:  # lossy: the same picture (measured correlation 0.987)
        assert np.corrcoef(vol.array.ravel(), ref.array.ravel())[0, 1] > 0.98


@pytest.mark.parametrize("name", ["bad_sequence.dcm", "JPEG-LL.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm"])
def test_jpeg_lossless_grayscale_reads_in_rescaled_units(name, pydicom_files, dicom_store):
    """JPEG Lossless grayscale (bad_sequence.dcm: a CT slice with intercept -1024) reads like any other file."""
    path = str(_testdata(name, pydicom_files, dicom_store))
    vol = read_volume(path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert vol.shape == (1, ds.Rows, ds.Columns)
    # GDCM's own reading (its rescale applied) equals ours, which went through our rescale.
    assert np.array_equal(vol.array, sitk.GetArrayFromImage(sitk.ReadImage(path)))
    if "RescaleIntercept" in ds:
        assert vol.array.dtype == np.int16 and vol.array.min() < 0 <= vol.array.min() - float(ds.RescaleIntercept)


@pytest.mark.parametrize(
    "name", ["RG1_UNCR.dcm", "MR2_UNCR.dcm", "CT_small.dcm", "emri_small.dcm", "SC_rgb.dcm"]
)
def test_gdcm_fallback_gives_pydicom_stored_values(name, pydicom_files, dicom_store):
    """The GDCM fallback undoes GDCM's rescale and MONOCHROME1 inversion: on uncompressed files (MONOCHROME1,
    fractional slope, intercept, multi-frame, RGB) it equals pydicom's stored values exactly."""
    from medsight.imaging.read_dicom import _stored_values_via_gdcm

    path = str(_testdata(name, pydicom_files, dicom_store))
    ds = pydicom.dcmread(path)
    stored = _stored_values_via_gdcm(path, ds, int(ds.get("NumberOfFrames", 1) or 1), "not used")
    assert stored.shape == ds.pixel_array.shape
    assert np.array_equal(stored, ds.pixel_array)


def test_gdcm_fallback_refuses_palette_color(pydicom_files, dicom_store):
    """GDCM expands PALETTE COLOR to RGB itself, which read_dicom_file would expand again: refused with the reason."""
    from medsight.imaging.read_dicom import _stored_values_via_gdcm

    path = str(_testdata("OBXXXX1A.dcm", pydicom_files, dicom_store))
    with pytest.raises(ImagingError, match="GDCM: PALETTE COLOR") as info:
        _stored_values_via_gdcm(path, pydicom.dcmread(path), 1, "no decoder")
    assert "pydicom: no decoder" in str(info.value)


# Lossy compression was read without a word: the volume now says which, for `medsight ask` to tell the user.
@pytest.mark.parametrize(
    ("name", "said"),
    [
        ("SC_rgb_jpeg_dcmtk.dcm", "JPEG Baseline (Process 1), ratio 17.401:1"),  # pydicom decodes it
        ("JPEG-lossy.dcm", "JPEG Extended (Process 2 and 4), ratio 76:1"),  # 12-bit: GDCM decodes it
        ("JPEGLSNearLossless_16.dcm", "JPEG-LS Lossy (Near-Lossless) Image Compression"),  # no (0028,2110): syntax
        ("MR2_J2KI.dcm", "JPEG 2000 Image Compression, ratio 18:1"),  # a syntax that may be either: (0028,2110) 01
        ("MR2_UNCI.dcm", "earlier JPEG 2000 compression, ratio 18:1"),  # stored uncompressed after a lossy one
    ],
)
def test_lossy_compression_is_reported(name, said, pydicom_files, dicom_store):
    assert read_volume(_testdata(name, pydicom_files, dicom_store)).lossy_compression == said


@pytest.mark.parametrize("name", ["MR_small_jp2klossless.dcm", "MR2_J2KR.dcm", "JPEG-LL.dcm", "MR_small_RLE.dcm",
                                  "CT_small.dcm"])
def test_lossless_and_uncompressed_files_report_no_lossy_compression(name, pydicom_files, dicom_store):
    assert read_volume(_testdata(name, pydicom_files, dicom_store)).lossy_compression is None


def test_lossless_file_flagged_lossy_names_the_earlier_compression(pydicom_files, dicom_store, tmp_path):
    # Stored JPEG Lossless after a lossy JPEG: the note named "JPEG Lossless" as the lossy compression, and a ratio
    # that is not a number raised ValueError out of the reader.
    from pydicom.dataelem import DataElement

    ds = pydicom.dcmread(_testdata("JPEG-LL.dcm", pydicom_files, dicom_store))
    ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
    ds[0x00282112] = DataElement(0x00282112, "LO", "high")  # LossyImageCompressionRatio, written with another VR
    ds.save_as(tmp_path / "flagged.dcm")
    assert read_volume(tmp_path / "flagged.dcm").lossy_compression == "earlier JPEG compression"


def test_series_with_a_lossy_slice_says_how_many(ct_series, tmp_path):
    files = sorted(ct_series.iterdir())
    for n, f in enumerate(files):
        ds = pydicom.dcmread(f)
        if n == 0:
            ds.LossyImageCompression = "01"
            ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.save_as(tmp_path / f.name)
    assert read_volume(ct_series).lossy_compression is None
    assert read_volume(tmp_path).lossy_compression == f"1 of {len(files)} files: earlier JPEG compression"


def test_files_without_a_meta_header_read_like_their_source(pydicom_files, dicom_store, tmp_path):
    # A file without preamble and meta header (older writers) names no transfer syntax; its header was read, but
    # pydicom refused its pixels ("file_meta has no (0002,0010) 'Transfer Syntax UID'"), though GDCM reads them.
    from pydicom.dataset import FileMetaDataset

    source = pydicom_files / "CT_small.dcm"
    for implicit in (True, False):  # (big endian too, but pydicom's writer would not swap the pixel bytes)
        ds = pydicom.dcmread(source)
        ds.preamble, ds.file_meta = None, FileMetaDataset()
        path = tmp_path / f"no_meta_{'implicit' if implicit else 'explicit'}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=False, implicit_vr=implicit, little_endian=True)
        vol, ref = read_volume(path), read_volume(source)
        assert np.array_equal(vol.array, ref.array) and vol.same_geometry(ref), path.name
    face = dicom_store / "OT-PAL-8-face.dcm"  # a real one: PALETTE COLOR with 16-bit palette entries
    vol = read_volume(face)
    gdcm = sitk.GetArrayFromImage(sitk.ReadImage(str(face)))  # GDCM gives the palette's top 8 bits
    assert vol.is_rgb and vol.array.shape == gdcm.shape
    assert np.array_equal(vol.array >> 8, gdcm)


def test_a_folder_without_series_is_one_line_without_itk_warnings(tmp_path, capfd):
    """GDCM's scan printed "WARNING: In .../itkGDCMSeriesFileNames.cxx, line 101 ... No Series were found" to
    stderr before the command's own one-line error."""
    (tmp_path / "notes.txt").write_text("not DICOM")
    with pytest.raises(ImagingError, match="no DICOM image series found in this folder"):
        read_volume(tmp_path)
    assert capfd.readouterr().err == ""
    assert sitk.ProcessObject.GetGlobalWarningDisplay()  # ITK's other warnings still shown


def test_an_export_root_names_the_subfolders_holding_dicom(dicomdir):
    """A study or CD export's root (a DICOMDIR beside patient/study/series folders) was 'no DICOM image series found in
    this folder' and no more: it now names the subfolders holding DICOM files, to give one of them."""
    with pytest.raises(ImagingError) as info:
        read_volume(dicomdir / "98892001")
    assert info.value.problem.endswith("its subfolders hold DICOM files (CT2N, CT5N): give the folder of one series")
    with pytest.raises(ImagingError) as info:
        read_volume(dicomdir)
    named = info.value.problem.split("(")[1].split(")")[0].split(", ")
    assert named[-1] == "..." and len(named) == SUBFOLDERS_NAMED + 1
    for sub in named[:-1]:
        assert list_dicom_series(dicomdir / sub)  # each one named holds a series
    with pytest.raises(ImagingError, match="PT000000/ST000000/SE000000"):  # three levels down
        read_volume(dicomdir / "TINY_ALPHA")


def _colour_series(source, folder, photometric=None, rescale=None):
    """A two-slice series of copies of a real colour file (the second flipped upside down, so the slices differ),
    optionally re-encoded from RGB into ``photometric`` (pydicom's convert_color_space) or given a rescale."""
    from pydicom.pixels import convert_color_space

    folder.mkdir()
    series_uid = pydicom.uid.generate_uid()
    for k in range(2):
        ds = pydicom.dcmread(source)
        if photometric:  # YBR_FULL: 8-bit samples converted from RGB
            pixels = convert_color_space(ds.pixel_array, "RGB", photometric)
            ds.PhotometricInterpretation = photometric
            ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        if k:  # rows reversed in the stored bytes: valid for every uncompressed layout, YBR_FULL_422's too
            ds.PixelData = np.frombuffer(ds.PixelData, np.uint8).reshape(ds.Rows, -1)[::-1].tobytes()
        if rescale:
            ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, pydicom.uid.generate_uid()
        ds.ImageOrientationPatient, ds.PixelSpacing = [1, 0, 0, 0, 1, 0], [0.5, 0.5]
        ds.ImagePositionPatient = [0, 0, 2.5 * k]
        ds.save_as(folder / f"slice{k}.dcm", enforce_file_format=True)
    return folder


def _colour_pixels(path):
    """A colour file's RGB samples as pydicom gives them (YBR converted, a palette applied)."""
    ds = pydicom.dcmread(path)
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        return pydicom.pixels.apply_color_lut(ds.pixel_array, ds)
    return ds.pixel_array


@pytest.mark.parametrize(
    ("name", "photometric", "rescale"),
    [
        ("SC_rgb_16bit.dcm", None, None),  # 16-bit RGB: came back int32, refused as "a vector field?"
        ("SC_rgb.dcm", None, None),  # 8-bit RGB: came back int16, refused the same way
        ("SC_rgb.dcm", "YBR_FULL", None),
        ("SC_ybr_full_422_uncompressed.dcm", None, None),
        ("examples_palette.dcm", None, None),  # refused: "pixel data has shape (2, 350, 800, 3), headers say ..."
        ("SC_rgb_16bit.dcm", None, ("0.5", "-7")),  # colour has no rescale: GDCM's wrapped samples, or grey floats
        ("SC_rgb.dcm", None, ("1", "3")),
    ],
)
def test_colour_series_reads_as_pydicoms_unsigned_samples(
    name, photometric, rescale, pydicom_files, dicom_store, tmp_path
):
    source = _testdata(name, pydicom_files, dicom_store)
    folder = _colour_series(source, tmp_path / "series", photometric, rescale)
    vol = read_volume(folder)
    files = sorted(folder.iterdir())
    ref = np.stack([_colour_pixels(f) for f in files])
    assert vol.is_rgb and vol.array.shape == ref.shape and vol.array.dtype == ref.dtype
    assert vol.array.dtype == read_volume(source).array.dtype  # as the single file reads
    assert np.abs(vol.array.astype(np.int64) - ref.astype(np.int64)).max() == 0
    image = sitk.ReadImage([str(f) for f in files])
    assert vol.spacing == image.GetSpacing() and vol.origin == image.GetOrigin()
    assert np.array_equal(vol.direction.ravel(), image.GetDirection())


@pytest.mark.parametrize("first", ["PALETTE COLOR", "MONOCHROME2"])
def test_series_mixing_palette_and_grey_slices_is_refused(first, pydicom_files, dicom_store, tmp_path):
    # Palette first: numpy's "all input arrays must have the same shape"; grey first: the palette slice's indices
    # were read as grey values.
    folder = _colour_series(_testdata("examples_palette.dcm", pydicom_files, dicom_store), tmp_path / "series")
    files = sorted(folder.iterdir())
    other = "MONOCHROME2" if first == "PALETTE COLOR" else "PALETTE COLOR"
    for f, photometric in zip(files, (first, other), strict=True):
        ds = pydicom.dcmread(f)
        ds.PhotometricInterpretation = photometric
        ds.save_as(f)
    with pytest.raises(ImagingError, match=f"mixed series: photometric interpretation {first} in {files[0].name} "
                       f"but {other} in {files[1].name} \\(colour from a palette in some slices, grey in others\\)"):
        read_volume(folder)


@pytest.mark.parametrize("rescale", [("0.5", "-7"), ("1", "3")])
@pytest.mark.parametrize(("name", "twin"), [("SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm"), ("SC_rgb_16bit.dcm", None)])
def test_gdcm_fallback_leaves_colour_unrescaled(name, twin, rescale, pydicom_files, dicom_store, tmp_path):
    """GDCM applied a colour file's RescaleSlope/Intercept to its samples (SC_rgb.dcm's up to 249 off): the JPEG
    Lossless file pydicom cannot decode read wrong, and the fallback itself differs from pydicom's samples."""
    from medsight.imaging.read_dicom import _stored_values_via_gdcm

    ds = pydicom.dcmread(_testdata(name, pydicom_files, dicom_store))
    ds.RescaleSlope, ds.RescaleIntercept = rescale
    path = tmp_path / name
    ds.save_as(path)
    ref = _colour_pixels(_testdata(twin or name, pydicom_files, dicom_store))
    stored = _stored_values_via_gdcm(str(path), ds, 1, "not used")
    assert stored.dtype == ref.dtype and np.abs(stored.astype(np.int64) - ref.astype(np.int64)).max() == 0
    assert np.abs(read_volume(path).array[0].astype(np.int64) - ref.astype(np.int64)).max() == 0


@pytest.mark.parametrize("tilt_degrees", [15.0, -7.0])
def test_gantry_tilted_series_is_refused_naming_the_option_and_regularized_with_it(ct_series, tmp_path,
                                                                                  tilt_degrees):
    """A gantry-tilted CT was refused as "not stacked along their normal (gantry tilt or shear of ...)", naming no way
    to read it, where 3D Slicer regularizes it. The refusal names regularize_tilt, and with it each output voxel
    holds the value the acquired slices have at its patient position (a ramp, exact under linear interpolation)."""
    template = sorted(ct_series.iterdir())[0]
    count, step = 12, 2.5
    folder = write_tilted_series(template, tmp_path / "tilted", count, step, tilt_degrees)
    with pytest.raises(ImagingError, match=rf"gantry tilt of {abs(tilt_degrees):.1f} degrees.*regularize_tilt=True"):
        read_volume(folder)
    vol = read_volume(folder, regularize_tilt=True)
    assert vol.shape[0] == count and vol.resampled.startswith(f"gantry tilt of {abs(tilt_degrees):.1f} degrees")
    assert vol.array.dtype == np.int16 and np.allclose(vol.direction.T @ vol.direction, np.eye(3))
    rows, columns = pydicom.dcmread(template).Rows, pydicom.dcmread(template).Columns
    k, j, i = np.mgrid[: vol.shape[0], : vol.shape[1], : vol.shape[2]]
    lps = (vol.ijk_to_lps @ np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(k.size)]))[:3].T
    source = np.empty((k.size, 3))  # each output voxel in its acquired slice's (column, row, normal) mm
    for n, f in enumerate(vol.source_files):
        ds = pydicom.dcmread(f)
        iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
        axes = np.stack([iop[:3], iop[3:], np.cross(iop[:3], iop[3:])])
        on = k.ravel() == n
        source[on] = (lps[on] - np.asarray(ds.ImagePositionPatient, dtype=float)) @ axes.T
    assert np.abs(source[:, 2]).max() < 1e-3  # every output slice lies in its acquired slice's plane
    spacing = np.asarray(pydicom.dcmread(template).PixelSpacing, dtype=float)
    col, row = source[:, 0] / spacing[1], source[:, 1] / spacing[0]
    values = vol.array.ravel().astype(float)
    inside = (row >= -1e-6) & (row <= rows - 1 + 1e-6) & (np.abs(col - np.rint(col)) < 1e-6)
    expected = -1024 + 100 * k.ravel() + 10 * row + col
    assert inside.sum() >= count * (rows - 1) * columns and np.abs(values[inside] - expected[inside]).max() <= 0.5
    outside = (row < -0.5) | (row > rows - 0.5)
    assert outside.any() and np.all(values[outside] == -1024)


@pytest.mark.parametrize("decimals", [1, 2])
def test_regularize_tilt_leaves_an_untilted_series_as_it_is(restacked_series, decimals):
    """regularize_tilt resampled any stack whose positions drifted more than 1e-3 mm within their plane: an oblique
    series with positions written to one or two decimals (read unsheared without the option) came back widened by a
    row of fill and interpolated. The option now resamples only what would be refused without it."""
    tilt = np.deg2rad(10)
    folder = restacked_series(np.arange(40) * 3.0, decimals=decimals, orientation=[1, 0, 0, 0, np.cos(tilt),
                                                                                   np.sin(tilt)])
    plain, regularized = read_volume(folder), read_volume(folder, regularize_tilt=True)
    assert regularized.resampled is None and regularized.same_geometry(plain)
    assert np.array_equal(regularized.array, plain.array)


def _ramp_at(vol):
    """(expected value, inside) of each voxel of ``vol``: `write_uneven_series`' ramp at the voxel's patient position
    (where the table would have put a slice through it), and whether it lies within the rows of the acquired slices
    on both sides of it (a tilt shifts their rows apart: between them, fill beside values is interpolated)."""
    ds = pydicom.dcmread(vol.source_files[0])
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    row_dir, col_dir, normal = iop[:3], iop[3:], np.cross(iop[:3], iop[3:])
    spacing = np.asarray(ds.PixelSpacing, dtype=float)
    start = np.asarray(ds.ImagePositionPatient, dtype=float)
    k, j, i = np.mgrid[: vol.shape[0], : vol.shape[1], : vol.shape[2]]
    lps = (vol.ijk_to_lps @ np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(k.size)]))[:3].T
    d = (lps - start) @ normal
    table = start + np.outer(d / normal[2], [0, 0, 1])  # the slice position a slice through the voxel would have
    row, col = ((lps - table) @ col_dir) / spacing[0], ((lps - table) @ row_dir) / spacing[1]
    acquired = np.array([np.asarray(pydicom.dcmread(f).ImagePositionPatient, dtype=float) for f in vol.source_files])
    around = np.clip(np.searchsorted((acquired - start) @ normal, d - 1e-6), 1, len(acquired) - 1)
    inside = np.ones(k.size, dtype=bool)
    for side in (acquired[around - 1], acquired[around]):
        side_row = ((lps - side) @ col_dir) / spacing[0]
        inside &= (side_row >= -1e-6) & (side_row <= ds.Rows - 1 + 1e-6)
    return VALUE_PER_MM * d + 10 * row + col + float(ds.RescaleIntercept), inside


@pytest.mark.parametrize(("case", "table_mm", "tilt"), [
    ("a missing slice", np.delete(np.arange(12) * 2.5, 5), 0.0),
    ("a drifting table step", np.round(np.concatenate([[0], np.cumsum(np.linspace(0.6, 0.7, 59))]), 2), 0.0),
    ("a missing slice of a tilted gantry", np.delete(np.arange(12) * 2.5, 7), 15.0),
])
def test_unevenly_spaced_series_is_refused_naming_the_option_and_regularized_with_it(ct_series, tmp_path, case,
                                                                                   table_mm, tilt):
    """A series with a missing slice or a drifting step was refused as "uneven slice spacing" naming no way to read
    it, where 3D Slicer loads it under its acquisition geometry regularization. The refusal names regularize_spacing;
    with it the volume lies on Slicer's grid (as many slices as acquired, evenly from the first to the last: ITK's
    spacing and origin) and each voxel holds the value the acquired slices have at its patient position: a ramp of
    VALUE_PER_MM per mm along the normal, so the allowed 0.5 (output rounding to integers; stored values are exact
    but for the tilted case's, rounded by 0.5 more) is a position within 0.01 mm."""
    template = sorted(ct_series.iterdir())[0]
    folder = write_uneven_series(template, tmp_path / "uneven", table_mm, tilt)
    with pytest.raises(ImagingError, match=r"uneven slice spacing.*regularize_spacing=True"):
        read_volume(folder, regularize_tilt=True)
    vol = read_volume(folder, regularize_spacing=True, regularize_tilt=bool(tilt))
    first, last = (np.asarray(pydicom.dcmread(vol.source_files[n]).ImagePositionPatient, dtype=float) for n in (0, -1))
    normal = vol.direction[:, 2]
    assert vol.shape[0] == len(table_mm) and vol.array.dtype == np.int16
    assert vol.spacing[2] == pytest.approx((last - first) @ normal / (len(table_mm) - 1), abs=1e-9)
    if not tilt:  # a tilted grid starts where the widened first slice does, in its plane (the tilt test checks it)
        assert np.allclose(vol.origin, first, atol=1e-6)
    assert vol.resampled.endswith("linear interpolation") and "uneven slice spacing (steps of" in vol.resampled
    assert ("gantry tilt of 15.0 degrees" in vol.resampled) == bool(tilt)
    expected, inside = _ramp_at(vol)
    values = vol.array.ravel().astype(float)
    # Most voxels are checked: a tilt shifts neighbouring slices' rows apart by up to ~2 rows here.
    assert inside.sum() >= 0.75 * vol.shape[0] * pydicom.dcmread(template).Rows * vol.shape[2]
    assert np.abs(values[inside] - expected[inside]).max() <= (1.0 if tilt else 0.5)
    if tilt:
        return  # the ramp above placed every voxel; a tilt moves the point within its plane by a fraction of a pixel
    # A known point: row 3, column 7 of the acquired slice lying farthest from its place on the grid, at its patient
    # position in the resampled volume (between two grid slices: linear between them, as the ramp is), holds that
    # voxel's value.
    farthest = int(np.argmax(np.abs(table_mm - table_mm[-1] * np.arange(len(table_mm)) / (len(table_mm) - 1))))
    ds = pydicom.dcmread(vol.source_files[farthest])
    spacing = np.asarray(ds.PixelSpacing, dtype=float)
    point = np.asarray(ds.ImagePositionPatient, dtype=float) + 7 * spacing[1] * vol.direction[:, 0] + \
        3 * spacing[0] * vol.direction[:, 1]
    i, j, k = (np.linalg.inv(vol.ijk_to_lps) @ [*point, 1])[:3]
    assert (i, j) == (pytest.approx(7, abs=1e-6), pytest.approx(3, abs=1e-6)) and 0 < k < vol.shape[0] - 1
    below, t = int(k), k - int(k)
    at_point = (1 - t) * vol.array[below, 3, 7] + t * vol.array[below + 1, 3, 7]
    assert abs(at_point - apply_modality_lut(ds.pixel_array, ds)[3, 7]) <= 0.5


@pytest.mark.parametrize("decimals", [1, 6])
def test_regularize_spacing_leaves_an_evenly_spaced_series_as_it_is(restacked_series, decimals):
    """regularize_spacing resamples only what would be refused without it: slices within the spacing tolerance (ITK's
    grid) and positions written to one decimal read as without the option."""
    folder = restacked_series(np.array([0.0, 2.5, 5.01, 7.5, 10.005]), decimals=decimals)
    plain, regularized = read_volume(folder), read_volume(folder, regularize_spacing=True)
    assert regularized.resampled is None and regularized.same_geometry(plain)
    assert np.array_equal(regularized.array, plain.array)
