"""The conversation panel: ask the engine about slices of a volume and watch the answer stream in.

The panel never blocks the user interface: uploads and asks run in a worker thread that only talks to the
network and reports what it learns through ``jobs.JobRunner``; a QTimer on the main thread polls it and updates the
widgets (Qt objects must only be touched from the thread that owns them). It knows nothing about MRML: the host
(the Slicer module, or a test) plugs in callables:

- ``volume_provider()`` -> ``VolumeData`` to upload, an existing ``volume_id`` string, or None (nothing chosen); a
  ValueError (e.g. the volume has no image data) is shown in the error line and nothing is sent.
- ``current_slice_provider()`` -> what the "Current slice" scope means: a slice index (None: 0) along the panel's
  plane, or the 4x4 slice-to-RAS of the view the user looks at (the engine then picks plane and index). Its
  ValueError is shown only for that scope: a range or the whole volume is asked without it.
- ``before_upload(url)`` -> False to refuse sending images to that engine (the first-use consent prompt).
- ``on_volume_uploaded(key, volume_id)``: an upload finished (the host may cache the id).
- ``on_volume_unknown(volume_id)`` -> ``VolumeData`` or None: the engine no longer has the id the provider gave
  (restarted, or evicted it); the host forgets it and returns the voxels to send again (None: it cannot).
- ``on_region_answers(answers)``: once per poll with the ``SliceAnswer``s with regions that arrived in it (one
  request's slices end together), so the host turns them into suggestions at once.
- ``on_region_clicked(link)``: a region chip in the conversation was clicked; ``link`` (a ``RegionLink``) names the
  question (``ask_serial``), plane, slice and region of that chip's answer. It returns False when the region's volume
  is gone (the panel then says so).
- ``on_accept_all()``: the "Accept all" button was pressed.
"""

from __future__ import annotations

import contextlib
import html
import ipaddress
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Union

import numpy as np

from .client import MedSIGHTClient, MedSIGHTError, describe_error
from .jobs import Job, JobRunner
from .protocol import ENGINE_ERRORS, PLANES, Region, SliceAnswer
from .qt_shim import connect, grab_png, prop, qt
from .theme import Colours, colours_of
from .transcript_view import TranscriptView

__all__ = ["SCOPES", "ChatPanel", "RegionLink", "VolumeData", "describe_error", "guess_modality", "parse_region_url"]

#: Scope choices, in the order of the selector.
SCOPES = ("current", "range", "volume")
_SCOPE_LABELS = ("Current slice", "Slice range", "Whole volume")
#: Slices per request of a multi-slice job: small enough for steady progress and a prompt cancel.
CHUNK_SLICES = 16
#: The first request of a multi-slice job asks about this many slices; each next one twice as many (up to
#: CHUNK_SLICES), so the first suggestions appear after one slice, not after a whole chunk (streamed review).
FIRST_CHUNK_SLICES = 1
#: Earlier questions (about the same slice of the same volume) sent along with a follow-up question.
MAX_CONTEXT_TURNS = 4
POLL_MS = 40
#: While an answer streams in, the conversation is redrawn at most this often (its events still arrive every poll):
#: each redraw lays out the growing answer again, so drawing every poll took a larger share of Slicer's time as the
#: answer grew.
RENDER_INTERVAL_S = 0.1
#: How long in all one question waits for an engine that answers 429 "busy" (another client's upload holds its
#: upload memory, or waiting asks hold its volumes or fill its queue) before the refusal is shown; each wait is the
#: engine's Retry-After (at least BUSY_MIN_PAUSE_S), and Stop ends it at once.
BUSY_WAIT_S = 30.0
BUSY_MIN_PAUSE_S = 0.5
_REGION_URL = re.compile(rf"^region://([0-9.]+)/({'|'.join(PLANES)})/(\d+)/(\d+)/?$")




@dataclass
class VolumeData:
    """A volume to upload: (k, j, i) voxels and LPS geometry, as ``MedSIGHTClient.upload_volume`` takes them.

    ``key`` identifies the voxels (e.g. node ID and modification time): the panel uploads each key once.
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: Any = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    modality: str = "CT"
    key: str | None = None


VolumeSource = Union[VolumeData, str]  # evaluated at run time: Slicer 5.8 has Python 3.9


def guess_modality(array: np.ndarray) -> str:
    """"CT" when the voxels look like Hounsfield units (air near -1000), else "MR": it picks the default window.
    NaN voxels (which the engine reads as the smallest value) are passed over: with np.min one NaN made a CT "MR"."""
    return "CT" if array.size and float(np.fmin.reduce(array, axis=None)) < -500.0 else "MR"


class RegionLink(NamedTuple):
    """What a region chip names: the region ``index`` of the answer about ``slice`` along ``plane`` to the question
    ``serial`` (the panel's ``ask_serial`` when it was sent), so a chip finds its own answer, never a later one about
    the same slice number (of another plane or volume)."""

    serial: int
    plane: str
    slice: int
    index: int

    def url(self) -> str:
        return f"region://{self.serial}/{self.plane}/{self.slice}/{self.index}"


def parse_region_url(url: str) -> RegionLink | None:
    """'region://<serial>/<plane>/<slice>/<index>' -> its ``RegionLink``; None for any other link."""
    match = _REGION_URL.match(url.strip())
    if match is None:
        return None
    host = match.group(1)
    # QUrl reads a number in the host position as an IPv4 address: "region://40/axial/3/0" reaches the
    # anchorClicked slot as "region://0.0.0.40/axial/3/0". Both spellings give back the number.
    try:
        serial = int(host) if host.isdigit() else int(ipaddress.IPv4Address(host))
    except ValueError:
        return None
    return RegionLink(serial, match.group(2), int(match.group(3)), int(match.group(4)))


def _region_name(region: Region) -> str:
    label = region.label.replace("\ufffd", "").strip()
    return label or region.code or f"region {region.index}"


@dataclass
class _Turn:
    """One question and its answers, as shown in the conversation."""

    question: str
    scope: str
    #: The panel's ``ask_serial`` of this question and the plane its answers lie in: with the slice, they name an
    #: answer exactly (region chips, ``RegionLink``).
    serial: int = 0
    plane: str = "axial"
    texts: dict[int, str] = field(default_factory=dict)
    regions: dict[int, list[Region]] = field(default_factory=dict)
    status: str = ""
    #: Why the question failed (status "error"), kept in the transcript after the error line shows a later one.
    error: str = ""
    #: (plane, slice) for a one-slice question, else None; with ``volumes`` (the volume's key and engine id) it
    #: says which later questions are follow-ups of this one.
    place: tuple[str, int] | None = None
    volumes: set[str] = field(default_factory=set)
    #: The answered slice's slice-to-RAS (for ``place``): tells which slice a later view shows (``_view_place``).
    frame: np.ndarray | None = None
    #: What the engine did to the voxels it was sent (``VolumeInfo.nan_filled``), shown with the answer.
    note: str = ""
    #: Each slice's line as last formatted, with what it was formatted from (``_slice_line``), valid for the look
    #: ``lines_look`` (slice prefixes shown, plane, colours).
    lines: dict[int, tuple[str, tuple, tuple, str]] = field(default_factory=dict, repr=False, compare=False)
    lines_look: tuple = field(default=(), repr=False, compare=False)


@dataclass
class _Job:
    """What the worker of one question needs; ``runner`` (its ``jobs.Job``) carries events and the cancel flag."""

    question: str | list[tuple[str, str]]
    scope: tuple[str, int, int]
    plane: str
    source: VolumeSource
    cached_id: str | None
    options: dict[str, Any]
    view: Any = None  # 4x4 slice-to-RAS of the view asked about (instead of scope indices)
    job_id: str | None = None
    runner: Job | None = None
    answers: list[SliceAnswer] = field(default_factory=list)
    #: The volume was already sent again after an "unknown_volume" answer: a second one is an error, not a loop.
    resent: bool = False

    @property
    def serial(self) -> int:
        return self.runner.job_id if self.runner is not None else 0

    @property
    def cancelled(self) -> bool:
        return self.runner is not None and self.runner.cancelled

    def emit(self, kind: str, *payload: Any) -> None:
        self.runner.emit((kind, *payload))


class ChatPanel:
    """The conversation widget (``panel.widget``) and its behaviour.

    Args:
        client: the engine client (replace it with ``set_client`` when the connection settings change).
        parent: optional parent widget.
    """

    def __init__(self, client: MedSIGHTClient | None = None, parent: Any = None) -> None:
        self.client = client
        self._plane = "axial"  # see ``plane``
        #: Slices per plane of the volume last sent or asked about (the engine's ``VolumeInfo.slices``).
        self._slice_counts: dict[str, int] = {}
        #: Generation options sent with every question (see the engine's AskOptions; unset ones take its defaults).
        self.options: dict[str, Any] = {}
        #: Send earlier questions and answers about the same slice as conversation context (`follow_up_messages`).
        self.follow_ups = True
        self.volume_provider: Callable[[], VolumeSource | None] | None = None
        self.current_slice_provider: Callable[[], int | None] | None = None
        self.before_upload: Callable[[str], bool] | None = None
        self.on_volume_uploaded: Callable[[str, str], None] | None = None
        self.on_volume_unknown: Callable[[str], VolumeData | None] | None = None
        self.on_region_answers: Callable[[list[SliceAnswer]], None] | None = None
        #: Called once per question with every slice answer that has regions (so hosts can merge the slices of
        #: one finding into one 3D segment); also after a cancel or an error, with what had arrived.
        self.on_answers: Callable[[list[SliceAnswer]], None] | None = None
        self.on_region_clicked: Callable[[RegionLink], None] | None = None
        self.on_accept_all: Callable[[], None] | None = None
        #: Errors of a question (the engine's answer or the connection), e.g. for the engine log; not the refusals
        #: before sending ("Type a question first.").
        self.on_error: Callable[[str], None] | None = None
        #: The question being (or last) answered, for hosts that tag suggestions with it.
        self.last_question = ""
        #: Counts questions sent; with ``last_scope`` it tells hosts which streamed answers belong together.
        self.ask_serial = 0
        self.last_scope = "current"
        #: Slices answered so far in the running (or last) question.
        self.answered_slices = 0
        #: The model that gave the latest answer (from the engine's reply), for hosts that tag suggestions with it.
        self.last_model = ""

        self._turns: list[_Turn] = []
        self._auto_range_to = 0  # the "to" box's value as the panel last set it (not the user)
        self._volume_ids: dict[str, str] = {}
        self._runner = JobRunner()
        self._job: _Job | None = None
        self._dirty = False
        self._arrived: list[SliceAnswer] = []  # for ``on_region_answers``, until the end of the poll
        self._rendered = 0.0  # time.monotonic() of the last redraw
        self._started = 0.0
        self._build(parent)

    # -- widgets -------------------------------------------------------------------------------------------------
    def _build(self, parent: Any) -> None:
        self.widget = qt.QWidget(parent) if parent is not None else qt.QWidget()
        self.widget.setObjectName("MedSIGHTChatPanel")
        layout = qt.QVBoxLayout(self.widget)
        layout.setContentsMargins(0, 0, 0, 0)

        self.conversation = qt.QTextBrowser()
        self.conversation.setObjectName("conversationView")
        # Links are region chips: handle them here instead of letting the browser navigate away.
        self.conversation.setOpenLinks(False)
        self.conversation.setOpenExternalLinks(False)
        self.conversation.setMinimumHeight(180)
        self._view = TranscriptView(self.conversation)
        connect(self.conversation, "anchorClicked", self._anchor_clicked)
        layout.addWidget(self.conversation, 1)

        scope_row = qt.QHBoxLayout()
        scope_row.addWidget(qt.QLabel("Ask about:"))
        self.scope = qt.QComboBox()
        self.scope.setObjectName("scopeComboBox")
        for label in _SCOPE_LABELS:
            self.scope.addItem(label)
        scope_row.addWidget(self.scope)
        self.range_from = qt.QSpinBox()
        self.range_from.setObjectName("rangeFromSpinBox")
        self.range_to = qt.QSpinBox()
        self.range_to.setObjectName("rangeToSpinBox")
        for box in (self.range_from, self.range_to):
            box.setRange(0, 9999)
        scope_row.addWidget(self.range_from)
        scope_row.addWidget(qt.QLabel("to"))
        scope_row.addWidget(self.range_to)
        scope_row.addStretch(1)
        layout.addLayout(scope_row)
        connect(self.scope, "currentIndexChanged", self._scope_changed)

        self.question = qt.QPlainTextEdit()
        self.question.setObjectName("questionEdit")
        self.question.setPlaceholderText("Ask about the image, e.g. 'Where is the liver?'  (Ctrl+Enter sends)")
        self.question.setMaximumHeight(80)
        layout.addWidget(self.question)
        self._shortcuts = []
        for keys in ("Ctrl+Return", "Ctrl+Enter"):
            shortcut = qt.QShortcut(qt.QKeySequence(keys), self.question)
            shortcut.setContext(qt.Qt.WidgetShortcut)
            connect(shortcut, "activated", self.send)
            self._shortcuts.append(shortcut)  # PythonQt and PySide both need a Python reference to keep it

        buttons = qt.QHBoxLayout()
        self.send_button = qt.QPushButton("Send")
        self.send_button.setObjectName("sendButton")
        self.send_button.setToolTip("Send the question (Ctrl+Enter)")
        self.cancel_button = qt.QPushButton("Cancel")
        self.cancel_button.setObjectName("cancelButton")
        self.cancel_button.setEnabled(False)
        self.accept_all_button = qt.QPushButton("Accept all")
        self.accept_all_button.setObjectName("acceptAllButton")
        self.accept_all_button.setToolTip("Keep every suggested region as a segment")
        self.accept_all_button.setEnabled(False)
        for button in (self.send_button, self.cancel_button, self.accept_all_button):
            buttons.addWidget(button)
        layout.addLayout(buttons)
        connect(self.send_button, "clicked", lambda *_: self.send())
        connect(self.cancel_button, "clicked", lambda *_: self.cancel())
        connect(self.accept_all_button, "clicked", lambda *_: self._accept_all())

        self.progress = qt.QProgressBar()
        self.progress.setObjectName("jobProgressBar")
        self.progress.setVisible(False)
        layout.addWidget(self.progress)
        self.status = qt.QLabel("")
        self.status.setObjectName("statusLabel")
        layout.addWidget(self.status)
        self.error = qt.QLabel("")
        self.error.setObjectName("errorLabel")
        self.error.setWordWrap(True)
        self.error.setStyleSheet(f"color: {colours_of(self.error).error};")
        self.error.setTextInteractionFlags(qt.Qt.TextSelectableByMouse)  # so users can copy it into a report
        layout.addWidget(self.error)

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MS)
        connect(self._timer, "timeout", self._poll)
        self._scope_changed(0)

    # -- public API ------------------------------------------------------------------------------------------------
    @property
    def plane(self) -> str:
        """The plane slice ranges and the whole volume are asked along (the host sets it from the chosen view)."""
        return self._plane

    @plane.setter
    def plane(self, plane: str) -> None:
        self._plane = plane
        count = self._slice_counts.get(plane)
        if count:
            # The range boxes follow the plane at once, so the user can type that plane's slices before sending;
            # boxes the user left alone span it, a range they typed stays (clamped to it).
            self.set_slice_count(count, keep_range=self._range_typed())

    @property
    def busy(self) -> bool:
        return self._job is not None

    def set_client(self, client: MedSIGHTClient | None) -> None:
        """Use another engine; volume ids belong to an engine, so the upload cache starts afresh."""
        self.client = client
        self._volume_ids.clear()

    def set_slice_count(self, count: int, keep_range: bool = False) -> None:
        """Limit the range spin boxes to a volume of ``count`` slices along the current plane; the "to" box goes to
        the last slice unless ``keep_range`` (then the boxes keep their values, clamped to the volume)."""
        top = max(int(count) - 1, 0)
        for box in (self.range_from, self.range_to):
            box.setMaximum(top)
        if not keep_range:
            self.range_to.setValue(top)
            self._auto_range_to = top

    def set_slice_counts(self, counts: dict[str, int]) -> None:
        """Slices per plane of the volume the user chose (the host's, for another volume): the range boxes fit it at
        once, not the last volume asked about, whose count limited what could be typed until a question came back."""
        self._slice_counts = {str(p): int(n) for p, n in counts.items()}
        self.plane = self._plane

    def set_scope(self, scope: str, first: int | None = None, last: int | None = None) -> None:
        """Select "current", "range" (with ``first``..``last``, inclusive) or "volume"."""
        self.scope.setCurrentIndex(SCOPES.index(scope))
        if first is not None:
            self.range_from.setValue(int(first))
        if last is not None:
            self.range_to.setValue(int(last))

    def region(self, link: RegionLink) -> Region | None:
        """The region a chip shows."""
        turn = next((t for t in self._turns if t.serial == link.serial and t.plane == link.plane), None)
        regions = [] if turn is None else turn.regions.get(link.slice, [])
        return next((r for r in regions if r.index == link.index), None)

    def region_links(self) -> list[str]:
        """The chip links of the conversation, in order (for tests and accessibility tools)."""
        return re.findall(r'href="(region://[^"]+)"', self.conversation.toHtml())

    def conversation_text(self) -> str:
        return str(self.conversation.toPlainText())

    def clear(self) -> None:
        """Forget the conversation (not the uploaded volumes). A question still running is cancelled first (what
        had arrived still reaches the host): its answers have no place left in the conversation, and its next event
        found no question to belong to, which left the panel busy for good."""
        self.cancel()
        self._turns.clear()
        self.accept_all_button.setEnabled(False)
        self._render()

    def apply_palette(self) -> None:
        """Re-colour after a theme change (the conversation and error line take their colours from the palette)."""
        self.error.setStyleSheet(f"color: {colours_of(self.error).error};")
        self._render()

    def show_error(self, message: str) -> None:
        self.error.setText(message)

    def save_screenshot(self, path: str) -> bool:
        return grab_png(self.widget, path)

    def send(self, question: str | None = None) -> bool:
        """Ask ``question`` (default: the text in the question box) about the selected scope. Returns False,
        with the reason in the error line, when the question could not be sent."""
        if self.busy:
            return False
        text = (self.question.toPlainText() if question is None else question).strip()
        self.error.setText("")
        if not text:
            self.show_error("Type a question first.")
            return False
        if self.client is None:
            self.show_error("Not connected: set the engine URL in the connection settings.")
            return False
        try:
            source = self.volume_provider() if self.volume_provider is not None else None
        except ValueError as err:  # e.g. a volume without image data, a geometry the upload cannot describe
            self.show_error(str(err))
            return False
        if source is None:
            self.show_error("Select a volume first.")
            return False
        cached_id = source if isinstance(source, str) else self._volume_ids.get(source.key or "")
        if cached_id is None and self.before_upload is not None and not self.before_upload(self.client.base_url):
            self.show_error("Not sent: sending images to this engine was not allowed.")
            return False
        scope = SCOPES[max(int(prop(self.scope, "currentIndex")), 0)]
        # Read before the provider may change ``plane`` (and so the boxes' maximum): the range the user typed is asked.
        first, last = int(prop(self.range_from, "value")), int(prop(self.range_to, "value"))
        try:
            current = self.current_slice_provider() if self.current_slice_provider is not None else None
        except ValueError as err:  # e.g. a volume under a warping transform: no single view plane
            if scope == "current":
                self.show_error(str(err))
                return False
            current = None  # a slice range or the whole volume is asked without the view
        view = None
        if current is not None and not isinstance(current, (int, np.integer)):
            view = np.asarray(current, dtype=float)  # a view's slice-to-RAS: the engine resolves the slice
            current = None
        if scope == "current":
            first = last = int(current or 0)
        else:
            view = None
        volumes = {v for v in (source if isinstance(source, str) else source.key, cached_id) if v}
        if view is not None:
            # The engine picks the slice only once asked; an earlier answer says which one it will be, so a
            # follow-up about the slice in view still carries its conversation (README: "and the spleen?").
            place = self._view_place(view, volumes)
        else:
            place = (self.plane, first) if first == last and scope != "volume" else None
        messages = self.follow_up_messages(text, place, volumes)
        job = _Job(messages, (scope, first, last), self.plane, source, cached_id, dict(self.options), view)
        scope_text = "slice in view" if view is not None else self._scope_text(scope, first, last)
        self.ask_serial += 1
        self._turns.append(_Turn(text, scope_text, self.ask_serial, self.plane, place=place, volumes=volumes))
        self.last_question = text
        self.last_scope = scope
        self.answered_slices = 0
        self._job = job
        self._started = time.monotonic()
        if question is None:
            self.question.setPlainText("")
        self._set_busy(True, "Sending the volume…" if cached_id is None else "Asking…")
        self._render()
        client = self.client
        job.runner = self._runner.start(lambda runner: _run_job(client, job, runner), name="MedSIGHT ask")
        self._timer.start()
        return True

    def follow_up_messages(self, text: str, place: tuple[str, int] | None,
                           volumes: set[str]) -> str | list[tuple[str, str]]:
        """The question alone, or, when earlier answered questions were about this same slice of this volume, the
        conversation so far (up to ``MAX_CONTEXT_TURNS`` of them) followed by the question, so the model sees what
        it said before ("and the spleen?", "is it larger than the liver?")."""
        if not self.follow_ups or place is None:
            return text
        earlier = [t for t in self._turns if t.place == place and t.volumes & volumes and not t.status
                   and t.texts.get(place[1])][-MAX_CONTEXT_TURNS:]
        if not earlier:
            return text
        messages = [m for t in earlier for m in (("user", t.question), ("assistant", t.texts[place[1]]))]
        return [*messages, ("user", text)]

    def _view_place(self, view: np.ndarray, volumes: set[str]) -> tuple[str, int] | None:
        """The (plane, slice) the engine will answer about for ``view``, worked out from the latest earlier answer
        about one slice of this volume (None when none tells). The engine (``slice_for_view``) takes the volume axis
        nearest to the view's normal and the voxel layer nearest to the view's point; an answer's slice-to-RAS holds
        the volume's axes (columns 0-2, the slice's normal last) and a point of that slice."""
        normal = view[:3, 2] / (float(np.linalg.norm(view[:3, 2])) or 1.0)
        for turn in reversed(self._turns):
            if turn.place is None or turn.frame is None or not turn.volumes & volumes:
                continue
            axes = turn.frame[:3, :3] / np.linalg.norm(turn.frame[:3, :3], axis=0)
            if int(np.argmax(np.abs(axes.T @ normal))) != 2:
                continue  # the view cuts the volume along another axis: another plane
            offset = float(np.linalg.solve(turn.frame, np.append(view[:3, 3], 1.0))[2])  # in slices
            return turn.place[0], int(np.rint(turn.place[1] + offset))
        return None

    def close(self) -> None:
        """Stop polling, cancel any running question and close the widget (module cleanup, application exit).

        Qt objects must go before the application object does; leaving a live QTimer to interpreter shutdown
        crashes PySide at exit.
        """
        self.cancel()
        self._timer.stop()
        self.widget.close()
        self.widget.deleteLater()

    def cancel(self) -> None:
        """Stop the running question. The panel is usable again at once; the engine stops generating shortly."""
        job = self._job
        if job is None:
            return
        if job.runner is not None:
            job.runner.cancel()
        client, job_id = self.client, job.job_id
        if client is not None and job_id is not None:
            # A network call: never on the main thread.
            threading.Thread(target=_cancel_quietly, args=(client, job_id), daemon=True).start()
        if self._turns:
            self._turns[-1].status = "cancelled"
        self._deliver_regions()
        if job.answers and self.on_answers is not None:
            self._call_hook(self.on_answers, list(job.answers))  # what arrived before Cancel is kept
        self._finish("Cancelled.")

    # -- main-thread side ------------------------------------------------------------------------------------------
    def _scope_text(self, scope: str, first: int, last: int) -> str:
        if scope == "volume":
            return "whole volume"
        if scope == "range":
            return f"slices {min(first, last)}–{max(first, last)}"
        return f"slice {first}"

    def _range_typed(self) -> bool:
        """The user set the "to" box (the panel did not: it holds another value than the panel last put there)."""
        return int(prop(self.range_to, "value")) != self._auto_range_to

    def _scope_changed(self, index: Any = 0) -> None:
        ranged = int(index) == SCOPES.index("range")
        self.range_from.setEnabled(ranged)
        self.range_to.setEnabled(ranged)

    def _set_busy(self, busy: bool, status: str) -> None:
        self.send_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)
        self.status.setText(status)
        if not busy:
            self.progress.setVisible(False)

    def _finish(self, status: str) -> None:
        self._job = None
        # The timer keeps polling while worker threads live: each tick gives Python (and so the worker and the
        # cancel request's thread) a turn, which PythonQt's idle Slicer otherwise would not.
        if not self._runner.busy:
            self._timer.stop()
        self._set_busy(False, status)
        self._render()

    def _poll(self) -> None:
        """Drain the worker's events (main thread, from the QTimer)."""
        for event in self._runner.poll():
            job = self._job
            current = job is not None and event.job_id == job.serial
            if event.kind == "progress":
                kind, *payload = event.data
                if current:
                    self._handle(job, kind, payload)
                elif kind == "uploaded":  # still worth remembering after a cancel
                    self._remember_volume(*payload)
            elif current and event.kind == "error":  # only what escaped _run_job (it reports its own errors)
                self._handle(job, "error", [RuntimeError(event.message)])
            elif current and event.kind in ("done", "cancelled"):
                self._handle(job, "finished", [bool(event.data) or event.kind == "cancelled"])
            # Anything else is a cancelled job's late event: ignored.
        self._deliver_regions()
        if self._dirty and time.monotonic() - self._rendered >= RENDER_INTERVAL_S:
            self._render()  # a finished question was drawn whole by _finish
        if self._job is None and not self._runner.busy:
            self._timer.stop()

    def _deliver_regions(self) -> None:
        """Hand the answers that arrived to ``on_region_answers``, before anything that ends their question."""
        answers, self._arrived = self._arrived, []
        if answers and self.on_region_answers is not None:
            self._call_hook(self.on_region_answers, answers)

    def _remember_volume(self, key: str | None, volume_id: str) -> None:
        if key:
            self._volume_ids[key] = volume_id
            if self.on_volume_uploaded is not None:
                self.on_volume_uploaded(key, volume_id)

    def _handle(self, job: _Job, kind: str, payload: list[Any]) -> None:
        turn = self._turns[-1]
        if kind == "uploaded":
            self._remember_volume(*payload)
            turn.volumes.add(payload[1])  # later questions may name the volume by its engine id
            self.status.setText("Asking…")
        elif kind == "busy":  # the worker waits for the engine, then tries again by itself
            what, seconds = payload
            again = "sending the volume" if what == "upload" else "asking"
            self.status.setText(f"The engine is busy with other uploads or questions; {again} again in "
                                f"{seconds:.0f} s… (Stop to give up)")
        elif kind == "job":
            job.job_id = payload[0]
            if not self.answered_slices:  # later chunks keep the progress line
                self.status.setText("Thinking…")
        elif kind == "resolved":  # the engine picked the slice a view shows
            plane, index = payload
            turn.scope = f"{plane} slice {index} (in view)"
            turn.place = (plane, index)
            turn.plane = plane
            self._dirty = True
        elif kind == "clamped":  # the transcript names the slices answered, not the ones beyond the volume
            first, last, count = payload
            turn.scope = f"slices {first}–{last}; the volume has {count} {job.plane} slices"
            self._dirty = True
        elif kind == "slices":
            self._slice_counts = {str(p): int(n) for p, n in payload[0].items()}
            count = self._slice_counts.get(self.plane, 0)
            if count and int(prop(self.range_from, "maximum")) != count - 1:
                # A range the user chose (just asked, or typed) stays as typed (clamped to the volume): a follow-up
                # asks the same slices. Boxes the user left alone follow the volume's last slice.
                chosen = job.scope[0] == "range" or self._range_typed()
                self.set_slice_count(count, keep_range=chosen)
        elif kind == "note":
            turn.note = str(payload[0])
            self._dirty = True
        elif kind == "model":
            self.last_model = str(payload[0])
        elif kind == "token":
            slice_index, text = payload
            turn.texts[slice_index] = turn.texts.get(slice_index, "") + text
            self._dirty = True
        elif kind == "region":
            slice_index, region = payload
            turn.regions.setdefault(slice_index, []).append(region)
            self._dirty = True
        elif kind == "answer":
            answer: SliceAnswer = payload[0]
            self.answered_slices += 1
            turn.texts[answer.index] = answer.text  # the engine's final text (token pieces may be regrouped)
            turn.regions[answer.index] = list(answer.regions)
            if turn.place == (answer.plane, answer.index):
                turn.frame = np.asarray(answer.slice_to_ras, dtype=float)
            self._dirty = True
            if answer.regions:
                job.answers.append(answer)
                self.accept_all_button.setEnabled(True)
                if self.on_region_answers is not None:
                    self._arrived.append(answer)
        elif kind == "progress":
            done, total = payload
            if total > 1:
                self.progress.setVisible(True)
                self.progress.setRange(0, total)
                self.progress.setValue(done)
                self.status.setText(progress_text(done, total, time.monotonic() - self._started))
        elif kind == "finished":
            cancelled = payload[0]
            self._deliver_regions()
            if job.answers and self.on_answers is not None:
                self._call_hook(self.on_answers, list(job.answers))
            turn.status = "cancelled" if cancelled else ""
            seconds = time.monotonic() - self._started
            self._finish("Cancelled." if cancelled else f"Answered in {seconds:.1f} s.")
        elif kind == "error":
            if self._send_again(job, payload[0]):
                return
            message = describe_error(payload[0], resent=job.resent)
            self._deliver_regions()
            if job.answers and self.on_answers is not None:
                self._call_hook(self.on_answers, list(job.answers))  # slices answered before the error are kept
            turn.status, turn.error = "error", message
            self.show_error(message)
            if self.on_error is not None:
                self._call_hook(self.on_error, message)
            self._finish("Failed.")

    def _send_again(self, job: _Job, err: BaseException) -> bool:
        """The engine forgot the volume id this job reused (engine restarted, or evicted it): drop the id, upload
        the voxels once more and ask the same question again, without bothering the user. False: not that case,
        or nothing to send (the caller shows the error)."""
        if not isinstance(err, MedSIGHTError) or err.code != "unknown_volume" or job.resent or job.cached_id is None:
            return False
        stale = job.cached_id
        for key in [k for k, v in self._volume_ids.items() if v == stale]:
            del self._volume_ids[key]
        data = job.source if isinstance(job.source, VolumeData) else None
        if data is None and self.on_volume_unknown is not None:
            try:
                data = self.on_volume_unknown(stale)  # the host drops its cached id and hands back the voxels
            except Exception:  # a failing host must not stop the panel: the engine's error is shown instead
                data = None
        if data is None or self.client is None:
            return False
        again = _Job(job.question, job.scope, job.plane, data, None, job.options, job.view, resent=True)
        # The new job is the current one before the consent dialog: its nested event loop may poll, and the old
        # job's late "done" event must then be stale, not finish the panel under the new job.
        self._job = again
        if self.before_upload is not None and not self.before_upload(self.client.base_url):
            self._job = job  # refused: the caller reports the engine's error on the old job and finishes
            return False
        if self._job is not again:
            return True  # cancelled or reset while the dialog was open: nothing more to send
        client = self.client
        again.runner = self._runner.start(lambda runner: _run_job(client, again, runner), name="MedSIGHT ask")
        self._set_busy(True, "The engine lost the volume; sending it again…")
        self._timer.start()  # whatever the dialog's event loop did to the timer, the new job must be polled
        return True

    def _call_hook(self, hook: Callable[..., Any], *args: Any) -> Any:
        # A failing host callback must not stop the conversation; report it like any other error.
        try:
            return hook(*args)
        except Exception as err:
            self.show_error(f"Could not apply the answer: {type(err).__name__}: {err}")
            return None

    def _anchor_clicked(self, url: Any) -> None:
        link = parse_region_url(url.toString())
        if link is None or self.on_region_clicked is None:
            return
        if self._call_hook(self.on_region_clicked, link) is False:  # a click that does nothing says why
            self.show_error("That region cannot be shown: the volume it was found on is no longer in the scene.")

    def _accept_all(self) -> None:
        if self.on_accept_all is not None:
            self._call_hook(self.on_accept_all)

    def _render(self) -> None:
        bar = self.conversation.verticalScrollBar()
        if self._job is not None and self.conversation.textCursor().hasSelection():
            return  # the user is selecting text: re-render once the answer is complete
        self._dirty = False
        self._rendered = time.monotonic()
        at_end = int(prop(bar, "value")) >= int(prop(bar, "maximum")) - 4
        position = int(prop(bar, "value"))
        colours = colours_of(self.conversation)
        self.error.setStyleSheet(f"color: {colours.error};")
        self._view.show(*render_parts(self._turns, colours))
        # Follow the answer only when the reader was at the end; otherwise leave them where they were reading.
        bar.setValue(int(prop(bar, "maximum")) if at_end else position)


def progress_text(done: int, total: int, seconds: float) -> str:
    """"Answered 5 of 20 slices, about 12 s left" (the rate so far predicts the rest)."""
    text = f"Answered {done} of {total} slices"
    if 0 < done < total:
        left = seconds / done * (total - done)
        text += f", about {left:.0f} s left" if left < 120 else f", about {left / 60:.0f} min left"
    return text


#: The light-theme colours, for callers without a widget.
LIGHT = Colours(text="#000000", base="#ffffff", secondary="#757575", accent="#1565c0", error="#c62828",
                success="#2e7d32", dark=False)


def render_html(turns: list[_Turn], colours: Colours = LIGHT) -> str:
    """The conversation as HTML (QTextBrowser's rich-text subset): questions, answers, region chips, in the
    palette's colours (``theme.colours_of(widget)``), so it reads in Slicer's light and dark themes."""
    head, pieces, end = render_parts(turns, colours)
    return head + "".join(pieces) + end


def render_parts(turns: list[_Turn], colours: Colours = LIGHT) -> tuple[str, list[str], str]:
    """``render_html`` in three parts, for ``TranscriptView``: everything before the last answer's lines, those
    lines (each "<br>" and one line) and what closes them. A line is formatted again only when its slice's text or
    regions changed (``_Turn.lines``), so a streamed event does not cost the whole answer so far."""
    grey = colours.secondary
    parts: list[str] = []
    pieces: list[str] = []
    for turn in turns:
        parts.append(
            f'<p style="margin-top:8px"><b style="color:{colours.accent}">You</b> '
            f'<span style="color:{grey}">({html.escape(turn.scope)})</span><br>'
            f"{html.escape(turn.question).replace(chr(10), '<br>')}</p>"
        )
        parts.append(f'<p><b style="color:{colours.success}">MedSIGHT</b>')
        pieces = [f"<br>{line}" for line in _answer_lines(turn, colours)] or ["<br>"]
        if turn is not turns[-1]:
            parts.extend(pieces)
            parts.append("</p>")
    return "".join(parts), pieces if turns else [], "</p>" if turns else ""


def _answer_lines(turn: _Turn, colours: Colours) -> list[str]:
    """The lines of one turn's answer: a line per slice (its text and chips), then any note and status."""
    grey = colours.secondary
    slices = sorted(set(turn.texts) | set(turn.regions))
    look = (len(slices) > 1, turn.plane, colours)
    if turn.lines_look != look:  # every line looks different now: none is kept
        turn.lines, turn.lines_look = {}, look
    body = [_slice_line(turn, slice_index, look[0], colours) for slice_index in slices]
    if turn.note:
        body.append(f'<i style="color:{grey}">(note: {html.escape(turn.note)})</i>')
    if not slices and not turn.status:
        body.append(f'<i style="color:{grey}">…</i>')
    if turn.status == "cancelled":
        body.append(f'<i style="color:{grey}">(cancelled)</i>')
    elif turn.status == "error":  # the error line shows only the latest question's error
        body.append(f'<i style="color:{colours.error}">(failed: {html.escape(turn.error)})</i>')
    return body


def _slice_line(turn: _Turn, slice_index: int, multi: bool, colours: Colours) -> str:
    """One slice's line of ``turn``'s answer; taken from ``turn.lines`` while its text and regions are unchanged (the
    same region objects, kept there so that their ids stay theirs: a chip gains its link when the slice's answer
    replaces the streamed regions)."""
    text = turn.texts.get(slice_index, "")
    regions = tuple(turn.regions.get(slice_index, ()))
    ids = tuple(map(id, regions))
    known = turn.lines.get(slice_index)
    if known is not None and known[0] == text and known[1] == ids:
        return known[3]
    grey, chip_bg = colours.secondary, colours.base if colours.dark else "#e8f5e9"
    line = html.escape(text.replace("\ufffd", "")).replace("\n", "<br>")
    prefix = f'<span style="color:{grey}">slice {slice_index}:</span> ' if multi else ""
    chips = " ".join(_chip(RegionLink(turn.serial, turn.plane, slice_index, r.index), r, colours, chip_bg)
                     for r in regions)
    line = prefix + line + (f"<br>{chips}" if chips else "")
    turn.lines[slice_index] = (text, ids, regions, line)
    return line


def _chip(link: RegionLink, region: Region, colours: Colours, chip_bg: str) -> str:
    """A region's chip: a link that centres the views on it, or, for an empty mask (no bounding box: nowhere to go
    and no suggestion made of it), its name marked "(empty)" without a link, so no chip is a click that does nothing.
    A streamed region (no mask yet: the host gets it with its slice's answer) is shown without a link until then."""
    name = html.escape(_region_name(region))
    if region.bbox is None:
        return f'<span style="color:{colours.secondary}">&nbsp;{name} (empty)&nbsp;</span>'
    if region.mask is None:
        return f'<span style="color:{colours.success}">&nbsp;{name}&nbsp;</span>'
    return (f'<a href="{link.url()}" style="background-color:{chip_bg};color:{colours.success};'
            f'text-decoration:none">&nbsp;{name}&nbsp;</a>')


# -- worker side (no Qt here) ------------------------------------------------------------------------------------
def _cancel_quietly(client: MedSIGHTClient, job_id: str) -> None:
    # The job may have ended already, or the engine be gone: either way nothing more is generated.
    with contextlib.suppress(MedSIGHTError):
        client.cancel(job_id, timeout=10)


class _StoppedError(Exception):
    """Stop was pressed while the worker waited for a busy engine."""


def _while_busy(job: _Job, what: str, call: Callable[[], Any]) -> Any:
    """``call()``; while the engine answers 429 "busy", wait its Retry-After and call again, up to BUSY_WAIT_S in
    all (then its refusal is raised). ``what`` ("upload" or "ask") names the retry in the status line."""
    waited = 0.0
    while True:
        try:
            return call()
        except MedSIGHTError as err:
            pause = min(max(err.retry_after or 0.0, BUSY_MIN_PAUSE_S), BUSY_WAIT_S - waited)
            if err.code != "busy" or err.status not in ENGINE_ERRORS["busy"] or pause <= 0 or job.cancelled:
                raise
            job.emit("busy", what, pause)
            deadline = time.monotonic() + pause
            while time.monotonic() < deadline:  # short naps: Stop ends the wait at once
                if job.cancelled:
                    raise _StoppedError from None
                time.sleep(min(0.05, max(deadline - time.monotonic(), 0.0)))
            waited += pause


def _upload(client: MedSIGHTClient, data: VolumeData, job: _Job) -> Any:
    info = _while_busy(job, "upload", lambda: client.upload_volume(
        data.array, data.spacing, data.origin, data.direction, modality=data.modality))
    job.emit("uploaded", data.key, info.volume_id)
    job.emit("slices", dict(info.slices))
    if info.nan_filled:  # the engine's words: how many, and the value they read as
        job.emit("note", f"{info.nan_filled}; the volume in Slicer keeps its NaN")
    return info


def _ask(client: MedSIGHTClient, job: _Job, volume_id: str, part: list[int] | None) -> Any:
    return _while_busy(job, "ask", lambda: client.ask_stream(
        volume_id, job.question, job.plane, part, job.options, view=job.view))


def _resolve_indices(scope: tuple[str, int, int], count: int) -> list[int]:
    kind, first, last = scope
    if count <= 0:
        raise ValueError("the volume has no slices along this plane")
    if kind == "volume":
        return list(range(count))
    first, last = sorted((first, last))
    first, last = max(first, 0), min(last, count - 1)
    if first > last:
        raise ValueError(f"slice {scope[1]} is outside the volume (0–{count - 1})")
    return list(range(first, last + 1))


def chunk_bounds(total: int) -> list[tuple[int, int]]:
    """(start, stop) of each request: FIRST_CHUNK_SLICES, then doubling up to CHUNK_SLICES."""
    bounds, start, size = [], 0, FIRST_CHUNK_SLICES
    while start < total:
        bounds.append((start, min(start + size, total)))
        start, size = start + size, min(size * 2, CHUNK_SLICES)
    return bounds


def _run_job(client: MedSIGHTClient, job: _Job, runner: Job) -> bool:
    """Upload if needed, then ask chunk by chunk. Returns whether the job was cancelled (the runner's "done"
    event); failures are emitted as an "error" event carrying the exception (for ``describe_error``)."""
    job.runner = runner  # set here too: the thread may run before ``JobRunner.start`` returns it
    try:
        data = job.source if isinstance(job.source, VolumeData) else None
        if job.cached_id is not None:
            volume_id = job.cached_id
            info = client.volume_info(volume_id) if job.scope[0] != "current" else None
        else:
            assert data is not None
            info = _upload(client, data, job)
            volume_id = info.volume_id
        if info is not None and job.cached_id is not None:
            job.emit("slices", dict(info.slices))
        if job.view is not None:
            indices = [-1]  # the engine says which slice in its "job" event
        elif info is not None:
            count = int(info.slices.get(job.plane, 0))
            if count <= 0:  # a 2D image (one slice) has slices along one plane only: say which
                planes = " or ".join(p for p, n in info.slices.items() if n > 0)
                raise ValueError(f"the volume has no {job.plane} slices: ask along the {planes} plane")
            indices = _resolve_indices(job.scope, count)
            if job.scope[0] == "range" and [indices[0], indices[-1]] != sorted(job.scope[1:]):
                job.emit("clamped", indices[0], indices[-1], count)  # part of the range lies outside the volume
        else:
            indices = [job.scope[1]]
        total = len(indices)
        cancelled = False
        for start, stop in chunk_bounds(total):
            if job.cancelled:
                cancelled = True
                break
            part = indices[start:stop]
            ask_part = None if job.view is not None else part
            try:
                stream = _ask(client, job, volume_id, ask_part)
            except MedSIGHTError as err:
                if err.code != "unknown_volume" or data is None or job.resent:
                    raise
                job.resent = True  # once: a second refusal is reported, not retried forever
                volume_id = _upload(client, data, job).volume_id  # the engine evicted it: send it again
                stream = _ask(client, job, volume_id, ask_part)
            cancelled = _read_stream(client, stream, job, part) or cancelled
            job.emit("progress", stop, total)
            if cancelled:
                break
        return cancelled or job.cancelled
    except _StoppedError:
        return True
    except Exception as err:  # every failure is shown in the error line, never raised into Slicer
        job.emit("error", err)
        return False


def _slice_of(part: list[int], event: Any) -> int:
    """The slice index a "token" or "region" event is about (its ``slice`` counts the asked slices); the stream's
    ``with`` closes it when this raises."""
    if not 0 <= event.slice < len(part):
        raise MedSIGHTError(f"malformed {event.kind!r} event from the engine: it names answer {event.slice} of a "
                            f"question about {len(part)} slice(s)", status=200, code="bad_response")
    return part[event.slice]


def _read_stream(client: MedSIGHTClient, stream: Any, job: _Job, part: list[int]) -> bool:
    """Forward one stream's events; returns whether the engine reports the job cancelled."""
    cancel_sent = False
    with stream:
        for event in stream:
            if event.kind == "job":
                job.job_id = event.job_id
                job.emit("job", event.job_id)
                if job.view is not None and event.indices:
                    part[:] = event.indices
                    job.emit("resolved", event.plane, event.indices[0])
            elif event.kind == "token":
                job.emit("token", _slice_of(part, event), event.text)
            elif event.kind == "region":
                job.emit("region", _slice_of(part, event), event.region)
            elif event.kind == "done":
                job.emit("model", event.result.model)
                for answer in event.result.answers:
                    job.emit("answer", answer)
                return bool(event.result.cancelled)
            elif event.kind == "error":
                stream.raise_for_error()
            if job.cancelled and not cancel_sent and job.job_id is not None:
                # The main thread may have pressed Cancel before it knew the job id.
                _cancel_quietly(client, job.job_id)
                cancel_sent = True
    return job.cancelled
