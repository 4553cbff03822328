"""The /v1 API contract as pydantic models. FastAPI serves it as OpenAPI at /openapi.json."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from medsight.imaging import PLANES
from medsight.model.generation import DEFAULT_MAX_NEW_TOKENS

Plane = Literal[PLANES]  # the engine's one list of planes (medsight.imaging.slicing)
#: The seeds torch's generator takes (a 64-bit integer, signed or not); beyond them the job would fail after its 200.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StrictRequest(Strict):
    """A request body: no field is converted from another JSON type (a client's `"stream": "yes"`, `"top_k": 5.5`,
    `"max_new_tokens": "12"` or an index `true` would otherwise be read as a different request), except an integer
    where a number is expected."""

    model_config = ConfigDict(strict=True)  # extra="forbid" comes from Strict

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data):
        """One error for all the unknown fields of an object: `extra="forbid"` gives one per field, and the framework
        turns each into a dict on the server's event loop (an ask of 660,000 unknown fields held it, health and cancel
        included, for 3.6 s)."""
        known = cls.model_fields
        if isinstance(data, dict) and not data.keys() <= known.keys():
            name, unknown = next(str(n) for n in data if n not in known), len(data.keys() - known.keys())
            raise PydanticCustomError("extra_forbidden", "unknown field {name}{more}; known: {known}", {
                "name": repr(name if len(name) <= 64 else name[:64] + "\u2026"),
                "more": f" (and {unknown - 1} more)" if unknown > 1 else "", "known": ", ".join(known)})
        return data


class ErrorBody(Strict):
    """Every error response: a machine-readable code and a message for people."""

    code: str
    message: str


class Health(Strict):
    status: Literal["ok"] = "ok"
    version: str
    model: str
    device: str
    dtype: str
    # Published so that a client refuses an upload over them before sending it (up to a GiB), not after the 413.
    max_upload_bytes: int = Field(description="largest POST /v1/volumes body (.npy bytes) the engine takes "
                                  "(medsight serve --max-upload-mb); a larger one gets 413 too_large")
    max_voxels: int = Field(description="most values an upload's array may hold (the product of its .npy shape); "
                            "more get 413 too_large")
    max_ask_body_bytes: int = Field(description="largest POST /v1/ask body (JSON bytes) the engine reads: the "
                                    "longest conversation the model's prompt can hold (max_ask_body_bytes); a larger "
                                    "one gets 413 too_large before it is read")


class ModelCard(Strict):
    name: str
    version: str
    parameters: int
    image_size: int
    mask_size: int
    num_region_codes: int
    first_code_id: int
    random_weights: bool
    intended_use: str
    config: dict


class VolumeInfo(Strict):
    """An uploaded image or volume. The id is the SHA-256 of its voxels and geometry."""

    volume_id: str
    shape: list[int] = Field(description="(k, j, i) voxels, or (1, H, W) for a 2D image")
    modality: str
    slices: dict[str, int] = Field(description="number of slices per plane, for the planes that can be asked about "
                                   "(a 2D image: only the plane it lies in)")
    bytes: int
    nan_filled: str | None = Field(default=None, description="NaN voxels of the upload read as the volume's smallest "
                                   "value, in words (how many, of how many, the value); null when there were none")


MAX_MESSAGES, MAX_MESSAGE_CHARACTERS = 64, 16_000
#: JSON bytes that one token of a prompt takes at most: Qwen3's heaviest token as JSON writes it is 128 spaces (128
#: bytes); 32 newlines written as \u000a, as some encoders do, are 192.
MAX_JSON_BYTES_PER_TOKEN = 192
#: Room for the rest of an ask: volume id, 1024 slice indices, view, options, window, and a client's indentation.
ASK_BODY_ALLOWANCE = 64 * 1024


def max_ask_body_bytes(max_prompt_tokens: int) -> int:
    """The largest valid ask as JSON for a model whose prompt takes at most `max_prompt_tokens` tokens: every message
    is part of the prompt, so a conversation the model can take is at most this long. A larger body is refused
    before it is read: its JSON is parsed on the server's event loop, holding every other client (a 13 MB body of
    unknown fields, under the old limit, held /v1/health for 2.6 s; one at this limit, 0.06 s at most)."""
    return max_prompt_tokens * MAX_JSON_BYTES_PER_TOKEN + ASK_BODY_ALLOWANCE


class MessageIn(StrictRequest):
    role: Literal["user", "assistant", "system"]
    content: str = Field(max_length=MAX_MESSAGE_CHARACTERS)


class WindowIn(StrictRequest):
    """Display window for 8-bit conversion: a CT preset name, or an explicit centre and width."""

    preset: str | None = None
    center: float | None = Field(default=None, allow_inf_nan=False)
    width: float | None = Field(default=None, gt=0, allow_inf_nan=False)


class AskOptions(StrictRequest):
    max_new_tokens: int = Field(default=DEFAULT_MAX_NEW_TOKENS, ge=1, le=2048)
    do_sample: bool = False
    # NaN and infinities are refused as such (their message said "should be less than or equal to 10").
    temperature: float = Field(default=1.0, ge=0.01, le=10, allow_inf_nan=False)  # below 0.01 sampling overflows
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=1)
    # It divides the logits too: tiny values overflow them.
    repetition_penalty: float = Field(default=1.2, ge=0.01, le=10, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    resize_mode: Literal["letterbox", "crop"] = "letterbox"
    hidden_state_position: Literal["before", "at"] | None = None  # None: the model's own default
    no_code_fallback: bool = False


class SliceSelection(StrictRequest):
    """Slices by plane and indices, or the one slice a viewer shows (``view``): then the engine picks plane and
    index for the volume's acquisition, and the answer says which it took (plane, index, slice_to_ras)."""

    plane: Plane = "axial"
    indices: list[int] = Field(default_factory=list, max_length=1024)
    # Bounded by length, rows too: the length is checked before the items, so a huge list is refused at once (each
    # row of one of 1.1 million rows was read first, an error each, holding the server's event loop for 12-15 s).
    view: list[Annotated[list[float], Field(max_length=4)]] | None = Field(
        default=None, max_length=4, description="4x4 slice-to-RAS of the view (normal in column 3, a point in column "
        "4), in the frame of the uploaded geometry; instead of plane and indices (not with them)")

    @model_validator(mode="after")
    def _one_way(self) -> SliceSelection:
        if self.view is None and not self.indices:
            raise ValueError("give indices (at least one) or a view")
        given = sorted({"plane", "indices"} & self.model_fields_set)
        if self.view is not None and given:  # the view would silently win over them
            raise ValueError(f"give a view or plane and indices, not both (got a view and {' and '.join(given)})")
        if self.view is not None and (len(self.view) != 4 or any(len(row) != 4 for row in self.view)):
            raise ValueError("view must be a 4x4 matrix")
        return self


class AskRequest(StrictRequest):
    """A question about one or more slices of an uploaded volume (a 2D image has one axial slice)."""

    volume_id: str
    slices: SliceSelection = SliceSelection(indices=[0])
    messages: list[MessageIn] = Field(min_length=1, max_length=MAX_MESSAGES)
    options: AskOptions = AskOptions()
    window: WindowIn | None = None
    stream: bool = False


class MaskRLE(Strict):
    """Row-major run lengths alternating False/True, starting with False; counts sum to H * W."""

    shape: list[int]
    counts: list[int]


class RegionOut(Strict):
    code: str | None
    label: str
    index: int
    mask: MaskRLE | None = Field(description="null in streamed region events: each mask is sent once, in done")
    probability: float
    bbox: list[int] | None = Field(description="row0, col0, row1, col1 (inclusive) in the slice grid")


class SliceAnswer(Strict):
    plane: Plane
    index: int
    text: str
    regions: list[RegionOut]
    # Every answer is about a volume slice (a 2D image is a one-slice volume), so it always has its geometry.
    slice_to_ras: list[list[float]] = Field(description="4x4: (col, row, 0, 1) pixel -> RAS millimetres")
    cancelled: bool = False


class AskResponse(Strict):
    job_id: str
    model: str
    answers: list[SliceAnswer]
    timings: dict[str, float]
    cancelled: bool = False


class CancelResponse(Strict):
    job_id: str
    cancelled: bool = Field(description="true: the job was waiting or running and is told to stop (text generation "
                            "stops at its next step; the masks of the text generated so far are still decoded, so an "
                            "ask told to stop after its text was complete still completes); false: it had finished")
