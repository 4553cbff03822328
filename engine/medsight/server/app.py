"""The FastAPI application: the /v1 contract (`schemas.py`, docs/ARCHITECTURE.md) over one `Engine`.

Every ask goes through one bounded job queue (`jobs.JobQueue`): a single worker thread runs the model, waiting asks
hold no thread, and handlers never block the event loop, so health, cancel and volume look-ups answer at once
however many asks wait. Asks get their job id at once (header or first event) and a client that hangs up stops its
job. Before admission an ask's memory is estimated against a budget (`admission`). Requests first pass `guard.Guard`
(host allow-list, origin, token, body read deadline). Logs carry job ids, sizes and timings only: never pixels,
questions, answers or DICOM identifiers; the optional audit trail (`audit`) likewise.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import traceback

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from medsight._version import __version__
from medsight.engine import Engine, EngineAnswer, VolumeSlices
from medsight.imaging import ImagingError, Volume, slice_count, slice_for_view
from medsight.imaging.slicing import slice_planes
from medsight.imaging.volume import MODALITY_PATTERN
from medsight.model.sizes import model_size
from medsight.prompt import Message
from medsight.server import convert, schemas
from medsight.server.admission import estimate_ask_memory, prompt_tokens
from medsight.server.audit import AuditLog, PendingLine, answer_regions, sent_regions
from medsight.server.guard import BodyTimeoutError, Guard, HostPolicy
from medsight.server.jobs import Job, JobQueue, QueueFullError
from medsight.server.responses import JOB_ID_HEADER, SEND_TIMEOUT_S, EventFeed, JobResponse
from medsight.server.volume_store import (
    StoreBusyError,
    UploadBudget,
    VolumeStore,
    array_from_npy,
    read_npy_header,
    volume_from_upload,
)
from medsight.server.windows import VolumeWindows

log = logging.getLogger("medsight.server")

DEFAULT_MAX_UPLOAD_BYTES = 1024**3
DEFAULT_MAX_VOXELS = 512 * 512 * 1024
DEFAULT_STORE_BYTES = 4 * 1024**3
DEFAULT_REQUEST_TIMEOUT_S = 600.0
DEFAULT_MAX_WAITING = 64
DEFAULT_ASK_MEMORY_BYTES = 8 * 1024**3
#: Seconds a stopping engine waits for its stopped asks to end and write their lines: a generation step of the full
#: model on a CPU; within the 5 s that the Slicer module gives a stopping engine (its 3 s grace included).
STOP_WAIT_S = 1.5


#: Why the framework could not parse a JSON body, by the exception it met (its own 400 names none of them).
BODY_PARSE_ERRORS = {
    UnicodeDecodeError: "it is not UTF-8 text",
    RecursionError: "it is nested too deeply",
    ValueError: "a number in it is too long",  # Python refuses integers of over 4300 digits
}


class WithheldExceptionText(logging.Filter):
    """Uvicorn logs an exception that escapes the app ("Exception in ASGI application") with its traceback, message
    included: the message of an unexpected error may quote the question or values of the request. The record keeps
    the frames and the exception's type; the message is withheld."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            err = record.exc_info[1]
            frames = "".join(traceback.format_tb(err.__traceback__))
            record.msg = f"{record.getMessage()}\nTraceback (message withheld: it may hold patient data):\n{frames}" \
                         f"{type(err).__name__}"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


def _withhold_uvicorn_exception_text() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, WithheldExceptionText) for f in logger.filters):
        logger.addFilter(WithheldExceptionText())


class ApiError(Exception):
    """An error with an HTTP status and a machine code; rendered as ErrorBody."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


#: The longest error message sent: messages quote the field names and values they refuse, and a request naming an
#: unknown field, volume or window preset of a megabyte got that megabyte back.
MAX_ERROR_MESSAGE = 2000


def _short(message: str) -> str:
    return message if len(message) <= MAX_ERROR_MESSAGE else message[:MAX_ERROR_MESSAGE - 1] + "\u2026"


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"code": code, "message": _short(message)}, headers=headers)


def _error_json(err: BaseException) -> str:
    """The ErrorBody of an exception raised by a job after its response started."""
    if isinstance(err, ApiError):
        body = {"code": err.code, "message": _short(err.message)}
    else:
        body = {"code": "internal_error", "message": f"the engine failed: {type(err).__name__}"}
    return json.dumps(body, separators=(",", ":"))


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


def _exact_buffer(received: bytearray, size: int) -> memoryview:
    """A buffer of the upload's declared ``size`` holding what was ``received`` so far, for the rest to be written
    into: the stored volume keeps it, and one grown by ``extend`` kept up to an eighth more than the volume (bytearray
    over-allocates), memory that the store's byte bound does not count. Its pages are taken as the chunks arrive:
    ``bytearray(size)`` zeroed them all at once on the event loop (0.54 s for 256 MiB, every other client waiting)."""
    buffer = memoryview(np.empty(size, np.uint8))
    kept = min(len(received), size)
    buffer[:kept] = received[:kept]
    return buffer


def _known_query(request: Request) -> None:
    """Refuse query parameters the route does not declare, or declares once and gets twice: a typo such as
    `spaceing` would otherwise be ignored and the default used in its place, silently."""
    route = request.scope.get("route")
    known = {p.alias for p in route.dependant.query_params} if route is not None else set()
    names = [name for name, _ in request.query_params.multi_items()]
    unknown = sorted({n for n in names if n not in known})
    if unknown:
        allowed = ", ".join(sorted(known)) or "none"
        raise ApiError(422, "invalid_request", f"unknown query parameter(s): {', '.join(unknown)} (this endpoint "
                       f"takes: {allowed})")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ApiError(422, "invalid_request", f"query parameter(s) given more than once: {', '.join(repeated)}")


def create_app(
    engine: Engine,
    token: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    store_bytes: int = DEFAULT_STORE_BYTES,
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    model_name: str | None = None,
    host: str = "127.0.0.1",
    allowed_hosts: tuple[str, ...] = (),
    max_waiting: int = DEFAULT_MAX_WAITING,
    ask_memory_bytes: int = DEFAULT_ASK_MEMORY_BYTES,
    compute_threads: int | None = None,
    audit_path: str | None = None,
    read_grace_s: float = 10.0,
    min_read_rate: float = 64 * 1024,
    send_timeout_s: float = SEND_TIMEOUT_S,
) -> FastAPI:
    """Build the app around a loaded engine.

    Args:
        token: when set, every /v1 request needs `Authorization: Bearer <token>`.
        max_upload_bytes / max_voxels: larger uploads get 413 (checked on the .npy header, before the voxels).
        store_bytes: memory for uploaded volumes (least recently used are evicted).
        request_timeout_s: an ask *running* longer is cancelled and returns what it has (queue time not counted).
        host / allowed_hosts: the bound host and extra names the `Host` header may carry (see `guard`).
        max_waiting: asks that may wait behind the running one; more get 429 with Retry-After.
        ask_memory_bytes: budget for one ask's estimated memory (`admission`); larger asks get 422 with the numbers.
        compute_threads: the model's compute threads, set once on the engine's worker thread (None: library default).
        audit_path: append one JSON line per job to this file (`audit`).
        read_grace_s / min_read_rate: a request body must arrive at `min_read_rate` bytes/s on average after
            `read_grace_s` seconds, or the request is cut with 408.
        send_timeout_s: an ask's client that takes none of its response for this long (its socket buffers full) is
            dropped and its job stopped, as if it had hung up.
    """
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        jobs.start()
        yield
        # The server has stopped every open ask by now (they end at their next generation step, the waiting ones
        # at once): the worker writes their log and audit lines before the process exits. Not waiting, a stop
        # left no line for any of them, the running one included although its tokens and regions had gone out.
        if not jobs.close(wait_s=STOP_WAIT_S):
            running = jobs.running
            log.warning("job %s was still running when the engine stopped: it has no log%s line",
                        running.id if running is not None else "?", " or audit" if audit is not None else "")
        elif audit is not None:  # never while the worker may still write to it
            audit.close()
        log.info("engine stopped")

    _withhold_uvicorn_exception_text()
    app = FastAPI(
        lifespan=lifespan,
        dependencies=[Depends(_known_query)],
        title="MedSIGHT engine",
        version=__version__,
        description="Answers and segmentation masks for questions about medical images. Not for clinical use.",
    )
    store = VolumeStore(store_bytes)
    uploads = UploadBudget(store_bytes)  # bytes of uploads being received at once
    jobs = JobQueue(max_waiting=max_waiting, threads=compute_threads)
    windows = VolumeWindows()
    model = engine.model
    model_name = model_name or model.weights_source
    random_weights = model.weights_source.startswith("random")
    audit = AuditLog.for_model(audit_path, model, model_name) if audit_path else None
    app.state.jobs, app.state.store, app.state.uploads = jobs, store, uploads  # for tests and operators
    prompt_tokens_max = model.config.llm.max_sequence_length
    ask_limit = (schemas.max_ask_body_bytes(prompt_tokens_max),
                 f" (the longest conversation that the model's prompt of {prompt_tokens_max} tokens can hold)")
    app.add_middleware(Guard, policy=HostPolicy(host, allowed_hosts), token=token, read_grace_s=read_grace_s,
                       min_read_rate=min_read_rate, body_limits={"/v1/ask": ask_limit})

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return _error(err.status, err.code, err.message, err.headers)

    @app.exception_handler(ImagingError)
    async def imaging_error(_: Request, err: ImagingError) -> JSONResponse:
        if "oversize" in str(err):
            return _error(413, "too_large", str(err))
        return _error(422, "invalid_image", str(err))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        parts = []
        for e in err.errors()[:5]:
            if e.get("type") == "json_invalid":  # the framework's loc is ("body", character position)
                at = e.get("loc", ("body", 0))[-1]
                return _error(422, "invalid_request", f"the body is not valid JSON: "
                              f"{e.get('ctx', {}).get('error', 'unreadable')} (at character {at})")
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{where or 'body'}: {e.get('msg')}")
        return _error(422, "invalid_request", "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        unparsed = BODY_PARSE_ERRORS.get(type(err.__cause__)) if err.status_code == 400 else None
        if unparsed is not None:  # the framework's 400 "There was an error parsing the body" did not say why
            return _error(422, "invalid_request", f"the body is not valid JSON: {unparsed}")
        return _error(err.status_code, "too_large" if err.status_code == 413 else "http_error", str(err.detail))

    @app.exception_handler(BodyTimeoutError)
    async def body_timeout(_: Request, __: BodyTimeoutError) -> JSONResponse:
        log.info("request body too slow: connection cut")
        return _error(408, "body_timeout", f"the request body arrived too slowly (under {min_read_rate:.0f} bytes/s "
                      f"after {read_grace_s:g} s)", {"Connection": "close"})

    @app.exception_handler(ClientDisconnect)
    async def client_gone(_: Request, __: ClientDisconnect) -> Response:
        log.info("client disconnected before its request was read")
        return Response(status_code=400)  # nobody reads it; uvicorn drops it

    @app.exception_handler(Exception)
    async def internal_error(_: Request, err: Exception) -> JSONResponse:
        log.error("internal error: %s", type(err).__name__)
        return _error(500, "internal_error", f"the engine failed: {type(err).__name__}")

    @app.get("/v1/health", response_model=schemas.Health)
    async def health() -> schemas.Health:
        return schemas.Health(version=__version__, model=model_name, device=str(model.device),
                              dtype=str(model.dtype).removeprefix("torch."), max_upload_bytes=max_upload_bytes,
                              max_voxels=max_voxels, max_ask_body_bytes=ask_limit[0])

    @app.get("/v1/model", response_model=schemas.ModelCard)
    async def model_card() -> schemas.ModelCard:
        cfg = model.config
        return schemas.ModelCard(
            name=model_name, version=__version__, parameters=model_size(cfg).total,
            image_size=cfg.vision.image_size, mask_size=cfg.mask_size,
            num_region_codes=model.codes.num_codes, first_code_id=model.codes.first_id,
            random_weights=random_weights,
            intended_use="Research and annotation assistance. Not for clinical use.",
            config=cfg.to_dict(),
        )

    def volume_info(volume_id: str, volume: Volume | None = None) -> schemas.VolumeInfo:
        volume = volume if volume is not None else store.get(volume_id)
        if volume is None:
            raise ApiError(404, "unknown_volume", f"no volume {volume_id!r} (never uploaded, or evicted)")
        return schemas.VolumeInfo(
            volume_id=volume_id, shape=list(volume.array.shape[:3]), modality=volume.modality,
            slices={p: slice_count(volume, p) for p in slice_planes(volume)}, bytes=int(volume.array.nbytes),
            nan_filled=volume.nan_filled,
        )

    @app.post("/v1/volumes", response_model=schemas.VolumeInfo, status_code=201)
    async def upload_volume(
        request: Request,
        modality: str = Query("OT", max_length=16, pattern=MODALITY_PATTERN),
        spacing: str | None = Query(None, description="sx,sy,sz in mm (i, j, k)"),
        origin: str | None = Query(None, description="LPS position of voxel (0,0,0) in mm"),
        direction: str | None = Query(None, description="9 numbers, row-major 3x3, columns = i, j, k in LPS"),
    ) -> schemas.VolumeInfo:
        """Body: one array as .npy bytes, sent as `application/octet-stream` (or `application/x-npy`)."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_upload_bytes:
            raise ApiError(413, "too_large", f"upload of {declared} bytes exceeds the limit of {max_upload_bytes}")
        geometry = (
            _floats(spacing, 3, "spacing", (1.0, 1.0, 1.0)),
            _floats(origin, 3, "origin", (0.0, 0.0, 0.0)),
            np.array(_floats(direction, 9, "direction", tuple(np.eye(3).ravel()))).reshape(3, 3),
        )
        body, header, reserved, received = bytearray(), None, 0, 0
        try:
            async for chunk in request.stream():
                if header is None:  # the header decides the size before any voxel is kept
                    body.extend(chunk)
                    received = len(body)
                    header = read_npy_header(body, max_voxels)
                    if header is not None:
                        if header.total_bytes > max_upload_bytes:
                            raise ApiError(413, "too_large", f"the .npy header declares {header.total_bytes} bytes,"
                                           f" over the limit of {max_upload_bytes}")
                        if not uploads.reserve(header.total_bytes):
                            raise ApiError(429, "busy", f"the engine is receiving other uploads ({uploads.in_flight}"
                                           f" bytes, its volume memory is {store_bytes}); retry when they are done",
                                           {"Retry-After": "1"})
                        reserved = header.total_bytes
                        body = _exact_buffer(body, header.total_bytes)
                else:
                    if received + len(chunk) <= len(body):
                        body[received:received + len(chunk)] = chunk
                    received += len(chunk)
                if received > (header.total_bytes if header is not None else max_upload_bytes):
                    raise ApiError(422 if header is not None else 413, "invalid_image" if header else "too_large",
                                   "the body is longer than its .npy header declares" if header
                                   else f"upload exceeds the limit of {max_upload_bytes} bytes")
            if header is None:
                raise ApiError(422, "invalid_image", "the body is not a complete .npy array (header missing or cut)")

            def build() -> tuple[str, Volume]:
                volume = volume_from_upload(array_from_npy(header, memoryview(body)[:received]), *geometry,
                                            modality)
                return store.put(volume), volume

            volume_id, volume = await run_in_threadpool(build)
        except StoreBusyError as err:
            raise ApiError(429, "busy", str(err), {"Retry-After": str(jobs.retry_after())}) from None
        finally:
            uploads.release(reserved)
        log.info("volume stored: %d bytes", received)
        return volume_info(volume_id, volume)  # not a new look-up: a concurrent upload may have evicted it already

    @app.get("/v1/volumes/{volume_id}", response_model=schemas.VolumeInfo)
    async def get_volume(volume_id: str) -> schemas.VolumeInfo:
        return volume_info(volume_id)

    def admit(req: schemas.AskRequest) -> tuple[VolumeSlices, list[Message], list[int]]:
        """Pin the ask's volume in the store (the caller unpins it when the ask ends) and check the ask. One look-up
        for the view and the ask: with two, a volume uploaded between them let a view-named ask through with no
        slice, and it failed after its 200 with "no images given"."""
        volume = store.get(req.volume_id, pin=True)
        if volume is None:
            raise ApiError(422, "unknown_volume", f"no volume {req.volume_id!r}: upload it first (or again)")
        try:
            return check_ask(resolve_view(req, volume), volume)
        except BaseException:
            store.unpin(req.volume_id)
            raise

    def check_ask(req: schemas.AskRequest, volume: Volume) -> tuple[VolumeSlices, list[Message], list[int]]:
        """Everything that can be refused is refused here, before the job is queued (quick work only, but for the
        first ask about a volume: its percentile window reads the whole volume, `windows.VolumeWindows`)."""
        plane, indices = req.slices.plane, list(req.slices.indices)
        if len(set(indices)) != len(indices):
            raise ApiError(422, "invalid_request", f"slice indices must be unique, got {indices[:16]}")
        count = slice_count(volume, plane)
        outside = [i for i in indices if not 0 <= i < count]
        if outside:
            raise ApiError(422, "invalid_request", f"{plane} slice index {outside[0]} is out of range 0..{count - 1}")
        try:  # after the quick checks: a first percentile window reads the whole volume
            win = windows.get(req.volume_id, volume, convert.window(req.window, volume.modality))
        except ValueError as err:
            raise ApiError(422, "invalid_window", str(err)) from None
        messages = [Message(m.role, m.content) for m in req.messages]
        try:
            convert.generation_options(req.options)
            prompt = prompt_tokens(engine, messages)
            engine.check_generation_length(prompt, req.options.max_new_tokens)
        except ValueError as err:
            raise ApiError(422, "invalid_request", str(err)) from None
        estimate = estimate_ask_memory(
            model.config, model.dtype, len(indices), prompt, req.options.max_new_tokens,
            int(np.prod(volume.shape)) // count, model.codes.num_codes)
        if estimate.total > ask_memory_bytes:
            raise ApiError(422, "over_memory_budget",
                           f"this ask may need {estimate.describe()}, over the engine's budget of "
                           f"{ask_memory_bytes / 1024**2:.0f} MiB per ask: ask about fewer slices or fewer new "
                           f"tokens (or raise --ask-memory-mb)")
        return VolumeSlices(volume, plane, indices, win), messages, indices

    def run_job(job: Job, req: schemas.AskRequest, slices: VolumeSlices, messages: list[Message],
                feed: EventFeed | None, line: PendingLine) -> str:
        """On the engine's worker thread: run the ask, return the JSON of its AskResponse."""
        position = {index: i for i, index in enumerate(slices.indices)}
        on_token = on_region = None
        if feed is not None:
            def on_token(slice_index: int, text: str) -> None:
                feed.put("token", json.dumps({"slice": position[slice_index], "text": text}))

            def on_region(slice_index: int, region) -> None:
                wire = convert.region(region, with_mask=False).model_dump()  # the mask follows once, in "done"
                payload = {"slice": position[slice_index], "region": wire}
                feed.put("region", json.dumps(payload, separators=(",", ":")))

        deadline = threading.Timer(request_timeout_s, job.stop, args=("timeout",))  # running time only
        deadline.daemon = True
        deadline.start()
        result: EngineAnswer | None = None
        response: str | None = None  # set: an answer (masks included) is about to leave the engine
        outcome = "error"
        try:
            result = engine.ask(slices, messages, convert.generation_options(req.options),
                                convert.image_options(req.options), on_token=on_token, on_region=on_region,
                                cancel=job.cancel, abandon=job.abandoned)
            outcome = (job.stop_reason or "cancelled") if result.cancelled else "completed"
            response = convert.ask_response(job.id, model_name, slices.plane, result).model_dump_json()
            return response
        except ValueError as err:
            outcome = "invalid_request"
            raise ApiError(422, "invalid_request", str(err)) from None
        except Exception as err:
            log.error("job %s failed: %s", job.id, type(err).__name__)
            raise
        finally:
            deadline.cancel()
            store.unpin(req.volume_id)
            elapsed = time.monotonic() - (job.started or time.monotonic())
            gone = job.abandoned.is_set()  # read once: the outcome and the regions must tell the same story

            def ended(left: bool) -> str:
                """The outcome, for a client that `left` before the answer went out (during the last slice's mask
                mapping, or once the job had ended: a "completed" job it did not receive) or not."""
                return (job.stop_reason or "disconnected") if left and outcome == "completed" else outcome

            log.info("job %s: %d slice(s), %s, %.2fs", job.id, len(slices.indices), ended(gone), elapsed)
            if audit is not None:
                regions, answered = answer_regions(result), response is not None  # not the answer's masks

                def write(left: bool) -> None:
                    """The job's line; `left`: its client left before the answer went out."""
                    if left and not gone:  # the job's log line, written at its end, said otherwise
                        log.info("job %s: the client left before the answer went out", job.id)
                    try:
                        audit.record(
                            job_id=job.id, volume_id=req.volume_id, plane=slices.plane, slices=slices.indices,
                            options=req.options.model_dump(),
                            queued_s=(job.started or job.submitted) - job.submitted,
                            regions=sent_regions(regions, left, feed.sent["region"] if feed is not None else None),
                            duration_s=elapsed,
                            outcome=ended(left))
                    except OSError as err:  # e.g. a full disk: no mask leaves the engine without its audit line
                        why = err.strerror or type(err).__name__
                        log.error("job %s: the audit trail could not be written (%s)", job.id, why)
                        if answered and not left:  # else the ask's own error goes out, or nothing
                            raise ApiError(500, "audit_failed", f"the answer is withheld: the engine's audit trail "
                                           f"could not be written ({why}); free space for it or restart the "
                                           f"engine") from None

                if answered and not gone:
                    line.hand_over(write)  # written as the answer goes out, or once its client is found gone
                else:
                    write(gone)

    def resolve_view(req: schemas.AskRequest, volume: Volume) -> schemas.AskRequest:
        """A view-named slice becomes plane + index: the engine is the one authority on slicing."""
        if req.slices.view is None:
            return req
        picked = slice_for_view(volume, np.array(req.slices.view))
        return req.model_copy(update={"slices": schemas.SliceSelection(plane=picked.plane, indices=[picked.index])})

    @app.post("/v1/ask", response_model=schemas.AskResponse,
              responses={200: {"content": {"text/event-stream": {}},
                               "headers": {JOB_ID_HEADER: {"description": "the job id, sent at once"}}}})
    async def ask(req: schemas.AskRequest):
        """Plain asks send `200` with the `X-Job-Id` header at once and the AskResponse when done; streams send
        the "job" event first (with the plane and slices answered, which a view-named ask learns there). Closing
        the connection cancels the job."""
        slices, messages, _ = await run_in_threadpool(admit, req)
        feed = EventFeed() if req.stream else None
        line = PendingLine()
        try:
            job = jobs.submit(lambda job: run_job(job, req, slices, messages, feed, line))
        except QueueFullError as err:
            store.unpin(req.volume_id)
            raise ApiError(429, "busy", str(err), {"Retry-After": str(err.retry_after)}) from None
        return JobResponse(job, feed, _error_json, {"plane": slices.plane, "indices": list(slices.indices)},
                           send_timeout_s, line.release)

    @app.post("/v1/jobs/{job_id}/cancel", response_model=schemas.CancelResponse)
    async def cancel_job(job_id: str) -> schemas.CancelResponse:
        state = jobs.cancel(job_id)
        if state is None:
            raise ApiError(404, "unknown_job", f"no job {job_id!r}")
        return schemas.CancelResponse(job_id=job_id, cancelled=state)

    return app
