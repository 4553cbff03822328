"""Suggested segments: the engine's regions shown in a preview, accepted into or rejected from the user's work.

The engine never writes into the user's segmentation. Its regions become *suggestions* in a separate preview
segmentation node; ``accept`` copies a suggestion into a segmentation of the same volume (default: the user's
one) as a new segment (renamed on a name clash, so nothing the user made is overwritten), or, only when asked with
``merge_into``, unites it with one named existing segment; ``reject`` drops it. All are undoable: each operation
keeps snapshots (cropped boolean masks) of only the segments it touched.

Invariant, checked by the tests: the user's own segments are never modified, except the one a merge names.
Accepted segments are added as their own labelmap layer (never merged into a shared layer), a merge rewrites
only the named segment (the segments it shares a layer with keep their voxels), and undoing an accept or a
merge touches the user's node only if what it wrote is still exactly there.

Multi-slice asks can stream in: ``add_streamed_answers`` grows one 3D suggestion per finding as the slices'
answers arrive, instead of waiting for the whole ask.

Main-thread only (MRML is not thread-safe); no Qt.
"""

from __future__ import annotations

import hashlib
import re
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from . import naming
from .geometry import (
    GeometryError,
    Grid,
    grid_holding,
    grid_within,
    grids_share_lattice,
    ijk_to_ras,
    labelmap_from_array,
    lattice_box,
    lattice_grid,
    mask_box,
    mask_on_grid,
    mask_to_ijk,
    nodes_by_class,
    reference_lattice,
    same_lattice,
    segment_array,
    shape_text,
    volume_shape,
    voxel_grid,
    voxels_replaced,
    vtk_matrix,
)
from .protocol import AskResult, SliceAnswer

__all__ = [
    "ALL",
    "TAG_CONFIDENCE",
    "TAG_LABEL",
    "TAG_MODEL",
    "TAG_QUESTION",
    "TAG_REGION_CODE",
    "TAG_SLICE",
    "TAG_VOLUME_DIGEST",
    "TAG_VOLUME_VOXELS",
    "SegmentRef",
    "SegmentSnapshot",
    "SuggestionError",
    "SuggestionManager",
    "get_tag",
    "is_same_segment",
    "mask_digest",
    "replace_segment_mask",
    "segment_ref",
    "volume_digest",
    "voxel_set_digest",
]

ALL = "all"
TAG_REGION_CODE = "MedSIGHT.RegionCode"
TAG_MODEL = "MedSIGHT.Model"
TAG_QUESTION = "MedSIGHT.Question"
TAG_CONFIDENCE = "MedSIGHT.Confidence"
TAG_SLICE = "MedSIGHT.Slice"
TAG_LABEL = "MedSIGHT.Label"
#: a suggestion's volume voxel counts when it was made ("512x512x300", i x j x k): saved with the scene, so a suggestion
#: reloaded from it is checked too once the volume's voxels are replaced by another size (``_made_on_other_voxels``)
TAG_VOLUME_VOXELS = "MedSIGHT.VolumeVoxels"
#: a hash of the volume's voxel values when the suggestion was made (``volume_digest``): a volume resampled in place to
#: the same voxel counts (other spacing, origin or directions) keeps its size, and the preview, which follows the
#: volume's grid by voxel index, would put the suggestion on other anatomy
TAG_VOLUME_DIGEST = "MedSIGHT.VolumeDigest"
PREVIEW_ATTRIBUTE = "MedSIGHT.Preview"
_ID_PREFIX = "MedSIGHT"


class SuggestionError(RuntimeError):
    """An accept, reject, undo or redo that cannot be done (unknown id, segment edited since, ...)."""


@dataclass(frozen=True)
class SegmentSnapshot:
    """Everything needed to re-create a segment: identity, look, tags and its voxels (cropped to their box).

    The voxels are the volume's unless ``lattice`` is set: a suggestion the user corrected on a finer (or turned)
    lattice in the Segment Editor keeps its voxels there, ``lattice`` mapping an (i, j, k) index of ``mask()`` to the
    volume's voxel index (``grid_of`` places them in a node).
    """

    segment_id: str
    name: str
    color: tuple[float, float, float]
    tags: dict[str, str]
    offset: tuple[int, int, int]
    crop: np.ndarray = field(repr=False)
    shape: tuple[int, int, int]
    lattice: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def from_mask(cls, segment_id: str, name: str, color, tags: dict[str, str], mask: np.ndarray,
                  lattice: np.ndarray | None = None) -> SegmentSnapshot:
        # Cropping to the bounding box keeps undo history small: a region is a sliver of a 512x512x300 volume.
        mask = np.asarray(mask, dtype=bool)
        box = mask_box(mask)
        if box is None:
            offset, crop = (0, 0, 0), np.zeros((0, 0, 0), dtype=bool)
        else:
            offset = box[0]
            crop = mask[tuple(slice(lo, hi) for lo, hi in zip(*box))].copy()
        return cls(segment_id, name, tuple(float(c) for c in color), dict(tags), offset, crop, tuple(mask.shape),
                   lattice)

    def mask(self) -> np.ndarray:
        """The full (k, j, i) boolean mask."""
        full = np.zeros(self.shape, dtype=bool)
        k, j, i = self.offset
        dk, dj, di = self.crop.shape
        full[k : k + dk, j : j + dj, i : i + di] = self.crop
        return full

    def digest(self) -> str:
        return mask_digest(self.mask())

    def grid_of(self, volume_node, node) -> Grid:
        """Where ``mask()``'s voxels lie in ``node``'s own frame (the volume's grid, or its own finer lattice)."""
        grid = voxel_grid(volume_node, node)
        return grid if self.lattice is None else (grid[0] @ self.lattice, self.shape)


def mask_digest(mask: np.ndarray) -> str:
    """A hash of a boolean mask's voxels (and shape), to detect edits."""
    mask = np.ascontiguousarray(mask, dtype=bool)
    return hashlib.sha1(repr(mask.shape).encode() + mask.tobytes()).hexdigest()


def _voxel_hashes(flat: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each flat voxel index (splitmix64's finaliser; numpy's uint64 arithmetic wraps)."""
    z = flat.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def voxel_set_digest(mask: np.ndarray | None, shape: tuple[int, ...] = (), added: np.ndarray | None = None,
                     digest: str = "") -> str:
    """A hash of a boolean mask's set voxels (and shape), to detect edits, that can be grown voxel by voxel.

    ``voxel_set_digest(mask)`` hashes a whole mask; ``voxel_set_digest(None, shape, added, digest)`` is the digest of
    the mask ``digest`` was taken of with the voxels ``added`` set ((n, 3) k, j, i indices, none of them set in it
    before). It is the count and the wrapping sum of the voxels' hashes: unlike ``mask_digest`` a streamed slice
    adds its voxels to it without the whole volume being read and hashed again.
    """
    if mask is not None:
        shape, flat, count, total = mask.shape, np.flatnonzero(mask), 0, 0
    else:
        text_shape, text_count, text_total = digest.split("/")
        if text_shape != shape_text(shape):
            raise ValueError(f"digest {digest!r} is not of a {shape_text(shape)} mask")
        flat = np.ravel_multi_index(tuple(np.asarray(added).T), shape) if len(added) else np.zeros(0, np.int64)
        count, total = int(text_count), int(text_total, 16)
    total = (total + int(np.sum(_voxel_hashes(flat), dtype=np.uint64))) % (1 << 64)
    return f"{shape_text(shape)}/{count + flat.size}/{total:016x}"


@dataclass
class _Item:
    suggestion: SegmentSnapshot
    before_id: str = ""  # the preview segment it stood before, to restore the list order on undo
    user_id: str = ""
    user_name: str = ""
    #: the grid the accept wrote the suggestion's voxels on, in the target's frame: undo compares the segment with
    #: them there, so moving the volume or a transform since (which moves no segment's own voxels) is no edit
    grid: Grid | None = None
    #: the voxels the accept wrote on ``grid`` when they are not the suggestion's own: moved onto the target's
    #: reference lattice (``_on_saved_lattice``)
    written: np.ndarray | None = field(default=None, repr=False)
    hidden: bool = False  # hidden in the views (Show/Hide) when it left the list: it comes back so on undo


@dataclass
class _Operation:
    kind: str  # "accept" or "reject"
    items: list[_Item]
    shape: tuple[int, int, int]  # the volume's (k, j, i) voxel counts when it was done
    digest: str = ""  # ``volume_digest`` of its voxels then
    target: object = None  # the segmentation node an accept wrote into
    merge_id: str = ""  # an accept that merged into this existing segment of ``target`` (else new segments)
    merge_segment: object = None  # ``segment_ref`` of that very segment: its id may name another one later
    merge_before: SegmentSnapshot | None = None  # the merge target before the merge, restored on undo
    merge_after: SegmentSnapshot | None = None  # the merge target right after it (undo refuses if edited since)
    merge_grid: Grid | None = None  # the grid the merge wrote on (``merge_after``'s grid)
    merge_before_grid: Grid | None = None  # ``merge_before``'s grid: the segment's own lattice, holding all of it


@dataclass
class _Group:
    """Regions that become one suggested segment."""

    label: str
    codes: list[str] = field(default_factory=list)
    slices: list[str] = field(default_factory=list)
    voxels: list[np.ndarray] = field(default_factory=list)
    weights: list[tuple[float, int]] = field(default_factory=list)


def _segment_ids(segmentation) -> list[str]:
    import vtk

    ids = vtk.vtkStringArray()
    segmentation.GetSegmentIDs(ids)
    return [ids.GetValue(n) for n in range(ids.GetNumberOfValues())]


#: Free-text tags. Slicer stores a segment's tags as "key:value|key:value|" without escaping, so a "|" or ":" in a
#: question would split it on reload; these are percent-encoded on write and decoded by ``get_tag``.
_TEXT_TAGS = (TAG_QUESTION, TAG_LABEL, TAG_MODEL)
_TAG_ESCAPES = (("%", "%25"), ("|", "%7C"), (":", "%3A"))


def encode_tag_value(text: str) -> str:
    for raw, escaped in _TAG_ESCAPES:
        text = text.replace(raw, escaped)
    return text


def decode_tag_value(text: str) -> str:
    for raw, escaped in reversed(_TAG_ESCAPES):
        text = text.replace(escaped, raw)
    return text


def get_tag(segment, name: str) -> str | None:
    """A segment tag's value, or None (the wrapped vtkSegment.GetTag fills an output argument)."""
    import vtk

    value = vtk.reference("")
    if not segment.GetTag(name, value):
        return None
    return decode_tag_value(str(value)) if name in _TEXT_TAGS else str(value)


def _segment_tags(segment) -> dict[str, str]:
    # vtkSegment's tag map is not listable from Python, so carry over the tags this module writes.
    known = [TAG_REGION_CODE, TAG_MODEL, TAG_QUESTION, TAG_CONFIDENCE, TAG_SLICE, TAG_LABEL, TAG_VOLUME_VOXELS,
             TAG_VOLUME_DIGEST, _terminology_tag()]
    tags = {key: get_tag(segment, key) for key in known}
    return {key: value for key, value in tags.items() if value is not None}


def volume_digest(volume_node) -> str:
    """A short hash of a volume's voxel values, type and counts (not its geometry: moving or re-spacing a volume in the
    Volumes module keeps its voxels, and suggestions follow them; resampling or cropping it in place replaces them)."""
    image = volume_node.GetImageData()
    scalars = None if image is None else image.GetPointData().GetScalars()
    if scalars is None:
        volume_shape(volume_node)  # a GeometryError naming the volume without image data
        raise GeometryError(f"volume {volume_node.GetName()!r} has no voxel values")
    from vtk.util import numpy_support

    values = np.ascontiguousarray(numpy_support.vtk_to_numpy(scalars))
    header = f"{values.dtype.str}|{image.GetDimensions()}|{scalars.GetNumberOfComponents()}".encode()
    digest = hashlib.blake2b(header, digest_size=8)
    digest.update(memoryview(values).cast("B"))  # no copy of a volume of hundreds of MB
    return digest.hexdigest()


def _terminology_tag() -> str:
    import slicer

    return slicer.vtkSegment.GetTerminologyEntryTagName()


class SuggestionManager:
    """Suggested segments for one volume, and their accept / reject / undo / redo.

    Args:
        scene: the vtkMRMLScene holding ``volume_node`` (``slicer.mrmlScene`` in the application).
        volume_node: the scalar volume the answers are about; it is the reference geometry of both the preview and
            the user's segmentation.
        model: default for the "MedSIGHT.Model" tag (e.g. the engine's model name and version).

    Example::

        manager = SuggestionManager(slicer.mrmlScene, volume_node, model="medsight-7b 0.1.0")
        ids = manager.add_result(result, question="Where is the liver?")
        manager.accept(ids[0]); manager.reject(ALL); manager.undo()
    """

    def __init__(self, scene, volume_node, model: str = "") -> None:
        self.scene = scene
        self.volume_node = volume_node
        self.model = model
        self.user_node = None  # the user's segmentation; found or created on the first accept
        self._undo: list[_Operation] = []
        self._redo: list[_Operation] = []
        #: stream key -> finding key -> (suggestion id, the finding's regions so far); see add_streamed_answers
        self._streams: dict[str, dict[str, tuple[str, _Group]]] = {}
        #: suggestion id -> digest of its voxels after a running question last grew it: a redo refused because the
        #: voxels changed since the undo then says they grew, not that the user edited them
        self._grown: dict[str, str] = {}
        #: suggestion id -> its labelmap (address, modification time) right after it was last grown: unchanged since,
        #: its voxels are still those ``_grown`` hashed, so the next growth adds to that digest instead of rehashing
        self._grown_layer: dict[str, tuple[str, int]] = {}
        self._issued = 0  # suggestions created so far (their ids count up)
        self._preview_node = None  # created with the first suggestion: looking must not add nodes to the scene
        self._volume_grid: np.ndarray | None = None  # the volume's IJKToRAS when the preview last followed it
        self._digest_of: tuple[str, int, str] = ("", -1, "")  # (image address, its MTime, its volume_digest)

    # -- nodes -------------------------------------------------------------------------------------------------
    def _create_preview_node(self):
        import slicer

        node = slicer.vtkMRMLSegmentationNode()
        node.SetName(f"{self.volume_node.GetName()} MedSIGHT suggestions")
        node.SetAttribute(PREVIEW_ATTRIBUTE, "1")
        # Saved with the scene (Slicer's default), so suggestions still under review, and corrections made to them in
        # the Segment Editor, come back with the scene (``existing_preview_node`` adopts the saved node).
        self.scene.AddNode(node)
        _follow_volume(node, self.volume_node)
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        if display is not None:
            display.SetOpacity(0.6)  # suggestions look tentative next to the user's segments
        return node

    @property
    def preview_node(self):
        """The preview segmentation node (re-created if the user deleted it from the scene).

        The user's segmentation is made first when there is none: Slicer's Segment Editor opens on the scene's first
        segmentation node, and the user's drawing belongs in their own segmentation, not among the suggestions.
        """
        if self.existing_preview_node() is None:
            if self.find_user_node() is None:
                self.user_segmentation_node()
            self._preview_node = self._create_preview_node()
            self._volume_grid = ijk_to_ras(self.volume_node)
        return self._preview_node

    def existing_preview_node(self):
        """The preview node if it is in the scene, else None (never creates it: looking must not add nodes).

        Suggestions are voxels of the volume, so the preview follows the volume's transform, also one set later.
        """
        if self._preview_node is None or self._preview_node.GetScene() is None:
            self._preview_node = self._saved_preview_node()
            if self._preview_node is None:
                return None
            self._volume_grid = ijk_to_ras(self.volume_node)
        self._follow_volume_moves(self._preview_node)
        return self._preview_node

    def _follow_volume_moves(self, preview) -> None:
        """Keep the suggestions on the volume's voxels when the volume is moved under a transform (the preview moves
        with it), its transform is hardened into its grid (the preview's is hardened too, so it stays put), or its
        grid is edited (origin, spacing or directions in the Volumes module: the preview's voxels move alike)."""
        grid = ijk_to_ras(self.volume_node)
        moved = self._volume_grid is not None and not np.allclose(grid, self._volume_grid, atol=1e-9)
        if preview.GetTransformNodeID() != self.volume_node.GetTransformNodeID():
            if moved:
                preview.HardenTransform()
            preview.SetAndObserveTransformNodeID(self.volume_node.GetTransformNodeID())
        elif moved:
            # Old voxel position -> new one, in the volume's own frame (the preview's too).
            preview.ApplyTransformMatrix(vtk_matrix(grid @ np.linalg.inv(self._volume_grid)))
        self._volume_grid = grid

    def _saved_preview_node(self):
        """This volume's preview as a reloaded scene holds it (the scene was saved with suggestions under review), or
        None; new suggestion ids then count on from the highest saved one."""
        import slicer

        role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
        # By ID: while the volume's NodeRemovedEvent runs (``forget``), the reference no longer resolves to it.
        volume_id = self.volume_node.GetID()
        for node in nodes_by_class(self.scene, "vtkMRMLSegmentationNode"):
            if node.GetAttribute(PREVIEW_ATTRIBUTE) == "1" and node.GetNodeReferenceID(role) == volume_id:
                numbers = [int(m.group(1)) for sid in _segment_ids(node.GetSegmentation())
                           if (m := re.fullmatch(rf"{_ID_PREFIX}_(\d+).*", sid))]
                self._issued = max([self._issued, *numbers])
                return node
        return None

    def forget(self) -> None:
        """Drop this manager's suggestions, nodes and history (its volume left the scene, or the scene closes).

        Segments the user drew in the preview (the Segment Editor can be pointed at it) are the user's, not
        suggestions: the preview then stays in the scene as an ordinary segmentation holding only those, named
        "<volume> segments drawn among suggestions", so they do not go with the suggestions.
        """
        preview = self._preview_node if self._preview_node is not None else self._saved_preview_node()
        if preview is not None and preview.GetScene() is not None:
            segmentation = preview.GetSegmentation()
            ids = _segment_ids(segmentation)
            if all(_is_suggestion_id(sid) for sid in ids):
                preview.GetScene().RemoveNode(preview)  # also a saved one no list has shown yet
            else:
                for segment_id in filter(_is_suggestion_id, ids):
                    segmentation.RemoveSegment(segment_id)
                preview.RemoveAttribute(PREVIEW_ATTRIBUTE)
                preview.SetName(preview.GetScene().GenerateUniqueName(
                    f"{self.volume_node.GetName()} segments drawn among suggestions"))
        self._preview_node = self.user_node = None
        self._undo.clear()
        self._redo.clear()
        self._grown.clear()
        self._grown_layer.clear()

    def find_user_node(self):
        """The user's segmentation of this volume, or None: a non-preview segmentation node referencing it,
        preferring one named "<volume> segmentation"."""
        if self.user_node is not None and self.user_node.GetScene() is not None:
            return self.user_node
        wanted = f"{self.volume_node.GetName()} segmentation"
        candidates = sorted(self._accept_candidates(), key=lambda node: node.GetName() != wanted)
        return candidates[0] if candidates else None

    def _accept_candidates(self) -> list:
        """The segmentations suggestions may go into: labelmap-based, not a preview, referencing this volume."""
        import slicer

        role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
        found = nodes_by_class(self.scene, "vtkMRMLSegmentationNode")
        return [node for node in found if node.GetAttribute(PREVIEW_ATTRIBUTE) != "1" and _holds_labelmaps(node)
                and node.GetNodeReference(role) is self.volume_node]

    def user_segmentation_node(self):
        """The user's segmentation of this volume, created (named "<volume> segmentation") if there is none."""
        import slicer

        node = self.find_user_node()
        if node is None:
            node = slicer.vtkMRMLSegmentationNode()
            node.SetName(f"{self.volume_node.GetName()} segmentation")
            self.scene.AddNode(node)
            _follow_volume(node, self.volume_node)
            node.CreateDefaultDisplayNodes()
        self.user_node = node
        return node

    # -- adding suggestions ------------------------------------------------------------------------------------
    def add_result(self, result: AskResult, question: str = "") -> list[str]:
        """All answers of an ask; the model tag comes from the result."""
        return self.add_answers(result.answers, question=question, model=result.model)

    def add_answer(self, answer: SliceAnswer, question: str = "", model: str | None = None) -> list[str]:
        """One slice's answer: each region with voxels becomes one suggested segment. Returns their ids."""
        groups = [self._group_of([(answer, region)]) for region in answer.regions]
        return self._add_groups(groups, question, model)

    def add_answers(self, answers: Sequence[SliceAnswer], question: str = "", model: str | None = None) -> list[str]:
        """Answers about several slices: regions with the same label become ONE 3D suggested segment.

        A single answer behaves as ``add_answer`` (two "lesion" regions on one slice stay two suggestions).
        """
        answers = list(answers)
        if len(answers) == 1:
            return self.add_answer(answers[0], question, model)
        by_label: dict[str, list] = {}
        for answer in answers:
            for region in answer.regions:
                key = naming.normalise_label(region.label) or (region.code or "region")
                by_label.setdefault(key, []).append((answer, region))
        return self._add_groups([self._group_of(pairs) for pairs in by_label.values()], question, model)

    def add_streamed_answers(
        self, answers: Sequence[SliceAnswer], stream: str, question: str = "", model: str | None = None
    ) -> list[str]:
        """Slices' answers of a multi-slice ask that is still running, as they arrived together (one request's
        slices; ``stream`` names the ask).

        Regions with the same label as an earlier slice of the same stream grow that suggestion (one 3D
        finding, as ``add_answers`` makes at the end); new labels become new suggestions. Returns the ids of the
        suggestions these answers added or grew. A suggestion the user already accepted or rejected is not grown:
        its later slices start a new suggestion. Each finding grows once, by the box around all the answers'
        voxels, not once a slice (each growth writes, and Slicer then shrinks, the segment: 16 slices of
        512 x 512 took 5.3 s one by one, 2.9 s together).
        """
        findings = self._streams.setdefault(stream, {})
        touched: list[str] = []
        current = set(self.suggestion_ids())
        by_key: dict[str, list] = {}
        for answer in answers:
            for region in answer.regions:
                part = self._group_of([(answer, region)])
                if len(part.voxels[0]):
                    key = naming.normalise_label(region.label) or (region.code or "region")
                    by_key.setdefault(key, []).append(part)
        for key, parts in by_key.items():
            known = findings.get(key)
            if known is not None and known[0] in current:
                segment_id, group = known
                for part in parts:
                    _merge_group(group, part)
                self._grow_suggestion(segment_id, group, np.concatenate([p.voxels[0] for p in parts]))
            else:
                group = parts[0]
                for part in parts[1:]:
                    _merge_group(group, part)
                ids = self._add_groups([group], question, model)
                if not ids:
                    continue
                segment_id = ids[0]
                current.add(segment_id)
            findings[key] = (segment_id, group)
            if segment_id not in touched:
                touched.append(segment_id)
        return touched

    def end_stream(self, stream: str) -> None:
        """The ask is over: its findings no longer grow."""
        self._streams.pop(stream, None)

    def _grow_suggestion(self, segment_id: str, group: _Group, voxels: np.ndarray) -> None:
        preview = self.preview_node
        volume_grid = voxel_grid(self.volume_node, preview)
        # Only the box around this slice's voxels (a slab of the volume) is built, read and written: growing through
        # the whole volume per streamed slice blocked Slicer's main thread 137 ms a slice on a 120 x 256 x 256 CT,
        # more on a larger one (benchmarks/slicer_answer_placement.py).
        first = voxels.min(axis=0)
        slab_grid = _box_grid(volume_grid, first, voxels.max(axis=0) + 1)
        added = np.zeros(slab_grid[1], dtype=bool)
        added[tuple((voxels - first).T)] = True
        # Grown on its own lattice, which a correction in the Segment Editor's oversampled geometry made finer than
        # the volume's voxels: rewritten on those, the correction's fine voxels were lost. On the volume's voxels
        # where that lattice cannot hold every new voxel (coarser or turned), and where its voxels are the volume's
        # (the usual case: checking it through the volume's whole grid cost every streamed slice seconds).
        grid = lattice_grid(preview, segment_id, added, slab_grid)
        if grid_within(grid, volume_grid) and not _shares_layer(preview, segment_id):
            self._merge_slab(segment_id, added, slab_grid, first)
        else:
            whole = mask_on_grid(added, slab_grid, volume_grid)
            if grid_within(grid, volume_grid):
                grid = volume_grid
            else:
                mask = segment_array(preview, segment_id, None, grid) | mask_on_grid(whole, volume_grid, grid)
                if np.any(whole & ~mask_on_grid(mask, grid, volume_grid)):
                    grid = volume_grid
            if grid is volume_grid:
                mask = self.suggestion_mask(segment_id) | whole
            replace_segment_mask(preview, segment_id, mask, self.volume_node, grid)
            grown = mask if grid is volume_grid else self.suggestion_mask(segment_id)
            self._grown[segment_id] = voxel_set_digest(grown)
        self._grown_layer[segment_id] = _layer_state(preview, segment_id)
        segment = self.suggestion(segment_id)
        segment.SetTag(TAG_REGION_CODE, ",".join(group.codes))
        segment.SetTag(TAG_SLICE, ";".join(group.slices))
        segment.SetTag(TAG_CONFIDENCE, f"{_weighted_confidence(group.weights):.4f}")

    def _merge_slab(self, segment_id: str, added: np.ndarray, slab_grid: Grid, first: np.ndarray) -> None:
        """Unite a suggestion on the volume's lattice with ``added`` (a mask on ``slab_grid``, a box of the volume's
        grid starting at voxel ``first``), writing that box only, and keep ``_grown``'s digest without reading the
        whole segment: the digest is a sum over voxels, so the voxels this slab adds are added to it. It is read
        whole again only when the segment's labelmap changed since the last growth (a user's edit, an undo)."""
        import slicer

        preview = self.preview_node
        before = segment_array(preview, segment_id, None, slab_grid)
        if self._grown_layer.get(segment_id) != _layer_state(preview, segment_id):
            self._grown[segment_id] = voxel_set_digest(self.suggestion_mask(segment_id))
        # On the volume's grid itself (only the slab's extent), not on a grid starting at the slab: Slicer would
        # re-origin the segment's labelmap onto the slab's grid with every write.
        box = (tuple(int(n) for n in first), tuple(int(n) for n in first + added.shape))
        labelmap = labelmap_from_array(added, self.volume_node, preview, box=box)
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        if not logic.SetBinaryLabelmapToSegment(labelmap, preview, segment_id, logic.MODE_MERGE_MAX):
            raise GeometryError(f"could not write segment {segment_id!r} of {preview.GetName()!r}")
        new = np.argwhere(added & ~before) + first
        self._grown[segment_id] = voxel_set_digest(None, self._shape(), new, self._grown[segment_id])

    def _group_of(self, pairs) -> _Group:
        """Map each region's mask onto the volume (raises GeometryError when an answer is off this grid)."""
        group = _Group(label=pairs[0][1].label)
        for answer, region in pairs:
            voxels = mask_to_ijk(answer.slice_to_ras, region.mask, self.volume_node)
            if region.code and region.code not in group.codes:
                group.codes.append(region.code)
            slice_name = f"{answer.plane}:{answer.index}"
            if slice_name not in group.slices:
                group.slices.append(slice_name)
            group.voxels.append(voxels)
            group.weights.append((float(region.probability), len(voxels)))
        return group

    def _add_groups(self, groups: Iterable[_Group], question: str, model: str | None) -> list[str]:
        shape = self._shape()
        ids = []
        for group in groups:
            mask = np.zeros(shape, dtype=bool)
            for voxels in group.voxels:
                mask[voxels[:, 0], voxels[:, 1], voxels[:, 2]] = True
            if not mask.any():
                continue  # an empty region has nothing to show or accept
            ids.append(self._add_suggestion(group, mask, question, self.model if model is None else model))
        return ids

    def _shape(self) -> tuple[int, int, int]:
        return volume_shape(self.volume_node)  # a volume without image data: an error naming it, not a traceback

    def voxels_digest(self) -> str:
        """``volume_digest`` of the volume's voxels, hashed again only once its image was replaced or modified (VTK's
        modification times count up across all objects, so a new image never has an old one's)."""
        image = self.volume_node.GetImageData()
        key = ("", -1) if image is None else (image.GetAddressAsString("vtkImageData"), int(image.GetMTime()))
        if key != self._digest_of[:2]:
            self._digest_of = (*key, volume_digest(self.volume_node))
        return self._digest_of[2]

    def _add_suggestion(self, group: _Group, mask: np.ndarray, question: str, model: str) -> str:
        fallback = ", ".join(group.codes) or "Region"
        name = naming.display_name(group.label, fallback=fallback)
        tags = {
            TAG_REGION_CODE: ",".join(group.codes),
            TAG_MODEL: model,
            TAG_QUESTION: question,
            TAG_CONFIDENCE: f"{_weighted_confidence(group.weights):.4f}",
            TAG_SLICE: ";".join(group.slices),
            TAG_LABEL: group.label,
            TAG_VOLUME_VOXELS: shape_text(mask.shape),
            TAG_VOLUME_DIGEST: self.voxels_digest(),
        }
        entry = naming.terminology_entry(group.label)
        if entry:
            tags[_terminology_tag()] = entry
        colour = naming.colour_for(group.label or fallback, avoid=self._colours_in_use())
        segmentation = self.preview_node.GetSegmentation()
        # Never reuse an id of this manager's history: an undone reject must find its id free.
        self._issued += 1
        segment_id = segmentation.GenerateUniqueSegmentID(f"{_ID_PREFIX}_{self._issued}")
        snapshot = SegmentSnapshot.from_mask(segment_id, name, colour, tags, mask)
        _add_segment(self.preview_node, snapshot, self.volume_node, mask=mask)
        return segment_id

    def _colours_in_use(self) -> list[tuple[float, float, float]]:
        segmentation = self.preview_node.GetSegmentation()
        return [tuple(segmentation.GetSegment(sid).GetColor()) for sid in _segment_ids(segmentation)]

    # -- queries -----------------------------------------------------------------------------------------------
    def suggestion_ids(self) -> list[str]:
        """Ids of the current suggestions, in display order: only the segments this manager put in the preview, so a
        segment the user drew there (the Segment Editor can be pointed at the preview) is never rejected or accepted
        with "all"."""
        preview = self.existing_preview_node()
        if preview is None:
            return []
        return [sid for sid in _segment_ids(preview.GetSegmentation()) if _is_suggestion_id(sid)]

    def suggestion(self, segment_id: str):
        """The preview vtkSegment of a suggestion."""
        preview = self.existing_preview_node()
        segment = None if preview is None else preview.GetSegmentation().GetSegment(segment_id)
        if segment is None or not _is_suggestion_id(segment_id):
            raise SuggestionError(f"no suggestion {segment_id!r}")
        return segment

    def suggestion_mask(self, segment_id: str) -> np.ndarray:
        """A suggestion's voxels as a boolean (k, j, i) array."""
        self.suggestion(segment_id)
        return segment_array(self.preview_node, segment_id, self.volume_node)

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    # -- accept / reject ---------------------------------------------------------------------------------------
    def _resolve(self, segment_ids) -> list[str]:
        current = self.suggestion_ids()
        if segment_ids == ALL or segment_ids is None:
            return current
        wanted = [segment_ids] if isinstance(segment_ids, str) else list(segment_ids)
        unknown = [sid for sid in wanted if sid not in current]
        if unknown:
            raise SuggestionError(f"no suggestion {', '.join(map(repr, unknown))}")
        return list(dict.fromkeys(wanted))

    def accept(self, segment_ids=ALL, target=None, merge_into: str | None = None) -> list[str]:
        """Move suggestions (an id, ids, or ALL) into a segmentation of this volume. Returns the segment ids there.

        Args:
            target: the segmentation node to accept into (default: the user's, created if there is none).
            merge_into: an existing segment of ``target`` to unite the suggestions with (its name, colour and
                tags stay); without it every suggestion becomes a new segment and no existing one is touched.
        """
        wanted = self._resolve(segment_ids)
        if not wanted:
            return []  # before the target: nothing to accept makes no (empty) segmentation
        stale = self._made_on_other_voxels(wanted)
        if stale:
            raise SuggestionError(stale)
        items = [self._snapshot_item(sid) for sid in wanted]
        erased = [repr(item.suggestion.name) for item in items if not item.suggestion.crop.any()]
        if erased:
            # Accepted, it would be an empty segment in the user's work (or a merge that adds nothing): refused before
            # the target, so nothing is made, and the whole selection stays in the list.
            its, it = ("its", "it") if len(erased) == 1 else ("their", "them")
            raise SuggestionError(f"nothing left to accept in {', '.join(erased)}: all {its} voxels were erased. "
                                  f"Reject {it}, or undo the erase in the Segment Editor")
        target = self._check_target(target, merge_into)
        operation = _Operation("accept", items, self._shape(), self.voxels_digest(), target=target,
                               merge_id=merge_into or "")
        self._do_accept(operation)
        self._push(operation)
        return [item.user_id for item in items]

    def _made_on_other_voxels(self, segment_ids: list[str]) -> str:
        """Why these suggestions cannot be accepted ("" when they can): the volume's voxels were replaced by another
        size since they were made. The preview followed the volume's grid by voxel index, which a crop that moves the
        grid's origin turns into another place: accepted, they would land beside what was found."""
        now = self._shape()
        # Without the tag (a scene saved before it was written) there is nothing to compare with.
        made_on = {sid: _shape_of(get_tag(self.suggestion(sid), TAG_VOLUME_VOXELS)) for sid in segment_ids}
        stale = [sid for sid, then in made_on.items() if then not in (None, now)]
        then = made_on[stale[0]] if stale else now
        if not stale:
            digest = self.voxels_digest()
            stale = [sid for sid in segment_ids
                     if get_tag(self.suggestion(sid), TAG_VOLUME_DIGEST) not in (None, digest)]
            if not stale:
                return ""
        names = ", ".join(repr(self.suggestion(sid).GetName()) for sid in stale)
        return (f"cannot accept {names}: {voxels_replaced(self.volume_node.GetName(), then, now)}, so the suggestion "
                "may no longer lie on what was found; reject it and ask again")

    def target_nodes(self) -> list:
        """Segmentation nodes a suggestion can be accepted into: every non-preview one referencing this volume,
        the user's own (``find_user_node``) first."""
        own = self.find_user_node()
        return sorted(self._accept_candidates(), key=lambda node: node is not own)

    def _check_target(self, target, merge_into: str | None):
        if target is None:
            target = self.user_segmentation_node()
        elif target.GetScene() is not self.scene or not target.IsA("vtkMRMLSegmentationNode"):
            raise SuggestionError("the chosen segmentation is not a segmentation node of this scene")
        elif target.GetAttribute(PREVIEW_ATTRIBUTE) == "1":
            raise SuggestionError("suggestions cannot be accepted into the suggestions' own preview")
        elif not _holds_labelmaps(target):
            raise SuggestionError(_surfaces_refusal(target))
        if merge_into and target.GetSegmentation().GetSegment(merge_into) is None:
            raise SuggestionError(f"no segment {merge_into!r} in {target.GetName()!r} to merge into")
        return target

    def reject(self, segment_ids=ALL) -> list[str]:
        """Drop suggestions (an id, ids, or ALL). Returns the dropped ids."""
        items = [self._snapshot_item(sid) for sid in self._resolve(segment_ids)]
        if not items:
            return []
        operation = _Operation("reject", items, self._shape(), self.voxels_digest())
        self._remove_suggestions(operation.items)
        self._push(operation)
        return [item.suggestion.segment_id for item in items]

    def _push(self, operation: _Operation) -> None:
        self._undo.append(operation)
        self._redo.clear()  # a new action forks history: the undone branch is gone, as in any editor

    def _snapshot_item(self, segment_id: str) -> _Item:
        self.suggestion(segment_id)  # a SuggestionError naming an unknown id
        ids = self.suggestion_ids()
        position = ids.index(segment_id)
        before = ids[position + 1] if position + 1 < len(ids) else ""
        display = self.preview_node.GetDisplayNode()
        hidden = display is not None and not display.GetSegmentVisibility(segment_id)
        return _Item(suggestion=self._suggestion_snapshot(segment_id), before_id=before, hidden=hidden)

    def _suggestion_snapshot(self, segment_id: str) -> SegmentSnapshot:
        """A suggestion as it is now: on the volume's voxels, or on its own lattice when the user corrected it finer
        than them (the Segment Editor's oversampled geometry), so an accept keeps every detail of the correction."""
        segment, preview = self.suggestion(segment_id), self.preview_node
        look = (segment_id, segment.GetName(), segment.GetColor(), _segment_tags(segment))
        mask = self.suggestion_mask(segment_id)
        volume_grid = voxel_grid(self.volume_node, preview)
        own = lattice_grid(preview, segment_id, mask, volume_grid)
        if own is volume_grid or grid_within(own, volume_grid):  # on the volume's voxels: the mask holds it all
            return SegmentSnapshot.from_mask(*look, mask)
        voxels = segment_array(preview, segment_id, None, own)
        if np.array_equal(voxels, mask_on_grid(mask, volume_grid, own)):
            return SegmentSnapshot.from_mask(*look, mask)
        return SegmentSnapshot.from_mask(*look, voxels, lattice=np.linalg.inv(volume_grid[0]) @ own[0])

    def _do_accept(self, operation: _Operation) -> None:
        user = operation.target
        if operation.merge_id:
            self._do_merge(operation)
            self._remove_suggestions(operation.items)
            return
        segmentation = user.GetSegmentation()
        # Where each goes, all before any is written: one that the target cannot hold refuses the whole accept.
        placed = [self._on_saved_lattice(user, repr(item.suggestion.name), item.suggestion.mask(),
                                         item.suggestion.grid_of(self.volume_node, user)) for item in operation.items]
        taken = {segmentation.GetSegment(sid).GetName().lower() for sid in _segment_ids(segmentation)}
        for item, (written, grid) in zip(operation.items, placed):
            name = _unique_name(item.suggestion.name, taken)
            taken.add(name.lower())
            # A redo gives the segment back its first id, so references to it (scripts, the list) stay valid.
            reuse = item.user_id and segmentation.GetSegment(item.user_id) is None
            user_id = item.user_id if reuse else segmentation.GenerateUniqueSegmentID(_ID_PREFIX)
            # The suggestion's grid size is the review's bookkeeping, not part of the user's segment.
            tags = {key: value for key, value in item.suggestion.tags.items()
                    if key not in (TAG_VOLUME_VOXELS, TAG_VOLUME_DIGEST)}
            _add_segment(user, replace(item.suggestion, tags=tags), self.volume_node, segment_id=user_id, name=name,
                         mask=written, grid=grid)
            if reuse:
                self._follow_remade_segment(user, user_id)
            item.user_id, item.user_name, item.grid, item.written = user_id, name, grid, written
        self._remove_suggestions(operation.items)

    def _on_saved_lattice(self, node, names: str, mask: np.ndarray, grid: Grid) -> tuple[np.ndarray | None, Grid]:
        """Where suggested voxels (``mask`` on ``grid``; ``names``: how a refusal names them) go into ``node``:
        ``(None, grid)``, as they are, while the volume's voxels lie on ``node``'s reference lattice (the usual case),
        else ``(voxels, lattice)`` on that lattice, where Slicer's save would put them anyway
        (``geometry.reference_lattice``), so what the accept shows is what is saved and reloaded. As the Segment
        Editor does: it edits a segmentation on its reference geometry whatever its source volume's geometry became,
        and never resamples the other segments.

        Refused (SuggestionError naming the numbers) unless the lattice holds the voxels exactly, read back on the
        volume's voxels they were reviewed on: a lattice coarser than them, or turned against them, would save another
        segment than the one shown."""
        reference = reference_lattice(node)
        if reference is None or grids_share_lattice((reference, ()), voxel_grid(self.volume_node, node)):
            return None, grid
        lattice = lattice_box(reference, mask, grid)
        written = mask_on_grid(mask, grid, lattice)
        back = mask_on_grid(written, lattice, grid)
        lost, gained = int(np.count_nonzero(mask & ~back)), int(np.count_nonzero(back & ~mask))
        if lost or gained:
            raise SuggestionError(self._lattice_refusal(node, names, int(np.count_nonzero(mask)), lost, gained,
                                                        reference))
        return written, lattice

    def _lattice_refusal(self, node, names: str, held: int, lost: int, gained: int, reference: np.ndarray) -> str:
        """Why ``names`` cannot go into ``node``: the lattice Slicer saves ``node`` on no longer lines up with the
        volume's voxels (``held`` of them suggested; it would lose ``lost`` and gain ``gained``)."""
        volume = self.volume_node.GetName()
        between = np.linalg.inv(voxel_grid(self.volume_node, node)[0]) @ reference
        sizes = np.linalg.norm(between[:3, :3], axis=0)
        if not np.allclose(np.abs(between[:3, :3]), np.diag(sizes), atol=1e-6):
            how = f"turned against the voxels of {volume!r} (a transform or their directions changed since)"
        elif np.any(sizes > 1 + 1e-6):
            how = f"coarser than the voxels of {volume!r} now (their spacing changed since, or it was set coarser)"
        else:
            how = f"off the voxels of {volume!r} now (their spacing or origin changed since)"
        change = " and ".join(part for part in (f"lose {lost} of its {held} voxels" if lost else "",
                                                f"gain {gained} it does not have" if gained else "") if part)
        fix = (f"Accept it into a segmentation made on {volume!r} as it is now, or give this one the geometry of "
               f"{volume!r} first (Segment Editor: Specify geometry)")
        if (node.GetTransformNodeID() != self.volume_node.GetTransformNodeID()
                and grids_share_lattice((reference, ()), (ijk_to_ras(self.volume_node), ()))):
            # Made on the volume where it lies in its own frame (e.g. before a registration moved the volume alone):
            # under the volume's transform it lines up again with none of its voxels resampled, which Specify
            # geometry would do to every segment of the user's.
            parent = self.volume_node.GetParentTransformNode()
            under = "no transform" if parent is None else f"the transform {parent.GetName()!r}"
            fix = (f"Either put {node.GetName()!r} under {under}, as {volume!r} is (Data module; its segments then "
                   f"move with the volume, none resampled), or {fix[0].lower()}{fix[1:]}")
        return (f"cannot accept {names} into {node.GetName()!r}: Slicer saves that segmentation on the grid it was "
                f"made on, which is {how}: there {names} would {change}. {fix}")

    def _follow_remade_segment(self, node, segment_id: str) -> None:
        """A redo made an undone accept's segment again under its first id, as a new segment object: the undone
        merges into it (redone after it) follow the new one, else their redo would be refused as if the user had
        deleted it. Only the accept's own undo removed the old one: an accept whose segment the user deleted or
        edited is not undone."""
        for later in self._redo:
            if later.merge_id == segment_id and later.target is node:
                later.merge_segment = segment_ref(node, segment_id)

    def _do_merge(self, operation: _Operation) -> None:
        node, merge_id = operation.target, operation.merge_id
        segment = node.GetSegmentation().GetSegment(merge_id)
        if segment is None:
            raise SuggestionError(f"the segment to merge into ({merge_id!r}) is gone from {node.GetName()!r}")
        volume_grid = voxel_grid(self.volume_node, node)
        before_grid = lattice_grid(node, merge_id, np.zeros(self._shape(), dtype=bool), volume_grid)  # its own box
        before = segment_array(node, merge_id, None, before_grid)
        # The suggestions on the volume's voxels as one mask, and any corrected finer than them on their own lattice.
        added = np.zeros(self._shape(), dtype=bool)
        parts = []
        for item in operation.items:
            if item.suggestion.lattice is None:
                added |= item.suggestion.mask()
            else:
                parts.append((item.suggestion.mask(), item.suggestion.grid_of(self.volume_node, node)))
        parts = [(before, before_grid), (added, volume_grid), *parts]
        lattices = [before_grid, volume_grid, *(grid for _, grid in parts[2:])]
        reference = reference_lattice(node)
        if reference is not None and not grids_share_lattice((reference, ()), volume_grid):
            # The volume's voxels left the lattice Slicer saves this segmentation on (``_on_saved_lattice``): merged
            # there, or refused where it cannot hold the suggested voxels exactly.
            names = ", ".join(repr(item.suggestion.name) for item in operation.items)
            for mask, mask_grid in parts[1:]:
                if mask.any():
                    self._on_saved_lattice(node, names, mask, mask_grid)
            lattices = [lattice_box(reference, *next((m, g) for m, g in parts[1:] if m.any()))]
        # Merged on the segment's own lattice (which may be finer than the volume's); where that would drop a voxel
        # of a suggestion (a coarser or turned lattice holds no voxel centre in it), on the volume's voxels, which
        # hold each coarse voxel; where a suggestion was corrected finer than those, on its own lattice. Each is grown
        # to hold everything, so the segment's part outside the volume's box stays too.
        dropped = []
        for lattice in lattices:
            grid = lattice
            for mask, mask_grid in parts:
                grid = grid_holding(grid, mask, mask_grid)
            merged = segment_array(node, merge_id, None, grid)
            for mask, mask_grid in parts[1:]:
                merged |= mask_on_grid(mask, mask_grid, grid)
            # The grid holds every part's box, so a part on its lattice goes there and back exactly: only the others
            # are sent back to check (each a resample through the whole grid).
            lost = [0 if grids_share_lattice(mask_grid, grid) else
                    int(np.count_nonzero(mask & ~mask_on_grid(merged, grid, mask_grid))) for mask, mask_grid in parts]
            if not any(lost):
                break
            if lattice is volume_grid or len(lattices) == 1:
                dropped = lost  # the refusal says what the volume's (or the saved) lattice would drop
        else:
            raise SuggestionError(self._merge_refusal(segment.GetName(), int(np.count_nonzero(before)), dropped,
                                                      len(lattices) == 1))
        # The segment as it was on its own lattice: undo gives back exactly its voxels, also after a coarse fallback.
        operation.merge_before = SegmentSnapshot.from_mask(
            merge_id, segment.GetName(), segment.GetColor(), _segment_tags(segment), before
        )
        operation.merge_before_grid = before_grid
        operation.merge_segment = segment_ref(node, merge_id)
        replace_segment_mask(node, merge_id, merged, self.volume_node, grid)
        operation.merge_after = SegmentSnapshot.from_mask(merge_id, segment.GetName(), segment.GetColor(), {}, merged)
        operation.merge_grid = grid
        for item in operation.items:
            item.user_id, item.user_name = merge_id, segment.GetName()

    @staticmethod
    def _merge_refusal(name: str, held: int, lost: list[int], saved: bool = False) -> str:
        """Why no lattice can hold a merge (``lost``: voxels it drops of the segment, then of each suggestion part;
        ``saved``: on the lattice its segmentation is saved on, the only one tried)."""
        what = f"{lost[0]} of its {held} voxels" if lost[0] else f"{sum(lost[1:])} of the suggested voxels"
        if saved:
            return (f"cannot merge into {name!r}: its voxels lie off the grid Slicer saves its segmentation on, and "
                    f"merging on that grid would lose {what}. Accept the suggestion as a new segment instead")
        return (f"cannot merge into {name!r}: its voxels lie on a lattice that does not line up with the volume's, "
                f"and merging on the volume's voxels would lose {what}. Accept the suggestion as a new segment "
                "instead (the Segment Editor's Logical operators can combine the two)")

    def _remove_suggestions(self, items: list[_Item]) -> None:
        segmentation = self.preview_node.GetSegmentation()
        for item in items:
            segmentation.RemoveSegment(item.suggestion.segment_id)

    def _restore_suggestions(self, items: list[_Item]) -> None:
        # Reverse order so that each item's "before" neighbour is back before it is needed.
        preview = self.preview_node
        display = preview.GetDisplayNode()
        for item in reversed(items):
            _add_segment(preview, item.suggestion, self.volume_node, before_id=item.before_id,
                         grid=item.suggestion.grid_of(self.volume_node, preview))
            if display is not None and item.hidden:
                display.SetSegmentVisibility(item.suggestion.segment_id, False)

    # -- undo / redo -------------------------------------------------------------------------------------------
    def undo(self) -> bool:
        """Revert the last accept or reject. False when there is nothing to undo.

        An accept whose segment the user deleted or edited since cannot be reverted without rewriting the user's
        work, and no step can be once the volume's voxels were replaced (another grid size, or resampled in place:
        its suggestions are voxels of the old grid). Its undo is refused with the reason (naming the segment) and the
        step leaves the history, the user's segments staying exactly as they are: the next undo goes on with the step
        before, instead of every later undo being refused by this one step.
        """
        if not self._undo:
            return False
        operation = self._undo[-1]
        changed = self._voxels_replaced(operation)
        if not changed and operation.kind == "accept":
            changed = self._accepted_changed(operation)
        if changed:
            self._undo.pop()
            after = "Undo again to undo the step before it." if self._undo else "Nothing before it to undo."
            raise SuggestionError(f"cannot undo {changed}. That step leaves the undo history; your segments "
                                  f"stay as they are. {after}")
        if operation.kind == "accept" and not operation.merge_id:
            segmentation = operation.target.GetSegmentation()
            for item in operation.items:
                # A name or colour the user gave the accepted segment is theirs: it goes back to the list with the
                # suggestion, and a redo brings it back. The name the accept gave ("Liver (2)" beside the user's
                # "Liver") is not: the row gets its own name back.
                segment = segmentation.GetSegment(item.user_id)
                name = item.suggestion.name if segment.GetName() == item.user_name else segment.GetName()
                item.suggestion = replace(_with_look_of(item.suggestion, segment), name=name)
        # The suggestions first: if they cannot come back, the accepted segments stay where they are.
        self._restore_suggestions(operation.items)
        if operation.kind == "accept" and operation.merge_id:
            replace_segment_mask(operation.target, operation.merge_id, operation.merge_before.mask(),
                                 self.volume_node, operation.merge_before_grid)
        elif operation.kind == "accept":
            for item in operation.items:
                operation.target.GetSegmentation().RemoveSegment(item.user_id)
        self._redo.append(self._undo.pop())
        return True

    def _voxels_replaced(self, operation: _Operation) -> str:
        """Why ``operation``'s suggestions cannot come back ("" when they can): the volume's voxel array has another
        size or other values than when they were made (cropped or resampled in place), so they name voxels it no
        longer has, or voxels now elsewhere in the body."""
        then, now = operation.shape, self._shape()
        if then == now and operation.digest in ("", self.voxels_digest()):
            return ""
        # The accepted segment's name (the user may have renamed it); a merge's or a reject's suggestions' own.
        plain_accept = operation.kind == "accept" and not operation.merge_id
        names = ", ".join(repr(item.user_name if plain_accept and item.user_name else item.suggestion.name)
                          for item in operation.items)
        verb = "rejecting" if operation.kind == "reject" else "accepting"
        return f"{verb} {names}: {voxels_replaced(self.volume_node.GetName(), then, now)}"

    def redo(self) -> bool:
        """Re-apply the last undone accept or reject. False when there is nothing to redo."""
        if not self._redo:
            return False
        operation = self._redo[-1]
        replaced = self._voxels_replaced(operation)
        if replaced:
            raise SuggestionError(f"cannot redo {replaced}; accept or reject them again")
        refused = self._target_refusal(operation)
        if refused:
            raise SuggestionError(refused)
        present = set(self.suggestion_ids())
        missing = [repr(i.suggestion.name) for i in operation.items if i.suggestion.segment_id not in present]
        if missing:
            which = f"suggestion {missing[0]} is" if len(missing) == 1 else f"suggestions {', '.join(missing)} are"
            raise SuggestionError(f"cannot redo: {which} no longer in the list (deleted from the suggestions' "
                                  "segmentation since)")
        # A suggestion corrected after the undo: redoing would accept (or drop) the voxels it had before, and the
        # correction would be lost with the preview segment. Compared on the suggestion's own lattice: a correction
        # finer than the volume's voxels counts too.
        preview = self.preview_node
        for item in operation.items:
            snapshot = item.suggestion
            if not _still_written(preview, snapshot.segment_id, snapshot.mask(), snapshot.grid_of(self.volume_node,
                                                                                                  preview)):
                digest = voxel_set_digest(self.suggestion_mask(snapshot.segment_id))
                grew = self._grown.get(item.suggestion.segment_id) == digest
                why = "grew with later slices of the running question" if grew else "was edited"
                raise SuggestionError(f"cannot redo: suggestion {item.suggestion.name!r} {why} since the undo; "
                                      "accept or reject it again")
        display = preview.GetDisplayNode()
        for item in operation.items:  # renamed, recoloured or shown/hidden since the undo: redone as it is now
            item.suggestion = _with_look_of(item.suggestion, self.suggestion(item.suggestion.segment_id))
            item.hidden = display is not None and not display.GetSegmentVisibility(item.suggestion.segment_id)
        if operation.kind == "accept":
            self._do_accept(operation)
        else:
            self._remove_suggestions(operation.items)
        self._undo.append(self._redo.pop())
        return True

    @staticmethod
    def _target_refusal(operation: _Operation) -> str:
        """Why an accept cannot be redone where it went ("" when it can): that segmentation was removed from the
        scene, keeps closed surfaces now, or lost the segment merged into. Never the user's own node instead: the user
        chose where it went, and a merge's segment id ("Segment_1") may name another segment there."""
        target = operation.target
        if operation.kind != "accept":
            return ""
        names = ", ".join(repr(item.suggestion.name) for item in operation.items)
        verb = "merging" if operation.merge_id else "accepting"
        if target.GetScene() is None:
            return (f"cannot redo {verb} {names}: the segmentation {target.GetName()!r} it went into was removed "
                    "since; accept them again from the list")
        if not _holds_labelmaps(target):
            return f"cannot redo: {_surfaces_refusal(target)}"
        if operation.merge_id and not is_same_segment(operation.merge_segment, target, operation.merge_id):
            return (f"cannot redo merging {names} into {operation.merge_before.name!r}: that segment was deleted from "
                    f"{target.GetName()!r} since; accept them again from the list")
        return ""

    def _accepted_changed(self, operation: _Operation) -> str:
        """Why undoing an accept would touch what the user changed since ("" when it would not): it deletes segments
        from the user's node (or puts a merged one back as it was), only if they are exactly what the accept wrote."""
        user = operation.target if operation.target is not None and operation.target.GetScene() is not None else None
        if user is None:
            names = ", ".join(repr(item.user_name) for item in operation.items)
            where = f" ({operation.target.GetName()!r})" if operation.target is not None else ""
            return f"accepting {names}: the segmentation it went into{where} was removed since"
        if operation.merge_id:
            name = operation.merge_before.name if operation.merge_before is not None else operation.merge_id
            if not is_same_segment(operation.merge_segment, user, operation.merge_id):
                return f"the merge into {name!r}: that segment was deleted since"
            if not _still_written(user, operation.merge_id, operation.merge_after.mask(), operation.merge_grid):
                return f"the merge into {name!r}: that segment was edited since"
            return ""
        for item in operation.items:
            segment = user.GetSegmentation().GetSegment(item.user_id)
            if segment is None:
                return f"accepting {item.user_name!r}: that segment was deleted since"
            written = item.suggestion.mask() if item.written is None else item.written
            if not _still_written(user, item.user_id, written, item.grid):
                return f"accepting {segment.GetName()!r}: that segment was edited since"
        return ""

    def clear(self) -> None:
        """Remove every suggestion without history (e.g. when the volume changes)."""
        preview = self.existing_preview_node()
        for segment_id in self.suggestion_ids():
            preview.GetSegmentation().RemoveSegment(segment_id)
        self._undo.clear()
        self._redo.clear()
        self._streams.clear()
        self._grown.clear()
        self._grown_layer.clear()


def _merge_group(group: _Group, part: _Group) -> None:
    """Add one slice's region (``part``) to a streamed finding's group."""
    for code in part.codes:
        if code not in group.codes:
            group.codes.append(code)
    for name in part.slices:
        if name not in group.slices:
            group.slices.append(name)
    group.voxels.extend(part.voxels)
    group.weights.extend(part.weights)


def _box_grid(grid: Grid, first, end) -> Grid:
    """``grid``'s voxels from (k, j, i) index ``first`` up to ``end`` (excluded), as a grid of their own."""
    matrix = grid[0].copy()
    matrix[:3, 3] += matrix[:3, :3] @ np.asarray(first[::-1], dtype=float)
    return matrix, tuple(int(e - f) for f, e in zip(first, end))


def _shares_layer(node, segment_id: str) -> bool:
    """Whether a segment shares its labelmap layer with other segments (told apart by label value)."""
    sharing: list[str] = []
    node.GetSegmentation().GetSegmentIDsSharingBinaryLabelmapRepresentation(segment_id, sharing, False)
    return bool(sharing)


def _layer_state(node, segment_id: str) -> tuple[str, int]:
    """A segment's labelmap object and its modification time: any write into it (a Segment Editor effect, an undo's
    new segment) changes one of them."""
    import slicer

    layer = node.GetSegmentation().GetSegment(segment_id).GetRepresentation(
        slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    return ("", -1) if layer is None else (layer.GetAddressAsString("vtkOrientedImageData"), int(layer.GetMTime()))


def replace_segment_mask(node, segment_id: str, mask: np.ndarray, volume_node, grid: Grid | None = None) -> None:
    """Set one segment's voxels to ``mask`` (k, j, i) without touching any other segment (on ``grid``, default the
    volume's grid where it is now).

    A segment may share its labelmap layer with others (the Segment Editor's default); Slicer's
    SetBinaryLabelmapToSegment then moves it out of that layer where the new voxels overlap a neighbour, so the
    neighbours keep theirs (checked by test_review with user segments in one shared layer). Written on another
    lattice than the layer's, it would resample the whole layer onto that one, and a neighbour on a turned lattice
    would lose voxels: the segment gets a layer of its own first.
    """
    import slicer

    segmentation = node.GetSegmentation()
    if segmentation.GetSegment(segment_id) is None:
        raise SuggestionError(f"no segment {segment_id!r} in {node.GetName()!r}")
    labelmap = labelmap_from_array(mask, volume_node, node, grid)
    sharing: list[str] = []
    segmentation.GetSegmentIDsSharingBinaryLabelmapRepresentation(segment_id, sharing, False)
    layer = segmentation.GetSegment(segment_id).GetRepresentation(
        slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    if sharing and layer is not None and not same_lattice(layer, labelmap):
        segmentation.SeparateSegmentLabelmap(segment_id)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(labelmap, node, segment_id, logic.MODE_REPLACE):
        raise GeometryError(f"could not write segment {segment_id!r} of {node.GetName()!r}")


class SegmentRef:
    """One segment of a node, the object and not its id (``segment_ref``), with how it looks (name, colour, tags)."""

    def __init__(self, segment) -> None:
        import vtk

        self._weak = vtk.vtkWeakReference()  # weak, so a deleted segment's voxels are not held
        self._look: tuple = ()
        self._observer = 0
        self._follow(segment)

    def __del__(self) -> None:
        self._stop_observing()

    def _stop_observing(self) -> None:
        """One observer per reference and segment: a reference dropped (a merge chosen again) leaves none behind."""
        held = self._weak.Get()
        if held is not None and self._observer:
            held.RemoveObserver(self._observer)
        self._observer = 0

    def _follow(self, segment) -> None:
        """Hold ``segment`` and keep its look as it is renamed or recoloured (a copy brought back later has those)."""
        import vtk

        self._stop_observing()
        self._weak.Set(segment)
        self._look = _look_of(segment)
        me = weakref.ref(self)  # the observer holds neither this reference nor the segment (it would never be freed)

        def changed(caller, _event) -> None:
            ref = me()
            if ref is not None and ref._weak.Get() is caller:
                ref._look = _look_of(caller)

        self._observer = segment.AddObserver(vtk.vtkCommand.ModifiedEvent, changed)

    def is_segment(self, segment) -> bool:
        """Whether ``segment`` is this one: the very object, or the copy the Segment Editor's Undo puts back under its
        id once it was deleted (vtkSegmentationHistory::RestoreState adds a new vtkSegment with the deleted one's
        name, colour and tags), which is followed from then on."""
        if segment is None:
            return False
        held = self._weak.Get()
        if held is None and _look_of(segment) == self._look:
            self._follow(segment)
            return True
        return held is segment


def _look_of(segment) -> tuple:
    return segment.GetName(), tuple(float(c) for c in segment.GetColor()), sorted(_segment_tags(segment).items())


def segment_ref(node, segment_id: str) -> SegmentRef:
    """A reference to the segment ``segment_id`` of ``node`` as it is now, the object and not its id: a segment
    deleted since and another one given its id (ids repeat: "MedSIGHT", "Segment_1" of older scenes) is not it, but
    the deleted one brought back by the Segment Editor's Undo is."""
    return SegmentRef(node.GetSegmentation().GetSegment(segment_id))


def is_same_segment(ref: SegmentRef | None, node, segment_id: str) -> bool:
    """Whether ``node``'s segment ``segment_id`` is still the one ``ref`` (``segment_ref``) was taken of."""
    return ref is not None and ref.is_segment(node.GetSegmentation().GetSegment(segment_id))


def _still_written(node, segment_id: str, written: np.ndarray, grid: Grid) -> bool:
    """Whether a segment holds exactly the voxels ``written`` on ``grid``, compared on the segment's own lattice: an
    edit anywhere counts, also one finer than ``grid``, and Slicer moving the segment onto another lattice unchanged
    (saving collapses a segmentation's layers onto the first one's) does not."""
    lattice = lattice_grid(node, segment_id, written, grid)
    return np.array_equal(segment_array(node, segment_id, None, lattice), mask_on_grid(written, grid, lattice))


def _shape_of(text: str | None) -> tuple[int, ...] | None:
    """The (k, j, i) voxel counts a ``TAG_VOLUME_VOXELS`` tag holds ("40x32x7"), or None (no tag, or not one)."""
    if text is None or not re.fullmatch(r"\d+(x\d+)*", text):
        return None
    return tuple(int(n) for n in reversed(text.split("x")))


def _surfaces_refusal(node) -> str:
    """Why nothing is accepted into ``node``, a segmentation kept as closed surfaces."""
    return (f"{node.GetName()!r} keeps its segments as closed surfaces, which would lose the accepted voxels: accept "
            "into another segmentation, or make Binary labelmap its source representation first (Segmentations "
            "module > Representations)")


def _is_suggestion_id(segment_id: str) -> bool:
    """Ids this module gives suggestions; a segment the user drew in the preview has another (Slicer's "Segment_1")."""
    return segment_id.startswith(f"{_ID_PREFIX}_")


def _holds_labelmaps(node) -> bool:
    """Whether a segmentation keeps its segments as binary labelmaps (its source representation), the only kind voxels
    can be written into: Slicer turns anything added to a surface-based one into surfaces."""
    import slicer

    labelmap = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    return node.GetSegmentation().GetSourceRepresentationName() == labelmap


def _follow_volume(segmentation_node, volume_node) -> None:
    """Same grid and same parent transform as the volume, so segments sit on its voxels wherever it is moved.

    The transform first: the grid is taken in the node's frame as it is then, and set before the transform it would
    be the volume's grid turned by that transform, a lattice Slicer's save would move every segment onto."""
    segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)


def _weighted_confidence(weights: list[tuple[float, int]]) -> float:
    """Mean probability over all voxels of the merged regions (a large region weighs more than a sliver)."""
    total = sum(n for _, n in weights)
    if total == 0:
        return float(np.mean([p for p, _ in weights])) if weights else 0.0
    return sum(p * n for p, n in weights) / total


def _with_look_of(snapshot: SegmentSnapshot, segment) -> SegmentSnapshot:
    """``snapshot`` with ``segment``'s current name, colour and terminology (the same voxels and other tags).

    The terminology goes with the name: Slicer's terminology picker sets both (and the colour), and an export codes
    the segment by it, so a "Right kidney" must not come back from an undo and redo coded as the suggestion was.
    """
    tags = {key: value for key, value in snapshot.tags.items() if key != _terminology_tag()}
    terminology = get_tag(segment, _terminology_tag())
    if terminology is not None:
        tags[_terminology_tag()] = terminology
    return replace(snapshot, name=segment.GetName(), color=tuple(float(c) for c in segment.GetColor()), tags=tags)


def _unique_name(name: str, taken: set[str]) -> str:
    """``name``, or "name (2)", "name (3)", ... whichever is not taken (case-insensitive)."""
    if name.lower() not in taken:
        return name
    n = 2
    while f"{name} ({n})".lower() in taken:
        n += 1
    return f"{name} ({n})"


def _add_segment(
    node,
    snapshot: SegmentSnapshot,
    volume_node,
    segment_id: str | None = None,
    name: str | None = None,
    mask: np.ndarray | None = None,
    before_id: str = "",
    grid: Grid | None = None,
) -> None:
    """Add a segment with its own labelmap layer (so no other segment's voxels are rewritten), holding only the box
    around its voxels (a few hundred suggestions of a large CT must not each hold the whole volume)."""
    import slicer

    segment = slicer.vtkSegment()
    segment.SetName(name or snapshot.name)
    segment.SetColor(*snapshot.color)
    for key, value in snapshot.tags.items():
        segment.SetTag(key, encode_tag_value(value) if key in _TEXT_TAGS else value)
    labelmap = labelmap_from_array(snapshot.mask() if mask is None else mask, volume_node, node, grid, crop=True)
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), labelmap)
    segmentation = node.GetSegmentation()
    if before_id and segmentation.GetSegment(before_id) is None:
        before_id = ""
    if not segmentation.AddSegment(segment, segment_id or snapshot.segment_id, before_id):
        raise GeometryError(f"could not add segment {segment.GetName()!r} to {node.GetName()!r}")
