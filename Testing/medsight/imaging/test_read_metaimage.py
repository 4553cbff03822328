"""MetaImage (.mha, .mhd + .raw) written by SimpleITK from nibabel's real volumes, read back against the NIfTI."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813  (the universal alias)

from medsight.imaging import ImagingError, read_volume

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _nifti_as_metaimage(nifti, path, compress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Write the NIfTI's first 3D volume with SimpleITK; return its [i, j, k] voxels and IJK-to-RAS affine."""
    img = nib.load(nifti)
    data = np.asanyarray(img.dataobj)
    data = data[..., 0] if data.ndim == 4 else data
    data = data.astype(data.dtype.newbyteorder("="))
    spacing = np.linalg.norm(img.affine[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.T))
    image.SetSpacing(spacing.tolist())
    image.SetOrigin((RAS_TO_LPS @ img.affine[:3, 3]).tolist())
    image.SetDirection((RAS_TO_LPS @ img.affine[:3, :3] / spacing).ravel().tolist())
    sitk.WriteImage(image, str(path), useCompression=compress)
    return data, img.affine


def _corners(shape) -> np.ndarray:
    return np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)]).T


@pytest.mark.parametrize("name", ["anatomical.nii", "example4d.nii.gz"])  # y-flipped; oblique (a 4D file's 1st)
@pytest.mark.parametrize("suffix", [".mha", ".mhd"])
def test_metaimage_matches_its_nifti_source(nibabel_data, tmp_path, name, suffix):
    path = tmp_path / f"volume{suffix}"
    data, affine = _nifti_as_metaimage(nibabel_data / name, path, compress=suffix == ".mha")
    vol = read_volume(path, modality="MR")
    assert vol.modality == "MR" and vol.has_patient_geometry and vol.shape == data.shape[::-1]
    assert np.array_equal(vol.array, data.T) and vol.array.dtype == data.dtype
    corners = _corners(data.shape)
    assert np.abs(vol.ijk_to_ras @ corners - affine @ corners).max() < 1e-4


def test_metaimage_without_its_data_or_with_the_wrong_amount_is_refused(nibabel_data, tmp_path):
    # ITK's own error for a missing or short .raw names the header with "No such file or directory", and it reads
    # a .raw longer than its header says without a word.
    header = tmp_path / "volume.mhd"
    data, _ = _nifti_as_metaimage(nibabel_data / "anatomical.nii", header, compress=False)
    raw = tmp_path / "volume.raw"
    pixels = raw.read_bytes()
    raw.unlink()
    with pytest.raises(ImagingError, match=r"volume.mhd: its data file volume.raw \(ElementDataFile\) is missing"):
        read_volume(header)
    for size in (len(pixels) // 2, len(pixels) + data.dtype.itemsize):
        raw.write_bytes((pixels * 2)[:size])
        with pytest.raises(ImagingError, match=f"volume.raw holds {size} bytes of pixel data but DimSize "
                                               f"{' '.join(map(str, data.shape))} of MET_SHORT needs {len(pixels)}"):
            read_volume(header)


def test_damaged_compressed_metaimage_is_refused(nibabel_data, tmp_path):
    path = tmp_path / "volume.mha"
    data, _ = _nifti_as_metaimage(nibabel_data / "anatomical.nii", path, compress=True)
    whole = path.read_bytes()
    damaged = bytearray(whole)
    middle = len(whole) // 2
    damaged[middle : middle + 64] = bytes(64)
    path.write_bytes(bytes(damaged))
    # ITK reads it without an error, into wrong voxels: the reader must not.
    wrong = np.count_nonzero(sitk.GetArrayFromImage(sitk.ReadImage(str(path))) != data.T)
    assert wrong > 0
    with pytest.raises(ImagingError, match="damaged compressed pixel data"):
        read_volume(path)
    path.write_bytes(whole[:middle])
    with pytest.raises(ImagingError, match=r"compressed pixel data end early \(a truncated file\?\)"):
        read_volume(path)


def test_metaimage_vector_field_and_4d_are_refused_2d_is_one_slice(tmp_path):
    field = sitk.GetImageFromArray(np.zeros((2, 3, 4, 3), np.float32), isVector=True)
    sitk.WriteImage(field, str(tmp_path / "field.mha"))
    with pytest.raises(ImagingError, match="3 float32 components per voxel"):
        read_volume(tmp_path / "field.mha")
    frames = [sitk.GetImageFromArray(np.zeros((2, 3, 4), np.int16))] * 2
    sitk.WriteImage(sitk.JoinSeries(frames), str(tmp_path / "time.mha"))
    with pytest.raises(ImagingError, match="4D data"):
        read_volume(tmp_path / "time.mha")
    plane = np.arange(12, dtype=np.uint8).reshape(3, 4)
    image = sitk.GetImageFromArray(plane)
    image.SetSpacing((0.5, 0.7))
    image.SetOrigin((3.0, 4.0))
    sitk.WriteImage(image, str(tmp_path / "plane.mha"))
    vol = read_volume(tmp_path / "plane.mha")
    assert np.array_equal(vol.array[0], plane)
    assert np.allclose(vol.ijk_to_lps @ [plane.shape[1] - 1, plane.shape[0] - 1, 0, 1],
                       [3.0 + 0.5 * (plane.shape[1] - 1), 4.0 + 0.7 * (plane.shape[0] - 1), 0.0, 1.0])


def test_metaimage_with_malformed_geometry_fields_is_refused(nibabel_data, tmp_path):
    # MetaIO reads an Offset it cannot parse as (0, 0, 0) without a word (so does 3D Slicer): the volume sat at the
    # origin instead of where its header meant it.
    path = tmp_path / "volume.mha"
    data, _ = _nifti_as_metaimage(nibabel_data / "anatomical.nii", path, compress=False)
    header, _, pixels = path.read_bytes().partition(b"ElementDataFile = LOCAL\n")
    lines = header.decode().splitlines()
    offset = next(line for line in lines if line.startswith("Offset = "))
    dims = next(line for line in lines if line.startswith("DimSize = "))
    for old, new, said in (
        (offset, "Offset = nan " + " ".join(offset.split()[3:]), r"malformed Offset 'nan .*': 3 finite numbers"),
        (offset, offset.rsplit(" ", 1)[0], r"malformed Offset .*: 3 finite numbers expected"),
        (dims, dims.rsplit(" ", 1)[0], r"malformed NDims '3' or DimSize .*: DimSize must be NDims positive integers"),
    ):
        bad = tmp_path / "bad.mha"
        bad.write_bytes("\n".join(lines).replace(old, new).encode() + b"\nElementDataFile = LOCAL\n" + pixels)
        if old == offset and "nan" in new:
            assert sitk.ReadImage(str(bad)).GetOrigin() == (0.0, 0.0, 0.0)
        with pytest.raises(ImagingError, match=said):
            read_volume(bad)
    # Numbers written as text (BinaryData = False) have no byte count to check: read as ITK reads them.
    text = "\n".join(line.replace("BinaryData = True", "BinaryData = False") for line in lines)
    path.write_text(text + "\nElementDataFile = LOCAL\n" + " ".join(map(str, data.T.ravel())) + "\n")
    assert np.array_equal(read_volume(path).array, data.T)
