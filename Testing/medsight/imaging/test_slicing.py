"""Slices along anatomical planes and their exact way back to voxels."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from medsight.imaging import (
    PLANES,
    ImagingError,
    Segment,
    SegmentationBuilder,
    Volume,
    extract_slice,
    iter_slices,
    read_volume,
    slice_at_ras,
    slice_count,
)
from medsight.imaging.slicing import check_sliceable, slice_planes

# RAS directions the image columns and rows should follow (radiological display).
EXPECT = {
    "axial": ((-1, 0, 0), (0, -1, 0)),
    "coronal": ((-1, 0, 0), (0, 0, -1)),
    "sagittal": ((0, -1, 0), (0, 0, -1)),
}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _oblique_volume(direction: np.ndarray) -> Volume:
    rng = np.random.default_rng(0)
    return Volume(
        rng.normal(size=(30, 34, 38)).astype(np.float32),
        spacing=(0.9, 1.2, 1.5),
        origin=(-20.0, 15.0, -30.0),
        direction=direction,
    )


DIRECTIONS = {
    "oblique": Rotation.from_euler("xyz", [25, -15, 35], degrees=True).as_matrix(),
    "oblique_left_handed": Rotation.from_euler("zyx", [-40, 20, 10], degrees=True).as_matrix()
    @ np.diag([1, -1, 1]),
    "sagittal_acquisition": np.array([[0.0, 0, 1], [1, 0, 0], [0, -1, 0]]),
}


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_sphere_through_every_plane_lands_on_its_voxels(name):
    vol = _oblique_volume(DIRECTIONS[name])
    k, j, i = np.mgrid[0:30, 0:34, 0:38]
    ijk1 = np.stack([i, j, k, np.ones_like(i)], -1).astype(float)
    centre = vol.ijk_to_ras @ [19, 17, 15, 1]
    truth = np.linalg.norm((ijk1 @ vol.ijk_to_ras.T)[..., :3] - centre[:3], axis=-1) < 11.0
    for plane in PLANES:
        # Mask computed from the slice's own pixel -> RAS matrix, independent of voxel indices.
        builder = SegmentationBuilder(vol)
        centre_slice = slice_at_ras(vol, plane, centre[:3])
        for slc in iter_slices(vol, plane):
            rows, cols = slc.shape
            y, x = np.mgrid[0:rows, 0:cols]
            pts = np.stack([x, y, np.zeros_like(x), np.ones_like(x)], -1) @ slc.slice_to_ras.T
            mask = np.linalg.norm(pts[..., :3] - centre[:3], axis=-1) < 11.0
            builder.add(slc, mask, Segment(1, "sphere"))
            if slc.index == centre_slice.index:
                one = SegmentationBuilder(vol)
                one.add(slc, mask, Segment(1, "sphere"))
                slab = np.zeros_like(truth)
                slc.paste(slab, np.ones(slc.shape, bool))
                assert _dice(one.build().labelmap == 1, truth & slab) == 1.0, (name, plane)
        assert _dice(builder.build().labelmap == 1, truth) == 1.0, (name, plane)
        # Pixels are exactly the voxels the mapping names, and the display follows the convention.
        ijk = centre_slice.voxel_indices()
        assert np.array_equal(centre_slice.pixels, vol.array[ijk[..., 2], ijk[..., 1], ijk[..., 0]])
        m = centre_slice.slice_to_ras
        col_dir, row_dir = m[:3, 0] / np.linalg.norm(m[:3, 0]), m[:3, 1] / np.linalg.norm(m[:3, 1])
        assert col_dir @ EXPECT[plane][0] > 0.5 and row_dir @ EXPECT[plane][1] > 0.5, (name, plane)
        assert centre_slice.oblique == (name != "sagittal_acquisition")


def test_axis_aligned_ct_axial_is_the_stored_image(ct_series):
    vol = read_volume(ct_series)
    s = extract_slice(vol, "axial", 2)
    assert np.array_equal(s.pixels, vol.array[2]) and not s.oblique
    assert s.pixel_spacing == (vol.spacing[0], vol.spacing[1]) and s.thickness == vol.spacing[2]
    assert slice_count(vol, "axial") == 5 and slice_count(vol, "coronal") == 16
    cor = extract_slice(vol, "coronal", 3)
    assert np.array_equal(cor.pixels, vol.array[::-1, 3, :])  # superior at the top


def test_mni_planes_are_anatomical(mni_t1):
    vol = read_volume(mni_t1, modality="MR")
    for plane in PLANES:
        s = extract_slice(vol, plane, slice_count(vol, plane) // 2)
        assert not s.oblique
        top, bottom = s.slice_to_ras @ [0, 0, 0, 1], s.slice_to_ras @ [0, s.shape[0] - 1, 0, 1]
        left, right = s.slice_to_ras @ [0, 0, 0, 1], s.slice_to_ras @ [s.shape[1] - 1, 0, 0, 1]
        if plane == "axial":
            assert top[1] > bottom[1] and left[0] > right[0]  # anterior up, patient right on the left
        else:
            assert top[2] > bottom[2]  # superior up
        t = np.zeros(vol.shape, np.uint8)
        s.paste(t, np.ones(s.shape, np.uint8))
        assert t.sum() == s.pixels.size


def test_slice_errors(ct_series):
    vol = read_volume(ct_series)
    with pytest.raises(ImagingError, match=r"axial slice 5 is outside 0\.\.4"):
        extract_slice(vol, "axial", 5)
    with pytest.raises(ImagingError, match="unknown plane 'oblique'"):
        extract_slice(vol, "oblique", 0)
    s = extract_slice(vol, "axial", 0)
    with pytest.raises(ImagingError, match="does not match the axial slice"):
        s.paste(np.zeros(vol.shape), np.zeros((3, 3)))


@pytest.mark.parametrize(("direction", "plane"), [(np.eye(3), "axial"),
                                                  (DIRECTIONS["sagittal_acquisition"], "sagittal")])
def test_a_2d_image_has_only_the_plane_it_lies_in(direction, plane):
    """Its other planes would be 1-voxel lines: refused by name, wherever slicing is asked for (CLI, engine, server)."""
    image = Volume(np.zeros((1, 12, 10), np.float32), direction=direction, source="scan.png")
    assert slice_planes(image) == (plane,)
    assert slice_count(image, plane) == 1 and extract_slice(image, plane, 0).shape in ((12, 10), (10, 12))
    for other in (p for p in PLANES if p != plane):
        expected = rf"scan\.png: this volume \(1 x 12 x 10 voxels\) is a single 2D image: only the {plane} plane"
        for call, args in ((slice_count, (image, other)), (extract_slice, (image, other, 0)),
                           (iter_slices, (image, other))):
            with pytest.raises(ImagingError, match=expected):
                list(call(*args)) if call is iter_slices else call(*args)


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_iter_slices_of_chosen_indices_are_extract_slices(name):
    """The engine prepares an ask's slices with `iter_slices(volume, plane, indices)` (the plane's layout worked out
    once): each is the slice `extract_slice` gives, in the order asked, and an index outside is refused alike."""
    vol = _oblique_volume(DIRECTIONS[name])
    for plane in PLANES:
        count = slice_count(vol, plane)
        indices = [count - 1, 0, count // 2]
        for got, index in zip(iter_slices(vol, plane, indices), indices, strict=True):
            want = extract_slice(vol, plane, index)
            assert (got.index, got.plane, got.layout) == (want.index, want.plane, want.layout)
            assert np.array_equal(got.pixels, want.pixels) and np.array_equal(got.slice_to_ras, want.slice_to_ras)
        with pytest.raises(ImagingError, match=rf"{plane} slice {count} is outside 0\.\.{count - 1}"):
            list(iter_slices(vol, plane, [0, count]))


def test_a_line_of_voxels_has_no_plane():
    line = Volume(np.zeros((1, 1, 10), np.float32))
    assert slice_planes(line) == ()
    with pytest.raises(ImagingError, match="no plane has slices"):
        check_sliceable(line)
    with pytest.raises(ImagingError, match=r"its axial slices would be 1 x 10 voxels"):
        slice_count(line, "axial")
    check_sliceable(Volume(np.zeros((1, 2, 2), np.float32)))  # a 2 x 2 image is enough
