"""HTTP client of the MedSIGHT engine's /v1 API, for 3D Slicer's Python (standard library and numpy only).

Typical use::

    client = MedSIGHTClient("http://127.0.0.1:8765", token=None)
    info = client.upload_volume(voxels_kji, spacing, origin, direction, modality="CT")
    result = client.ask(info.volume_id, "Where is the liver?", plane="axial", indices=[40, 41])
    for answer in result.answers:
        print(answer.index, answer.text, [r.mask.shape for r in answer.regions])

    with client.ask_stream(info.volume_id, "Describe the slice.", indices=[40]) as stream:
        for event in stream:
            if event.kind == "token":
                print(event.text, end="")

Every failure (connection, timeout, HTTP error, malformed reply) raises ``MedSIGHTError``; invalid arguments
raise ``ValueError`` before anything is sent. Only idempotent GET requests are retried. Each call opens its own
connection, so one client may be shared between threads (e.g. to ``cancel`` a job that another thread is
streaming). Pixel data is never logged.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import re
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar, Union

import numpy as np

from .protocol import (
    AskResult,
    CancelResult,
    ErrorInfo,
    Health,
    ModelCard,
    SSEParser,
    StreamEvent,
    VolumeInfo,
    build_ask_request,
    npy_parts,
    volume_query,
)

__all__ = ["DEFAULT_URL", "ERROR_HINTS", "AskStream", "MedSIGHTClient", "MedSIGHTError", "describe_error"]

log = logging.getLogger(__name__)

#: A request body: one bytes object, or parts sent one after the other (``npy_parts``: header, then the voxels).
Body = Union[bytes, "tuple[bytes | memoryview, ...]"]
#: What a request sent within the engine's limits returns.
_Reply = TypeVar("_Reply")

DEFAULT_URL = "http://127.0.0.1:8765"
API_PREFIX = "/v1"
#: HTTP statuses worth retrying for an idempotent request (the engine or a proxy is briefly unavailable).
RETRY_STATUSES = frozenset({502, 503, 504})
_MAX_ERROR_TEXT = 2000
_READ_CHUNK = 64 * 1024
#: Bytes of a request body per socket send: ``sendall``'s timeout bounds its whole duration, so a volume sent in one
#: call would have to arrive within one timeout whatever its size.
_SEND_CHUNK = 1024 * 1024
#: What to do when the engine's reply stopped half-way (the engine ended or restarted, or the network dropped).
_CUT_OFF_HINT = "The engine may have stopped or restarted (its log says why); ask again once it runs."
#: What the user can do about an error, by its code (the engine's, or the client's own for no response).
ERROR_HINTS = {
    "connection_error": "Is the engine running? Start it with 'medsight serve', or check the engine URL.",
    "not_http": "Set the engine URL to the address the engine prints when it starts ('medsight serve').",
    "timeout": "The engine did not answer in time; it may be busy or overloaded.",
    "unauthorized": "Check the token in the connection settings.",
    "unknown_volume": "The engine no longer has this volume; ask again to send it once more.",
    "busy": "The engine is busy with other uploads or questions; ask again in a moment.",
    "too_large": "The engine does not take a request this large: shorten the question, or send a smaller (cropped "
    "or resampled) volume.",
    "body_timeout": "The request reached the engine too slowly; check the network connection to the engine.",
    "stream_truncated": _CUT_OFF_HINT,
    "reply_truncated": _CUT_OFF_HINT,
    "tls_error": "Check that the engine URL starts with https:// only when the engine is served over HTTPS, and that "
    "the engine's certificate, or the authority that signed it, is among the trusted ones (one the engine signed "
    "itself is not).",
}
#: The volume was sent again and the engine still does not have it: asking again would not help.
RESENT_HINT = ("The volume was sent again, but the engine still does not keep it: it may be restarting or short "
               "of memory for volumes; check the engine log.")


class MedSIGHTError(Exception):
    """Any failure talking to the engine.

    Attributes:
        status: the HTTP status, or None when no response came (connection refused, timeout, DNS, ...). An ask
            sends its status before its job runs, so a job that fails while running (a plain ask's error body, or a
            stream's "error" event) raises with status 200 and the engine's own code and message.
        code: the engine's machine-readable error code (e.g. "not_found", "unauthorized"), or one of this
            client's: "connection_error", "not_http" (a program that does not speak HTTP answered), "timeout",
            "tls_error", "bad_response", "stream_truncated" (an answer stream that stopped before its end),
            "reply_truncated" (a reply that did), "http_<status>".
        message: what went wrong, for people.
        body: the response body (decoded JSON when it was JSON, else text; None without a response).
        url: the request URL.
        retry_after: seconds the engine asks to wait before trying again (its Retry-After header, e.g. with
            429 "busy"), or None when it named none.
    """

    def __init__(
        self,
        message: str,
        status: int | None = None,
        code: str = "error",
        body: Any = None,
        url: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.body = body
        self.url = url
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = f"HTTP {self.status}" if self.status is not None else "no response"
        return f"{self.message} ({where}, {self.code})"

    def __repr__(self) -> str:
        return f"MedSIGHTError(status={self.status!r}, code={self.code!r}, message={self.message!r})"


def describe_error(err: BaseException, resent: bool = False) -> str:
    """A plain sentence for the user (no tracebacks: the user cannot act on them), with what to do about it: the chat
    panel's error line and "Test connection" say the same. ``resent``: the volume was already sent again for this
    question (so "ask again" would not help)."""
    if isinstance(err, MedSIGHTError):
        hint = RESENT_HINT if resent and err.code == "unknown_volume" else ERROR_HINTS.get(err.code, "")
        where = f" (HTTP {err.status})" if err.status and err.status != 200 else ""
        return f"{err.message}{where}. {hint}".strip() if hint else f"{err.message}{where}"
    if isinstance(err, ValueError):
        return str(err)
    return f"Unexpected error: {type(err).__name__}: {err}"


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds; the HTTP-date form (which the engine never sends) and nonsense give None."""
    try:
        seconds = float((value or "").strip())
    except ValueError:
        return None
    return seconds if 0.0 <= seconds < float("inf") else None


def _error_from_response(
    status: int, raw: bytes, url: str, reason: str = "", headers: Mapping[str, str] | None = None
) -> MedSIGHTError:
    """The error for a reply of HTTP ``status`` (``headers``: its Retry-After and Location are read)."""
    headers = headers or {}
    address = url.split("?")[0]
    location = headers.get("Location")
    text = raw.decode("utf-8", errors="replace")
    try:
        body: Any = json.loads(text) if text else None
    except json.JSONDecodeError:
        body = text
    code, message = f"http_{status}", ""
    if isinstance(body, dict):
        if isinstance(body.get("code"), str):
            code = body["code"]
        if isinstance(body.get("message"), str):
            message = body["message"]
        elif "detail" in body:  # a framework's default error shape
            detail = body["detail"]
            message = detail if isinstance(detail, str) else json.dumps(detail)[:_MAX_ERROR_TEXT]
    elif isinstance(body, str) and body.lstrip().startswith("<"):
        # The engine only answers JSON: a web page (a proxy's "502 Bad Gateway", another server on this address)
        # is named by its title, not pasted whole into the error line.
        title = re.search(r"<title[^>]*>(.*?)</title>", body, re.IGNORECASE | re.DOTALL)
        page = " ".join((title.group(1) if title else "").split())[:200] or reason or f"HTTP {status}"
        gateway = ": the proxy may have lost the engine" if status in (502, 504) else ""
        message = (f"{address} answered with a web page ({page!r}) instead of the engine's reply: a proxy "
                   f"in between or another program at this address answered{gateway}")
    elif isinstance(body, str) and body.strip():
        message = body.strip()[:_MAX_ERROR_TEXT]
    if status == 404 and code in ("http_404", "http_error"):
        # The engine names each 404 of its routes (e.g. "unknown_volume"): one without such a code is from no route
        # (the engine says "http_error"), and a bare "Not Found" would not say that the address is what is wrong.
        message = (f"nothing answers at {address} ({message or reason or 'not found'}): this address does "
                   "not serve the MedSIGHT engine's API; check the engine URL and its path")
    if 300 <= status < 400 and location:
        # Never followed: the bearer token would go wherever the redirect points.
        message = (f"{address} redirects to {location.strip()[:200]}; redirects are not followed (the "
                   "token is sent only to the engine URL set here): set the engine URL to the new address")
    if not message:
        message = f"{reason or 'HTTP error'} from {url}"
    return MedSIGHTError(message, status=status, code=code, body=body, url=url,
                         retry_after=_retry_after(headers.get("Retry-After")))


class AskStream:
    """The events of a streamed ask, read from the connection as they arrive.

    Iterate it for ``StreamEvent`` objects; iteration stops after the "done" or "error" event. ``close()`` (or
    leaving a ``with`` block, or dropping the iterator) closes the connection; the engine then stops the job.
    After the "job" event ``job_id`` is set, and after "done" ``result`` holds the complete ``AskResult``.
    An "error" event is yielded, not raised: inspect ``event.error`` (or call ``raise_for_error``).
    """

    def __init__(self, connection: http.client.HTTPConnection, response: http.client.HTTPResponse, url: str):
        self._connection = connection
        self._response = response
        self._url = url
        self._parser = SSEParser()
        self._pending: list[tuple[str, str]] = []
        self._finished = False
        self.job_id: str | None = None
        self.result: AskResult | None = None
        self.error: MedSIGHTError | None = None

    @property
    def closed(self) -> bool:
        return self._response is None

    def __iter__(self) -> Iterator[StreamEvent]:
        return self

    def __next__(self) -> StreamEvent:
        if self._finished:
            raise StopIteration
        while not self._pending:
            if self._response is None:
                self._finished = True
                raise StopIteration
            chunk = self._read()
            if chunk:
                self._pending.extend(self._parser.feed(chunk))
                continue
            self._pending.extend(self._parser.close())
            if not self._pending:
                self.close()
                raise MedSIGHTError(
                    f"the engine's answer stream from {self._url} ended before the answer was complete",
                    status=200,
                    code="stream_truncated",
                    url=self._url,
                )
        kind, payload = self._pending.pop(0)
        try:
            event = StreamEvent.from_sse(kind, payload)
        except (ValueError, TypeError, KeyError) as err:  # as ``_json`` parses: e.g. int(None) is a TypeError
            self.close()
            raise MedSIGHTError(
                f"malformed {kind!r} event from {self._url}: {err}", status=200, code="bad_response", url=self._url
            ) from None
        if event.job_id is not None:
            self.job_id = event.job_id
        if event.kind == "done":
            self.result = event.result
        if event.kind == "error" and event.error is not None:
            self.error = MedSIGHTError(
                event.error.message, status=200, code=event.error.code, body=event.data, url=self._url
            )
        if event.final:
            self._finished = True
            self.close()
        return event

    def _read(self) -> bytes:
        try:
            return self._response.read1(_READ_CHUNK)
        except (socket.timeout, TimeoutError):  # distinct classes before Python 3.10 (Slicer 5.8)
            self.close()
            raise MedSIGHTError(
                f"no event from {self._url} within the timeout", code="timeout", url=self._url
            ) from None
        except (OSError, http.client.HTTPException) as err:
            self.close()
            raise MedSIGHTError(
                f"the engine's answer stream from {self._url} broke off before the answer was complete "
                f"({_why_cut_off(err)})", status=200, code="stream_truncated", url=self._url,
            ) from None

    def raise_for_error(self) -> None:
        """Raise the stream's "error" event as a ``MedSIGHTError``, if there was one."""
        if self.error is not None:
            raise self.error

    def collect(self) -> AskResult:
        """Read the remaining events and return the final result (raises on an "error" event)."""
        for _ in self:
            pass
        self.raise_for_error()
        if self.result is None:
            raise MedSIGHTError(f"the event stream from {self._url} was closed before it finished", code="closed")
        return self.result

    def close(self) -> None:
        """Close the connection (idempotent)."""
        response, self._response = self._response, None
        self._finished = True
        if response is not None:
            try:
                response.close()
            finally:
                self._connection.close()

    def __enter__(self) -> AskStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # never raise from a finaliser
            self.close()


class MedSIGHTClient:
    """Client of one MedSIGHT engine.

    Args:
        base_url: the engine's address, e.g. "http://127.0.0.1:8765" (a path prefix such as
            "https://host/medsight" is kept; "/v1/..." is appended, so a trailing "/v1" is dropped).
        token: bearer token when the engine was started with one (always when it listens beyond this machine).
        timeout: seconds to wait for a connection or for data, for every call unless the call passes its own; a
            GET's timeout bounds all its attempts together.
        retries: extra attempts for idempotent GET requests after a connection failure or HTTP 502/503/504, with
            exponential backoff, within the GET's one timeout. POST requests (uploads, asks, cancels) are never
            retried.
        backoff: seconds before the first retry; doubled for each further one.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        token: str | None = None,
        timeout: float = 30.0,
        retries: int = 2,
        backoff: float = 0.25,
    ) -> None:
        try:
            parts = urllib.parse.urlsplit(base_url.strip())
        except ValueError:  # an unclosed IPv6 bracket: urllib's "Invalid IPv6 URL" would not name the URL
            raise ValueError(f"base_url must look like http://host:port, got {base_url!r}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in parts.netloc):
            raise ValueError(f"base_url must look like http://host:port, got {base_url!r}")
        try:
            port = parts.port  # urllib refuses a port that is not a number from 0 to 65535 only when asked for it
        except ValueError:
            port = 0
        if port == 0:
            raise ValueError(f"base_url must look like http://host:port with a port from 1 to 65535, got {base_url!r}")
        unsendable = [i for i, c in enumerate(token or "") if not " " <= c <= "~"]  # the engine's rule (check_bind)
        if unsendable:
            # http.client would raise a bare UnicodeEncodeError at the first request ("ä" is sent as Latin-1, which
            # no engine accepts), so a mistyped token is named here, without echoing it.
            raise ValueError(f"the token must be printable ASCII (letters, digits, punctuation, spaces): character "
                             f"{unsendable[0] + 1} is not")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive")
        prefix = parts.path.rstrip("/")
        if prefix.endswith(API_PREFIX):
            # The address the engine prints ("MedSIGHT engine on http://127.0.0.1:8765/v1"), pasted as the URL: every
            # request went to /v1/v1/... and was "not found".
            prefix = prefix[:-len(API_PREFIX)]
        self.base_url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, prefix, "", ""))
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = port
        self._prefix = prefix
        self.token = token
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        #: The engine's last health reply, for its upload limits: fetched once per client, not per upload.
        self._health: Health | None = None

    def __repr__(self) -> str:
        return f"MedSIGHTClient({self.base_url!r}, token={'***' if self.token else None})"

    # -- endpoints ---------------------------------------------------------------------------------------------
    def health(self, timeout: float | None = None) -> Health:
        """GET /v1/health: whether the engine is up, its version, model, device and dtype, and its upload limits."""
        self._health = self._json("GET", "/health", timeout=timeout, parse=Health.from_json)
        return self._health

    def model_card(self, timeout: float | None = None) -> ModelCard:
        """GET /v1/model: the loaded model's card (name, size, whether its weights are random, intended use)."""
        return self._json("GET", "/model", timeout=timeout, parse=ModelCard.from_json)

    def upload_volume(
        self,
        array: np.ndarray,
        spacing: Iterable[float] = (1.0, 1.0, 1.0),
        origin: Iterable[float] = (0.0, 0.0, 0.0),
        direction: Iterable[float] | np.ndarray = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
        modality: str = "CT",
        timeout: float | None = None,
    ) -> VolumeInfo:
        """POST /v1/volumes: send a volume (or a 2D image) once; ask about it by its ``volume_id`` afterwards.

        Args:
            array: (k, j, i) voxels with raw intensities (HU for CT), e.g. ``slicer.util.arrayFromVolume``; or
                an (H, W) / (H, W, 3) uint8 image.
            spacing: (i, j, k) voxel size in mm.
            origin: LPS position of voxel (0, 0, 0) in mm.
            direction: LPS direction matrix, 3x3 or 9 numbers row-major; its columns are the i, j, k axes.
                (Slicer's IJKToRAS directions become LPS by negating their first two rows.)
            modality: "CT", "MR", ... (chooses the default display window).
        The same voxels and geometry always give the same ``volume_id``, so uploading twice is harmless. A volume over
        the engine's published limits (``health``) raises ``MedSIGHTError`` "too_large" before anything is sent.
        """
        query = volume_query(spacing, origin, direction, modality)
        body = npy_parts(array)
        size = _body_size(body)
        shape = np.shape(array)
        log.debug("uploading %s %s array (%d bytes)", getattr(array, "shape", "?"), getattr(array, "dtype", "?"), size)
        return self._within_limits(
            lambda health: health.upload_refusal(size, shape),
            "/volumes",
            timeout,
            lambda: self._json("POST", "/volumes", query=query, body=body, content_type="application/x-npy",
                               timeout=timeout, parse=VolumeInfo.from_json),
        )

    def _within_limits(self, refusal: Callable[[Health], str | None], path: str, timeout: float | None,
                       send: Callable[[], _Reply], check: bool = True) -> _Reply:
        """``send()`` a request to ``path`` that the engine's published limits bound (``refusal``: why a `Health`
        refuses it, or None), refused here without sending when it is over them (``check``: look them up at all).

        The limits are fetched (GET /v1/health) on this client's first such request, and again before refusing: the
        engine may have restarted with higher ones. The engine's own 413 "too_large" means that the limits known here
        were out of date (an older engine's health without them, a restart with lower ones): they are fetched again
        at once, and the error names the engine's limit as a refusal here does; the next such request is refused
        unsent. An engine that publishes none, or whose health fails, gets the request and tells what is wrong."""
        if check:
            why = self._refusal(refusal, timeout)
            if why is not None:
                raise MedSIGHTError(f"{why}; nothing was sent", code="too_large", url=self._url(path))
        try:
            return send()
        except MedSIGHTError as err:
            if err.code != "too_large" or err.status is None:
                raise
            self._health = None
            why = self._refusal(refusal, timeout)
            if why is None:
                raise
            raise MedSIGHTError(f"{why}; the engine refused it", status=err.status, code=err.code, body=err.body,
                                url=err.url, retry_after=err.retry_after) from None

    def _refusal(self, refusal: Callable[[Health], str | None], timeout: float | None) -> str | None:
        """Why the engine's limits refuse the request, from the limits known here when they take it, else from a fresh
        look-up; None when they take it or are unknown."""
        if self._health is not None and refusal(self._health) is None:
            return None
        try:
            return refusal(self.health(timeout=timeout))
        except MedSIGHTError as err:
            log.info("the engine's limits are unknown (%s)", err.code)
            return None

    def _send_ask(self, body: dict, timeout: float | None, send: Callable[[bytes], _Reply]) -> _Reply:
        """``send`` the ask's JSON, refused with the engine's limit when it is over it (a long conversation). One of
        ``ASK_BYTES_ALWAYS_READ`` or less is sent without looking the limit up (every engine reads it)."""
        data = _json_bytes(body)
        return self._within_limits(lambda health: health.ask_refusal(len(data)), "/ask", timeout,
                                   lambda: send(data), check=len(data) > ASK_BYTES_ALWAYS_READ)

    def volume_info(self, volume_id: str, timeout: float | None = None) -> VolumeInfo:
        """GET /v1/volumes/{volume_id}. Raises ``MedSIGHTError`` with status 404 when the engine no longer has it
        (it forgets the least recently used volumes when memory runs short): upload it again."""
        return self._json("GET", f"/volumes/{_segment(volume_id)}", timeout=timeout, parse=VolumeInfo.from_json)

    def ask(
        self,
        volume_id: str,
        messages: str | Iterable[Any],
        plane: str = "axial",
        indices: Iterable[int] = (0,),
        options: Mapping[str, Any] | None = None,
        window: Any = None,
        timeout: float | None = None,
        view: Any = None,
    ) -> AskResult:
        """POST /v1/ask: ask the same question about each slice; one ``SliceAnswer`` per index, in order.

        Args:
            messages: a question, or a conversation as (role, content) pairs.
            plane, indices: which slices ("axial", "coronal" or "sagittal"; indices along that axis).
            options: generation settings, e.g. {"max_new_tokens": 128, "seed": 0} (see the engine's AskOptions).
            window: display window: a CT preset name, a (center, width) pair, or None for the modality default.
            timeout: seconds to wait for the whole answer (generation may take a while on a CPU).
            view: the 4x4 slice-to-RAS of the view the user looks at, instead of plane and indices: the engine
                picks the slice (each answer's plane, index and slice_to_ras say which).
        """
        body = build_ask_request(volume_id, messages, plane, indices, options, window, stream=False, view=view)
        return self._send_ask(body, timeout, lambda data: self._json("POST", "/ask", body=data, timeout=timeout,
                                                                     parse=AskResult.from_json))

    def ask_stream(
        self,
        volume_id: str,
        messages: str | Iterable[Any],
        plane: str = "axial",
        indices: Iterable[int] = (0,),
        options: Mapping[str, Any] | None = None,
        window: Any = None,
        timeout: float | None = None,
        view: Any = None,
    ) -> AskStream:
        """POST /v1/ask with streaming: an ``AskStream`` of "job", "token", "region", then "done" (or "error").

        Same arguments as ``ask``; ``timeout`` here bounds the wait for each piece of data, not the whole answer.
        The request is sent before this returns, so HTTP errors (401, 404, 422, ...) raise here. Close the
        stream (or use it in a ``with`` block) to hang up early; ``cancel(stream.job_id)`` stops the job too.
        """
        body = build_ask_request(volume_id, messages, plane, indices, options, window, stream=True, view=view)
        return self._send_ask(body, timeout, lambda data: self._open_stream(data, timeout))

    def _open_stream(self, data: bytes, timeout: float | None) -> AskStream:
        url = self._url("/ask")
        connection, response = self._send("POST", "/ask", None, data, "application/json", timeout,
                                          accept="text/event-stream")
        if response.status >= 300:
            try:
                raise _error_from_response(response.status, response.read(), url, response.reason, response.msg)
            finally:
                connection.close()
        content_type = response.getheader("Content-Type", "")
        if "text/event-stream" not in content_type:
            try:
                raw = response.read()
            finally:
                connection.close()
            raise MedSIGHTError(
                f"expected an event stream from {url}, got {content_type or 'no content type'}",
                status=response.status,
                code="bad_response",
                body=raw.decode("utf-8", "replace")[:_MAX_ERROR_TEXT],
                url=url,
            )
        return AskStream(connection, response, url)

    def cancel(self, job_id: str, timeout: float | None = None) -> CancelResult:
        """POST /v1/jobs/{job_id}/cancel: stop a running ask; it returns its partial answers marked cancelled.

        Raises ``MedSIGHTError`` (404) for a job id the engine does not know.
        """
        return self._json("POST", f"/jobs/{_segment(job_id)}/cancel", timeout=timeout, parse=CancelResult.from_json)

    # -- transport ---------------------------------------------------------------------------------------------
    def _url(self, path: str, query: Mapping[str, str] | None = None) -> str:
        url = f"{self.base_url}{API_PREFIX}{path}"
        return f"{url}?{urllib.parse.urlencode(query)}" if query else url

    def _headers(self, content_type: str | None, accept: str) -> dict[str, str]:
        headers = {"Accept": accept, "User-Agent": "MedSIGHTSlicer"}
        if content_type:
            headers["Content-Type"] = content_type
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _send(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None,
        body: Body | None,
        content_type: str | None,
        timeout: float | None,
        accept: str = "application/json",
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """One attempt: open a connection, send, return it with the response headers read (body unread). A body
        given in parts (``npy_parts``) is sent from those buffers as they are, never joined into one."""
        url = self._url(path, query)
        seconds = self.timeout if timeout is None else timeout
        connection_class = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        connection = connection_class(self._host, self._port, timeout=seconds)
        target = f"{self._prefix}{API_PREFIX}{path}"
        if query:
            target += "?" + urllib.parse.urlencode(query)
        headers = self._headers(content_type, accept)
        payload: Any = body
        if isinstance(body, tuple):
            headers["Content-Length"] = str(_body_size(body))  # else http.client would send it chunked
            payload = _send_pieces(body)
        try:
            try:
                connection.request(method, target, body=payload, headers=headers)
            except (BrokenPipeError, ConnectionResetError):
                # The engine may refuse a body on its declared length (413 too_large) and hang up before it is all
                # sent: its answer is then waiting to be read, and names the problem; without one, this raises.
                if body is None:
                    raise
            return connection, connection.getresponse()
        except (socket.timeout, TimeoutError):  # distinct classes before Python 3.10 (Slicer 5.8)
            connection.close()
            raise MedSIGHTError(f"{method} {url} timed out after {seconds} s", code="timeout", url=url) from None
        except ssl.SSLError as err:  # before OSError, its base: "is the engine running?" would mislead
            connection.close()
            what = getattr(err, "verify_message", None) or err.reason or str(err)
            if isinstance(err, ssl.SSLCertVerificationError):
                what += _trusted_certificates()
            raise MedSIGHTError(
                f"the secure (HTTPS) connection to {url} failed: {what}", code="tls_error", url=url
            ) from None
        except (OSError, http.client.HTTPException) as err:
            connection.close()
            raise _unreachable(url, err) from None

    def _json(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None = None,
        body: Body | None = None,
        content_type: str | None = "application/json",
        timeout: float | None = None,
        parse: Callable[[Any], Any] | None = None,
    ) -> Any:
        """Send, read the whole JSON reply (through `parse`, if given); retry idempotent GETs on connection failures
        and 502/503/504. A reply that `parse` rejects becomes a "bad_response" error.

        A GET's timeout bounds all its attempts together: each attempt gets the time left, a timed-out one is not
        repeated and no retry starts after the time is up ("Test connection" against an engine that never answered
        took three timeouts and two backoffs: 9.8 s with 3 s set)."""
        url = self._url(path, query)
        attempts = 1 + (self.retries if method == "GET" else 0)
        if body is None:
            content_type = None
        seconds = self.timeout if timeout is None else timeout
        deadline = None if seconds is None or attempts == 1 else time.monotonic() + seconds
        for attempt in range(attempts):
            last = attempt == attempts - 1
            limit = seconds if deadline is None or attempt == 0 else max(deadline - time.monotonic(), 0.001)
            try:
                status, reason, raw, headers = self._exchange(method, path, query, body, content_type, limit)
            except MedSIGHTError as err:
                if err.code == "timeout" and attempt > 0:  # the time that ran out is the call's, not the attempt's
                    raise MedSIGHTError(f"{method} {url} got no reply within {seconds:g} s ({attempt + 1} attempts)",
                                        code="timeout", url=url) from None
                if last or err.code == "timeout":
                    raise
                failure: MedSIGHTError = err
                log.info("%s %s failed (%s); retrying", method, url, err.code)
            else:
                if status < 300:
                    data = _parse_json(raw, status, url)
                    failed = ErrorInfo.in_reply(data)
                    if failed is not None:  # the job failed after its 200 went out: the engine's own error
                        raise MedSIGHTError(failed.message, status=status, code=failed.code, body=data, url=url)
                    if parse is None:
                        return data
                    try:
                        return parse(data)
                    except (ValueError, TypeError, KeyError) as err:
                        raise MedSIGHTError(
                            f"unexpected reply from {url}: {err}",
                            status=status,
                            code="bad_response",
                            body=data,
                            url=url,
                        ) from None
                failure = _error_from_response(status, raw, url, reason, headers)
                if last or status not in RETRY_STATUSES:
                    raise failure
                log.info("%s %s returned HTTP %d; retrying", method, url, status)
            pause = self.backoff * (2**attempt)
            if deadline is not None and time.monotonic() + pause >= deadline:
                raise failure  # no time left for another attempt
            time.sleep(pause)
        raise AssertionError("unreachable")  # pragma: no cover

    def _exchange(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None,
        body: Body | None,
        content_type: str | None,
        timeout: float | None,
    ) -> tuple[int, str, bytes, http.client.HTTPMessage]:
        """Status, reason, body and headers of one attempt."""
        connection, response = self._send(method, path, query, body, content_type, timeout)
        url = self._url(path, query)
        try:
            return response.status, response.reason, response.read(), response.msg
        except (socket.timeout, TimeoutError):  # distinct classes before Python 3.10 (Slicer 5.8)
            raise MedSIGHTError(f"{method} {url}: the reply timed out", code="timeout", url=url) from None
        except (OSError, http.client.HTTPException) as err:
            raise MedSIGHTError(
                f"{method} {url}: the engine's reply broke off before it was complete ({_why_cut_off(err)})",
                status=response.status,
                code="reply_truncated",
                url=url,
            ) from None
        finally:
            connection.close()


def _trusted_certificates() -> str:
    """Where this Python reads the certificates it trusts, for a certificate it did not. Slicer's launcher points
    SSL_CERT_FILE at its own list (Slicer.crt), so a hospital's certificate authority that the operating system
    trusts is not trusted here (on Windows the system's list is read as well)."""
    paths = ssl.get_default_verify_paths()
    where = paths.cafile or paths.capath
    return f"; the certificates trusted here are those in {where}" if where else ""


def _unreachable(url: str, err: BaseException) -> MedSIGHTError:
    """Why no HTTP reply came. A program on that port that does not speak HTTP (an SSH server, a database) is named as
    that, with its own code "not_http": http.client's error is its first line as it came ("SSH-2.0-OpenSSH_9.6\\r\\n"),
    which read as the reason the engine "cannot be reached", and "Is the engine running?" (or, while the local engine
    runs, "it is still loading") does not help when the URL names another service."""
    if isinstance(err, http.client.BadStatusLine) and not isinstance(err, http.client.RemoteDisconnected):
        words = "".join(c for c in str(err.args[0] if err.args else "") if c.isprintable()).strip()[:60]
        said = f" (it sent {words!r})" if words else ""
        return MedSIGHTError(f"another program answers at {url.split('?')[0]}, not over HTTP{said}: the engine URL "
                             "names a port of some other service", code="not_http", url=url)
    return MedSIGHTError(f"cannot reach the MedSIGHT engine at {url}: {err or type(err).__name__}",
                         code="connection_error", url=url)


def _why_cut_off(err: BaseException) -> str:
    """Why a reply stopped half-way, in words: http.client's "IncompleteRead(0 bytes read)" says nothing to a user."""
    if isinstance(err, http.client.IncompleteRead):
        return "the engine closed the connection"
    if isinstance(err, ConnectionResetError):
        return "the connection was reset"
    return getattr(err, "strerror", None) or str(err) or type(err).__name__


def _parse_json(raw: bytes, status: int, url: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        text = raw.decode("utf-8", errors="replace")[:_MAX_ERROR_TEXT]
        raise MedSIGHTError(
            f"the reply from {url} is not JSON", status=status, code="bad_response", body=text, url=url
        ) from None


def _body_size(parts: tuple[bytes | memoryview, ...]) -> int:
    return sum(memoryview(part).nbytes for part in parts)


def _send_pieces(parts: tuple[bytes | memoryview, ...]) -> Iterator[memoryview]:
    """The parts as views of at most ``_SEND_CHUNK`` bytes each (no copies)."""
    for part in parts:
        view = memoryview(part).cast("B")
        for start in range(0, len(view), _SEND_CHUNK):
            yield view[start:start + _SEND_CHUNK]


#: An ask body every engine reads: its limit is this much plus the JSON of the longest prompt its model takes
#: (contract test), so an ordinary question needs no look-up of the limit.
ASK_BYTES_ALWAYS_READ = 64 * 1024


def _json_bytes(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _segment(value: str) -> str:
    value = str(value)
    if not value:
        raise ValueError("an id must not be empty")
    return urllib.parse.quote(value, safe="")
