"""What the module remembers about the scene: the engine connection, each volume's upload id, answers and
suggestions, and which volume the running question is about. Dropped when the scene closes or a volume is removed.

Slicer restarts node ID numbering after File > Close scene, so the next volume may get the ID of the last one: state
keyed by ID alone would hand the old volume's suggestions, answers and engine id to the new one. Every entry keeps
the node it belongs to, is discarded when that node leaves the scene (NodeRemovedEvent), and everything is discarded
on StartCloseEvent / EndCloseEvent.

Main thread only (MRML); no Qt. The Slicer module's Logic is this class.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import vtk

from . import geometry, views
from .chat_panel import RegionLink, VolumeData, guess_modality
from .client import MedSIGHTClient, MedSIGHTError
from .dicom_seg import dicom_modality
from .protocol import SliceAnswer

__all__ = ["MedSIGHTSession", "volume_key"]


def volume_key(node) -> str:
    """Changes whenever the voxels or the geometry change, so an edited volume is uploaded again."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    elements = ",".join(repr(matrix.GetElement(r, c)) for r in range(3) for c in range(4))
    image = node.GetImageData()
    return f"{node.GetID()}|{image.GetMTime() if image is not None else 'empty'}|{elements}"


def _grid_of(node) -> geometry.Grid | tuple[np.ndarray, tuple[()]]:
    """The volume's voxel grid (``geometry.voxel_grid``); () counts without image data, so a question bound to a
    volume without voxels yet is told apart from one about voxels (a size change) instead of raising here."""
    if node.GetImageData() is None:
        return geometry.ijk_to_ras(node), ()
    return geometry.voxel_grid(node)


def _weak_callback(method: Callable[..., Any]) -> Callable[..., None]:
    """An observer callback that does not keep its session alive: scene -> observer -> session -> scene would be a
    cycle, and the garbage collector may break it at any moment, on any thread, while VTK objects are mid-use."""
    ref = weakref.WeakMethod(method)

    def callback(*args: Any) -> None:
        bound = ref()
        if bound is not None:
            bound(*args)

    return callback


@dataclass
class _VolumeState:
    node: Any
    upload_ids: dict[str, str] = field(default_factory=dict)
    manager: Any = None
    observers: list[int] = field(default_factory=list)  # on the volume node while it has a manager


class MedSIGHTSession:
    """State of the module for one scene.

    Args:
        scene: the vtkMRMLScene (``slicer.mrmlScene``).
        on_reset: called after the state was dropped (scene closed), e.g. to clear the conversation panel.
    """

    def __init__(self, scene, on_reset: Callable[[], None] | None = None) -> None:
        self.scene = scene
        self.client: MedSIGHTClient | None = None
        self.model_name = ""
        self.on_reset = on_reset
        self._volumes: dict[str, _VolumeState] = {}
        self._bound: Any = None  # the volume of the question being answered
        #: (IJK-to-RAS, (k, j, i) shape) of the bound volume as it was sent: the grid the engine computes its answers'
        #: slice-to-RAS on, whatever the user does to the volume's grid while they arrive
        self._bound_grid: tuple[np.ndarray, tuple[int, ...]] | None = None
        self._bound_digest = ""  # ``SuggestionManager.voxels_digest`` of the bound volume as it was sent
        #: () -> Slicer's DICOM database (``slicer.dicomDatabase``) or None: a volume loaded from DICOM is sent with
        #: its own Modality, so a CT that shows no air (cropped inside the body) still gets CT windowing.
        self.dicom_database: Callable[[], Any] = lambda: None
        #: (ask serial, plane, slice) -> (volume, slice-to-IJK, region index -> bbox) of the panel's streamed answers:
        #: where a region chip centres the views (on the region's voxels, wherever the volume's grid is moved later).
        #: No masks: a long session asks about thousands of slices.
        self._asked: dict[tuple[int, str, int], tuple[Any, Any, dict[int, Any]]] = {}
        self._observers: list[int] = []
        self.observe_scene()

    # -- scene life cycle -----------------------------------------------------------------------------------------
    def observe_scene(self) -> None:
        import slicer

        if self._observers:
            return
        scene_class = slicer.vtkMRMLScene
        self._observers = [
            self.scene.AddObserver(scene_class.StartCloseEvent, _weak_callback(self._scene_closing)),
            self.scene.AddObserver(scene_class.EndCloseEvent, _weak_callback(self._scene_closing)),
            self.scene.AddObserver(scene_class.NodeRemovedEvent, _weak_callback(self._node_removed)),
        ]

    def stop_observing(self) -> None:
        """Stop reacting to the scene and to its volumes (the module widget's cleanup). A developer Reload leaves
        this session alive (the old widget's hidden Qt widgets keep their connections to it): the volume observers
        it kept made its suggestion managers follow a moved volume too, so the preview moved twice."""
        for tag in self._observers:
            self.scene.RemoveObserver(tag)
        self._observers = []
        for state in self._volumes.values():
            for tag in state.observers:
                state.node.RemoveObserver(tag)
            state.observers = []
        # Nor does it hold the volumes any more (no scene close reaches it now): their voxels stayed in memory for the
        # rest of the Slicer session. Not forget(): the previews stay in the scene, for the reloaded widget to adopt.
        self._volumes.clear()
        self._bound = self._bound_grid = None
        self._asked.clear()

    def _scene_closing(self, *_: Any) -> None:
        self.reset()

    def _node_removed(self, *_: Any) -> None:
        # The removed node is not handed to a plain Python observer; a node no longer in the scene is the one.
        for node_id, state in list(self._volumes.items()):
            if state.node.GetScene() is not self.scene:
                self._drop(node_id)
        if self._bound is not None and self._bound.GetScene() is not self.scene:
            self._bound = self._bound_grid = None
        self._asked = {key: kept for key, kept in self._asked.items() if kept[0].GetScene() is self.scene}

    def _drop(self, node_id: str) -> None:
        state = self._volumes.pop(node_id, None)
        if state is None:
            return
        for tag in state.observers:
            state.node.RemoveObserver(tag)
        if state.manager is not None:
            state.manager.forget()

    def reset(self) -> None:
        """Forget every volume, answer, upload id and the bound question (scene closed)."""
        for node_id in list(self._volumes):
            self._drop(node_id)
        self._bound = self._bound_grid = None
        self._asked.clear()
        if self.on_reset is not None:
            self.on_reset()

    def _state(self, node) -> _VolumeState:
        """The state of ``node``; a fresh one if the ID was last used by another node."""
        state = self._volumes.get(node.GetID())
        if state is None or state.node is not node:
            if state is not None:
                self._drop(node.GetID())
            state = _VolumeState(node)
            self._volumes[node.GetID()] = state
        return state

    # -- connection -----------------------------------------------------------------------------------------------
    def connect(self, url: str, token: str | None = None, timeout: float = 600.0) -> MedSIGHTClient:
        """Talk to the engine at ``url`` from now on (raises ValueError for a malformed URL)."""
        self.client = MedSIGHTClient(url, token=token, timeout=timeout)
        for state in self._volumes.values():
            state.upload_ids.clear()  # volume ids belong to one engine
        return self.client

    # -- uploads --------------------------------------------------------------------------------------------------
    volume_key = staticmethod(volume_key)

    def remember_volume_id(self, key: str, volume_id: str) -> None:
        for state in self._volumes.values():
            if key.startswith(f"{state.node.GetID()}|") and key == volume_key(state.node):
                state.upload_ids[key] = volume_id

    def volume_source(self, node):
        """The engine's id for ``node`` if it has it, else what to upload. Raises ValueError for a volume the engine
        cannot take, e.g. one without voxels (``geometry.volume_upload_arrays``; the panel shows it in its error
        line)."""
        state = self._state(node)
        key = volume_key(node)
        if key in state.upload_ids:
            return state.upload_ids[key]
        array, spacing, origin, direction = geometry.volume_upload_arrays(node)
        modality = (node.GetAttribute("MedSIGHT.Modality") or dicom_modality(node, self.dicom_database())
                    or guess_modality(array))
        return VolumeData(array, spacing, origin, direction, modality, key=key)

    def forget_volume_id(self, volume_id: str) -> VolumeData | None:
        """The engine no longer has ``volume_id`` (it restarted, or evicted it): forget it, so no later question
        reuses it, and return the voxels to upload again (None when its volume left the scene). The chat panel's
        ``on_volume_unknown``."""
        holders = self._drop_volume_id(volume_id)
        if not holders:
            return None
        # The question was asked about the bound volume: its key must get the new id (others may share the voxels).
        node = self._bound if any(n is self._bound for n in holders) else holders[0]
        source = self.volume_source(node)
        if not isinstance(source, VolumeData):
            return None
        self._bound_grid = _grid_of(node)  # the question is asked again, about these voxels on this grid
        self._bound_digest = self._digest_of(node)
        return source

    def _drop_volume_id(self, volume_id: str) -> list[Any]:
        """Forget ``volume_id`` for every volume (identical voxels share one id); returns those still in the scene."""
        holders = []
        for state in list(self._volumes.values()):
            stale = [key for key, known in state.upload_ids.items() if known == volume_id]
            for key in stale:
                del state.upload_ids[key]
            if stale and state.node.GetScene() is self.scene:
                holders.append(state.node)
        return holders

    def upload(self, node) -> str:
        """Upload ``node`` now (blocking; for scripts and tests) and return its volume id."""
        source = self.volume_source(node)
        if isinstance(source, str):
            return source
        info = self.client.upload_volume(source.array, source.spacing, source.origin, source.direction,
                                         modality=source.modality)
        self._state(node).upload_ids[source.key] = info.volume_id
        return info.volume_id

    # -- binding a question to its volume -------------------------------------------------------------------------
    def bind(self, node) -> None:
        """The question about to be sent is about ``node``: its answers go there, whatever is selected later, and
        onto the voxels they were computed for, whatever is done to the volume's grid meanwhile."""
        self._bound = node
        self._bound_grid = None if node is None else _grid_of(node)
        self._bound_digest = "" if node is None else self._digest_of(node)

    def _digest_of(self, node) -> str:
        """The hash of ``node``'s voxel values (hashed again only once they change), "" without voxels."""
        image = node.GetImageData()
        if image is None or image.GetPointData().GetScalars() is None:
            return ""
        return self.suggestion_manager(node).voxels_digest()

    def answer_volume(self):
        """Where answers of the bound question go: the bound volume, or None if it left the scene meanwhile (its
        answers are then dropped). The module's review list takes streamed answers through this."""
        node = self._bound
        if node is None or node.GetScene() is not self.scene:
            return None
        return node

    # -- answers and suggestions ----------------------------------------------------------------------------------
    def suggestion_manager(self, node):
        from .suggestions import SuggestionManager

        state = self._state(node)
        if state.manager is None:
            import slicer

            state.manager = SuggestionManager(self.scene, node, model=self.model_name)
            # The suggestions move with the volume's voxels when its grid or transform changes, not only when the
            # list next looks at them (``SuggestionManager.existing_preview_node`` follows the volume).
            events = (vtk.vtkCommand.ModifiedEvent, slicer.vtkMRMLTransformableNode.TransformModifiedEvent)
            state.observers = [node.AddObserver(event, _weak_callback(self._volume_modified)) for event in events]
        return state.manager

    def _volume_modified(self, node, *_: Any) -> None:
        state = self._volumes.get(node.GetID())
        if state is not None and state.node is node and state.manager is not None and node.GetScene() is self.scene:
            state.manager.existing_preview_node()

    def apply_answers(self, node, answers: Sequence[SliceAnswer], question: str = "",
                      model: str | None = None) -> list[str]:
        """One question's answers: regions of the same finding on several slices become one 3D suggestion."""
        answers = [a for a in answers if a.regions]
        if not answers:
            return []
        return self.suggestion_manager(node).add_answers(answers, question=question, model=model or self.model_name)

    def take_answers(self, node, answers: Sequence[SliceAnswer], ask_serial: int, scope: str, question: str = "",
                     model: str | None = None) -> list[str]:
        """Slices' answers that streamed in together: each finding grows once for all (``review.take_answers``)."""
        from .review import take_answers

        placed = []
        for answer in answers:
            answer = self._on_current_grid(node, answer)
            slice_to_ijk = np.linalg.inv(geometry.ijk_to_ras(node)) @ answer.slice_to_ras
            self._asked[(ask_serial, answer.plane, answer.index)] = (
                node, slice_to_ijk, {r.index: r.bbox for r in answer.regions})
            placed.append(answer)
        return take_answers(self.suggestion_manager(node), placed, ask_serial, scope, question,
                            model=model or self.model_name)

    def _on_current_grid(self, node, answer: SliceAnswer) -> SliceAnswer:
        """``answer`` with its slice placed on ``node``'s grid as it is now, on the same voxels.

        The engine computed ``slice_to_ras`` on the grid that was sent; the user may have moved that grid since (a
        transform hardened into the volume, origin or spacing edited in the Volumes module). Voxel indices do not
        move with the grid, so the slice goes through the sent grid to voxels and the current grid back to RAS.
        Voxels replaced since (cropped, resampled in place, also to the same voxel counts, or their values changed in
        place) are refused: the indices name other voxels than the ones the engine saw (a suggestion made now would be
        taken as made on the new ones, and accepted there).
        """
        if node is not self._bound or self._bound_grid is None:
            return answer
        sent, shape = self._bound_grid
        now, now_shape = _grid_of(node)
        if now_shape != shape or (self._bound_digest and self._digest_of(node) != self._bound_digest):
            replaced = geometry.voxels_replaced(node.GetName(), shape, now_shape, "while the question ran",
                                                "when asked")
            raise geometry.GeometryError(f"{replaced}: answers about the old voxels are not placed on the new ones; "
                                         "ask again")
        if np.array_equal(now, sent):
            return answer
        return replace(answer, slice_to_ras=now @ np.linalg.inv(sent) @ np.asarray(answer.slice_to_ras, dtype=float))

    def ask(self, node, question: str, indices=None, options=None, plane: str = "axial", view=None):
        """Upload if needed, ask (blocking), add the regions as suggestions. ``view``: a view's slice node (or its
        4x4 SliceToRAS in the volume's frame) instead of plane and indices. Returns the ``AskResult``."""
        if view is not None and not isinstance(view, np.ndarray):
            view = views.view_in_volume_frame(view, node)
        indices = list(indices) if indices is not None else (0,)
        volume_id = self.upload(node)
        try:
            result = self.client.ask(volume_id, question, plane=plane, indices=indices, options=options, view=view)
        except MedSIGHTError as err:
            if err.code != "unknown_volume":
                raise
            # The engine restarted or evicted the volume: send it once more (a second refusal is raised), else the
            # cached id would be refused on every later ask too.
            self._drop_volume_id(volume_id)
            result = self.client.ask(self.upload(node), question, plane=plane, indices=indices, options=options,
                                     view=view)
        self.apply_answers(node, result.answers, question=question, model=result.model)
        return result

    def current_view(self, node, view_name: str = "Red") -> np.ndarray:
        """The 4x4 SliceToRAS of the view ``view_name``, in ``node``'s frame: what "Current slice" asks about."""
        slice_node = views.slice_node(self.scene, view_name)
        if slice_node is None:
            raise ValueError(f"there is no {view_name} slice view in this scene")
        return views.view_in_volume_frame(slice_node, node)

    def view_plane(self, node, view_name: str) -> str | None:
        """The plane slice ranges and the whole volume of ``node`` are asked along when the view ``view_name`` is the
        chosen one (None: no such view, or ``node`` is under a warping transform)."""
        try:
            return views.view_plane(self.current_view(node, view_name), geometry.ijk_to_ras(node))
        except ValueError:
            return None

    def slice_counts(self, node) -> dict[str, int]:
        """Slices per plane of ``node`` as the engine will count them ({} without image data): the chat panel's range
        boxes fit a newly chosen volume before its first question."""
        image = node.GetImageData()
        return {} if image is None else views.plane_slice_counts(geometry.ijk_to_ras(node), image.GetDimensions())

    def jump_to_region_link(self, link: RegionLink) -> bool:
        """Centre the slice views on the region a chip names (a ``chat_panel.RegionLink``): that question's answer
        about that slice and plane, on the volume it was asked about. False when it is gone (volume removed)."""
        node, slice_to_ijk, boxes = self._asked.get((link.serial, link.plane, link.slice), (None, None, {}))
        if node is None or node.GetScene() is not self.scene:
            return False
        return self._centre_on(node, geometry.ijk_to_ras(node) @ slice_to_ijk, boxes.get(link.index))

    def _centre_on(self, node, slice_to_ras, bbox) -> bool:
        if bbox is None or slice_to_ras is None:
            return False
        views.centre_views_on(self.scene, views.region_centre_ras(slice_to_ras, bbox), node)
        return True

    def accept_all(self, node) -> list[str]:
        """Accept every suggestion of ``node`` (nothing, and no new node, when there are none)."""
        state = self._state(node)
        if state.manager is None or not state.manager.suggestion_ids():
            return []
        return state.manager.accept()

    def user_segmentation(self, node, chosen=None):
        """The user's segmentation of ``node`` (None when nothing was accepted or drawn): found, never created.

        ``chosen``: the segmentation picked under "Accept into" (``Review.target``); it is the one returned while it
        is still a segmentation of ``node``, so Export writes the segments that were accepted, not the own one's.
        """
        from .suggestions import SuggestionManager

        state = self._state(node)
        manager = state.manager or SuggestionManager(self.scene, node, model=self.model_name)
        if chosen is not None and chosen in manager.target_nodes():
            return chosen
        return manager.find_user_node()
