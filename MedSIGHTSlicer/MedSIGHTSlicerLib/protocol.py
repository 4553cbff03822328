"""Typed views of the MedSIGHT engine's /v1 JSON messages, request builders and a server-sent-events parser.

The authoritative schema is the engine's ``medsight.server.schemas`` (also served as ``/openapi.json``). This
module mirrors it with plain dataclasses so that 3D Slicer's Python needs nothing beyond the standard library
and numpy. ``from_json`` constructors accept the decoded JSON dict and ignore keys they do not know, so a newer
engine that adds fields does not break an older client.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .rle import decode_mask

__all__ = [
    "ENGINE_ERRORS",
    "PLANES",
    "ROLES",
    "AskResult",
    "CancelResult",
    "ErrorInfo",
    "Health",
    "ModelCard",
    "Region",
    "SSEParser",
    "SliceAnswer",
    "StreamEvent",
    "VolumeInfo",
    "build_ask_request",
    "build_messages",
    "build_window",
    "npy_bytes",
    "npy_parts",
    "volume_query",
]

PLANES = ("axial", "coronal", "sagittal")
#: The engine's error codes this module acts on (the chat panel's hints, its wait on "busy"), with the HTTP statuses
#: the engine sends them with; a contract test checks the engine still sends each so.
ENGINE_ERRORS = {
    "unauthorized": (401,),
    "unknown_volume": (404, 422),
    "busy": (429,),  # uploads (upload memory or volume store held) and asks (queue full), with Retry-After
    "too_large": (413,),  # uploads over the engine's limit; asks over the largest valid ask
    "body_timeout": (408,),  # a request body that arrived too slowly
}
ROLES = ("user", "assistant", "system")


def _require(data: Any, name: str, *keys: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ValueError(f"{name}: expected a JSON object, got {type(data).__name__}")
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(f"{name}: response lacks {', '.join(missing)}")
    return data


# -- responses ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ErrorInfo:
    """The engine's error body: a machine-readable ``code`` and a ``message`` for people."""

    code: str
    message: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ErrorInfo:
        data = _require(data, "ErrorBody", "code", "message")
        return cls(code=str(data["code"]), message=str(data["message"]))

    @classmethod
    def in_reply(cls, data: Any) -> ErrorInfo | None:
        """The error a successful reply's body reports, if it is exactly an error body: a plain ask's status 200
        goes out before its job runs, so a job that fails sends ``{code, message}`` under that 200."""
        exact = isinstance(data, Mapping) and set(data) == {"code", "message"}
        if exact and isinstance(data["code"], str) and isinstance(data["message"], str):
            return cls(code=data["code"], message=data["message"])
        return None


@dataclass(frozen=True)
class Health:
    """GET /v1/health. ``max_upload_bytes`` and ``max_voxels``: the engine's upload limits; ``max_ask_body_bytes``:
    the largest ask it reads (None from engines that do not publish them)."""

    status: str
    version: str
    model: str
    device: str
    dtype: str
    max_upload_bytes: int | None = None
    max_voxels: int | None = None
    max_ask_body_bytes: int | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Health:
        data = _require(data, "Health", "version", "model", "device", "dtype")
        limits = {k: None if data.get(k) is None else int(data[k])
                  for k in ("max_upload_bytes", "max_voxels", "max_ask_body_bytes")}
        return cls(
            status=str(data.get("status", "ok")),
            version=str(data["version"]),
            model=str(data["model"]),
            device=str(data["device"]),
            dtype=str(data["dtype"]),
            **limits,
        )

    def upload_refusal(self, body_bytes: int, shape: Sequence[int]) -> str | None:
        """Why the engine would refuse an upload body of ``body_bytes`` (``npy_parts``) holding an array of
        ``shape`` with 413 too_large, as its own checks count (the body's length; the product of the shape), or
        None when it would take it or publishes no limits."""
        size = " x ".join(str(int(n)) for n in shape)
        if self.max_upload_bytes is not None and body_bytes > self.max_upload_bytes:
            return (f"the volume ({size}) is {body_bytes:,} bytes ({body_bytes / 2**20:.1f} MiB) to send, over the "
                    f"engine's upload limit of {self.max_upload_bytes:,} bytes ({self.max_upload_bytes / 2**20:.1f} "
                    "MiB, medsight serve --max-upload-mb)")
        voxels = math.prod(int(n) for n in shape)
        if self.max_voxels is not None and voxels > self.max_voxels:
            return f"the volume ({size}) has {voxels:,} voxels, over the engine's limit of {self.max_voxels:,}"
        return None

    def ask_refusal(self, body_bytes: int) -> str | None:
        """Why the engine would refuse an ask of ``body_bytes`` JSON bytes with 413 too_large, or None when it would
        read it or publishes no limit."""
        if self.max_ask_body_bytes is None or body_bytes <= self.max_ask_body_bytes:
            return None
        return (f"the question and conversation are {body_bytes:,} bytes to send, over the engine's limit of "
                f"{self.max_ask_body_bytes:,} bytes for an ask (the longest conversation its model's prompt can hold); "
                "shorten the conversation")


@dataclass(frozen=True)
class ModelCard:
    """GET /v1/model: what model the engine runs and how it was configured."""

    name: str
    version: str
    parameters: int
    image_size: int
    mask_size: int
    num_region_codes: int
    first_code_id: int
    random_weights: bool
    intended_use: str
    config: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelCard:
        keys = ("name", "version", "parameters", "image_size", "mask_size", "num_region_codes", "first_code_id")
        data = _require(data, "ModelCard", *keys, "random_weights", "intended_use")
        return cls(
            name=str(data["name"]),
            version=str(data["version"]),
            parameters=int(data["parameters"]),
            image_size=int(data["image_size"]),
            mask_size=int(data["mask_size"]),
            num_region_codes=int(data["num_region_codes"]),
            first_code_id=int(data["first_code_id"]),
            random_weights=bool(data["random_weights"]),
            intended_use=str(data["intended_use"]),
            config=dict(data.get("config") or {}),
        )


@dataclass(frozen=True)
class VolumeInfo:
    """An uploaded volume (or 2D image) as the engine holds it.

    Attributes:
        volume_id: SHA-256 of the voxels and geometry; the same upload always gets the same id.
        shape: (k, j, i) voxels, or (1, H, W) for a 2D image.
        slices: number of slices per plane, e.g. {"axial": 95, "coronal": 117, "sagittal": 99}; only the planes
            that can be asked about (a 2D image has just the plane it lies in, e.g. {"axial": 1}).
        bytes: memory the engine uses for it.
        nan_filled: the NaN voxels the engine read as the volume's smallest value, in words ("864 NaN voxels (of
            6912) read as the volume's minimum -5"), for the user to be told; None when there were none (or the
            engine predates it). The volume in Slicer keeps its NaN.
    """

    volume_id: str
    shape: tuple[int, ...]
    modality: str
    slices: dict[str, int]
    bytes: int
    nan_filled: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> VolumeInfo:
        data = _require(data, "VolumeInfo", "volume_id", "shape", "modality", "slices", "bytes")
        return cls(
            volume_id=str(data["volume_id"]),
            shape=tuple(int(s) for s in data["shape"]),
            modality=str(data["modality"]),
            slices={str(k): int(v) for k, v in dict(data["slices"]).items()},
            bytes=int(data["bytes"]),
            nan_filled=None if data.get("nan_filled") is None else str(data["nan_filled"]),
        )


@dataclass(frozen=True)
class Region:
    """One segmented region of a slice.

    Attributes:
        code: the region-code token that produced it (e.g. "[M3_17]"); None for the no-code fallback mask.
        label: the text the answer attached to the region.
        index: position of the region within its slice's answer.
        mask: boolean (rows, cols) array on the slice's pixel grid (row = j, col = i for axial slices); None in a
            streamed "region" event (the engine sends each mask once, with the slice's answer in "done").
        probability: the model's mean probability over the mask.
        bbox: (row0, col0, row1, col1), inclusive, in the slice grid; None for an empty mask.
    """

    code: str | None
    label: str
    index: int
    mask: np.ndarray | None = field(repr=False, compare=False)
    probability: float
    bbox: tuple[int, int, int, int] | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Region:
        data = _require(data, "Region", "label", "index", "probability")
        bbox = data.get("bbox")
        code = data.get("code")
        return cls(
            code=None if code is None else str(code),
            label=str(data["label"]),
            index=int(data["index"]),
            mask=None if data.get("mask") is None else decode_mask(data["mask"]),
            probability=float(data["probability"]),
            bbox=None if bbox is None else tuple(int(b) for b in bbox),
        )


@dataclass(frozen=True)
class SliceAnswer:
    """The answer about one slice.

    Attributes:
        plane, index: which slice (``index`` is the slice number along the plane's axis).
        slice_to_ras: 4x4 float array mapping (col, row, 0, 1) pixel coordinates to RAS millimetres; use it to
            place ``Region.mask`` in Slicer's world space.
        cancelled: generation stopped early because the job was cancelled.
    """

    plane: str
    index: int
    text: str
    regions: list[Region]
    slice_to_ras: np.ndarray = field(repr=False, compare=False)
    cancelled: bool = False

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SliceAnswer:
        data = _require(data, "SliceAnswer", "plane", "index", "text", "regions", "slice_to_ras")
        matrix = np.asarray(data["slice_to_ras"], dtype=np.float64)
        if matrix.shape != (4, 4):
            raise ValueError(f"SliceAnswer: slice_to_ras must be 4x4, got shape {matrix.shape}")
        return cls(
            plane=str(data["plane"]),
            index=int(data["index"]),
            text=str(data["text"]),
            regions=[Region.from_json(r) for r in data["regions"]],
            slice_to_ras=matrix,
            cancelled=bool(data.get("cancelled", False)),
        )


@dataclass(frozen=True)
class AskResult:
    """POST /v1/ask: one answer per requested slice, in request order, and per-stage timings in seconds."""

    job_id: str
    model: str
    answers: list[SliceAnswer]
    timings: dict[str, float]
    cancelled: bool = False

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AskResult:
        data = _require(data, "AskResponse", "job_id", "model", "answers")
        return cls(
            job_id=str(data["job_id"]),
            model=str(data["model"]),
            answers=[SliceAnswer.from_json(a) for a in data["answers"]],
            timings={str(k): float(v) for k, v in dict(data.get("timings") or {}).items()},
            cancelled=bool(data.get("cancelled", False)),
        )


@dataclass(frozen=True)
class CancelResult:
    """POST /v1/jobs/{job_id}/cancel. ``cancelled`` is False when the job had already finished."""

    job_id: str
    cancelled: bool

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CancelResult:
        data = _require(data, "CancelResponse", "job_id", "cancelled")
        return cls(job_id=str(data["job_id"]), cancelled=bool(data["cancelled"]))


@dataclass(frozen=True)
class StreamEvent:
    """One event of a streamed ask.

    ``kind`` is the SSE event name; the matching attribute is set:

    - "job": ``job_id`` (pass it to ``MedSIGHTClient.cancel``); ``plane`` and ``indices``: the slices the engine
      answers about (the ones it picked when the ask named a view; None from engines that do not say).
    - "token": ``slice`` (position in the request's indices) and ``text`` (the new text).
    - "region": ``slice`` and ``region``.
    - "done": ``result`` (the complete ``AskResult``); the stream ends.
    - "error": ``error`` (code and message); the stream ends.

    Events of kinds this client does not know keep only ``data`` (the decoded JSON).
    """

    kind: str
    data: Any = field(repr=False, default=None)
    job_id: str | None = None
    slice: int | None = None
    text: str | None = None
    region: Region | None = None
    result: AskResult | None = None
    error: ErrorInfo | None = None
    plane: str | None = None
    indices: list[int] | None = None

    @property
    def final(self) -> bool:
        """True for the last event of a stream ("done" or "error")."""
        return self.kind in ("done", "error")

    @classmethod
    def from_json(cls, kind: str, data: Any) -> StreamEvent:
        if kind == "job":
            data = _require(data, "job event", "job_id")
            indices = data.get("indices")
            return cls(kind, data, job_id=str(data["job_id"]), plane=data.get("plane"),
                       indices=None if indices is None else [int(i) for i in indices])
        if kind == "token":
            data = _require(data, "token event", "slice", "text")
            return cls(kind, data, slice=int(data["slice"]), text=str(data["text"]))
        if kind == "region":
            data = _require(data, "region event", "slice", "region")
            return cls(kind, data, slice=int(data["slice"]), region=Region.from_json(data["region"]))
        if kind == "done":
            result = AskResult.from_json(data)
            return cls(kind, data, job_id=result.job_id, result=result)
        if kind == "error":
            return cls(kind, data, error=ErrorInfo.from_json(data))
        return cls(kind, data)

    @classmethod
    def from_sse(cls, kind: str, payload: str) -> StreamEvent:
        """From an SSE event name and its (JSON) data text."""
        try:
            data = json.loads(payload) if payload else None
        except json.JSONDecodeError as err:
            raise ValueError(f"{kind} event: data is not JSON ({err.msg})") from None
        return cls.from_json(kind, data)


# -- server-sent events -------------------------------------------------------------------------------------------
class SSEParser:
    """Incremental parser for a ``text/event-stream`` body (the WHATWG "server-sent events" format).

    Feed it bytes as they arrive, in chunks of any size (a chunk may end mid-line or mid-UTF-8 character);
    ``feed`` returns the (event name, data text) pairs completed by that chunk. Handles LF, CRLF and CR line
    ends, ``:`` comment lines (keep-alives), multi-line ``data`` (joined with "\\n"), and ignores ``id`` and
    ``retry``. A block without data lines dispatches nothing; an event without a name is called "message".
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._event = ""
        self._data: list[str] = []
        self._first_line = True

    def feed(self, chunk: bytes) -> list[tuple[str, str]]:
        self._buffer += chunk
        events: list[tuple[str, str]] = []
        for line in self._lines(final=False):
            self._line(line, events)
        return events

    def close(self) -> list[tuple[str, str]]:
        """End of stream: an unterminated last line is processed; an event without its blank line is dropped."""
        events: list[tuple[str, str]] = []
        for line in self._lines(final=True):
            self._line(line, events)
        self._event, self._data = "", []
        return events

    def _lines(self, final: bool) -> Iterator[bytes]:
        buf = self._buffer
        start = 0
        n = len(buf)
        i = 0
        while i < n:
            b = buf[i]
            if b == 0x0A:  # LF
                yield bytes(buf[start:i])
                i += 1
                start = i
            elif b == 0x0D:  # CR or CRLF
                if i + 1 == n and not final:
                    break  # the LF of a CRLF may be in the next chunk
                yield bytes(buf[start:i])
                i += 2 if i + 1 < n and buf[i + 1] == 0x0A else 1
                start = i
            else:
                i += 1
        if final and start < n:
            yield bytes(buf[start:n])
            start = n
        del buf[:start]

    def _line(self, raw: bytes, events: list[tuple[str, str]]) -> None:
        line = raw.decode("utf-8", errors="replace")
        if self._first_line:
            self._first_line = False
            line = line.removeprefix("\ufeff")
        if not line:
            if self._data:
                events.append((self._event or "message", "\n".join(self._data)))
            self._event, self._data = "", []
            return
        if line.startswith(":"):
            return
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        # "id", "retry" and unknown fields are ignored.


# -- requests -----------------------------------------------------------------------------------------------------
def build_messages(messages: str | Iterable[Any]) -> list[dict[str, str]]:
    """A question, or a conversation of (role, content) pairs or {"role", "content"} dicts -> JSON messages."""
    if isinstance(messages, str):
        items: list[Any] = [("user", messages)]
    else:
        items = list(messages)
    if not items:
        raise ValueError("messages is empty; give a question or a list of (role, content) pairs")
    out = []
    for item in items:
        if isinstance(item, Mapping):
            role, content = item.get("role"), item.get("content")
        elif isinstance(item, Sequence) and not isinstance(item, (str, bytes)) and len(item) == 2:
            role, content = item
        else:
            raise ValueError(f"a message is a (role, content) pair or a dict, got {item!r}")
        if role not in ROLES:
            raise ValueError(f"message role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"message content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def build_window(window: Any) -> dict[str, Any] | None:
    """None, a preset name ("abdomen", "lung", "auto", ...), a (center, width) pair, or a dict -> JSON window."""
    if window is None:
        return None
    if isinstance(window, str):
        return {"preset": window}
    if isinstance(window, Mapping):
        return dict(window)
    if isinstance(window, Sequence) and len(window) == 2:
        center, width = (float(v) for v in window)
        if not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
            raise ValueError(f"window needs a finite center and a positive width, got {tuple(window)}")
        return {"center": center, "width": width}
    raise ValueError(f"window must be a preset name, a (center, width) pair or a dict, got {window!r}")


def build_ask_request(
    volume_id: str,
    messages: str | Iterable[Any],
    plane: str = "axial",
    indices: Iterable[int] = (0,),
    options: Mapping[str, Any] | None = None,
    window: Any = None,
    stream: bool = False,
    view: Any = None,
) -> dict[str, Any]:
    """The JSON body of POST /v1/ask.

    Args:
        volume_id: from ``upload_volume``.
        messages: a question, or a conversation as (role, content) pairs; roles are user, assistant, system.
        plane: "axial", "coronal" or "sagittal".
        indices: slice numbers along the plane's axis (a 2D image has the single axial slice 0).
        options: generation settings by name, e.g. {"max_new_tokens": 64, "no_code_fallback": True}; the engine
            rejects unknown names (HTTP 422).
        window: see ``build_window``; None uses the modality's default.
        view: instead of ``plane`` and ``indices``, the 4x4 slice-to-RAS of the view the user looks at (in the
            uploaded volume's frame): the engine picks plane and index and says which in its answer.
    """
    if view is not None:
        matrix = np.asarray(view, dtype=np.float64)
        if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
            raise ValueError(f"view must be a finite 4x4 slice-to-RAS matrix, got shape {matrix.shape}")
        plane, indices = "axial", ()
    if plane not in PLANES:
        raise ValueError(f"plane must be one of {', '.join(PLANES)}, got {plane!r}")
    if isinstance(indices, (int, np.integer)):
        indices = (indices,)
    index_list = []
    for i in indices:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise ValueError(f"slice indices must be integers, got {i!r}")
        index_list.append(int(i))
    if not index_list and view is None:
        raise ValueError("indices is empty; ask about at least one slice")
    slices: dict[str, Any] = {"plane": plane, "indices": index_list}
    if view is not None:
        slices = {"view": [[float(v) for v in row] for row in np.asarray(view, dtype=np.float64)]}
    body: dict[str, Any] = {
        "volume_id": str(volume_id),
        "slices": slices,
        "messages": build_messages(messages),
        "stream": bool(stream),
    }
    if options:
        body["options"] = dict(options)
    window_json = build_window(window)
    if window_json is not None:
        body["window"] = window_json
    return body


def _triple(values: Iterable[float], name: str, count: int = 3) -> list[float]:
    out = [float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]
    if len(out) != count:
        raise ValueError(f"{name} needs {count} numbers, got {len(out)}")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} must be finite, got {out}")
    return out


def volume_query(
    spacing: Iterable[float], origin: Iterable[float], direction: Iterable[float] | np.ndarray, modality: str
) -> dict[str, str]:
    """Query parameters of POST /v1/volumes. Geometry is LPS (as DICOM, ITK and SimpleITK use it).

    ``direction`` is the 3x3 direction matrix (its columns are the i, j, k axis directions), as a 3x3 array or 9
    numbers in row-major order.
    """
    spacing_list = _triple(spacing, "spacing")
    if min(spacing_list) <= 0:
        raise ValueError(f"spacing must be positive, got {spacing_list}")
    origin_list = _triple(origin, "origin")
    direction_list = _triple(direction, "direction", 9)
    if not isinstance(modality, str) or not modality.strip():
        raise ValueError("modality must be a non-empty string such as 'CT' or 'MR'")

    def fmt(values: list[float]) -> str:
        return ",".join(repr(v) for v in values)

    return {
        "modality": modality.strip(),
        "spacing": fmt(spacing_list),
        "origin": fmt(origin_list),
        "direction": fmt(direction_list),
    }


def npy_parts(array: np.ndarray) -> tuple[bytes, memoryview]:
    """The upload body in two parts, the NPY header and the voxels, so that nothing copies the volume to send it:
    the voxels part is a view of ``array``'s own buffer when it is C-contiguous (a volume's may be gigabytes, and
    Slicer already holds it). Joined, they are exactly what ``np.save`` writes (no pickles). Accepts integer and
    float arrays (the engine refuses booleans: a mask is not an image)."""
    array = np.asarray(array)
    if array.dtype.kind not in "iuf":
        raise ValueError(f"cannot upload an array of dtype {array.dtype}; use an integer or float array")
    if array.ndim not in (2, 3):
        raise ValueError(f"expected a (k, j, i) volume or an (H, W[, 3]) image, got {array.ndim} dimensions")
    array = np.ascontiguousarray(array)  # a copy only for a strided view, as np.save would make one
    header = io.BytesIO()
    # np.save writes format 1.0 whenever the header fits it, as it always does for a 2D/3D numeric array.
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    # Bytes of any dtype, byte order included (memoryview.cast refuses non-native formats such as '>i2').
    return header.getvalue(), memoryview(array.reshape(-1).view(np.uint8))


def npy_bytes(array: np.ndarray) -> bytes:
    """The upload body as one bytes object (a copy of the voxels: ``npy_parts`` sends them without one)."""
    header, voxels = npy_parts(array)
    return header + voxels.tobytes()
