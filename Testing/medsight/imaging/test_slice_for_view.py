"""slice_for_view: the engine picks plane and index from a viewer's slice-to-RAS, for any acquisition."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from medsight.imaging import PLANES, ImagingError, Volume, extract_slice, slice_count, slice_for_view


def _volume(direction_lps: np.ndarray) -> Volume:
    rng = np.random.default_rng(1)
    return Volume(rng.normal(size=(14, 17, 19)).astype(np.float32), spacing=(0.9, 1.3, 2.2),
                  origin=(-20.0, 15.0, -30.0), direction=direction_lps)


def _view_of(slice_to_ras: np.ndarray, shift_mm: float = 0.0, in_plane: tuple = (0.0, 0.0)) -> np.ndarray:
    """A viewer's matrix for the plane of an engine slice: unit columns, origin anywhere on the plane (+ a shift)."""
    view = np.eye(4)
    axes = slice_to_ras[:3, :3] / np.linalg.norm(slice_to_ras[:3, :3], axis=0)
    view[:3, :3] = axes
    view[:3, 3] = slice_to_ras[:3, 3] + axes[:, 0] * in_plane[0] + axes[:, 1] * in_plane[1] + axes[:, 2] * shift_mm
    return view


SAGITTAL_LPS = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # k runs left-right
OBLIQUE_LPS = Rotation.from_rotvec([0.25, -0.4, 0.3]).as_matrix()


@pytest.mark.parametrize("direction", [np.eye(3), SAGITTAL_LPS, OBLIQUE_LPS], ids=["axial", "sagittal", "oblique"])
def test_every_slice_is_found_from_its_own_plane(direction):
    volume = _volume(direction)
    for plane in PLANES:
        for index in range(slice_count(volume, plane)):
            expected = extract_slice(volume, plane, index)
            thickness = expected.thickness
            view = _view_of(expected.slice_to_ras, shift_mm=0.4 * thickness, in_plane=(33.0, -12.0))
            picked = slice_for_view(volume, view)
            assert (picked.plane, picked.index) == (plane, index)
            np.testing.assert_allclose(picked.slice_to_ras, expected.slice_to_ras)


def test_sagittal_acquisition_in_an_axial_view_answers_the_axial_slab():
    volume = _volume(SAGITTAL_LPS)
    view = np.eye(4)  # an axial view (normal +S) through S = origin + 5 rows
    k_to_s = extract_slice(volume, "axial", 5).slice_to_ras[2, 3]
    view[2, 3] = k_to_s
    picked = slice_for_view(volume, view)
    assert picked.plane == "axial" and picked.index == 5
    assert volume.size_ijk[picked.layout.normal_axis] != volume.size_ijk[2]  # not the array's k axis


def test_views_outside_or_malformed_are_refused():
    volume = _volume(np.eye(3))
    view = np.eye(4)
    view[2, 3] = 500.0
    with pytest.raises(ImagingError, match="outside"):
        slice_for_view(volume, view)
    with pytest.raises(ImagingError, match="4x4"):
        slice_for_view(volume, np.eye(3))
    flat = np.eye(4)
    flat[:3, 2] = 0.0
    with pytest.raises(ImagingError, match="normal"):
        slice_for_view(volume, flat)
    nan = np.eye(4)
    nan[0, 3] = np.nan
    with pytest.raises(ImagingError, match="finite"):
        slice_for_view(volume, nan)
    projective = np.eye(4)
    projective[3] = (0.0, 0.0, 0.5, 1.0)  # not an affine slice-to-RAS: its point would be read as if it were
    with pytest.raises(ImagingError, match="last row"):
        slice_for_view(volume, projective)


def test_a_view_infinitely_many_voxels_away_is_outside():
    """Before the fix a finite point whose voxel position overflowed (1e300 mm at a spacing of 1e-300 mm) raised
    OverflowError, which the engine's server answered with 500 internal_error."""
    volume = Volume(np.zeros((4, 6, 5), np.float32), spacing=(1e-300, 1e-300, 1e-300), origin=(0.0, 0.0, 0.0),
                    direction=np.eye(3))
    view = np.eye(4)
    view[2, 3] = 1e300
    with pytest.raises(ImagingError, match=rf"axial position inf is outside 0\.\.{volume.shape[0] - 1}"):
        slice_for_view(volume, view)
