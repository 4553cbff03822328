"""Acceptance (issue 18): "Current slice" in the Red, Yellow and Green views of a sagittally acquired and an oblique
MNI152 volume (slicer-core volume nodes, the oblique one under a rotating parent transform). The live engine (tiny
model) answers about the slice whose plane matches the view's plane within half a voxel."""

from __future__ import annotations

import gc

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from medsight_testing.mrml import make_volume, oblique_matrix  # noqa: E402
from MedSIGHTSlicerLib.geometry import _matrix_to_numpy, ijk_to_ras  # noqa: E402
from MedSIGHTSlicerLib.session import MedSIGHTSession  # noqa: E402
from MedSIGHTSlicerLib.views import VIEW_NAMES, parent_to_world, slice_node, view_plane  # noqa: E402

SHORT = {"max_new_tokens": 2, "seed": 0}
STEP = 3  # MNI152 at 2 mm, every 3rd voxel: 6 mm voxels keep the uploads small
ORIENTATIONS = {"Red": "Axial", "Yellow": "Sagittal", "Green": "Coronal"}
FRACTIONS = (0.2, 0.5, 0.8)  # positions of the view plane through the volume


@pytest.fixture(scope="module")
def mni_kji() -> np.ndarray:
    from nilearn.datasets import load_mni152_template

    data = np.asarray(load_mni152_template(resolution=2).get_fdata(), dtype=np.float32)  # (x, y, z) = (R, A, S)
    return data[::STEP, ::STEP, ::STEP]


def sagittal_volume(scene, data_xyz: np.ndarray):
    """Acquired sagittally: k runs left to right, i anterior to posterior, j superior to inferior."""
    array_kji = np.ascontiguousarray(data_xyz[:, ::-1, ::-1].transpose(0, 2, 1)).astype(np.int16)  # (R, S, A)
    spacing = 2.0 * STEP
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]) * spacing
    ijk_to_ras[:3, 3] = [-98.0, 90.0, 108.0]
    return make_volume(scene, array_kji, ijk_to_ras, name="sagittal T1")


def oblique_volume(scene, data_xyz: np.ndarray):
    """Tilted axes (oblique acquisition), under a parent transform that rotates and moves it."""
    array_kji = np.ascontiguousarray(data_xyz.transpose(2, 1, 0)).astype(np.int16)
    matrix = oblique_matrix()
    matrix[:3, :3] = matrix[:3, :3] / np.linalg.norm(matrix[:3, :3], axis=0) * 2.0 * STEP
    node = make_volume(scene, array_kji, matrix, name="oblique T1")
    transform = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(transform)
    motion = vtk.vtkTransform()
    motion.Translate(14.0, -9.0, 21.0)
    motion.RotateWXYZ(28.0, 0.4, 0.8, -0.3)
    transform.SetMatrixTransformToParent(motion.GetMatrix())
    node.SetAndObserveTransformNodeID(transform.GetID())
    return node


def add_views(scene) -> None:
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)  # what the application does at start-up
    for name in VIEW_NAMES:
        node = scene.AddNewNodeByClass("vtkMRMLSliceNode")  # gets the scene's default orientation presets
        node.SetName(name)
        node.SetLayoutName(name)
        node.SetDefaultOrientation(ORIENTATIONS[name])
        node.SetOrientation(ORIENTATIONS[name])
        node.SetDimensions(256, 256, 1)
        node.SetFieldOfView(250.0, 250.0, 1.0)


def world_point(node, fraction: float) -> np.ndarray:
    i, j, k = node.GetImageData().GetDimensions()
    ijk = np.array([(i - 1) * fraction, (j - 1) * (1 - fraction), (k - 1) * fraction, 1.0])
    return (parent_to_world(node) @ ijk_to_ras(node) @ ijk)[:3]


def mismatch(view, answer_slice_to_ras, node) -> tuple[float, float, float]:
    """(angle in degrees between the planes, distance of the view's plane point from the answered plane in mm,
    the answered slice's voxel thickness in mm), all in world coordinates."""
    to_world = parent_to_world(node)
    answered = to_world @ np.asarray(answer_slice_to_ras)
    normal = answered[:3, 2]
    thickness = float(np.linalg.norm(normal))
    normal = normal / thickness
    view_matrix = _matrix_to_numpy(view.GetSliceToRAS())
    view_normal = view_matrix[:3, 2] / np.linalg.norm(view_matrix[:3, 2])
    angle = float(np.degrees(np.arccos(min(1.0, abs(float(normal @ view_normal))))))
    distance = abs(float((view_matrix[:3, 3] - answered[:3, 3]) @ normal))
    return angle, distance, thickness


@pytest.mark.parametrize("kind", ["sagittal", "oblique"])
def test_current_slice_of_each_view_is_the_slice_answered(url, mni_kji, kind):
    scene = slicer.vtkMRMLScene()
    add_views(scene)
    node = (sagittal_volume if kind == "sagittal" else oblique_volume)(scene, mni_kji)
    session = MedSIGHTSession(scene)
    session.connect(url)
    try:
        check_views(scene, session, node, kind)
    finally:
        # MRML objects must be freed here, on the main thread: left to the garbage collector (scene -> observer ->
        # session -> scene is a cycle), they could be collected on the live server's worker thread.
        session.stop_observing()
        scene.Clear(1)
        gc.collect()


def check_views(scene, session, node, kind: str) -> None:
    seen = set()
    for name in VIEW_NAMES:
        view = slice_node(scene, name)
        if kind == "oblique":
            view.RotateToVolumePlane(node)  # Slicer's "rotate to volume plane": the view shows native slices
        for fraction in FRACTIONS:
            point = world_point(node, fraction)
            view.JumpSliceByOffsetting(*point)
            session.bind(node)
            result = session.ask(node, "What is shown?", options=SHORT,
                                 view=session.current_view(node, name))
            answer = result.answers[0]
            angle, distance, thickness = mismatch(view, answer.slice_to_ras, node)
            assert angle < 1e-3, (name, fraction, angle)
            assert distance <= thickness / 2 + 1e-6, (name, fraction, distance, thickness)
            seen.add((answer.plane, answer.index))
            # A slice range asked from this view goes along the plane the engine answered the view about.
            assert view_plane(session.current_view(node, name), ijk_to_ras(node)) == answer.plane
    assert len({plane for plane, _ in seen}) == 3  # Red, Yellow and Green each resolved to their own plane
    assert len(seen) == len(VIEW_NAMES) * len(FRACTIONS)
