"""NIfTI, NRRD and 2D readers on nibabel's and nilearn's real volumes."""

from __future__ import annotations

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk  # noqa: N813
from PIL import Image

from medsight.imaging import (
    ImagingError,
    Segment,
    Segmentation,
    read_image2d,
    read_nifti,
    read_nrrd,
    read_volume,
    write_nifti_labelmap,
)


def test_mni_template_matches_nibabel(mni_t1):
    img = nib.load(mni_t1)
    vol = read_volume(mni_t1, modality="MR")
    assert vol.shape == img.shape[::-1] and vol.modality == "MR"
    assert np.array_equal(vol.array, np.transpose(np.asanyarray(img.dataobj), (2, 1, 0)))
    assert np.allclose(vol.ijk_to_ras, img.affine)


def test_nibabel_volumes_geometry(nibabel_data):
    for name in ("anatomical.nii", "standard.nii.gz", "reoriented_anat_moved.nii"):
        img = nib.load(nibabel_data / name)
        vol = read_nifti(nibabel_data / name)
        assert np.allclose(vol.ijk_to_ras, img.affine), name
        assert vol.array.dtype.isnative
        assert np.array_equal(
            vol.array[2, 1, 0] if min(vol.shape) > 2 else vol.array[0, 0, 0],
            np.asanyarray(img.dataobj)[0, 1, 2]
            if min(vol.shape) > 2
            else np.asanyarray(img.dataobj)[0, 0, 0],
        )


def test_nrrd_in_both_spaces_matches_nifti(mni_t1, tmp_path):
    vol = read_nifti(mni_t1)
    data = np.transpose(vol.array, (2, 1, 0))
    lps = vol.ijk_to_lps
    nrrd.write(
        str(tmp_path / "lps.nrrd"),
        data,
        {"space": "left-posterior-superior", "space directions": lps[:3, :3].T, "space origin": lps[:3, 3]},
    )
    ras = vol.ijk_to_ras
    nrrd.write(
        str(tmp_path / "ras.nhdr"),
        data,
        {
            "space": "right-anterior-superior",
            "space directions": ras[:3, :3].T,
            "space origin": ras[:3, 3],
            "encoding": "gzip",
        },
    )
    for name in ("lps.nrrd", "ras.nhdr"):
        back = read_nrrd(tmp_path / name)
        assert back.same_geometry(vol) and np.array_equal(back.array, vol.array), name


@pytest.mark.parametrize("space", ["left-posterior-superior", "right-anterior-superior", None])
def test_colour_nrrd_as_slicer_writes_it_reads_as_itk_reads_it(dicom_store, tmp_path, space):
    """3D Slicer writes a colour volume with its samples on a first NRRD axis of kind RGB-color (vtkTeemNRRDWriter):
    it was refused as '4D data ... split time points or channels first', and a one-slice one (a 2D picture) was read
    as a grey volume 3 voxels wide. Now RGB, as ITK (and so Slicer) reads it: samples, spacing, origin, direction."""
    rgb = pydicom.dcmread(dicom_store / "US1_UNCR.dcm").pixel_array  # (rows, columns, 3), real colour samples
    slices = np.stack([rgb, rgb[::-1]]) if space else rgb[None]  # (k, j, i, 3); no space: one slice, 2D
    data = np.transpose(slices, (3, 2, 1, 0))  # NRRD's order: sample, i, j, k
    if space:
        directions = np.array([[np.nan] * 3, [0, 0.6, 0], [-0.7, 0, 0], [0, 0, 2.5]])  # a rotated grid
        header = {"kinds": ["RGB-color", "domain", "domain", "domain"], "space": space,
                  "space directions": directions, "space origin": [4.0, -5.0, 6.0]}
    else:
        data, header = data[..., 0], {"kinds": ["RGB-color", "domain", "domain"], "spacings": [np.nan, 0.6, 0.7]}
    path = tmp_path / "colour.nrrd"
    nrrd.write(str(path), np.ascontiguousarray(data), header)
    vol, image = read_volume(path), sitk.ReadImage(str(path))
    itk = sitk.GetArrayFromImage(image)
    assert vol.is_rgb and vol.array.dtype == np.uint8 and np.array_equal(vol.array, itk.reshape(slices.shape))
    dims = image.GetDimension()
    assert np.allclose(vol.spacing[:dims], image.GetSpacing()) and np.allclose(vol.origin[:dims], image.GetOrigin())
    assert np.allclose(vol.direction[:dims, :dims].ravel(), image.GetDirection())


def test_rgb24_nifti_reads_as_itk_reads_it(dicom_store, tmp_path):
    """A colour NIfTI (RGB24, as colour-coded maps and histology are saved) was refused as 'not supported', where ITK
    and so 3D Slicer read it: now RGB, equal to ITK's reading in samples, spacing, origin and direction."""
    rgb = pydicom.dcmread(dicom_store / "US1_UNCR.dcm").pixel_array  # (rows, columns, 3), real colour samples
    slices = np.stack([rgb, rgb[::-1]])  # (k, j, i, 3)
    ijk = np.transpose(slices, (2, 1, 0, 3))
    structured = np.zeros(ijk.shape[:3], dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    for c, name in enumerate("RGB"):
        structured[name] = ijk[..., c]
    affine = np.array([[0, -0.6, 0, 10], [0.7, 0, 0, -20], [0, 0, 2.5, 30], [0, 0, 0, 1.0]])  # a rotated grid
    path = tmp_path / "colour.nii.gz"
    nib.save(nib.Nifti1Image(structured, affine), path)
    vol, image = read_volume(path), sitk.ReadImage(str(path))
    assert vol.is_rgb and np.array_equal(vol.array, slices) and np.array_equal(vol.array, sitk.GetArrayFromImage(image))
    assert np.allclose(vol.spacing, image.GetSpacing()) and np.allclose(vol.origin, image.GetOrigin())
    assert np.allclose(vol.direction.ravel(), image.GetDirection()) and np.allclose(vol.ijk_to_ras, affine)
    rgba = np.zeros((4, 5, 2), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1"), ("A", "u1")])
    nib.save(nib.Nifti1Image(rgba, np.eye(4)), tmp_path / "rgba.nii.gz")
    with pytest.raises(ImagingError, match=r"colour NIfTI with samples \('R', 'G', 'B', 'A'\) .*RGB24 is expected"):
        read_volume(tmp_path / "rgba.nii.gz")


def test_colour_nrrd_other_than_8_bit_is_refused_saying_so(tmp_path):
    path = tmp_path / "colour16.nrrd"
    nrrd.write(str(path), np.zeros((3, 4, 5, 2), np.uint16), {"kinds": ["RGB-color", "domain", "domain", "domain"]})
    with pytest.raises(ImagingError, match="RGB-color samples of type uint16: 8-bit RGB is expected"):
        read_volume(path)


def test_2d_nrrd_in_3d_space_is_refused_for_what_it_is(tmp_path):
    # A plane placed in LPS space (2 axes, 3D vectors) was refused as "malformed space directions [[0.8 0. 0.] ...]";
    # it is well-formed, only not readable as a volume (ITK refuses it as well).
    path = tmp_path / "plane.nrrd"
    nrrd.write(str(path), np.zeros((4, 5), np.int16), {"space": "left-posterior-superior", "space origin": [1, 2, 3],
                                                        "space directions": np.array([[0.8, 0, 0], [0, 0.9, 0]])})
    with pytest.raises(ImagingError, match=r"a 2D image placed in 3D space \(2 space directions\): not supported"):
        read_volume(path)
    with pytest.raises(RuntimeError, match="doesn't match dimension of space"):
        sitk.ReadImage(str(path))


def test_nrrd_with_space_dimension_but_no_named_space_is_placed_as_itk_places_it(mni_t1, tmp_path):
    # NRRD may give "space dimension: 3" with space directions and origin but no named space. ITK (so 3D Slicer)
    # takes the vectors as LPS; this reader ignored them and returned a 1 mm grid at 0 without patient geometry,
    # so `ask --out x.seg.nrrd` wrote the mask 1 mm-spaced at the origin, away from the image shown in Slicer.
    import SimpleITK as sitk  # noqa: N813  (the universal alias)

    vol = read_nifti(mni_t1)
    lps = vol.ijk_to_lps
    path = tmp_path / "no_space.nrrd"
    nrrd.write(str(path), np.transpose(vol.array, (2, 1, 0)),
               {"space dimension": 3, "space directions": lps[:3, :3].T, "space origin": lps[:3, 3]})
    back = read_nrrd(path)
    itk = sitk.ReadImage(str(path))
    itk_lps = np.eye(4)
    itk_lps[:3, :3] = np.asarray(itk.GetDirection()).reshape(3, 3) * np.asarray(itk.GetSpacing())
    itk_lps[:3, 3] = itk.GetOrigin()
    assert back.has_patient_geometry and back.same_geometry(vol)
    assert np.abs(back.ijk_to_lps - itk_lps).max() < 1e-4


def test_png_and_tiff_from_a_real_dicom_slice(pydicom_files, tmp_path):
    pixels = pydicom.dcmread(pydicom_files / "MR_small.dcm").pixel_array.astype(np.uint16)
    for name in ("slice.png", "slice.tif"):
        Image.fromarray(pixels).save(tmp_path / name)
        vol = read_volume(tmp_path / name, modality="MR")
        assert vol.shape == (1, 64, 64) and not vol.has_patient_geometry and vol.modality == "MR"
        assert np.array_equal(vol.array[0], pixels), name


def test_jpeg_colour_photo():
    import matplotlib

    path = f"{matplotlib.get_data_path()}/sample_data/grace_hopper.jpg"
    vol = read_image2d(path)
    with Image.open(path) as img:
        assert vol.array.shape == (1, img.height, img.width, 3)
        assert np.array_equal(vol.array[0], np.asarray(img.convert("RGB")))


def test_nifti_whose_qform_and_sform_disagree_is_refused(nibabel_data, tmp_path):
    # nibabel (this reader) takes the sform, ITK (3D Slicer) the qform when the sform code is not 1: a mask
    # written on the sform's grid sat 8 mm off the image as Slicer shows it.
    img = nib.load(nibabel_data / "anatomical.nii")
    sform = img.affine.copy()
    sform[:3, 3] += (8.0, 0.0, 0.0)
    img.set_sform(sform, code=2)
    img.set_qform(img.header.get_qform(), code=1)
    nib.save(img, tmp_path / "disagree.nii")
    with pytest.raises(ImagingError, match=r"qform \(code 1\) and sform \(code 2\) .* 8 mm apart"):
        read_volume(tmp_path / "disagree.nii")
    img.set_sform(sform, code=1)  # a scanner-space sform is the one both ITK and nibabel take: read, at its place
    nib.save(img, tmp_path / "scanner.nii")
    assert np.allclose(read_volume(tmp_path / "scanner.nii").ijk_to_ras, sform)
    img.set_sform(img.header.get_qform(), code=2)  # agreeing forms (as in nibabel's own files) still read
    nib.save(img, tmp_path / "agree.nii")
    assert np.allclose(read_volume(tmp_path / "agree.nii").ijk_to_ras, img.header.get_qform())


def test_nifti_whose_pixdim_and_sform_disagree_is_refused(nibabel_data, tmp_path):
    # nibabel's standard.nii.gz places its voxels by the sform alone (qform code 0); with pixdim no longer matching
    # it, nibabel (this reader) kept the sform's voxel sizes while ITK (3D Slicer) takes pixdim's: masks written on
    # the sform's grid were stretched against the image Slicer shows.
    import SimpleITK as sitk  # noqa: N813  (the universal alias)

    img = nib.load(nibabel_data / "standard.nii.gz")
    sizes = np.linalg.norm(img.affine[:3, :3], axis=0)
    assert int(img.header["qform_code"]) == 0 and int(img.header["sform_code"]) > 0
    assert np.allclose(read_volume(nibabel_data / "standard.nii.gz").spacing, sizes)
    img.header["pixdim"][1:4] = sizes[::-1]
    nib.save(img, tmp_path / "stale_pixdim.nii.gz")
    assert not np.allclose(sitk.ReadImage(str(tmp_path / "stale_pixdim.nii.gz")).GetSpacing(), sizes)
    with pytest.raises(ImagingError, match=r"voxel sizes \(pixdim \[2.0, 3.0, 1.0\] mm\) and its sform's "
                                           r"\(\[1.0, 3.0, 2.0\] mm\) disagree"):
        read_volume(tmp_path / "stale_pixdim.nii.gz")


def test_sheared_nifti_is_refused(nibabel_data, tmp_path):
    # An sform with a shear (affine registration output) has no rotation for its axes: it was read with a
    # non-orthonormal direction, and an --out NIfTI then held that sform beside a different (rotation-only) qform.
    img = nib.load(nibabel_data / "anatomical.nii")
    sheared = img.affine.copy()
    sheared[:3, 1] += 0.3 * sheared[:3, 0]
    img.set_sform(sheared, code=2)
    img.set_qform(None, code=0)
    nib.save(img, tmp_path / "sheared.nii")
    with pytest.raises(ImagingError, match="direction must be a 3x3 rotation or reflection"):
        read_volume(tmp_path / "sheared.nii")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_nan_outside_the_brain_reads_as_the_minimum_and_is_said(mni_t1, mni_gm, tmp_path, suffix):
    """MR pipelines write NaN outside the brain: such a volume was refused ("N NaN and 0 infinite voxel values",
    nothing on what to do). The NaN voxels now read as the volume's smallest value, every other voxel as written, the
    geometry as before, and the volume says how many were filled."""
    t1 = nib.load(mni_t1)
    data = np.asanyarray(t1.dataobj).astype(np.float32)
    outside = np.asanyarray(nib.load(mni_gm).dataobj) < 0.5
    data[outside] = np.nan
    path = tmp_path / f"masked{suffix}"
    if suffix == ".nii.gz":
        nib.save(nib.Nifti1Image(data, t1.affine), path)
    elif suffix == ".nrrd":
        nrrd.write(str(path), data, {"space": "right-anterior-superior", "space directions": t1.affine[:3, :3].T,
                                      "space origin": t1.affine[:3, 3]})
    else:
        image = sitk.GetImageFromArray(np.transpose(data, (2, 1, 0)).copy())
        lps = np.diag([-1.0, -1.0, 1.0]) @ t1.affine[:3, :3]
        spacing = np.linalg.norm(lps, axis=0)
        image.SetSpacing(spacing.tolist())
        image.SetDirection((lps / spacing).ravel().tolist())
        image.SetOrigin((np.diag([-1.0, -1.0, 1.0]) @ t1.affine[:3, 3]).tolist())
        sitk.WriteImage(image, str(path))
    vol = read_volume(path)
    reference = read_volume(mni_t1)
    assert vol.same_geometry(reference)
    got = np.transpose(vol.array, (2, 1, 0))
    low = float(np.nanmin(data))
    assert np.array_equal(got[~outside], data[~outside]) and np.all(got[outside] == low)
    assert vol.nan_filled == f"{int(outside.sum())} NaN voxels (of {data.size}) read as the volume's minimum {low:g}"
    assert reference.nan_filled is None


def test_nifti_of_nan_only_is_refused(mni_t1, tmp_path):
    t1 = nib.load(mni_t1)
    data = np.full(t1.shape, np.nan, np.float32)
    nib.save(nib.Nifti1Image(data, t1.affine), tmp_path / "nan.nii.gz")
    with pytest.raises(ImagingError, match=f"{data.size} NaN and 0 infinite voxel values: no voxel holds a number"):
        read_volume(tmp_path / "nan.nii.gz")


def test_nibabels_resampled_volume_with_nan_outside_its_field_of_view_reads(nibabel_data):
    """nibabel's resampled_anat_moved.nii, resampled with NaN where the moved image had no data, was refused."""
    path = nibabel_data / "resampled_anat_moved.nii"
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
    vol = read_volume(path)
    nan = np.isnan(data)
    got = np.transpose(vol.array, (2, 1, 0))
    assert np.allclose(vol.ijk_to_ras, img.affine) and np.array_equal(got[~nan], data[~nan])
    assert nan.any() and np.all(got[nan] == np.nanmin(data))
    assert vol.nan_filled.startswith(f"{int(nan.sum())} NaN voxels (of {data.size})")


@pytest.mark.parametrize(("unit", "in_mm"), [("meter", 1000.0), ("micron", 0.001), ("mm", 1.0), ("unknown", 1.0)])
@pytest.mark.parametrize("codes", [1, 0])
def test_nifti_in_metres_or_microns_lies_where_itk_puts_it_and_so_do_its_masks(mni_t1, tmp_path, unit, in_mm, codes):
    """ITK (and so 3D Slicer) scales a NIfTI header in metres or microns to millimetres; this reader took nibabel's
    affine as mm: a NIfTI in metres read 1000 times too small, and its mask (written in mm) sat 1000 times away from
    the image in Slicer. Image and mask now both lie where SimpleITK reads the image."""
    t1 = nib.load(mni_t1)
    data = np.asanyarray(t1.dataobj)[::16, ::16, ::16]
    affine = np.diag([1 / in_mm] * 3 + [1.0]) @ t1.affine @ np.diag([16, 16, 16, 1])
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=codes)
    img.set_sform(affine, code=codes)
    img.header.set_xyzt_units(xyz=unit)
    path = tmp_path / f"{unit}.nii.gz"
    nib.save(img, path)
    vol = read_volume(path)
    itk = sitk.ReadImage(str(path))
    assert np.allclose(vol.spacing, itk.GetSpacing(), rtol=1e-6) and np.allclose(vol.origin, itk.GetOrigin(), atol=1e-3)
    assert np.allclose(vol.direction.ravel(), itk.GetDirection(), atol=1e-6)
    write_nifti_labelmap(Segmentation(vol, (vol.array > 0).astype(np.uint8), [Segment(1, "head")]), tmp_path / "m.nii")
    mask = sitk.ReadImage(str(tmp_path / "m.nii"))
    assert np.allclose(mask.GetSpacing(), itk.GetSpacing(), rtol=1e-6)
    assert np.allclose(mask.GetOrigin(), itk.GetOrigin(), atol=1e-3)
    assert np.allclose(mask.GetDirection(), itk.GetDirection(), atol=1e-6)
