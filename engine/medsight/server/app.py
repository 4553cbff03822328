"""The FastAPI application: the /v1 contract (`schemas.py`, docs/ARCHITECTURE.md) over one `Engine`.

Blocking model work runs in worker threads; the engine serialises it. Streams are server-sent events fed by the
engine's token and region callbacks through a queue. Logs carry job ids, sizes and timings only: never pixels,
questions, answers or DICOM identifiers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from medsight._version import __version__
from medsight.engine import Engine, EngineAnswer, VolumeSlices
from medsight.imaging import PLANES, ImagingError, slice_count, slice_for_view
from medsight.model.sizes import model_size
from medsight.prompt import Message
from medsight.server import convert, schemas
from medsight.server.jobs import JobRegistry
from medsight.server.security import token_matches
from medsight.server.volume_store import VolumeStore, parse_npy, volume_from_upload

log = logging.getLogger("medsight.server")

DEFAULT_MAX_UPLOAD_BYTES = 1024**3
DEFAULT_MAX_VOXELS = 512 * 512 * 1024
DEFAULT_STORE_BYTES = 4 * 1024**3
DEFAULT_REQUEST_TIMEOUT_S = 600.0


class ApiError(Exception):
    """An error with an HTTP status and a machine code; rendered as ErrorBody."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"code": code, "message": message})


def _floats(text: str | None, n: int, name: str, default: tuple[float, ...]) -> tuple[float, ...]:
    if text is None:
        return default
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ApiError(422, "invalid_geometry", f"{name} must be {n} comma-separated numbers") from None
    if len(values) != n or not all(np.isfinite(values)):
        raise ApiError(422, "invalid_geometry", f"{name} must be {n} finite comma-separated numbers")
    return values


def create_app(
    engine: Engine,
    token: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    store_bytes: int = DEFAULT_STORE_BYTES,
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    model_name: str | None = None,
) -> FastAPI:
    """Build the app around a loaded engine.

    Args:
        token: when set, every /v1 request needs `Authorization: Bearer <token>`.
        max_upload_bytes / max_voxels: larger uploads get 413.
        store_bytes: memory for uploaded volumes (least recently used are evicted).
        request_timeout_s: an ask running longer is cancelled and returns what it has.
    """
    app = FastAPI(
        title="MedSIGHT engine",
        version=__version__,
        description="Answers and segmentation masks for questions about medical images. Not for clinical use.",
    )
    store = VolumeStore(store_bytes)
    jobs = JobRegistry()
    model = engine.model
    model_name = model_name or model.weights_source
    random_weights = model.weights_source.startswith("random")

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        guarded = token and request.url.path.startswith("/v1")
        if guarded and not token_matches(request.headers.get("authorization"), token):
            return _error(401, "unauthorized", "missing or wrong bearer token")
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return _error(err.status, err.code, err.message)

    @app.exception_handler(ImagingError)
    async def imaging_error(_: Request, err: ImagingError) -> JSONResponse:
        return _error(422, "invalid_image", str(err))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        parts = []
        for e in err.errors()[:5]:
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{where or 'body'}: {e.get('msg')}")
        return _error(422, "invalid_request", "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error(err.status_code, "http_error", str(err.detail))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, err: Exception) -> JSONResponse:
        log.error("internal error: %s", type(err).__name__)
        return _error(500, "internal_error", f"the engine failed: {type(err).__name__}")

    @app.get("/v1/health", response_model=schemas.Health)
    def health() -> schemas.Health:
        return schemas.Health(version=__version__, model=model_name, device=str(model.device),
                              dtype=str(model.dtype).removeprefix("torch."))

    @app.get("/v1/model", response_model=schemas.ModelCard)
    def model_card() -> schemas.ModelCard:
        cfg = model.config
        return schemas.ModelCard(
            name=model_name, version=__version__, parameters=model_size(cfg).total,
            image_size=cfg.vision.image_size, mask_size=cfg.mask_size,
            num_region_codes=model.codes.num_codes, first_code_id=model.codes.first_id,
            random_weights=random_weights,
            intended_use="Research and annotation assistance. Not for clinical use.",
            config=cfg.to_dict(),
        )

    def volume_info(volume_id: str) -> schemas.VolumeInfo:
        volume = store.get(volume_id)
        if volume is None:
            raise ApiError(404, "unknown_volume", f"no volume {volume_id!r} (never uploaded, or evicted)")
        return schemas.VolumeInfo(
            volume_id=volume_id, shape=list(volume.array.shape[:3]), modality=volume.modality,
            slices={p: slice_count(volume, p) for p in PLANES}, bytes=int(volume.array.nbytes),
        )

    @app.post("/v1/volumes", response_model=schemas.VolumeInfo, status_code=201)
    async def upload_volume(
        request: Request,
        modality: str = Query("OT", max_length=16, pattern=r"^[A-Za-z0-9]+$"),
        spacing: str | None = Query(None, description="sx,sy,sz in mm (i, j, k)"),
        origin: str | None = Query(None, description="LPS position of voxel (0,0,0) in mm"),
        direction: str | None = Query(None, description="9 numbers, row-major 3x3, columns = i, j, k in LPS"),
    ) -> schemas.VolumeInfo:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_upload_bytes:
            raise ApiError(413, "too_large", f"upload of {declared} bytes exceeds the limit of {max_upload_bytes}")
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > max_upload_bytes:
                raise ApiError(413, "too_large", f"upload exceeds the limit of {max_upload_bytes} bytes")
        if len(body) > max_voxels * 8 + 4096:
            raise ApiError(413, "too_large", f"upload exceeds the voxel limit of {max_voxels}")
        geometry = (
            _floats(spacing, 3, "spacing", (1.0, 1.0, 1.0)),
            _floats(origin, 3, "origin", (0.0, 0.0, 0.0)),
            np.array(_floats(direction, 9, "direction", tuple(np.eye(3).ravel()))).reshape(3, 3),
        )

        def build() -> str:
            try:
                array = parse_npy(bytes(body), max_voxels)
            except ImagingError as err:
                if "oversize" in str(err):
                    raise ApiError(413, "too_large", str(err)) from None
                raise
            return store.put(volume_from_upload(array, *geometry, modality))

        volume_id = await run_in_threadpool(build)
        log.info("volume stored: %d bytes", len(body))
        return volume_info(volume_id)

    @app.get("/v1/volumes/{volume_id}", response_model=schemas.VolumeInfo)
    def get_volume(volume_id: str) -> schemas.VolumeInfo:
        return volume_info(volume_id)

    def engine_request(req: schemas.AskRequest) -> tuple[VolumeSlices, list[Message]]:
        volume = store.get(req.volume_id)
        if volume is None:
            raise ApiError(422, "unknown_volume", f"no volume {req.volume_id!r}: upload it first (or again)")
        try:
            win = convert.window(req.window)
        except ValueError as err:
            raise ApiError(422, "invalid_window", str(err)) from None
        slices = VolumeSlices(volume, req.slices.plane, list(req.slices.indices), win)
        return slices, [Message(m.role, m.content) for m in req.messages]

    def run(req: schemas.AskRequest, cancel: threading.Event, on_token=None, on_region=None) -> EngineAnswer:
        slices, messages = engine_request(req)
        timer = threading.Timer(request_timeout_s, cancel.set)
        timer.daemon = True
        timer.start()
        try:
            return engine.ask(slices, messages, convert.generation_options(req.options),
                              convert.image_options(req.options), on_token=on_token, on_region=on_region,
                              cancel=cancel)
        except ValueError as err:
            raise ApiError(422, "invalid_request", str(err)) from None
        finally:
            timer.cancel()

    def resolve_view(req: schemas.AskRequest) -> schemas.AskRequest:
        """A view-named slice becomes plane + index: the engine is the one authority on slicing."""
        volume = store.get(req.volume_id)
        if req.slices.view is None or volume is None:
            return req
        picked = slice_for_view(volume, np.array(req.slices.view))
        return req.model_copy(update={"slices": schemas.SliceSelection(plane=picked.plane, indices=[picked.index])})

    @app.post("/v1/ask", response_model=schemas.AskResponse,
              responses={200: {"content": {"text/event-stream": {}}}})
    async def ask(req: schemas.AskRequest, request: Request):
        req = resolve_view(req)
        engine_request(req)  # fail fast (before a stream starts) on unknown volumes and bad windows
        job_id, cancel = jobs.start()
        started = time.monotonic()
        if not req.stream:
            try:
                result = await run_in_threadpool(run, req, cancel)
            finally:
                jobs.finish(job_id)
            log.info("job %s: %d slice(s) in %.2fs", job_id, len(result.answers), time.monotonic() - started)
            return convert.ask_response(job_id, model_name, req.slices.plane, result)
        return StreamingResponse(stream(req, request, job_id, cancel), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def stream(req: schemas.AskRequest, request: Request, job_id: str,
                     cancel: threading.Event) -> AsyncIterator[str]:
        events: queue.Queue = queue.Queue()
        position = {index: i for i, index in enumerate(req.slices.indices)}
        plane = req.slices.plane

        def on_token(slice_index: int, text: str) -> None:
            events.put(("token", {"slice": position[slice_index], "text": text}))

        def on_region(slice_index: int, region) -> None:
            # The mask follows once, in the done event's answer.
            wire = convert.region(region, with_mask=False).model_dump()
            events.put(("region", {"slice": position[slice_index], "region": wire}))

        def work() -> None:
            try:
                result = run(req, cancel, on_token, on_region)
                events.put(("done", convert.ask_response(job_id, model_name, plane, result).model_dump()))
            except ApiError as err:
                events.put(("error", {"code": err.code, "message": err.message}))
            except Exception as err:  # the stream must end with an event, never hang
                log.error("job %s failed: %s", job_id, type(err).__name__)
                events.put(("error", {"code": "internal_error", "message": f"the engine failed: {type(err).__name__}"}))
            finally:
                jobs.finish(job_id)

        worker = threading.Thread(target=work, name=f"ask-{job_id[:8]}", daemon=True)
        worker.start()
        yield _sse("job", {"job_id": job_id, "plane": plane, "indices": list(req.slices.indices)})
        while True:
            try:
                kind, data = events.get_nowait()
            except queue.Empty:
                if await request.is_disconnected():
                    cancel.set()  # nobody is listening: stop generating
                    return
                await asyncio.sleep(0.005)
                continue
            yield _sse(kind, data)
            if kind in ("done", "error"):
                return

    @app.post("/v1/jobs/{job_id}/cancel", response_model=schemas.CancelResponse)
    def cancel_job(job_id: str) -> schemas.CancelResponse:
        state = jobs.cancel(job_id)
        if state is None:
            raise ApiError(404, "unknown_job", f"no job {job_id!r}")
        return schemas.CancelResponse(job_id=job_id, cancelled=state)

    return app


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
