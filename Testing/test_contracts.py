"""Copies that must stay apart agree: the Slicer module may not import the engine, so it keeps its own wire types,
RLE decoder and terminology code; these tests hold the two sides to one contract."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import numpy as np
import pytest

from medsight import naming as engine_naming
from medsight.imaging import labelmap
from medsight.model.generation import GenerationOptions
from medsight.server import convert, schemas
from medsight.server.rle import decode_mask as engine_decode
from medsight.server.rle import encode_mask
from MedSIGHTSlicerLib import naming, protocol
from MedSIGHTSlicerLib.rle import decode_mask as client_decode

# Client type -> the server schema it is read from.
WIRE_TYPES = [
    (protocol.ErrorInfo, schemas.ErrorBody),
    (protocol.Health, schemas.Health),
    (protocol.ModelCard, schemas.ModelCard),
    (protocol.VolumeInfo, schemas.VolumeInfo),
    (protocol.Region, schemas.RegionOut),
    (protocol.SliceAnswer, schemas.SliceAnswer),
    (protocol.AskResult, schemas.AskResponse),
    (protocol.CancelResult, schemas.CancelResponse),
]

# Fields that older engines do not send: the client reads them as optional (None), so it still works with those.
ADDED_LATER = {(protocol.Health, "max_upload_bytes"), (protocol.Health, "max_voxels"),
               (protocol.Health, "max_ask_body_bytes"), (protocol.VolumeInfo, "nan_filled")}

# A client annotation -> the JSON Schema type the server must send for it.
JSON_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "dict": "object",
              "tuple": "array", "list": "array", "np.ndarray": "array"}


def _json_types(prop: dict, defs: dict) -> set[str]:
    """The JSON types a schema property allows ("null" included), references resolved."""
    if "$ref" in prop:
        return _json_types(defs[prop["$ref"].split("/")[-1]], defs)
    if "anyOf" in prop:
        return set().union(*(_json_types(p, defs) for p in prop["anyOf"]))
    return {prop.get("type", "object")}


def _client_types(annotation: str) -> set[str]:
    types = set()
    for part in annotation.split("|"):
        part = part.strip()
        base = part.split("[")[0]
        types.add("null" if part == "None" else JSON_TYPES.get(base, "object"))
    return types


@pytest.mark.parametrize(("client", "server"), WIRE_TYPES, ids=lambda t: t.__name__)
def test_client_types_match_the_openapi_schema_field_by_field(client, server):
    schema = server.model_json_schema(ref_template="#/$defs/{model}")
    defs, props = schema.get("$defs", {}), schema["properties"]
    fields = {f.name: f for f in dataclasses.fields(client)}
    assert set(fields) == set(props), f"{client.__name__} fields vs {server.__name__} properties"
    hints = {f.name: str(f.type) for f in dataclasses.fields(client)}
    for name, prop in props.items():
        sent, read = _json_types(prop, defs), _client_types(hints[name])
        if name == "mask":  # the client decodes the RLE object into an array; null in streamed region events
            refs = [p.get("$ref", "") for p in prop.get("anyOf", [prop])]
            assert any(r.endswith("MaskRLE") for r in refs) and read == {"array", "null"}
            continue
        if (client, name) in ADDED_LATER:
            assert read == sent | {"null"} and fields[name].default is None, f"{client.__name__}.{name}"
            continue
        assert sent == read, f"{client.__name__}.{name}: server sends {sent}, client reads {read}"
    required = set(schema.get("required", []))
    for name, f in fields.items():
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            # The server serialises every field, but one the client cannot do without must not be optional.
            assert name in required or "null" in _client_types(hints[name]) or server is schemas.Health, name


def test_an_ask_the_client_sends_without_looking_the_limit_up_is_one_every_engine_reads():
    from MedSIGHTSlicerLib.client import ASK_BYTES_ALWAYS_READ

    assert schemas.max_ask_body_bytes(0) >= ASK_BYTES_ALWAYS_READ


def test_client_recognises_the_server_error_body_under_a_200():
    """A job that fails after its 200 sends an ErrorBody: the client must tell it from an answer, and only it."""
    body = schemas.ErrorBody(code="invalid_request", message="no").model_dump()
    assert protocol.ErrorInfo.in_reply(body) == protocol.ErrorInfo("invalid_request", "no")
    answer = {**body, **{name: None for name in schemas.AskResponse.model_fields}}
    assert protocol.ErrorInfo.in_reply(answer) is None


def test_server_rle_decodes_in_the_client():
    rng = np.random.default_rng(0)
    masks = [rng.random((7, 9)) > 0.5, np.ones((3, 4), bool), np.zeros((5, 2), bool), rng.random((1, 1)) > 0.5,
             rng.random((64, 80)) > 0.9]
    for mask in masks:
        rle = encode_mask(mask)
        assert np.array_equal(client_decode(rle), mask)
        assert np.array_equal(engine_decode(rle), mask)
    corrupt = {"shape": [3, 4], "counts": [0, 11]}
    for decode in (client_decode, engine_decode):
        with pytest.raises(ValueError, match="11"):
            decode(corrupt)


def test_api_defaults_are_the_engine_defaults():
    """An ask without options decodes exactly as `GenerationOptions()` (one default per setting)."""
    api = convert.generation_options(schemas.AskOptions())
    assert api == GenerationOptions()


def test_code_types_agree():
    engine_fields = [f.name for f in dataclasses.fields(engine_naming.Code)]
    client_fields = [f.name for f in dataclasses.fields(naming.Code)]
    assert engine_fields == client_fields
    tissue = engine_naming.TISSUE
    assert naming.Code(*dataclasses.astuple(tissue)).serialise() == f"{tissue.scheme}^{tissue.value}^{tissue.meaning}"


def test_wire_type_hints_resolve():
    """The client's annotations name real types (a typo would make the field-by-field check compare nothing)."""
    for client, _ in WIRE_TYPES:
        typing.get_type_hints(client, vars(protocol))


def test_one_list_of_planes():
    from medsight.imaging import PLANES

    assert protocol.PLANES == PLANES
    assert typing.get_args(schemas.Plane) == PLANES


def test_naming_is_one_implementation_in_two_places():
    """The engine's `medsight.naming` is the Slicer module's `naming.py` verbatim below the docstring: the CLI and
    the Slicer module group, name, colour and code the same answer the same way."""
    from pathlib import Path

    import medsight.naming

    def body(path: Path) -> str:
        text = path.read_text()
        return text[text.index('"""', 3) + 3 :]

    assert body(Path(medsight.naming.__file__)) == body(Path(naming.__file__))


def _engine_terminology(label: str, region: engine_naming.Code | None = None) -> engine_naming.Term:
    """The engine's terminology of a structure the Slicer module codes (laterality included)."""
    return dataclasses.replace(engine_naming.term_for(label), anatomic_region=region)


def test_terminology_strings_agree():
    """The engine's writers (`Term.entry`, as a segment's terminology) and the Slicer module write the same
    TerminologyEntry for a known structure, and each reads the other's back, anatomic region included."""
    region = engine_naming.Code("SCT", "818981001", "Abdomen")
    for label in ("liver", "white matter", "lesion", "left kidney", "Right lung"):
        engine = _engine_terminology(label)
        assert engine.entry() == naming.terminology_entry(label)
        assert engine_naming.Term.parse(naming.terminology_entry(label)) == engine
        with_region = _engine_terminology(label, region)
        module = naming.Term.parse(with_region.entry())
        assert module.anatomic_region == naming.Code(*dataclasses.astuple(region))
        assert module.entry() == with_region.entry()
    assert engine_naming.Term.parse(naming.terminology_entry("left kidney")).modifier.meaning == "Left"



def _segments() -> list[labelmap.Segment]:
    """A coded structure with region code and anatomic region, a lateral one, and an uncoded one."""
    return [labelmap.Segment(1, "Liver", (0.9, 0.3, 0.24), "[M0_1]",
                             _engine_terminology("liver", engine_naming.Code("SCT", "818981001", "Abdomen"))),
            labelmap.Segment(2, "Left kidney", (0.3, 0.75, 0.35), "[M0_4]", _engine_terminology("left kidney")),
            labelmap.Segment(3, "My region", (0.2, 0.5, 1.0))]


def _sidecar_segmentation() -> labelmap.Segmentation:
    """A small engine segmentation of `_segments`."""
    from medsight.imaging import Volume

    voxels = np.zeros((3, 4, 5), np.uint8)
    voxels[1, 1:3, 2:4], voxels[2, 0, 0], voxels[0, 3, 4] = 1, 3, 2
    volume = Volume(np.zeros(voxels.shape, np.int16), spacing=(0.5, 0.75, 3.0), origin=(10.0, -4.0, 2.0))
    return labelmap.Segmentation(volume, voxels, _segments())


def _module_labels(seg: labelmap.Segmentation) -> list[dict]:
    """The module's sidecar entries for the same segments, from what a Slicer segment holds (name, colour, the
    TerminologyEntry tag, the region-code tag)."""
    from MedSIGHTSlicerLib.nifti_sidecar import label_record

    return [label_record(s.label, s.name, s.color, s.terminology.entry(), s.region_code)
            for s in seg.segments]


def test_nifti_label_sidecars_are_one_format(tmp_path):
    """The module's NIfTI sidecar is the engine's: same document for the same segments, and the engine's reader
    gives identical names, values, colours, region codes and terminology codes from either side's file."""
    import json

    from medsight.imaging import read_nifti_labelmap, write_nifti_labelmap
    from MedSIGHTSlicerLib.nifti_sidecar import SIDECAR_FORMAT, sidecar, sidecar_path

    seg = _sidecar_segmentation()
    nii, engine_json = write_nifti_labelmap(seg, tmp_path / "engine.nii.gz")
    engine_doc = json.loads(Path(engine_json).read_text())
    assert sidecar_path(nii) == Path(engine_json) and sidecar_path(tmp_path / "x.nii") == tmp_path / "x.json"
    ref = seg.reference
    module_doc = sidecar(_module_labels(seg), ref.ijk_to_ras.tolist(), ref.modality, ref.series_uid, ref.study_uid,
                         ref.frame_of_reference_uid)
    assert module_doc["format"] == SIDECAR_FORMAT
    assert module_doc == engine_doc  # field by field, engine -> module direction included
    # The module's file read by the engine's reader (the labelmap voxels are the same file's).
    module_nii = tmp_path / "module.nii.gz"
    module_nii.write_bytes(Path(nii).read_bytes())
    sidecar_path(module_nii).write_text(json.dumps(module_doc, indent=2))
    back = read_nifti_labelmap(module_nii)
    assert back.segments == seg.segments == read_nifti_labelmap(nii).segments
    assert back.segments[1].terminology.modifier.meaning == "Left"
    assert np.array_equal(back.labelmap, seg.labelmap)


def _described(path: Path) -> list[dict]:
    """What a DICOM SEG says of each segment, as plain values."""
    import pydicom

    def code(item) -> tuple[str, str, str]:
        return (str(item.CodingSchemeDesignator), str(item.CodeValue), str(item.CodeMeaning))

    described = []
    for d in pydicom.dcmread(str(path)).SegmentSequence:
        kind = d.SegmentedPropertyTypeCodeSequence[0]
        described.append({
            "number": int(d.SegmentNumber),
            "label": str(d.SegmentLabel),
            "category": code(d.SegmentedPropertyCategoryCodeSequence[0]),
            "type": code(kind),
            "modifier": [code(m) for m in kind.get("SegmentedPropertyTypeModifierCodeSequence") or []],
            "anatomic_region": [code(r) for r in d.get("AnatomicRegionSequence") or []],
            "colour": [int(v) for v in d.RecommendedDisplayCIELabValue],
            "tracking_id": str(d.TrackingID) if "TrackingID" in d else None,
            "tracking_uid": "TrackingUID" in d,
            "algorithm": [str(a.AlgorithmName) for a in d.get("SegmentationAlgorithmIdentificationSequence") or []],
            "algorithm_type": str(d.SegmentAlgorithmType),
        })
    return described


def test_dicom_seg_writers_describe_segments_alike(tmp_path):
    """The engine's DICOM SEG writer (CLI) and the module's (`seg_writer`, from a Slicer segment's name, colour and
    tags) describe the same segments with the same codes, laterality, anatomic region, colour and tracking ID (none
    for a segment without a region code).
    They differ by design in one field: the engine's masks are the model's alone (AUTOMATIC); the module's were
    accepted or drawn by a person (SEMIAUTOMATIC or MANUAL), and a segment without a region code is the user's."""
    import pydicom
    import pydicom.data

    from medsight.imaging import read_dicom_seg, read_volume, write_dicom_seg
    from MedSIGHTSlicerLib.seg_writer import SegmentInfo, write_seg

    volume = read_volume(Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "98892001" / "CT5N")
    segments = _segments()
    masks = []
    for n in range(len(segments)):
        mask = np.zeros(volume.shape, bool)
        mask[n % volume.shape[0], n : n + 3, 2 * n : 2 * n + 4] = True
        masks.append(mask)
    seg = labelmap.Segmentation(volume, np.zeros(volume.shape, np.uint8), segments)
    for segment, mask in zip(segments, masks, strict=True):
        seg.labelmap[mask] = segment.label
    engine_path = write_dicom_seg(seg, tmp_path / "engine.dcm")
    # The module writes from the volume's own source images, in slice order, and its segments' tags.
    ordered = [pydicom.dcmread(f) for f in volume.source_files]
    infos = [SegmentInfo(s.name, s.color, s.terminology.entry() if s.terminology != engine_naming.UNCODED
                         else "", "MedSIGHT" if s.region_code else None, s.region_code) for s in segments]
    module_path = write_seg(ordered, masks, infos, tmp_path / "module.dcm")

    engine, module = _described(Path(engine_path)), _described(module_path)
    assert [e["algorithm_type"] for e in engine] == ["AUTOMATIC"] * len(segments)
    assert [m["algorithm_type"] for m in module] == ["SEMIAUTOMATIC", "SEMIAUTOMATIC", "MANUAL"]
    for e, m, segment in zip(engine, module, segments, strict=True):
        e.pop("algorithm_type"), m.pop("algorithm_type")
        if segment.region_code is None:  # the user's own segment: no algorithm on the module's side
            for d in (e, m):
                d.pop("algorithm")
        assert e == m, (segment.name, e, m)
    # A segment without a region code has no tracking ID in either (read back, the name is no region code).
    assert engine[2]["tracking_id"] is None and not engine[2]["tracking_uid"]
    assert [s.region_code for s in read_dicom_seg(engine_path).segments] == [s.region_code for s in segments]
    assert engine[1]["modifier"] == [("SCT", "7771000", "Left")]
    assert engine[0]["anatomic_region"] == [("SCT", "818981001", "Abdomen")]


def test_dicom_seg_writers_label_names_alike():
    """Both DICOM SEG writers turn a segment name into the same Segment Label (LO: one value, at most 64
    characters), also for names that break the plain rule: a backslash, over 64 characters, no name at all."""
    from medsight.imaging.export_dicom_seg import LO_MAX, UTF8
    from medsight.imaging.export_dicom_seg import segment_label as engine_label
    from MedSIGHTSlicerLib import seg_writer

    names = ["liver", "Leber Läsion 肝", "L\\R kidney", "lesion " * 12, ""]
    assert [engine_label(name, 3) for name in names] == [seg_writer.segment_label(name, 3) for name in names]
    assert (LO_MAX, UTF8) == (seg_writer.LO_MAX, seg_writer.UTF8)


def test_dicom_seg_writers_fill_and_refuse_the_same_source_attributes(tmp_path):
    """Both DICOM SEG writers give images of a de-identified series the same missing Type 2 attributes empty, and
    refuse images without the same UIDs a SEG must repeat (the engine reads them into a `Volume`, the module checks
    the datasets)."""
    import pydicom
    import pydicom.data

    from medsight.imaging import read_volume
    from medsight.imaging.export_dicom_seg import TYPE2_COPIED, reference_problem
    from MedSIGHTSlicerLib import seg_writer

    assert seg_writer.TYPE2_COPIED == TYPE2_COPIED
    ct = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
    for name in seg_writer.UIDS_REPEATED:
        folder = tmp_path / name
        folder.mkdir()
        for f in sorted(ct.iterdir()):
            ds = pydicom.dcmread(f)
            delattr(ds, name)
            ds.save_as(folder / f.name)
        assert name in (reference_problem(read_volume(folder)) or "")
        with pytest.raises(seg_writer.SegWriteError, match=name):
            seg_writer.order_sources([pydicom.dcmread(f) for f in sorted(folder.iterdir())], np.eye(4), (1, 1, 1))


def test_export_suffixes_agree():
    """The module's Export dispatch and the engine's suffix -> writer table accept exactly the same file endings,
    and the module's format combo box (the .ui file) has one entry per `EXPORT_FORMATS` row, naming its suffix."""
    import xml.etree.ElementTree as ET

    from medsight.imaging.export import WRITERS
    from MedSIGHTSlicerLib.export import EXPORT_FORMATS, EXPORT_SUFFIXES

    assert sorted(EXPORT_SUFFIXES) == sorted(suffix for suffix, _ in WRITERS)
    assert len(set(EXPORT_SUFFIXES)) == len(EXPORT_SUFFIXES)
    ui = Path(protocol.__file__).parents[1] / "Resources" / "UI" / "MedSIGHTSlicer.ui"
    combo = ET.parse(ui).getroot().find(".//widget[@name='exportFormatComboBox']")
    texts = [item.findtext("property/string") for item in combo.findall("item")]
    assert len(texts) == len(EXPORT_FORMATS)
    for text, (pattern, suffixes) in zip(texts, EXPORT_FORMATS, strict=True):
        assert suffixes[0] in text and all(f"*{s}" in pattern for s in suffixes), (text, pattern)


def _random_ijk_to_ras(rng: np.random.Generator) -> np.ndarray:
    """A voxel grid in any orientation (possibly left-handed), with spacings from 0.5 to 3 mm, anywhere near 0."""
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = rotation @ np.diag(rng.uniform(0.5, 3.0, 3))
    ijk_to_ras[:3, 3] = rng.uniform(-50, 50, 3)
    return ijk_to_ras


def test_both_sides_name_a_views_plane_alike():
    """A slice range goes along the plane the Slicer side names for the chosen view; the engine answers the view
    itself about the plane its ``slice_for_view`` picks. They must agree for any acquisition, also double-oblique ones
    (a cardiac short axis), where the anatomical plane nearest to the view's normal can be another."""
    from medsight.imaging.slicing import _PLANE_FRAMES, PLANES, slice_for_view
    from medsight.imaging.volume import volume_from_affine
    from MedSIGHTSlicerLib import views

    assert tuple(views.PLANE_NORMALS) == PLANES
    for plane in PLANES:
        np.testing.assert_array_equal(views.PLANE_NORMALS[plane], _PLANE_FRAMES[plane][0])
    rng = np.random.default_rng(0)
    other_than_nearest = 0
    for _ in range(400):
        ijk_to_ras = _random_ijk_to_ras(rng)
        shape = tuple(int(n) for n in rng.integers(4, 9, 3))  # (k, j, i)
        volume = volume_from_affine(np.zeros(shape, np.int16), np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_ras)
        frame, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        view = np.eye(4)
        view[:3, :3] = frame  # columns: the view's x, y and normal
        view[:3, 3] = (ijk_to_ras @ np.append((np.array(shape[::-1]) - 1) / 2.0, 1.0))[:3]  # the volume's centre
        engine_plane = slice_for_view(volume, view).plane
        assert views.view_plane(view, ijk_to_ras) == engine_plane
        nearest = max(PLANES, key=lambda p: abs(frame[:, 2] @ _PLANE_FRAMES[p][0]))
        other_than_nearest += nearest != engine_plane
    print(f"\n{other_than_nearest} of 400 views answered about another plane than the nearest anatomical one")
    assert other_than_nearest > 0  # the sample holds the views a "nearest anatomical plane" rule got wrong


def test_both_sides_count_a_volumes_slices_per_plane_alike():
    """The range boxes fit a newly chosen volume by the Slicer side's count of its slices per plane (before any
    question): it must be the engine's ``VolumeInfo.slices`` for any orientation, also for 2D images (one voxel thick),
    whose other planes the engine does not offer."""
    from medsight.imaging.slicing import slice_count, slice_planes
    from medsight.imaging.volume import volume_from_affine
    from MedSIGHTSlicerLib import views

    rng = np.random.default_rng(1)
    thin = 0
    for _ in range(300):
        ijk_to_ras = _random_ijk_to_ras(rng)
        shape = [int(n) for n in rng.integers(2, 9, 3)]  # (k, j, i)
        if rng.random() < 0.25:
            shape[int(rng.integers(3))] = 1
            thin += 1
        volume = volume_from_affine(np.zeros(shape, np.int16), np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_ras)
        engine_counts = {plane: slice_count(volume, plane) for plane in slice_planes(volume)}
        assert views.plane_slice_counts(ijk_to_ras, shape[::-1]) == engine_counts, (shape, ijk_to_ras)
    assert thin > 0


def _server_error_codes() -> set[tuple[int, str]]:
    """(status, code) pairs the engine's server code sends: each 4xx/5xx literal followed by a code literal, in a
    call (``ApiError(429, "busy", ...)``, ``_error(413, "too_large", ...)``) or a tuple (the guard's refusals)."""
    import ast
    import itertools

    import medsight.server

    pairs = set()
    for source in Path(medsight.server.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            items = node.args if isinstance(node, ast.Call) else node.elts if isinstance(node, ast.Tuple) else []
            for status, code in itertools.pairwise(items):
                if (isinstance(status, ast.Constant) and isinstance(status.value, int) and 400 <= status.value < 600
                        and isinstance(code, ast.Constant) and isinstance(code.value, str)):
                    pairs.add((status.value, code.value))
    return pairs


def test_the_error_codes_the_client_acts_on_are_the_engines():
    """Every engine error code the Slicer side acts on (hints, the wait on 429 busy) is sent by the engine with the
    status the Slicer side expects; every code the client has a hint for is one of those, or the client's own."""
    from MedSIGHTSlicerLib.client import ERROR_HINTS

    sent = _server_error_codes()
    assert {(429, "busy"), (413, "too_large"), (408, "body_timeout"), (401, "unauthorized")} <= sent  # the reader
    for code, statuses in protocol.ENGINE_ERRORS.items():
        for status in statuses:
            assert (status, code) in sent, f"the engine no longer sends {code!r} with HTTP {status}"
    client_codes = {"connection_error", "not_http", "timeout", "tls_error", "stream_truncated", "reply_truncated"}
    assert set(ERROR_HINTS) - client_codes <= set(protocol.ENGINE_ERRORS)


def test_one_list_of_message_roles():
    """The roles the client lets a message have are the ones the engine's request schema accepts."""
    assert typing.get_args(schemas.MessageIn.model_fields["role"].annotation) == protocol.ROLES


@pytest.mark.parametrize(("kwargs", "read"), [
    ({"indices": np.arange(2, 4), "stream": 1}, {"slices": {"plane": "axial", "indices": [2, 3]}, "stream": True}),
    ({"plane": "coronal", "indices": np.int64(5), "window": (40, 400)},
     {"slices": {"plane": "coronal", "indices": [5]}, "window": {"center": 40.0, "width": 400.0}}),
    ({"window": "lung", "options": {"max_new_tokens": 8, "temperature": 1, "seed": 0, "do_sample": True}},
     {"window": {"preset": "lung"}, "options": {"max_new_tokens": 8, "temperature": 1.0, "seed": 0,
                                                 "do_sample": True}}),
    ({"view": np.eye(4, dtype=np.float32)}, {"slices": {"view": np.eye(4).tolist()}}),
], ids=["numpy-indices", "pair-window", "preset-and-options", "view"])
def test_every_ask_the_client_builds_the_engine_reads_as_meant(kwargs, read):
    """The engine reads an ask's JSON types strictly (no "yes" for true, no 2.0 for 2): whatever the client accepts
    (numpy indices, a (center, width) pair, a float32 view) it must send with the types the engine takes."""
    import json

    body = json.dumps(protocol.build_ask_request("v" * 64, "Segment the liver.", **kwargs))
    req = schemas.AskRequest.model_validate_json(body)
    assert req.messages[0].content == "Segment the liver." and req.volume_id == "v" * 64
    for name, expected in read.items():
        got = getattr(req, name).model_dump(exclude_unset=True) if name != "stream" else req.stream
        assert got == expected, name


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "localhost", "0.0.0.0", "10.0.0.2", "::",
                                  "example.org", "localhost.example.org", "128.0.0.1"])
def test_both_sides_count_the_same_hosts_as_this_computer(host):
    """The engine asks for a token when it listens beyond this computer; the module asks for consent before sending
    images beyond it: one rule of which hosts are this computer."""
    from medsight.server.security import is_loopback
    from MedSIGHTSlicerLib.settings import is_loopback_url

    url = f"http://[{host}]:8765" if ":" in host else f"http://{host}:8765"
    assert is_loopback_url(url) == is_loopback(host)


@pytest.mark.parametrize("token", ["s3cret-token_~!", "with space", "pässwörd", "€uro", "tab\tinside", ""])
def test_both_sides_take_the_same_tokens(token):
    """The engine refuses to start with a token some client cannot send; the module refuses to send one: one rule."""
    from medsight.server.security import check_bind
    from MedSIGHTSlicerLib.client import MedSIGHTClient

    def taken(check) -> bool:
        try:
            check()
        except ValueError:
            return False
        return True

    assert taken(lambda: check_bind("127.0.0.1", token)) == taken(lambda: MedSIGHTClient(token=token))


def test_the_default_serve_command_serves_where_the_module_connects_by_default():
    """'Start local engine' runs DEFAULT_SERVE_COMMAND and then talks to DEFAULT_URL: the engine's own parser reads
    the command's host and port, and its defaults are the same address."""
    from urllib.parse import urlsplit

    from medsight.cli import _parser
    from MedSIGHTSlicerLib.client import DEFAULT_URL
    from MedSIGHTSlicerLib.engine_launch import DEFAULT_SERVE_COMMAND, split_command

    _, *arguments = split_command(DEFAULT_SERVE_COMMAND)
    given, defaults = _parser().parse_args(arguments), _parser().parse_args(["serve"])
    url = urlsplit(DEFAULT_URL)
    assert (given.host, given.port) == (defaults.host, defaults.port) == (url.hostname, url.port)
    assert given.model == defaults.model


@pytest.mark.parametrize("command", [
    "medsight serve", "medsight serve --port 9000", "medsight serve --port=9001 --model demo",
    "medsight serve --port 8000 --host 127.0.0.1 --port 9002",
    "medsight serve --po 9000", "medsight serve --por=9003 --model demo",  # argparse takes abbreviations
])
def test_the_port_the_module_reads_in_a_serve_command_is_the_engines(command):
    """`engine_launch.served_port` (which tells the user when the local engine's port is not the URL's) reads the
    port the engine's own parser does, its default included."""
    from medsight.cli import _parser
    from MedSIGHTSlicerLib.engine_launch import served_port, split_command

    _, *arguments = split_command(command)
    assert served_port(arguments) == _parser().parse_args(arguments).port


def test_a_serve_command_the_engine_refuses_serves_no_port(capsys):
    """"--p" abbreviates both --port and --perceiver-attention: the engine refuses it, so no port is read from it."""
    from medsight.cli import _parser
    from MedSIGHTSlicerLib.engine_launch import served_port

    arguments = ["serve", "--p", "9000"]
    with pytest.raises(SystemExit):
        _parser().parse_args(arguments)
    assert "ambiguous option: --p" in capsys.readouterr().err
    assert served_port(arguments) is None


def test_the_module_asks_the_engine_to_exit_with_slicer_as_the_engine_reads_it():
    """The module's variable turns on the engine's watch of its standard input, and the module's line, written there
    when it leaves the engine running after all, turns it off."""
    from medsight.server.parent_watch import EXIT_WITH_PARENT_VARIABLE, KEEP_RUNNING, exit_with_parent_wanted
    from MedSIGHTSlicerLib import engine_launch

    plan = engine_launch.launch_plan("medsight serve", {}, stop_on_exit=True)
    assert engine_launch.EXIT_WITH_PARENT_VARIABLE == EXIT_WITH_PARENT_VARIABLE
    assert exit_with_parent_wanted(False, plan.environment)
    assert engine_launch.KEEP_RUNNING_LINE.strip() == KEEP_RUNNING and engine_launch.KEEP_RUNNING_LINE.endswith(b"\n")


def test_every_array_the_client_uploads_the_engine_reads():
    """`protocol.npy_parts` (joined: `npy_bytes`) refuses what it cannot send before the upload; what it sends, the
    engine must take (a boolean array went over the wire to be refused there as 'unsupported array dtype bool')."""
    import io

    from medsight.imaging.errors import ImagingError
    from medsight.server.volume_store import array_from_npy, read_npy_header, volume_from_upload

    arrays = [np.zeros((4, 5, 6), dtype) for dtype in (bool, np.int8, np.int16, np.uint16, np.int32, np.float16,
                                                        np.float32, np.float64, np.complex64)]
    arrays += [np.zeros((5, 6), np.float32), np.zeros((5, 6, 3), np.uint8), np.zeros(5, np.float32),
               np.zeros((4, 5, 6, 3), np.uint8)]
    sent = 0
    for array in arrays:
        try:
            body = bytearray(protocol.npy_bytes(array))
        except ValueError:
            continue
        sent += 1
        try:
            header = read_npy_header(body, array.size)
            volume_from_upload(array_from_npy(header, body), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), "CT")
        except ImagingError as err:
            pytest.fail(f"the client sends {array.dtype} {array.shape}, the engine refuses it: {err}")
        assert np.array_equal(np.load(io.BytesIO(bytes(body))), array)
    assert sent == len(arrays) - 4  # bool, complex, 1D and the 4D colour volume (the module sends scalars) stay here


def test_both_sides_refuse_the_same_sheared_grids():
    """`geometry.volume_upload_arrays` refuses sheared voxel axes before the upload with the engine's tolerance: a
    grid it sends, the engine takes; one it refuses, the engine would refuse too."""
    slicer = pytest.importorskip("slicer")
    from medsight.imaging.errors import ImagingError
    from medsight.imaging.volume import check_geometry
    from medsight_testing.mrml import make_volume
    from MedSIGHTSlicerLib import geometry

    scene = slicer.vtkMRMLScene()
    for lean in (0.25, 4.0):  # times the tolerance
        matrix = np.eye(4)
        matrix[:3, 1] = [lean * geometry.DIRECTION_TOLERANCE, 1.0, 0.0]
        node = make_volume(scene, np.zeros((2, 3, 4), np.int16), matrix)
        try:
            _, spacing, origin, direction = geometry.volume_upload_arrays(node)
        except geometry.GeometryError:
            client_sends = False
            spacing, origin, direction = (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), matrix[:3, :3]
            direction = direction / np.linalg.norm(direction, axis=0)
        else:
            client_sends = True
        try:
            check_geometry(spacing, origin, np.reshape(direction, (3, 3)), "upload")
            engine_takes = True
        except ImagingError:
            engine_takes = False
        assert client_sends == engine_takes == (lean < 1.0), lean


def test_both_sides_refuse_the_same_non_finite_voxels():
    """`geometry.volume_upload_arrays` sends NaN voxels for the engine to fill (`fill_nan`, one rule for files and
    uploads) and refuses what the engine would refuse, before the upload: infinite voxels, or NaN only."""
    slicer = pytest.importorskip("slicer")
    from medsight.imaging.errors import ImagingError
    from medsight.server.volume_store import volume_from_upload
    from medsight_testing.mrml import make_volume
    from MedSIGHTSlicerLib import geometry

    scene = slicer.vtkMRMLScene()
    cases = {"finite": [], "some NaN": [np.nan], "NaN and inf": [np.nan, np.inf], "-inf": [-np.inf],
             "NaN only": None}
    decisions = {}
    for name, values in cases.items():
        voxels = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
        if values is None:
            voxels[:] = np.nan
        for n, value in enumerate(values or []):
            voxels.reshape(-1)[n * 5] = value
        node = make_volume(scene, voxels, np.eye(4), dtype=np.float32)
        try:
            geometry.volume_upload_arrays(node)
            client_sends = True
        except geometry.GeometryError:
            client_sends = False
        try:
            volume_from_upload(voxels, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), "MR")
            engine_takes = True
        except ImagingError:
            engine_takes = False
        decisions[name] = (client_sends, engine_takes)
    assert decisions == {"finite": (True, True), "some NaN": (True, True), "NaN and inf": (False, False),
                         "-inf": (False, False), "NaN only": (False, False)}


def test_the_engines_404_for_no_route_reads_as_a_wrong_address_and_its_own_404s_do_not():
    """The client names a 404 from no route (the engine URL's path is wrong) by the code the engine sends for it, and
    keeps the engine's own 404s (unknown_volume) as they are: a renamed code on either side would break one of them."""
    from fastapi.testclient import TestClient

    import medsight
    from medsight.server.app import create_app
    from MedSIGHTSlicerLib.client import _error_from_response, describe_error

    app = create_app(medsight.Engine.load("tiny", device="cpu"))
    with TestClient(app, base_url="http://127.0.0.1:8765") as engine:  # the guard takes only this computer's host
        no_route = engine.get("/medsight/v1/health")
        no_volume = engine.get(f"/v1/volumes/{'0' * 64}")
    assert (no_route.status_code, no_volume.status_code) == (404, 404)
    wrong_address = _error_from_response(404, no_route.content, "http://127.0.0.1:8765/medsight/v1/health")
    assert "check the engine URL" in describe_error(wrong_address)
    unknown = _error_from_response(404, no_volume.content, f"http://127.0.0.1:8765/v1/volumes/{'0' * 64}")
    assert unknown.code == "unknown_volume" and "engine URL" not in describe_error(unknown)
