"""The response of an admitted ask: headers (with the job id) go out at once, then the answer.

A plain ask sends `200` and `X-Job-Id` immediately and its JSON body when the job ends; a stream sends the "job"
event first, then "token"/"region" events as the engine produces them and "done" (or "error"). Both watch the
connection: a client that goes away stops its job, whether it was waiting or running. No thread waits or polls:
the worker hands events to the event loop with `loop.call_soon_threadsafe` into an `asyncio.Queue`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections import Counter
from collections.abc import Callable

from starlette.responses import Response

from medsight.server.jobs import Job

log = logging.getLogger("medsight.server")

JOB_ID_HEADER = "X-Job-Id"
#: The error a request still open when the server stops (after its grace) receives, in place of a cut connection:
#: an ask in its started response (`JobResponse`), any other request as a 503 (`guard.Guard`).
STOPPING_ERROR = {"code": "stopping", "message": "the engine is stopping; try again once it runs"}
STOPPING = json.dumps(STOPPING_ERROR, separators=(",", ":"))


def sse(event: str, data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"event: {event}\ndata: {payload}\n\n".encode()


#: Least time between two hand-overs of a stream's events to the event loop: 50 a second reads as continuous text,
#: while each hand-over costs the model's thread the GIL for the loop's turn (one per token was 20-30 % of a job).
STREAM_INTERVAL_S = 0.02


class EventFeed:
    """Thread-safe producer side of an asyncio.Queue: the worker calls `put`, the event loop reads `queue`.

    Events wait in a locked list; one loop callback at a time (at most every `interval_s`) moves all that arrived
    meanwhile. The reader calls `flush` once the job has settled, so no event is left behind.
    """

    def __init__(self, interval_s: float = STREAM_INTERVAL_S) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._pending: list[tuple[str, str]] = []  # not yet in `queue`; a hand-over is scheduled while non-empty
        self._moved_at = -interval_s
        #: Events of each kind the response has sent (written on the loop; read on the worker once the job is
        #: abandoned, when the response has stopped sending): what of the answer went out, for the audit trail.
        self.sent: Counter[str] = Counter()

    def put(self, kind: str, payload: str) -> None:
        with self._lock:
            self._pending.append((kind, payload))
            if len(self._pending) > 1:
                return  # the scheduled hand-over takes it
        with contextlib.suppress(RuntimeError):  # RuntimeError: the loop is closed, nobody is listening
            self.loop.call_soon_threadsafe(self._schedule)

    def flush(self) -> None:
        """On the loop: move every pending event into `queue` now."""
        self._moved_at = self.loop.time()
        with self._lock:
            events, self._pending = self._pending, []
        for event in events:
            self.queue.put_nowait(event)

    def _schedule(self) -> None:
        wait = self._moved_at + self.interval_s - self.loop.time()
        if wait > 0:
            self.loop.call_later(wait, self.flush)
        else:
            self.flush()


#: Longest one write of a response waits for its client to take the bytes sent before it (the kernel's socket buffers,
#: megabytes, being full). A client that stops reading without hanging up otherwise held its connection and the rest
#: of its answer in memory for ever (uvicorn has no write timeout); it is then dropped like one that hung up.
SEND_TIMEOUT_S = 300.0


class ClientStalledError(Exception):
    """The client took none of the response for `send_timeout_s`."""


class JobResponse(Response):
    """ASGI response for an admitted job. `job.future` resolves to the JSON text of the answer, or raises
    an `ApiError`-like exception with `status`, `code` and `message`. `release(sent)` is told, once the job has
    ended, whether its answer goes out (just before: an `ApiError`-like exception withholds it) or never does (the
    audit line, `audit.PendingLine`)."""

    def __init__(self, job: Job, feed: EventFeed | None, error_body, job_event: dict | None = None,
                 send_timeout_s: float = SEND_TIMEOUT_S, release: Callable[[bool], None] | None = None) -> None:
        self.job, self.feed, self.error_body = job, feed, error_body
        self.job_event = {"job_id": job.id, **(job_event or {})}  # a stream's first event
        self.send_timeout_s = send_timeout_s
        self.release = release or (lambda sent: None)
        self.background = None

    async def __call__(self, scope, receive, send) -> None:
        try:
            await self._respond(receive, send)
        except ClientStalledError:
            # Returning with the response unfinished makes uvicorn close the connection (it logs that it did).
            log.info("job %s: the client read nothing for %g s: connection dropped", self.job.id, self.send_timeout_s)

    def _timed(self, send):
        async def timed_send(message) -> None:
            try:
                await asyncio.wait_for(send(message), self.send_timeout_s)
            except asyncio.TimeoutError:
                raise ClientStalledError() from None

        return timed_send

    async def _respond(self, receive, plain_send) -> None:
        streaming = self.feed is not None
        send = self._timed(plain_send)
        content_type = b"text/event-stream" if streaming else b"application/json"
        headers = [(b"content-type", content_type), (b"cache-control", b"no-cache"),
                   (JOB_ID_HEADER.lower().encode(), self.job.id.encode())]
        if streaming:
            headers.append((b"x-accel-buffering", b"no"))
        gone = asyncio.ensure_future(_disconnected(receive))
        try:  # from the first write: however it ends, the job hears of it, and so does its audit line
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            if streaming:
                await send(_body(sse("job", self.job_event)))
                finished = await self._stream(send, gone)
            else:
                finished = await self._plain(send, gone)
            if not finished:
                self.job.stop("disconnected")
                return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            # The server is stopping and its grace has run out (uvicorn cancels open requests): the client is told
            # so, and the finished response spares the terminal uvicorn's error for every ask still open. The job
            # stops below.
            # Untimed: a timed write runs as a task of its own, which the stopping loop no longer runs.
            with contextlib.suppress(Exception):  # the connection may be gone already
                await plain_send(_body(sse("error", STOPPING) if streaming else STOPPING.encode()))
                await plain_send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        finally:
            gone.cancel()
            if not self.job.future.done():  # cancelled by the server (shutdown) or the client went away
                self.job.stop("disconnected")
            self.release(False)  # the answer, if not released yet, goes to nobody

    def _answer(self) -> tuple[str, str]:
        """The ended job's ("done", answer) or ("error", error body); its answer is released first: no mask leaves
        without its audit line. Called with the client known to be there, and no wait before the send."""
        err = self.job.future.exception()
        if err is None:
            try:
                self.release(True)
                return "done", self.job.future.result()
            except Exception as failed:  # the audit line could not be written: the answer is withheld
                err = failed
        return "error", self.error_body(err)

    async def _plain(self, send, gone: asyncio.Future) -> bool:
        await asyncio.wait({self.job.future, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not self.job.future.done() or gone.done():  # gone as the job ended: its answer goes to nobody
            return False
        await send(_body(self._answer()[1].encode()))
        return True

    async def _stream(self, send, gone: asyncio.Future) -> bool:
        queue = self.feed.queue
        while True:
            getter = asyncio.ensure_future(queue.get())
            try:
                await asyncio.wait({getter, self.job.future, gone}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:  # the server stops: a getter left pending is logged as an error
                getter.cancel()
                raise
            if gone.done():
                # Nothing sent now would reach the client (uvicorn drops it): a burst of events still counted as
                # sent, and the job went on for nobody, as long as events came (or its answer was released).
                getter.cancel()
                return False
            if getter.done():
                # Events that queued up meanwhile go out in the same write: one wake-up per burst, not per token.
                events = [getter.result()]
                while not queue.empty():
                    events.append(queue.get_nowait())
                await send(_body(b"".join(sse(*event) for event in events)))
                self.feed.sent.update(kind for kind, _ in events)
                continue
            getter.cancel()
            if not self.job.future.done():
                return False
            self.feed.flush()  # events the worker produced before the job settled come first
            while not queue.empty() and not gone.done():
                kind, payload = queue.get_nowait()
                await send(_body(sse(kind, payload)))
                self.feed.sent[kind] += 1
            if gone.done():  # gone as the job ended: its masks go to nobody
                return False
            await send(_body(sse(*self._answer())))
            return True


def _body(chunk: bytes) -> dict:
    return {"type": "http.response.body", "body": chunk, "more_body": True}


async def _disconnected(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
