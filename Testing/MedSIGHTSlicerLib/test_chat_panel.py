"""The chat panel (offscreen Qt) against a live engine server with the tiny random-weight model."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from qtpy.QtTest import QTest

import medsight
import medsight.server.app
from medsight_testing.live_server import free_port, live_server
from medsight_testing.palettes import contrast
from MedSIGHTSlicerLib.chat_panel import ChatPanel, VolumeData, describe_error, parse_region_url
from MedSIGHTSlicerLib.client import MedSIGHTClient, MedSIGHTError
from MedSIGHTSlicerLib.protocol import SliceAnswer
from MedSIGHTSlicerLib.qt_shim import qt
from MedSIGHTSlicerLib.settings import ConnectionSettings, is_loopback_url

TOKEN = "panel-secret"
SHORT = {"max_new_tokens": 12, "no_code_fallback": True, "seed": 0}
SCREENSHOT_COPY = Path("/tmp/medsight_chat_panel.png")


PANELS: list[ChatPanel] = []


@pytest.fixture(scope="module")
def app():
    application = qt.QApplication.instance() or qt.QApplication(sys.argv[:1])
    yield application
    # Close every panel (timers, widgets) while the application still exists.
    while PANELS:
        PANELS.pop().close()
    application.processEvents()


@pytest.fixture(scope="module")
def secured_url(engine):
    with live_server(medsight.server.app.create_app(engine, token=TOKEN)) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def volume() -> VolumeData:
    """Three 64 x 64 CT-like slices: a bright disc ("organ") in soft tissue, LPS geometry."""
    k, j, i = np.mgrid[0:3, 0:64, 0:64]
    voxels = np.where((j - 30) ** 2 + (i - 34) ** 2 < 15**2, 180.0, 40.0) + 10.0 * k
    direction = np.diag([-1.0, -1.0, 1.0])  # RAS identity, as Slicer makes new volumes, in LPS
    return VolumeData(voxels.astype(np.int16), (0.8, 0.8, 2.5), (10.0, 20.0, -5.0), direction, "CT", key="disc")


def pump(app, until, timeout: float = 60.0, step=None) -> None:
    """Run the Qt event loop until ``until()`` holds (``step()`` runs on each turn); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s")
        app.processEvents()
        if step is not None:
            step()
        time.sleep(0.005)
    app.processEvents()


def make_panel(url: str, volume: VolumeData, token: str | None = None) -> ChatPanel:
    panel = ChatPanel(MedSIGHTClient(url, token=token, timeout=60, retries=0))
    PANELS.append(panel)
    panel.volume_provider = lambda: volume
    panel.current_slice_provider = lambda: 1
    panel.options = dict(SHORT)
    panel.widget.resize(520, 620)
    panel.widget.show()
    return panel


def test_conversation_streams_answer_and_region_chips(app, url, volume, tmp_path):
    panel = make_panel(url, volume)
    panel.current_slice_provider = lambda: 0  # the tiny model's regions on slice 0 have an area (chips are links)
    uploaded, answers, clicks = [], [], []
    panel.on_volume_uploaded = lambda key, volume_id: uploaded.append((key, volume_id))
    panel.on_region_answers = answers.extend
    panel.on_region_clicked = clicks.append

    panel.question.setPlainText("Where is the liver?")
    QTest.mouseClick(panel.send_button, qt.Qt.LeftButton)
    assert panel.busy
    assert not panel.send_button.isEnabled() and panel.cancel_button.isEnabled()
    assert panel.question.toPlainText() == ""
    pump(app, lambda: not panel.busy)

    assert panel.error.text() == ""
    assert panel.status.text().startswith("Answered in")
    text = panel.conversation_text()
    assert "Where is the liver?" in text
    assert "MedSIGHT" in text
    assert len(uploaded) == 1 and uploaded[0][0] == "disc" and len(uploaded[0][1]) == 64
    assert len(answers) == 1 and isinstance(answers[0], SliceAnswer)
    assert answers[0].index == 0
    answer_text = answers[0].text.replace("\ufffd", "").strip()
    assert answer_text and answer_text[:5] in text  # the streamed answer is in the conversation
    links = panel.region_links()
    assert links, panel.conversation.toHtml()
    assert all(parse_region_url(link)[:3] == (1, "axial", 0) for link in links)  # question 1, axial slice 0
    assert panel.accept_all_button.isEnabled()
    first_chip = parse_region_url(links[0])
    assert panel.region(first_chip) is not None and panel.region(first_chip).mask.shape == (64, 64)

    # A chip click reaches the host with its link (QTextBrowser's signal for a link click).
    panel.conversation.anchorClicked.emit(qt.QUrl(links[-1]))
    assert clicks == [parse_region_url(links[-1])]
    accepted = []
    panel.on_accept_all = lambda: accepted.append(True)
    panel.accept_all_button.click()
    assert accepted == [True]

    shot = tmp_path / "chat_panel.png"
    assert panel.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shutil.copyfile(shot, SCREENSHOT_COPY)

    # The second question reuses the uploaded volume.
    assert panel.send("And the kidney?")
    pump(app, lambda: not panel.busy)
    assert len(uploaded) == 1
    assert panel.conversation_text().count("You") == 2


def test_follow_up_questions_carry_the_conversation_about_that_slice(app, url, volume):
    panel = make_panel(url, volume)
    assert panel.send("Where is the liver?")
    pump(app, lambda: not panel.busy)
    first = panel._turns[-1].texts[1]
    assert first
    here, volumes = ("axial", 1), {"disc"}
    assert panel.follow_up_messages("And the kidney?", here, volumes) == [
        ("user", "Where is the liver?"), ("assistant", first), ("user", "And the kidney?")]
    # Another slice, another volume, or a multi-slice scope: the question goes alone.
    assert panel.follow_up_messages("And the kidney?", ("axial", 2), volumes) == "And the kidney?"
    assert panel.follow_up_messages("And the kidney?", here, {"other volume"}) == "And the kidney?"
    assert panel.follow_up_messages("And the kidney?", None, volumes) == "And the kidney?"

    # Through the live engine: the follow-up's answer is the engine's answer to the whole conversation.
    assert panel.send("And the kidney?")
    pump(app, lambda: not panel.busy)
    volume_id = panel._volume_ids["disc"]
    expected = panel.client.ask(volume_id, [("user", "Where is the liver?"), ("assistant", first),
                                            ("user", "And the kidney?")], indices=[1], options=SHORT)
    assert panel._turns[-1].texts[1] == expected.answers[0].text
    # Both answered questions are context for a third; the option turns follow-ups off.
    assert len(panel.follow_up_messages("Third?", here, {volume_id})) == 5
    panel.follow_ups = False
    assert panel.follow_up_messages("Third?", here, volumes) == "Third?"


def test_ctrl_enter_sends(app, url, volume):
    panel = make_panel(url, volume)
    panel.widget.activateWindow()
    panel.question.setFocus()
    pump(app, lambda: True)
    panel.question.setPlainText("What is this?")
    QTest.keyClick(panel.question, qt.Qt.Key_Return, qt.Qt.ControlModifier)
    assert panel.busy
    pump(app, lambda: not panel.busy)
    assert panel.error.text() == ""
    assert "What is this?" in panel.conversation_text()


def test_cancel_mid_stream_then_ask_again(app, url, volume):
    panel = make_panel(url, volume)
    panel.options = {"max_new_tokens": 2048, "seed": 0}
    assert panel.send("Describe everything in detail.")
    pump(app, lambda: bool(panel._turns[-1].texts))  # the first token has arrived
    panel.cancel_button.click()
    assert not panel.busy
    assert panel.send_button.isEnabled() and not panel.cancel_button.isEnabled()
    assert "(cancelled)" in panel.conversation_text()
    assert panel.status.text() == "Cancelled."

    panel.options = dict(SHORT)
    started = time.monotonic()
    assert panel.send("Where is the liver?")
    # The engine serialises work: this is quick only because the cancelled job really stopped.
    pump(app, lambda: not panel.busy, timeout=30)
    assert time.monotonic() - started < 15
    assert panel.error.text() == ""
    assert panel.status.text().startswith("Answered")
    assert panel.conversation_text().count("(cancelled)") == 1


def test_clear_while_a_question_runs_cancels_it_and_the_panel_asks_again(app, url, volume):
    """clear() mid-answer emptied the conversation under the running question: its next event found no question to
    belong to (IndexError on every poll) and the panel stayed busy for good, refusing every later question."""
    panel = make_panel(url, volume)
    panel.options = {"max_new_tokens": 2048, "seed": 0}
    assert panel.send("Describe everything in detail.")
    pump(app, lambda: bool(panel._turns[-1].texts))  # the first token has arrived
    panel.clear()
    assert not panel.busy and panel.send_button.isEnabled() and not panel.cancel_button.isEnabled()
    assert panel.conversation_text() == ""

    panel.options = dict(SHORT)
    assert panel.send("Where is the liver?")
    pump(app, lambda: not panel.busy, timeout=30)
    pump(app, lambda: not panel._runner.busy, timeout=30)  # the cleared question's late events come and go
    assert panel.error.text() == "" and panel.status.text().startswith("Answered")
    assert [turn.question for turn in panel._turns] == ["Where is the liver?"]
    assert "Describe everything" not in panel.conversation_text() and "(cancelled)" not in panel.conversation_text()


def test_slice_range_reports_progress(app, url, volume):
    panel = make_panel(url, volume)
    progress, per_slice, per_question = [], [], []
    panel.on_region_answers = per_slice.extend
    panel.on_answers = per_question.append
    panel.set_slice_count(3)
    panel.set_scope("range", 0, 2)
    assert panel.range_from.isEnabled()
    assert panel.send("Where is the liver?")
    pump(app, lambda: not panel.busy, step=lambda: progress.append(panel.progress.value()))
    # One call per question with every answer that has regions: the host merges slices into 3D findings.
    assert len(per_question) == 1 and [a.index for a in per_question[0]] == [a.index for a in per_slice]
    text = panel.conversation_text()
    assert all(f"slice {k}:" in text for k in range(3)), text
    assert max(progress) == 3
    assert "slices 0–2" in text


def test_range_partly_outside_the_volume_names_the_slices_answered(app, url, volume):
    """Before the panel knows the volume's slice count its boxes take any range: the part inside the volume is
    answered and the transcript says which slices those are (it said "slices 1–7" of a 3-slice volume)."""
    count = volume.array.shape[0]
    panel = make_panel(url, volume)
    panel.set_scope("range", count + 4, 1)  # backwards, and past the last slice
    assert panel.send("Where is the liver?")
    pump(app, lambda: not panel.busy)
    assert panel.error.text() == ""
    assert sorted(panel._turns[-1].texts) == list(range(1, count))
    text = panel.conversation_text()
    assert f"slices 1–{count - 1}; the volume has {count} axial slices" in text, text
    assert f"slices 1–{count + 4}" not in text


def test_a_range_asked_stays_in_the_boxes_for_the_next_question(app, url, volume):
    """The volume's slice count arrives while the first range question runs: the boxes take its maximum but keep
    the range asked, so a follow-up asks the same slices (the "to" box jumped to the last slice, and the next question
    asked the whole rest of the volume)."""
    count = volume.array.shape[0]
    panel = make_panel(url, volume)
    panel.set_scope("range", 0, count - 2)
    assert panel.send("Where is the liver?")
    pump(app, lambda: not panel.busy)
    assert int(panel.range_to.maximum()) == count - 1
    assert (panel.range_from.value(), panel.range_to.value()) == (0, count - 2)
    assert panel.send("And the kidney?")
    pump(app, lambda: not panel.busy)
    assert sorted(panel._turns[-1].texts) == list(range(count - 1))
    # Boxes the user left alone span the whole volume once it is known, and follow the next volume's count.
    fresh = make_panel(url, volume)
    assert fresh.send("Where is the liver?")
    pump(app, lambda: not fresh.busy)
    assert (fresh.range_from.value(), fresh.range_to.value()) == (0, count - 1)
    taller = VolumeData(np.concatenate([volume.array, volume.array]), volume.spacing, volume.origin, volume.direction,
                        "CT", key="taller")
    fresh.volume_provider = lambda: taller
    assert fresh.send("Where is the liver?")
    pump(app, lambda: not fresh.busy)
    assert (fresh.range_from.value(), fresh.range_to.value()) == (0, 2 * count - 1)


def test_chips_link_only_regions_with_an_area(app, url, volume):
    """A region with an empty mask has no bounding box, so the host can centre nothing on it and makes no suggestion
    of it: its chip is marked "(empty)" instead of being a link that does nothing when clicked."""
    panel = make_panel(url, volume)
    panel.set_scope("volume")
    assert panel.send("Where is the liver?")
    pump(app, lambda: not panel.busy)
    regions = [(t.serial, t.plane, k, r) for t in panel._turns for k, rs in t.regions.items() for r in rs]
    empty = [r for *_, r in regions if r.bbox is None]
    assert empty and len(empty) < len(regions)  # the fixture's answers have both kinds
    linked = sorted(parse_region_url(link) for link in panel.region_links())
    assert linked == sorted((s, p, k, r.index) for s, p, k, r in regions if r.bbox is not None)
    assert panel.conversation_text().count("(empty)") == len(empty)


def test_whole_volume_scope(app, url, volume):
    panel = make_panel(url, volume)
    panel.set_scope("volume")
    assert not panel.range_from.isEnabled()
    assert panel.send("Where is the liver?")
    pump(app, lambda: not panel.busy)
    assert panel.error.text() == ""
    assert sorted(panel._turns[-1].texts) == [0, 1, 2]


def test_engine_down_is_shown_not_raised(app, volume):
    panel = make_panel(f"http://127.0.0.1:{free_port()}", volume)
    assert panel.send("Anyone there?")
    pump(app, lambda: not panel.busy)
    assert "cannot reach the MedSIGHT engine" in panel.error.text()
    assert "medsight serve" in panel.error.text()
    assert panel.send_button.isEnabled()


def test_wrong_token_is_shown_not_raised(app, secured_url, volume):
    panel = make_panel(secured_url, volume, token="wrong")
    assert panel.send("Where is the liver?")
    pump(app, lambda: not panel.busy)
    assert "token" in panel.error.text()
    assert "401" in panel.error.text()
    # With the right token the same panel works.
    panel.set_client(MedSIGHTClient(secured_url, token=TOKEN, timeout=60))
    assert panel.send("Where is the liver?")
    pump(app, lambda: not panel.busy)
    assert panel.error.text() == ""


def test_refusals_before_sending(app, url, volume):
    panel = make_panel(url, volume)
    assert not panel.send("   ")
    assert panel.error.text() == "Type a question first."
    panel.volume_provider = lambda: None
    assert not panel.send("Where?")
    assert panel.error.text() == "Select a volume first."
    asked = []
    panel.volume_provider = lambda: volume
    panel.before_upload = lambda target: asked.append(target) or False
    assert not panel.send("Where?")
    assert asked == [url]
    assert "not allowed" in panel.error.text()
    assert not panel.busy


def test_volume_id_source_and_eviction_message(app, url, volume):
    client = MedSIGHTClient(url, timeout=60)
    info = client.upload_volume(volume.array, volume.spacing, volume.origin, volume.direction, modality="CT")
    panel = make_panel(url, volume)
    panel.volume_provider = lambda: info.volume_id  # the host already uploaded it
    assert panel.send("Where is the liver?")
    pump(app, lambda: not panel.busy)
    assert panel.error.text() == ""
    panel.volume_provider = lambda: "0" * 64
    assert panel.send("Where is the liver?")
    pump(app, lambda: not panel.busy)
    assert "no longer has this volume" in panel.error.text()


def test_helpers():
    from MedSIGHTSlicerLib.chat_panel import RegionLink

    assert parse_region_url("region://40/coronal/7/3") == (40, "coronal", 7, 3)
    # QUrl's IPv4 reading of the host
    assert parse_region_url(qt.QUrl("region://300/axial/12/2").toString()) == (300, "axial", 12, 2)
    assert parse_region_url(RegionLink(5, "sagittal", 0, 1).url()) == (5, "sagittal", 0, 1)
    assert parse_region_url("region://40/3") is None  # no plane: which answer it means is unknown
    assert parse_region_url("region://x/axial/3/0") is None
    assert parse_region_url("https://example.org") is None
    err = MedSIGHTError("missing or wrong bearer token", status=401, code="unauthorized")
    assert describe_error(err) == (
        "missing or wrong bearer token (HTTP 401). Check the token in the connection settings."
    )
    assert is_loopback_url("http://localhost:8765") and is_loopback_url("http://[::1]:1")
    assert not is_loopback_url("https://gpu.example.org")


def test_settings_round_trip_and_consent():
    class Store(dict):
        def value(self, key, default=None):
            return self.get(key, default)

        def setValue(self, key, value):  # noqa: N802 - QSettings' name
            self[key] = value

    store = Store()
    settings = ConnectionSettings.load(store)
    assert settings.url == "http://127.0.0.1:8765" and not settings.needs_consent()
    settings.url = "https://gpu.example.org:8765"
    assert settings.needs_consent()
    settings.record_consent()
    settings.token = "t"
    settings.remember_token = True
    settings.save(store)
    again = ConnectionSettings.load(store)
    assert again == settings
    assert not again.needs_consent()
    assert again.needs_consent("http://other.example.org")


def test_cancel_keeps_the_answers_that_arrived_and_polls_until_workers_end(app, url, volume, monkeypatch):
    """Issue 18 defect 8: Cancel after the first chunk's answers must hand them to the host, and the poll timer keeps
    giving Python turns while the worker (and the cancel request's thread) still run."""
    import MedSIGHTSlicerLib.chat_panel as chat_panel

    monkeypatch.setattr(chat_panel, "CHUNK_SLICES", 1)  # one request per slice: answers arrive chunk by chunk
    panel = make_panel(url, volume)
    delivered = []
    panel.on_answers = delivered.append
    panel.set_slice_count(3)
    panel.set_scope("range", 0, 2)
    assert panel.send("Where is the liver?")
    pump(app, lambda: panel._job is not None and bool(panel._job.answers))
    arrived = list(panel._job.answers)
    panel.cancel()
    assert not panel.busy
    assert len(delivered) == 1 and [a.index for a in delivered[0]] == [a.index for a in arrived]
    # Busy read first: the worker may end at any moment, but the timer stops only on a later tick of the loop.
    if panel._runner.busy:
        assert panel._timer.isActive()
    pump(app, lambda: not panel._runner.busy, timeout=60)
    pump(app, lambda: not panel._timer.isActive(), timeout=5)
    assert len(delivered) == 1  # late events of the cancelled job are not applied a second time


def test_model_tag_comes_with_the_answer(app, url, volume):
    """Issue 18 defect 12: the model name is known from the answer itself, without pressing Test connection."""
    panel = make_panel(url, volume)
    assert panel.last_model == ""
    assert panel.send("Where is the liver?")
    pump(app, lambda: not panel.busy)
    assert panel.last_model and panel.last_model == MedSIGHTClient(url).health().model


def test_current_slice_named_by_the_view(app, url, volume):
    """"Current slice" as the view's slice-to-RAS: the engine picks plane and index and the panel shows which."""
    panel = make_panel(url, volume)
    # The volume: RAS identity directions, origin RAS (-10, -20, -5), 2.5 mm slices -> k = 2 lies at S = 0.
    view = np.eye(4)
    view[:3, 3] = [3.0, -1.0, 0.4]
    panel.current_slice_provider = lambda: view
    answers = []
    panel.on_region_answers = answers.extend
    assert panel.send("Where is the liver?")
    pump(app, lambda: not panel.busy)
    assert panel.error.text() == ""
    assert answers and answers[0].plane == "axial" and answers[0].index == 2
    assert "axial slice 2 (in view)" in panel.conversation_text()
    assert int(panel.range_from.maximum()) == 2  # the engine's slice count of the plane limits the range boxes


def test_follow_up_about_the_slice_in_view_carries_the_conversation(app, url, volume):
    """Audit F1: Slicer's "Current slice" always sends the view, so the panel learns the slice only from the engine;
    an earlier answer about that slice tells it beforehand, and the follow-up goes with the conversation."""
    panel = make_panel(url, volume)
    sent = []
    real_ask = panel.client.ask_stream

    def spy(volume_id, messages, *args, **kwargs):
        sent.append(messages)
        return real_ask(volume_id, messages, *args, **kwargs)

    panel.client.ask_stream = spy
    # RAS identity directions, origin RAS (-10, -20, -5), 2.5 mm slices: S = 0.4 lies on axial slice 2.
    view = np.eye(4)
    view[:3, 3] = [3.0, -1.0, 0.4]
    panel.current_slice_provider = lambda: view
    assert panel.send("Where is the liver?")
    pump(app, lambda: not panel.busy)
    first = panel._turns[-1].texts[2]
    assert panel.error.text() == "" and first and panel._turns[-1].place == ("axial", 2)

    view = view.copy()
    view[:3, 3] = [12.0, 7.5, 0.4]  # panned within the same slice
    assert panel.send("And the spleen?")
    pump(app, lambda: not panel.busy)
    assert panel.error.text() == ""
    assert sent[1] == [("user", "Where is the liver?"), ("assistant", first), ("user", "And the spleen?")]
    assert panel._turns[-1].place == ("axial", 2)

    view = view.copy()
    view[:3, 3] = [3.0, -1.0, -2.1]  # scrolled to axial slice 1: nothing was said about it yet
    assert panel.send("And the kidney?")
    pump(app, lambda: not panel.busy)
    assert sent[2] == "And the kidney?" and panel._turns[-1].place == ("axial", 1)
    assert len(sent) == 3


def test_slice_range_boxes_follow_the_chosen_plane(app, url):
    """Audit F5: after a question along one plane, choosing a view along another plane (the module sets ``plane``)
    lets the range boxes take that plane's slices: 10-20 of 32 sagittal slices, not clamped to the 3 axial ones."""
    volume = VolumeData(np.full((3, 32, 32), 40, np.int16), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0),
                        np.diag([-1.0, -1.0, 1.0]), "CT", key="slab")
    panel = make_panel(url, volume)
    panel.options = {"max_new_tokens": 2, "seed": 0}
    red = np.eye(4)
    red[:3, 3] = [-5.0, -5.0, 2.0]
    panel.current_slice_provider = lambda: red
    assert panel.send("Where is the liver?")
    pump(app, lambda: not panel.busy)
    assert panel.error.text() == "" and int(panel.range_to.maximum()) == 2  # 3 axial slices

    panel.plane = "sagittal"  # "Current slice of: Yellow" (MedSIGHTSlicerWidget._view_changed)
    assert int(panel.range_to.maximum()) == 31 and int(panel.range_from.maximum()) == 31
    panel.set_scope("range", 10, 20)
    assert (int(panel.range_from.value()), int(panel.range_to.value())) == (10, 20)
    panel.current_slice_provider = lambda: None
    assert panel.send("Where is the liver?")
    pump(app, lambda: not panel.busy)
    assert panel.error.text() == ""
    assert sorted(panel._turns[-1].texts) == list(range(10, 21)) and panel.answered_slices == 11
    assert (int(panel.range_from.value()), int(panel.range_to.value())) == (10, 20)  # the user's range stays
    panel.plane = "axial"
    assert int(panel.range_to.maximum()) == 2 and int(panel.range_to.value()) == 2


def test_untouched_range_boxes_follow_each_view_and_typed_ones_stay(app, url):
    """Choosing another view gave the boxes that plane's maximum but left an untouched "to" box at the old plane's
    last slice (Red axial 0-2, then Yellow sagittal still 0-2 of 32). Untouched boxes span the chosen plane; a range
    the user typed stays while it lies inside it."""
    volume = VolumeData(np.full((3, 24, 32), 40, np.int16), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0),
                        np.diag([-1.0, -1.0, 1.0]), "CT", key="box")
    panel = make_panel(url, volume)
    panel.options = {"max_new_tokens": 2, "seed": 0}
    assert panel.send("Where is the liver?")
    pump(app, lambda: not panel.busy)
    counts = dict(panel._slice_counts)
    assert panel.error.text() == "" and len(set(counts.values())) == 3  # each plane its own count

    def boxes() -> tuple[int, int]:
        return int(panel.range_from.value()), int(panel.range_to.value())

    assert boxes() == (0, counts["axial"] - 1)
    for plane in ("sagittal", "coronal", "axial", "sagittal"):
        panel.plane = plane  # "Current slice of: Yellow" (MedSIGHTSlicerWidget._view_changed)
        assert boxes() == (0, counts[plane] - 1), plane
        assert int(panel.range_to.maximum()) == counts[plane] - 1
    typed = (2, min(counts["coronal"], counts["sagittal"]) - 2)
    panel.set_scope("range", *typed)
    panel.plane = "coronal"
    assert boxes() == typed  # still inside the coronal slices: the user's range
    panel.plane = "sagittal"
    assert boxes() == typed


def test_range_boxes_fit_a_newly_chosen_volume_before_its_first_question(app, url, volume):
    """After a question about one volume, choosing a taller one left the boxes at the first volume's last slice: no
    slice beyond it could be typed, and untouched boxes asked only the first volume's count of slices. The host gives
    the chosen volume's counts (``MedSIGHTSession.slice_counts``)."""
    count = volume.array.shape[0]
    panel = make_panel(url, volume)
    assert panel.send("Where is the liver?")
    pump(app, lambda: not panel.busy)
    assert int(panel.range_to.maximum()) == count - 1
    taller = VolumeData(np.concatenate([volume.array] * 3), volume.spacing, volume.origin, volume.direction, "CT",
                        key="taller")
    panel.volume_provider = lambda: taller
    k, j, i = taller.array.shape
    panel.set_slice_counts({"axial": k, "coronal": j, "sagittal": i})
    assert int(panel.range_to.maximum()) == k - 1
    assert (int(panel.range_from.value()), int(panel.range_to.value())) == (0, k - 1)  # untouched: the whole volume
    panel.set_scope("range", count, k - 1)  # slices only the taller volume has
    assert (int(panel.range_from.value()), int(panel.range_to.value())) == (count, k - 1)
    assert panel.send("Where is the liver?")
    pump(app, lambda: not panel.busy)
    assert panel.error.text() == "" and sorted(panel._turns[-1].texts) == list(range(count, k))


def test_rendering_leaves_the_reader_where_they_are(app, url, volume):
    panel = make_panel(url, volume)
    panel.widget.resize(320, 260)
    for n in range(3):
        assert panel.send(f"Where is the liver? ({n})")
        pump(app, lambda: not panel.busy)
    bar = panel.conversation.verticalScrollBar()
    assert bar.maximum() > 0
    bar.setValue(0)  # the reader scrolls back up to an earlier answer
    assert panel.send("Where is the spleen?")
    pump(app, lambda: not panel.busy)
    assert bar.value() == 0


@pytest.mark.parametrize(("background", "text"), [("#202124", "#e8eaed"), ("#ffffff", "#000000")],
                         ids=["dark", "light"])
def test_conversation_is_readable_in_both_themes(app, url, volume, background, text):
    import re

    panel = make_panel(url, volume)
    panel.current_slice_provider = lambda: 0  # its regions have an area: chips are drawn as links
    palette = panel.widget.palette()
    palette.setColor(qt.QPalette.Base, qt.QColor(background))
    palette.setColor(qt.QPalette.Text, qt.QColor(text))  # a theme swaps both (Slicer's dark theme does)
    panel.widget.setPalette(palette)
    assert panel.send("Where is the liver?")
    pump(app, lambda: not panel.busy)
    page = panel.conversation.toHtml()
    base = qt.QColor(background)
    texts = set(re.findall(r"(?<!background-)color:\s*(#[0-9a-fA-F]{6})", page))
    backgrounds = set(re.findall(r"background-color:\s*(#[0-9a-fA-F]{6})", page))
    assert len(texts) >= 3 and len(backgrounds) == 1, page  # speakers, notes and region chips were all drawn
    chip_bg = qt.QColor(backgrounds.pop())
    for colour in texts:
        # A chip's text sits on the chip; everything else on the page's background.
        on = chip_bg if contrast(colour, chip_bg.name()) > contrast(colour, base.name()) else base
        assert contrast(colour, on.name()) >= 4.5, (colour, on.name(), background)
    assert contrast(panel.error.styleSheet().split("color:")[1].strip(" ;"), base.name()) >= 4.5


@pytest.mark.parametrize("kind", ["no image", "no scalars", "no voxels", "infinite voxels"])
def test_volume_the_engine_cannot_read_is_refused_before_sending(app, fake, kind):
    """A volume without an image (the selector lists Crop Volume's output before Apply), whose image holds no voxels,
    or infinite voxels, gets one plain error naming it and nothing is sent (it was sent whole, to be refused by the
    engine, or raised a message without the volume's name)."""
    slicer = pytest.importorskip("slicer")
    vtk = pytest.importorskip("vtk")
    from medsight_testing.mrml import make_volume
    from MedSIGHTSlicerLib.session import MedSIGHTSession

    scene = slicer.vtkMRMLScene()
    session = MedSIGHTSession(scene)
    if kind == "no image":
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    elif kind == "no scalars":
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
        node.SetAndObserveImageData(vtk.vtkImageData())  # an image object without voxels
    elif kind == "no voxels":
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
        image = vtk.vtkImageData()
        image.AllocateScalars(vtk.VTK_SHORT, 1)  # scalars of an empty extent: 0 x 0 x 0 voxels
        node.SetAndObserveImageData(image)
    else:
        voxels = np.zeros((3, 8, 8), np.float64)
        voxels[1, 2, 3] = np.inf
        node = make_volume(scene, voxels, np.eye(4), dtype=np.float64)
    node.SetName("Broken")
    panel = ChatPanel(MedSIGHTClient(fake.url, timeout=5, retries=0))
    PANELS.append(panel)
    panel.volume_provider = lambda: session.volume_source(node)
    try:
        assert panel.send("Where is the liver?") is False
        assert "'Broken'" in panel.error.text()
        assert ("1 infinite" if kind == "infinite voxels" else "no image data") in panel.error.text()
        assert not panel.busy and panel._turns == [] and fake.requests == []
    finally:
        session.stop_observing()
        scene.Clear(1)


def test_engine_restart_drops_the_stale_volume_id_and_sends_the_volume_again(app, engine):
    """Wired as the module wires it (the session caches the engine id, the panel asks with it): after the engine
    restarts on the same URL, the next question uploads the volume once more and gets its answer, no error shown."""
    slicer = pytest.importorskip("slicer")
    from medsight_testing.mrml import make_volume
    from MedSIGHTSlicerLib.session import MedSIGHTSession

    scene = slicer.vtkMRMLScene()
    session = MedSIGHTSession(scene)
    node = make_volume(scene, (np.arange(3 * 16 * 18).reshape(3, 16, 18) % 83).astype(np.int16), np.eye(4), "CT")
    port = free_port()
    panel = ChatPanel(None)
    PANELS.append(panel)
    uploads, unknown = [], []

    def source():  # MedSIGHTSlicerWidget._volume_source
        session.bind(node)
        return session.volume_source(node)

    def forget(volume_id: str):
        unknown.append(volume_id)
        return session.forget_volume_id(volume_id)

    def uploaded(key: str, volume_id: str) -> None:
        uploads.append(volume_id)
        session.remember_volume_id(key, volume_id)

    panel.volume_provider = source
    panel.current_slice_provider = lambda: 1
    panel.on_volume_uploaded = uploaded
    panel.on_volume_unknown = forget
    panel.options = dict(SHORT)

    def ask() -> None:
        assert panel.send("Where is the liver?")
        pump(app, lambda: not panel.busy)

    try:
        with live_server(medsight.server.app.create_app(engine), port=port) as base_url:
            panel.set_client(session.connect(base_url))
            ask()
            assert panel.error.text() == "" and len(uploads) == 1
            assert session.volume_source(node) == uploads[0]  # cached: the next question names the volume by id
        # "Stop" then "Start local engine": the same URL, a fresh engine that holds no volumes.
        with live_server(medsight.server.app.create_app(engine), port=port):
            ask()
            assert panel.error.text() == ""
            assert panel.status.text().startswith("Answered in")
            assert unknown == [uploads[0]]  # the stale id was dropped once ...
            assert len(uploads) == 2  # ... and the volume sent once more
            assert panel.client.volume_info(uploads[1]).slices["axial"] == 3  # the new engine holds it
            assert session.volume_source(node) == uploads[1]
            ask()  # the next question reuses the fresh id: no more uploads
            assert panel.error.text() == "" and len(uploads) == 2 and len(unknown) == 1
    finally:
        session.stop_observing()
        scene.Clear(1)



def test_a_volume_with_nan_voxels_is_answered_with_a_note_and_left_as_it_is(app, url):
    """A volume Slicer loaded with NaN voxels (a NIfTI from an MR pipeline: NaN outside the brain) was refused before
    sending ("has 864 NaN and 0 infinite voxels: replace them with finite values first"), which a Slicer user cannot
    easily do, while `medsight ask` read the same file. Wired as the module wires it, with a live engine: the engine
    reads them as the volume's smallest value, the question is answered, the transcript says how many, and the
    volume node keeps its voxels, NaN and all."""
    slicer = pytest.importorskip("slicer")
    from medsight_testing.mrml import make_volume
    from MedSIGHTSlicerLib.geometry import array_from_image
    from MedSIGHTSlicerLib.session import MedSIGHTSession

    scene = slicer.vtkMRMLScene()
    session = MedSIGHTSession(scene)
    voxels = np.linspace(-5, 100, 3 * 16 * 18, dtype=np.float32).reshape(3, 16, 18)
    voxels[:, :4, :] = np.nan  # the rows outside the "brain"
    node = make_volume(scene, voxels, np.eye(4), "MR", dtype=np.float32)
    panel = ChatPanel(MedSIGHTClient(url, timeout=120))
    PANELS.append(panel)
    panel.volume_provider = lambda: session.volume_source(node)
    panel.current_slice_provider = lambda: 1
    panel.options = dict(SHORT)
    try:
        assert panel.send("Where is the brain?")
        pump(app, lambda: not panel.busy)
        assert panel.error.text() == "" and panel.status.text().startswith("Answered in")
        turn = panel._turns[-1]
        assert set(turn.texts) == {1}
        low = float(np.nanmin(voxels))
        nan = int(np.isnan(voxels).sum())
        assert turn.note == (f"{nan} NaN voxels (of {voxels.size}) read as the volume's minimum {low:g}; "
                             "the volume in Slicer keeps its NaN")
        assert f"(note: {nan} NaN voxels" in panel.conversation.toPlainText()
        np.testing.assert_array_equal(array_from_image(node.GetImageData()), voxels)  # NaN where they were
    finally:
        session.stop_observing()
        scene.Clear(1)


def test_whole_volume_under_a_warping_transform_is_asked_without_a_view(app, url):
    """Wired as the module wires it (the "Current slice" provider is the chosen view in the volume's frame): a
    volume under a non-linear transform has no single view plane, so "Current slice" says to harden it; a slice
    range or the whole volume needs no view and was refused all the same. Its suggestions sit under the same
    transform, on its own grid."""
    slicer = pytest.importorskip("slicer")
    vtk = pytest.importorskip("vtk")
    from medsight_testing.mrml import add_slice_views, make_volume
    from MedSIGHTSlicerLib.session import MedSIGHTSession

    scene = slicer.vtkMRMLScene()
    add_slice_views(scene)
    session = MedSIGHTSession(scene)
    shape = (3, 16, 18)
    node = make_volume(scene, (np.arange(np.prod(shape)).reshape(shape) % 83).astype(np.int16), np.eye(4), "CT")
    warp = vtk.vtkThinPlateSplineTransform()  # a non-linear transform, as the Landmark Registration module makes
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for point in [(0, 0, 0), (40, 0, 0), (0, 40, 0), (0, 0, 40), (40, 40, 40)]:
        source.InsertNextPoint(point)
        target.InsertNextPoint(point[0] + 2.0, point[1] + 0.1 * point[0], point[2])
    warp.SetSourceLandmarks(source)
    warp.SetTargetLandmarks(target)
    transform = scene.AddNewNodeByClass("vtkMRMLTransformNode")
    transform.SetAndObserveTransformToParent(warp)
    node.SetAndObserveTransformNodeID(transform.GetID())
    panel = ChatPanel(session.connect(url))
    PANELS.append(panel)
    panel.volume_provider = lambda: session.volume_source(node)
    panel.current_slice_provider = lambda: session.current_view(node, "Red")  # MedSIGHTSlicerWidget._current_view
    panel.on_region_answers = lambda answers: session.take_answers(node, answers, panel.ask_serial, panel.last_scope)
    panel.options = dict(SHORT)
    try:
        panel.set_scope("current")
        assert panel.send("Where is the liver?") is False
        assert "non-linear transform: harden it first" in panel.error.text()
        panel.set_scope("volume")
        assert panel.send("Where is the liver?")
        pump(app, lambda: not panel.busy)
        assert panel.error.text() == ""
        assert panel.answered_slices == shape[0]
        manager = session.suggestion_manager(node)
        assert manager.suggestion_ids()
        assert manager.preview_node.GetTransformNodeID() == transform.GetID()
        for segment_id in manager.suggestion_ids():
            assert manager.suggestion_mask(segment_id).shape == shape
    finally:
        session.stop_observing()
        scene.Clear(1)



def test_a_2d_image_asked_along_a_plane_it_has_no_slices_of_says_which_plane_it_has(app, url):
    """A 2D image loaded as a volume (one slice) has slices along one plane only; a range or whole-volume question
    along another plane (the Yellow view chosen) said only "no slices along this plane"."""
    slicer = pytest.importorskip("slicer")
    from medsight_testing.mrml import make_volume
    from MedSIGHTSlicerLib.session import MedSIGHTSession

    scene = slicer.vtkMRMLScene()
    session = MedSIGHTSession(scene)
    image = make_volume(scene, (np.arange(16 * 18).reshape(1, 16, 18) % 83).astype(np.int16), np.eye(4), "X-ray")
    panel = ChatPanel(session.connect(url))
    PANELS.append(panel)
    panel.volume_provider = lambda: session.volume_source(image)
    panel.options = dict(SHORT)
    try:
        panel.plane = "sagittal"
        panel.set_scope("volume")
        assert panel.send("Where is the liver?")
        pump(app, lambda: not panel.busy)
        assert panel.error.text() == "the volume has no sagittal slices: ask along the axial plane"
        panel.plane = "axial"
        assert panel.send("Where is the liver?")
        pump(app, lambda: not panel.busy)
        assert panel.error.text() == "" and panel.answered_slices == image.GetImageData().GetDimensions()[2]
    finally:
        session.stop_observing()
        scene.Clear(1)


def test_chip_of_a_removed_volume_says_why_it_cannot_be_shown(app, url, volume):
    """Wired as the module wires it: a chip centres the views on its region; once its volume has left the scene
    the click did nothing at all, now the error line says why."""
    slicer = pytest.importorskip("slicer")
    from medsight_testing.mrml import add_slice_views, make_volume, view_origin
    from MedSIGHTSlicerLib.session import MedSIGHTSession
    from MedSIGHTSlicerLib.views import region_centre_ras

    scene = slicer.vtkMRMLScene()
    views = add_slice_views(scene)
    session = MedSIGHTSession(scene)
    node = make_volume(scene, volume.array, np.eye(4), "CT")
    panel = make_panel(url, volume)
    panel.volume_provider = lambda: session.bind(node) or session.volume_source(node)  # the module's _volume_source
    panel.current_slice_provider = lambda: 0
    answers = {}  # (plane, slice) -> the answer the host was handed

    def take(arrived) -> None:
        for answer in arrived:
            answers[answer.plane, answer.index] = answer
        session.take_answers(node, arrived, panel.ask_serial, panel.last_scope)

    panel.on_region_answers = take
    panel.on_region_clicked = session.jump_to_region_link  # as the module wires it
    try:
        assert panel.send("Where is the liver?")
        pump(app, lambda: not panel.busy)
        link = qt.QUrl(panel.region_links()[0])
        panel.conversation.anchorClicked.emit(link)
        assert panel.error.text() == ""
        chip = parse_region_url(link.toString())
        answer = answers[chip.plane, chip.slice]
        centre = region_centre_ras(answer.slice_to_ras, panel.region(chip).bbox)  # no parent transform: world
        np.testing.assert_allclose(view_origin(views["Red"]), centre, atol=1e-6)
        scene.RemoveNode(node)
        panel.conversation.anchorClicked.emit(link)
        assert "no longer" in panel.error.text() and "volume" in panel.error.text()
    finally:
        session.stop_observing()
        scene.Clear(1)


def test_volume_sent_again_and_still_unknown_is_a_clear_error_not_a_loop(app, fake, volume):
    """An engine that keeps refusing the volume: one re-upload, then an error that does not say "ask again"."""
    info = {"volume_id": "ab" * 32, "shape": [3, 64, 64], "modality": "CT", "slices": {"axial": 3}, "bytes": 24576}
    fake.add("POST", "/v1/volumes", fake.reply(201, info))
    fake.add("POST", "/v1/ask", fake.reply(422, {"code": "unknown_volume", "message": "no volume: upload it first"}))
    panel = make_panel(fake.url, volume)
    unknown = []
    panel.volume_provider = lambda: "cd" * 32  # the host's cached id from before the engine restarted
    panel.on_volume_unknown = lambda volume_id: unknown.append(volume_id) or volume
    assert panel.send("Where is the liver?")
    pump(app, lambda: not panel.busy)
    assert unknown == ["cd" * 32]
    assert fake.hits("POST", "/v1/volumes") == 1  # sent again once, never in a loop
    assert fake.hits("POST", "/v1/ask") == 2
    assert "sent again" in panel.error.text() and "ask again" not in panel.error.text()
    assert panel.status.text() == "Failed."


def test_answers_before_an_engine_error_reach_the_host(app, fake, volume):
    """A slice range whose second request is refused (the engine is stopping): the first slice's answer with its
    region still reaches ``on_answers`` (the host merges one question's slices into 3D findings there, and ends its
    stream); it was dropped, as only a finished or cancelled question handed its answers over."""
    import json

    def sse(kind: str, data) -> bytes:
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()

    count = volume.array.shape[0]
    region = {"code": "[M1_2]", "label": "liver", "index": 0, "probability": 0.9, "bbox": [1, 2, 3, 4]}
    answer = {"plane": "axial", "index": 0, "text": "liver", "regions": [region], "slice_to_ras": np.eye(4).tolist()}
    done = {"job_id": "j1", "model": "tiny", "answers": [answer], "timings": {}}
    info = {"volume_id": "ab" * 32, "shape": list(volume.array.shape), "modality": "CT", "slices": {"axial": count},
            "bytes": volume.array.nbytes}
    fake.add("POST", "/v1/volumes", fake.reply(201, info))
    fake.add("POST", "/v1/ask", fake.sse([sse("job", {"job_id": "j1", "plane": "axial", "indices": [0]}),
                                          sse("done", done)]),
             fake.reply(503, {"code": "stopping", "message": "the engine is stopping; try again once it runs"}))
    panel = make_panel(fake.url, volume)
    per_question = []
    panel.on_answers = per_question.append
    panel.set_scope("range", 0, count - 1)
    assert panel.send("Where is the liver?")
    pump(app, lambda: not panel.busy)
    assert "the engine is stopping" in panel.error.text()
    assert [[(a.index, [r.label for r in a.regions]) for a in answers] for answers in per_question] == [
        [(0, ["liver"])]]


@pytest.mark.parametrize("kind", ["token", "region"])
def test_an_event_about_a_slice_not_asked_is_a_clear_error(app, fake, volume, kind):
    """A "token" or "region" event whose ``slice`` lies outside the slices asked (a faulty engine or proxy) showed
    "Unexpected error: IndexError: list index out of range"; it is named as a malformed event, and the panel can ask
    again."""
    import json

    def sse(kind: str, data) -> bytes:
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()

    count = volume.array.shape[0]
    region = {"code": "[M1_2]", "label": "liver", "index": 0, "probability": 0.9, "bbox": [1, 2, 3, 4]}
    payload = {"slice": count, "text": "liver"} if kind == "token" else {"slice": count, "region": region}
    info = {"volume_id": "ab" * 32, "shape": list(volume.array.shape), "modality": "CT", "slices": {"axial": count},
            "bytes": volume.array.nbytes}
    fake.add("POST", "/v1/volumes", fake.reply(201, info))
    fake.add("POST", "/v1/ask", fake.sse([sse("job", {"job_id": "j1", "plane": "axial", "indices": [1]}),
                                          sse(kind, payload)]))
    panel = make_panel(fake.url, volume)
    assert panel.send("Where is the liver?")
    pump(app, lambda: not panel.busy)
    assert f"malformed '{kind}' event" in panel.error.text() and "IndexError" not in panel.error.text()
    assert panel.status.text() == "Failed." and panel.send_button.isEnabled()


def test_streamed_region_becomes_a_link_once_its_answer_arrived(app, fake, volume):
    """A region streams in long before its slice's answer (a chunk of many slices on a CPU): its chip was a link at
    once, but the host can centre on a region only once the answer brought its mask, so the click did nothing. The
    chip links once the answer is there."""
    import json

    from medsight.server.rle import encode_mask

    def sse(kind: str, data) -> bytes:
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()

    rows, cols = volume.array.shape[1:]
    mask = np.zeros((rows, cols), bool)
    mask[2:5, 3:7] = True
    region = {"code": "[M1_2]", "label": "liver", "index": 0, "probability": 0.9, "bbox": [2, 3, 4, 6]}
    answer = {"plane": "axial", "index": 1, "text": "liver", "regions": [{**region, "mask": encode_mask(mask)}],
              "slice_to_ras": np.eye(4).tolist()}
    done = {"job_id": "j1", "model": "tiny", "answers": [answer], "timings": {}}
    info = {"volume_id": "ab" * 32, "shape": list(volume.array.shape), "modality": "CT",
            "slices": {"axial": volume.array.shape[0]}, "bytes": volume.array.nbytes}
    fake.add("POST", "/v1/volumes", fake.reply(201, info))
    fake.add("POST", "/v1/ask", fake.sse([sse("job", {"job_id": "j1", "plane": "axial", "indices": [1]}),
                                          sse("region", {"slice": 0, "region": region}), sse("done", done)], pause=1.0))
    panel = make_panel(fake.url, volume)
    assert panel.send("Where is the liver?")
    pump(app, lambda: panel.conversation_text().count("liver") == 2)  # the streamed region is shown ...
    assert panel.busy and panel.region_links() == []  # ... but not yet as a link
    pump(app, lambda: not panel.busy)
    assert panel.region_links() == ["region://1/axial/1/0"]
    assert int(panel.region(parse_region_url(panel.region_links()[0])).mask.sum()) == int(mask.sum())


def test_consent_dialog_during_a_resend_leaves_the_new_question_polled(app, fake, volume, monkeypatch):
    """Review note: the consent dialog before sending the volume again is modal; a poll inside its event loop drains
    the old job's late "done" event. That must not finish the panel: the new question runs, is polled, is answered.
    When the user refuses instead, the panel ends in a plain failure, idle."""
    import json

    import MedSIGHTSlicerLib.chat_panel as chat_panel

    def sse(kind: str, data) -> bytes:
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()

    stale, fresh = "cd" * 32, "ab" * 32
    answer = {"plane": "axial", "index": 1, "text": "ok", "regions": [], "slice_to_ras": np.eye(4).tolist()}
    done = {"job_id": "j2", "model": "tiny", "answers": [answer], "timings": {}}
    unknown = fake.reply(422, {"code": "unknown_volume", "message": "no volume: upload it first"})
    answered = fake.sse([sse("job", {"job_id": "j2", "plane": "axial", "indices": [1]}), sse("done", done)])
    info = {"volume_id": fresh, "shape": [3, 64, 64], "modality": "CT", "slices": {"axial": 3}, "bytes": 24576}
    fake.add("POST", "/v1/volumes", fake.reply(201, info))
    fake.add("POST", "/v1/ask", unknown, answered, unknown)
    real_run = chat_panel._run_job

    def slow_to_end(client, job, runner):
        cancelled = real_run(client, job, runner)
        if not job.resent:
            time.sleep(0.3)  # the worker is slow to end: its "done" comes after the panel has seen its error
        return cancelled

    monkeypatch.setattr(chat_panel, "_run_job", slow_to_end)
    panel = make_panel(fake.url, volume)
    panel.volume_provider = lambda: stale  # the host's cached id from before the engine restarted
    panel.on_volume_unknown = lambda volume_id: volume
    consents, agree = [], [True]

    def consent(url: str) -> bool:  # the module's modal dialog: an event loop runs until the user answers
        consents.append(url)
        deadline = time.monotonic() + 10
        while panel._runner.busy and time.monotonic() < deadline:  # the old job ends meanwhile
            app.processEvents()
            time.sleep(0.005)
        panel._poll()  # a poll in the dialog's loop (Qt does not re-enter the panel's own timer slot)
        app.processEvents()
        return agree[0]

    panel.before_upload = consent
    assert panel.send("Where is the liver?")
    pump(app, lambda: not panel.busy, timeout=10)
    assert consents == [fake.url]
    assert panel.error.text() == "" and panel.status.text().startswith("Answered in")
    assert panel._turns[-1].texts == {1: "ok"} and panel._turns[-1].status == ""
    assert fake.hits("POST", "/v1/volumes") == 1 and fake.hits("POST", "/v1/ask") == 2

    agree[0] = False  # the next restart: this time the user does not allow sending the volume
    assert panel.send("And the spleen?")
    pump(app, lambda: not panel.busy, timeout=10)
    assert len(consents) == 2 and fake.hits("POST", "/v1/volumes") == 1 and fake.hits("POST", "/v1/ask") == 3
    assert panel.status.text() == "Failed." and panel._turns[-1].status == "error"
    assert "no volume" in panel.error.text()
    assert panel.send_button.isEnabled() and not panel.cancel_button.isEnabled()
    pump(app, lambda: not panel._timer.isActive(), timeout=5)  # idle again: the timer stops


def test_slice_range_after_an_engine_restart_sends_the_volume_again(app, engine, volume):
    """The panel's own upload cache: a range question first asks the engine about the cached id (volume_info); after
    a restart that answers "unknown_volume", and the panel sends the voxels again instead of failing."""
    port = free_port()
    uploads = []
    with live_server(medsight.server.app.create_app(engine), port=port) as base_url:
        panel = make_panel(base_url, volume)
        panel.on_volume_uploaded = lambda key, volume_id: uploads.append(volume_id)
        assert panel.send("Where is the liver?")
        pump(app, lambda: not panel.busy)
        assert panel.error.text() == "" and len(uploads) == 1
    with live_server(medsight.server.app.create_app(engine), port=port):
        panel.set_scope("range", 0, 1)
        assert panel.send("Where is the liver?")
        pump(app, lambda: not panel.busy)
        assert panel.error.text() == ""
        assert len(uploads) == 2 and panel.answered_slices == 2


# -- a busy engine (429 "busy" with Retry-After), requests too large -------------------------------------------------
STALLED_BYTES = 1 << 20  # what the other client's upload declares: the engine's whole upload memory


@pytest.fixture()
def busy_engine(engine):
    """A real server whose upload memory another client's upload holds (its .npy header sent, its voxels not yet):
    yields (base URL, release) where release() hangs that upload up, which frees the memory."""
    import io
    import socket

    server = medsight.server.app.create_app(engine, store_bytes=STALLED_BYTES, read_grace_s=120.0)
    with live_server(server) as base_url:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                      "shape": (1, 1024, STALLED_BYTES // 1024)})
        head = header.getvalue()
        port = int(base_url.rsplit(":", 1)[1])
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.sendall(
            f"POST /v1/volumes?modality=CT HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/x-npy\r\nContent-Length: {len(head) + STALLED_BYTES}\r\n\r\n".encode() + head
        )
        deadline = time.monotonic() + 10
        while server.state.uploads.in_flight < STALLED_BYTES:
            assert time.monotonic() < deadline, "the stalled upload was never counted"
            time.sleep(0.01)
        try:
            yield base_url, stalled.close
        finally:
            stalled.close()


def test_upload_refused_busy_is_sent_again_after_retry_after(app, busy_engine, volume):
    """Another client's upload holds the engine's upload memory: the engine answers 429 "busy" with Retry-After;
    the panel says so in its status line, waits, and sends the volume again by itself once the memory is free."""
    base_url, release = busy_engine
    with pytest.raises(MedSIGHTError) as refused:  # what the engine answers now (a lone upload would go through)
        MedSIGHTClient(base_url, retries=0).upload_volume(volume.array, volume.spacing, volume.origin,
                                                          volume.direction, modality="CT")
    assert (refused.value.status, refused.value.code, refused.value.retry_after) == (429, "busy", 1.0)
    panel = make_panel(base_url, volume)
    assert panel.send("Where is the liver?")
    pump(app, lambda: "busy" in panel.status.text())
    assert panel.busy and panel.cancel_button.isEnabled() and panel.error.text() == ""
    assert "sending the volume again in 1 s" in panel.status.text()
    time.sleep(1.5)  # still held: the panel keeps waiting, it does not give up after one refusal
    app.processEvents()
    assert panel.busy and panel.error.text() == ""
    release()
    pump(app, lambda: not panel.busy)
    assert panel.error.text() == ""
    assert panel.status.text().startswith("Answered in")
    assert 1 in panel._turns[-1].texts  # the question was answered about slice 1


def test_busy_wait_ends_at_once_with_stop(app, busy_engine, volume, monkeypatch):
    import MedSIGHTSlicerLib.chat_panel as chat_panel

    monkeypatch.setattr(chat_panel, "BUSY_MIN_PAUSE_S", 30.0)  # a long Retry-After: Stop must not wait it out
    panel = make_panel(busy_engine[0], volume)
    assert panel.send("Where is the liver?")
    pump(app, lambda: "busy" in panel.status.text())
    assert "again in 30 s" in panel.status.text()
    panel.cancel()
    assert not panel.busy and panel.status.text() == "Cancelled."
    # The worker thread ends too (it sends nothing more): well within the 30 s it would otherwise wait.
    pump(app, lambda: not panel._runner.busy, timeout=chat_panel.BUSY_MIN_PAUSE_S / 6)
    assert panel.error.text() == ""


def test_engine_busy_beyond_the_wait_is_a_clear_error(app, busy_engine, volume, monkeypatch):
    import MedSIGHTSlicerLib.chat_panel as chat_panel

    monkeypatch.setattr(chat_panel, "BUSY_WAIT_S", 2.0)
    panel = make_panel(busy_engine[0], volume)
    started = time.monotonic()
    assert panel.send("Where is the liver?")
    pump(app, lambda: not panel.busy)
    assert time.monotonic() - started >= chat_panel.BUSY_WAIT_S  # it waited, then gave up
    text = panel.error.text()
    assert "receiving other uploads" in text and "(HTTP 429)" in text
    assert "busy with other uploads or questions; ask again in a moment" in text
    assert "Traceback" not in text and "lacks" not in text
    assert panel.status.text() == "Failed." and panel.send_button.isEnabled()


def test_a_failed_question_keeps_its_reason_in_the_transcript(app, url, volume):
    """The engine refuses a question (422): its reason stays under that question in the transcript; it was only in
    the error line, which the next question clears, leaving an empty answer with no word of why."""
    panel = make_panel(url, volume)
    panel.options = {**SHORT, "max_new_tokens": 0}
    assert panel.send("Where is the liver?")
    pump(app, lambda: not panel.busy)
    reason = panel.error.text()
    assert "max_new_tokens" in reason
    panel.options = dict(SHORT)
    assert panel.send("And the kidney?")
    pump(app, lambda: not panel.busy)
    assert panel.error.text() == ""
    assert f"(failed: {reason})" in panel.conversation_text()


def test_question_over_the_largest_ask_is_a_clear_error(engine, url, volume):
    """An ask over the engine's limit, as the panel shows it: refused by the client before it is sent, naming the
    limit the engine publishes; with limits known from an older health (none for asks), the engine's own 413, named
    in the same words from the limits fetched again after it."""
    import dataclasses

    from medsight.server.schemas import max_ask_body_bytes

    largest = max_ask_body_bytes(engine.model.config.llm.max_sequence_length)
    client = MedSIGHTClient(url, retries=0)
    with pytest.raises(MedSIGHTError) as refused:
        client.ask("0" * 64, "x" * (largest + 1), indices=[1])
    assert (refused.value.status, refused.value.code) == (None, "too_large")  # nothing sent, so no HTTP status
    text = describe_error(refused.value)
    assert f"over the engine's limit of {largest:,} bytes" in text and "nothing was sent" in text

    client._health = dataclasses.replace(client.health(), max_ask_body_bytes=None)  # as an older engine's health
    with pytest.raises(MedSIGHTError) as refused:
        client.ask("0" * 64, "x" * (largest + 1), indices=[1])
    assert (refused.value.status, refused.value.code) == (413, "too_large")
    text = describe_error(refused.value)
    assert f"over the engine's limit of {largest:,} bytes" in text and "the engine refused it (HTTP 413)" in text
    assert "\n" not in text and "shorten the question, or send a smaller" in text


def test_slow_request_body_names_the_network():
    err = MedSIGHTError("the request body arrived too slowly (under 65536 bytes/s after 10 s)", status=408,
                        code="body_timeout")
    assert describe_error(err) == (
        "the request body arrived too slowly (under 65536 bytes/s after 10 s) (HTTP 408). The request reached the "
        "engine too slowly; check the network connection to the engine."
    )
