"""The audit trail (`medsight serve --audit FILE`): one JSON line per job, so that any mask can be traced to the
model, weights and settings that made it.

A line holds the time, job id, model name, version and weights hash, the volume's content hash (the volume id: a
SHA-256 of voxels and geometry), plane and slice indices, generation options, region codes and labels, durations and
the outcome. It never holds question or answer text, pixels, or anything from a DICOM header: the volume store keeps
no identifiers, and the line is built from an explicit list of fields, not from the request.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import torch

from medsight._version import __version__

if TYPE_CHECKING:
    from medsight.engine import EngineAnswer


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape, bytes) in name order: the same weights give
    the same hash whatever file or format they came from."""
    digest = hashlib.sha256()
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    for name in sorted(tensors):
        t = tensors[name].detach()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.to("cpu").contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def answer_regions(answer: EngineAnswer | None) -> list[dict]:
    """An answer's regions as the trail lists them (slice, code, label), in the answer's order."""
    return [{"slice": a.slice_index, "code": r.code, "label": r.label}
            for a in (answer.answers if answer is not None else []) for r in a.regions]


def sent_regions(regions: list[dict], abandoned: bool, streamed: int | None) -> list[dict]:
    """Of an answer's `regions` (`answer_regions`), those that went out to its client.

    An answer whose client was there when it went out went out whole (its "region" events, then the answer with the
    masks, which waits for this line: `PendingLine`). One abandoned before that (the client left, the engine stopped:
    the response had stopped sending when it said so) went out as far as the response had sent it: the first
    `streamed` "region" events of a stream (the engine streams them in the answer's order), nothing of a plain ask
    (`streamed` None). The regions mapped meanwhile were listed too: 105 audited, 73 sent for a client gone during
    the second of four slices."""
    if not abandoned:
        return regions
    return regions[:streamed] if streamed is not None else []


class PendingLine:
    """A finished job's audit line, waiting to learn whether its answer goes out: the job ends on the worker, its
    answer leaves later from the event loop, and its client may leave in between (which only the response sees).
    Written once: by the response as it sends the answer, before the masks leave, or, for a client gone, by whichever
    of job and response ends last. Written at the job's end, it listed a whole answer that nobody received."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._write: Callable[[bool], None] | None = None
        self._closed = False  # the response will send no answer

    def hand_over(self, write: Callable[[bool], None]) -> None:
        """On the worker, as a job with an answer ends: `write(left)` writes its line. Written at once (left) when
        the response has already stopped."""
        with self._lock:
            if not self._closed:
                self._write = write
                return
        write(True)

    def release(self, sent: bool) -> None:
        """From the response: its answer goes out now (`sent`; an error from the line withholds it), or never.
        On the event loop, between its look at the connection and its send: a client found there may not leave
        unrecorded while the line is written elsewhere."""
        with self._lock:
            write, self._write = self._write, None
            self._closed = self._closed or not sent
        if write is not None:
            write(not sent)


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    version: str
    weights_sha256: str


def open_audit_file(path: str) -> int:
    """A descriptor appending to `path`, created 0o600: the trail describes a patient's studies, even without
    identifiers."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


class AuditLog:
    """Appends one line per job to a file, flushed and fsynced so that a crash loses at most the line in flight."""

    def __init__(self, path: str, model: ModelIdentity) -> None:
        self.path, self.model = path, model
        self._lock = threading.Lock()
        self._fd = open_audit_file(path)  # open once, for every job; unbuffered, so a failed line leaves nothing

    @classmethod
    def for_model(cls, path: str, model: torch.nn.Module, name: str) -> AuditLog:
        return cls(path, ModelIdentity(name, __version__, weights_sha256(model)))

    def record(self, *, job_id: str, volume_id: str, plane: str, slices: list[int], options: dict,
               regions: list[dict], queued_s: float, duration_s: float, outcome: str) -> None:
        line = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "job_id": job_id,
            "model": {"name": self.model.name, "version": self.model.version,
                      "weights_sha256": self.model.weights_sha256},
            "volume_sha256": volume_id,
            "plane": plane,
            "slices": [int(i) for i in slices],
            "options": options,
            "regions": regions,
            "queued_s": round(queued_s, 3),
            "duration_s": round(duration_s, 3),
            "outcome": outcome,
        }
        data = (json.dumps(line, separators=(",", ":"), sort_keys=True) + "\n").encode("utf-8")
        with self._lock:
            start = os.fstat(self._fd).st_size
            try:
                written = 0
                while written < len(data):  # os.write may write part of the line (a full disk): go on or fail
                    written += os.write(self._fd, data[written:])
                os.fsync(self._fd)
            except OSError:
                # A torn line must not stay: the next job's line would be appended to it (a buffered file even
                # completed it, recording a "completed" job whose answer was withheld).
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, start)
                raise

    def close(self) -> None:
        with self._lock:
            os.close(self._fd)
