"""The token is remembered only with "Remember"; the MedSIGHT settings page saves at once; the engine log (PySide6)."""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import sys

import pytest

from medsight_testing.processes import wait_for
from MedSIGHTSlicerLib.engine_launch import launch_plan
from MedSIGHTSlicerLib.engine_log import MAX_LINES, EngineLog
from MedSIGHTSlicerLib.engine_process import EngineProcess, leave_engine
from MedSIGHTSlicerLib.qt_shim import connect, qt
from MedSIGHTSlicerLib.settings import DEFAULT_SERVE_COMMAND, PREFIX, ConnectionSettings, split_command
from MedSIGHTSlicerLib.settings_page import ApplicationSettings, ConnectionForm, SettingsPage, settings_kept
from MedSIGHTSlicerLib.theme import colours_of


class Store(dict):
    """QSettings' value/setValue over a dict (what the settings file would hold)."""

    def value(self, key, default=None):
        return self.get(key, default)

    def setValue(self, key, value):  # noqa: N802 - QSettings' name
        self[key] = value


@pytest.fixture(scope="module")
def app():
    application = qt.QApplication.instance() or qt.QApplication(sys.argv[:1])
    yield application
    application.processEvents()


def test_token_is_stored_only_when_remembered():
    store = Store()
    settings = ConnectionSettings(token="s3cret")
    settings.save(store)
    assert store[PREFIX + "token"] == "" and "s3cret" not in repr(store)
    assert ConnectionSettings.load(store).token == ""

    settings.remember_token = True
    settings.save(store)
    assert store[PREFIX + "token"] == "s3cret"
    again = ConnectionSettings.load(store)
    assert again.token == "s3cret" and again.remember_token

    # Unticking "Remember" blanks it on disk; a token an older version wrote without the flag is not loaded.
    again.remember_token = False
    again.save(store)
    assert store[PREFIX + "token"] == ""
    legacy = Store({PREFIX + "token": "old"})
    assert ConnectionSettings.load(legacy).token == ""


def test_settings_page_saves_at_once(app):
    store = Store()
    settings = ConnectionSettings(url="https://gpu.example.org:8765", token="t", remember_token=True)
    settings.record_consent()
    settings.save(store)
    page = SettingsPage(ConnectionSettings.load(store), store)
    seen = []
    page.on_changed = seen.append
    assert page.serve_command.text() == DEFAULT_SERVE_COMMAND
    assert [page.consents.item(n).text() for n in range(page.consents.count())] == ["gpu.example.org"]

    page.serve_command.setText("  /opt/venv/bin/medsight serve --port 9000 ")
    page.serve_command.editingFinished.emit()
    assert store[PREFIX + "serveCommand"] == "/opt/venv/bin/medsight serve --port 9000"
    page.stop_on_exit.setChecked(False)
    assert store[PREFIX + "stopEngineOnExit"] == "false"
    page.serve_command.setText("")
    page.serve_command.editingFinished.emit()
    assert page.serve_command.text() == DEFAULT_SERVE_COMMAND  # an empty command falls back, never blank

    assert page.forget_button.isEnabled()
    page.forget_button.click()
    assert page.consents.count() == 0 and ConnectionSettings.load(store).needs_consent()
    assert page.forget_token_button.isEnabled()
    page.forget_token_button.click()
    assert store[PREFIX + "token"] == "" and not page.forget_token_button.isEnabled()
    assert page.settings.token == "t"  # still used in this session
    assert len(seen) == 5 and all(s is page.settings for s in seen)
    page.widget.deleteLater()


def test_forgotten_token_stays_forgotten_until_remember_is_ticked_again(app):
    """The module panel's fields (ConnectionForm) and the settings page share the settings, wired as the module
    wires them: "Forget the remembered token" unticks "Remember", and the form's later saves (any URL edit, Slicer's
    exit) never write the token back; ticking "Remember" again does."""
    store = Store()
    shared = ApplicationSettings(lambda: store)
    page = shared.add_page(lambda widget: None)
    url, token, remember = qt.QLineEdit(), qt.QLineEdit(), qt.QCheckBox("Remember")
    form = ConnectionForm(shared.settings, store, url, token, remember)
    settings = shared.attach(lambda _: form.load())  # MedSIGHTSlicerWidget.setup
    form.on_saved = lambda _: shared.show_saved()
    try:
        token.setText("s3cret")
        remember.setChecked(True)  # the user ticks "Remember"
        assert store[PREFIX + "token"] == "s3cret" and store[PREFIX + "rememberToken"] == "true"
        assert page.forget_token_button.isEnabled()

        page.forget_token_button.click()
        assert not remember.isChecked()
        assert store[PREFIX + "token"] == "" and store[PREFIX + "rememberToken"] == "false"
        form.save()  # what cleanup() does when Slicer exits
        assert store[PREFIX + "token"] == "" and ConnectionSettings.load(store).token == ""
        assert token.text() == "s3cret" and settings.token == "s3cret"  # still used in this session

        # Even a box left ticked (a host that does not refresh the form) is not read back by a save.
        remember.blockSignals(True)
        remember.setChecked(True)
        remember.blockSignals(False)
        form.save()
        assert store[PREFIX + "token"] == ""

        remember.setChecked(False)
        remember.setChecked(True)  # the user really ticks it again
        assert store[PREFIX + "token"] == "s3cret" and ConnectionSettings.load(store).token == "s3cret"
    finally:
        for widget in (url, token, remember, page.widget):
            widget.deleteLater()


def test_one_settings_page_per_session_through_widget_reloads(app):
    """The module object adds the page at start-up, before any widget exists; the first widget and one made by a
    developer's Reload add none, share the one settings object, and the page's edits reach only the newest widget
    (the first one is cleaned up by then)."""
    store = Store({PREFIX + "serveCommand": "/opt/venv/bin/medsight serve"})
    shared = ApplicationSettings(lambda: store)
    added = []
    page = shared.add_page(lambda widget: added.append(widget) or f"panel {len(added)}")
    page.stop_on_exit.setChecked(not shared.settings.stop_engine_on_exit)  # an edit before any widget is fine
    assert shared.panel == "panel 1" and shared.settings.serve_command == "/opt/venv/bin/medsight serve"

    first, reloaded = [], []
    for told in (first, reloaded):
        assert shared.add_page(lambda widget: added.append(widget)) is page  # MedSIGHTSlicerWidget.setup
        assert shared.attach(told.append) is shared.settings
    page.forget_consents()
    assert added == [page.widget] and shared.panel == "panel 1"
    assert first == [] and reloaded == [shared.settings]

    shared.settings.serve_command = "medsight serve --port 9000"  # the module saves a change of its own
    shared.show_saved()
    assert page.serve_command.text() == "medsight serve --port 9000"
    page.widget.deleteLater()


def test_engine_log_collapses_keeps_the_tail_and_colours_errors(app):
    log = EngineLog()
    log.widget.show()
    assert not log.expanded and not log.text.isVisible()
    log.append("INFO: Started server process\n\n   \nINFO: Uvicorn running on http://127.0.0.1:8765\n")
    assert log.lines() == ["INFO: Started server process", "INFO: Uvicorn running on http://127.0.0.1:8765"]
    assert log.toggle.text().startswith("Engine log: INFO: Uvicorn running")
    log.toggle.click()
    assert log.expanded and log.text.isVisible()
    log.append_error("unknown_volume: the engine no longer has this volume <b>")
    assert "error: unknown_volume" in log.lines()[-1] and "<b>" in log.lines()[-1]  # escaped, shown as text
    assert "(1 error)" in log.toggle.text()
    assert colours_of(log.text).error in log.text.document().toHtml()
    log.append("\n".join(f"line {n}" for n in range(MAX_LINES + 50)))
    assert len(log.lines()) == MAX_LINES and log.lines()[-1] == f"line {MAX_LINES + 49}"
    log.set_expanded(False)
    assert not log.text.isVisible()
    log.widget.close()
    log.widget.deleteLater()


def test_a_download_progress_bar_is_one_line_of_the_engine_log(app, tmp_path):
    """The model's first download: huggingface_hub's tqdm bar on stderr, redrawn with "\\r" and never a newline until
    it closes, through the real EngineProcess into the log. Each redraw used to become a line (a long download pushed
    the 2000-line log's earlier lines out, the lines that explain a failure), with uvicorn's colour codes as text."""
    import time

    pytest.importorskip("tqdm")
    from MedSIGHTSlicerLib.engine_launch import launch_plan
    from MedSIGHTSlicerLib.engine_process import EngineProcess

    total, half = 400, 200
    go = tmp_path / "go"
    script = tmp_path / "download.py"
    script.write_text(
        "import os, sys, time\n"
        "from tqdm.auto import tqdm\n"
        "print('downloading (once, into the Hugging Face cache)', file=sys.stderr)\n"
        f"bar = tqdm(total={total}, unit='B', unit_scale=True, desc='model.safetensors', mininterval=0, miniters=1)\n"
        f"for n in range({total}):\n"
        "    bar.update(1)\n"
        f"    while n + 1 == {half} and not os.path.exists({str(go)!r}): time.sleep(0.02)\n"
        "bar.close()\n"
        "print('\\x1b[32mINFO\\x1b[0m:     Uvicorn running on http://127.0.0.1:8765')\n"
        "sys.stderr.write('medsight: error: stopped here'); sys.exit(2)\n"
    )
    log = EngineLog()
    finished = []
    process = EngineProcess(on_output=log.append, on_partial=log.set_partial, on_finished=finished.append)
    process.start(launch_plan(f'"{sys.executable}" "{script}"', os.environ, stop_on_exit=True))
    deadline = time.monotonic() + 60
    while f"{half}/{total}" not in log.toggle.text() and time.monotonic() < deadline:
        process.poll()
        time.sleep(0.05)
    # Halfway: the bar's latest state is the last line (also in the collapsed header), after the line before it.
    assert len(log.lines()) == 2 and f"{half}/{total}" in log.lines()[-1], log.lines()
    go.touch()
    while not finished and time.monotonic() < deadline:
        process.poll()
        time.sleep(0.05)
    lines = log.lines()
    assert finished == [2] and len(lines) == 4, lines
    assert lines[1].startswith("model.safetensors: 100%") and f"{total}/{total}" in lines[1]
    assert lines[2:] == ["INFO:     Uvicorn running on http://127.0.0.1:8765", "medsight: error: stopped here"]
    assert process.finished_message(2).endswith("medsight: error: stopped here")
    log.widget.deleteLater()


def test_an_unfinished_line_is_redrawn_in_place_and_can_vanish(app):
    """A bar that clears itself when done (tqdm's leave=False) leaves no line; an error after a bar keeps both."""
    log = EngineLog()
    log.set_partial("shards:  10%|")
    log.set_partial("shards:  20%|")
    assert log.lines() == ["shards:  20%|"]
    log.set_partial("")
    assert log.lines() == [] and log.toggle.text() == "Engine log"
    log.append("ready\n")
    log.set_partial("weights:  50%|")
    log.append_error("out of memory")
    log.set_partial("weights:  60%|")
    assert log.lines()[0] == "ready" and log.lines()[1] == "weights:  50%|" and len(log.lines()) == 4
    assert log.lines()[2].endswith("error: out of memory") and log.lines()[3] == "weights:  60%|"
    log.append("weights: 100%|")
    log.set_partial("")
    assert log.lines()[3:] == ["weights: 100%|"]
    log.widget.deleteLater()


def test_question_errors_reach_the_engine_log_refusals_do_not(app):
    import numpy as np

    from medsight_testing.chat import wait_until_answered
    from medsight_testing.live_server import free_port
    from MedSIGHTSlicerLib.chat_panel import ChatPanel, VolumeData
    from MedSIGHTSlicerLib.client import MedSIGHTClient

    log = EngineLog()
    panel = ChatPanel(MedSIGHTClient(f"http://127.0.0.1:{free_port()}", timeout=5, retries=0))
    panel.on_error = log.append_error
    panel.volume_provider = lambda: VolumeData(np.zeros((2, 8, 8), dtype=np.int16), key="empty")
    try:
        assert not panel.send("   ")
        assert panel.error.text() == "Type a question first." and log.errors == 0
        assert panel.send("Anyone there?")
        wait_until_answered(app, panel, 30, pause_s=0.01)
        assert log.errors == 1 and "cannot reach the MedSIGHT engine" in log.lines()[-1]
    finally:
        panel.close()
        log.widget.deleteLater()
        app.processEvents()


@pytest.mark.parametrize("stored", ["abc", "", None, "  ", "maybe"])
def test_an_unreadable_stored_yes_no_is_the_default(stored):
    """An INI file edited by hand, or an invalid QVariant (PythonQt gives None): "stop on exit" was read as False,
    leaving the engine running after Slicer closed; "Remember token" must stay off."""
    default = ConnectionSettings()
    store = Store({PREFIX + "stopEngineOnExit": stored, PREFIX + "rememberToken": stored, PREFIX + "token": "t"})
    loaded = ConnectionSettings.load(store)
    assert (loaded.stop_engine_on_exit, loaded.remember_token, loaded.token) == (
        default.stop_engine_on_exit, default.remember_token, "")


@pytest.mark.parametrize(("stored", "expected"), [("true", True), ("False", False), (" 1 ", True), ("off", False),
                                                  (True, True), (False, False), (0, False)])
def test_stored_yes_no_values_as_qsettings_returns_them(stored, expected):
    loaded = ConnectionSettings.load(Store({PREFIX + "stopEngineOnExit": stored}))
    assert loaded.stop_engine_on_exit is expected


def test_an_engine_log_flood_lays_out_only_the_lines_it_keeps(app):
    """An engine printing many lines between two polls: only the last MAX_LINES can stay, and only they are laid out
    (the document received every line, one at a time, and dropped all but the last MAX_LINES)."""
    log = EngineLog()
    log.set_partial("weights:  50%|")
    flood = [f"WARNING: retrying {n}" for n in range(MAX_LINES * 3)]
    inserted = []
    connect(log.text.document(), "contentsChange", lambda _at, _removed, added: inserted.append(added))
    log.append("\n".join(flood) + "\n")
    assert log.lines() == flood[-MAX_LINES:]
    kept_chars = len("\n".join(flood[-MAX_LINES:]))
    assert sum(inserted) <= kept_chars + 2 * len(flood[-MAX_LINES]), (sum(inserted), kept_chars)
    log.widget.deleteLater()


def test_hand_edited_ini_values_with_commas_read_as_typed(tmp_path):
    """Slicer keeps its settings in an INI file, whose reader (a real QSettings here) splits an unquoted value at its
    commas into a list: the engine command came back as the list's repr ("['medsight serve ... a.example',
    'b.example']"), was run so and saved so; a token with a comma likewise. Now the parts are joined again."""
    command = f"{DEFAULT_SERVE_COMMAND} --allow-host a.example,b.example"
    path = tmp_path / "Slicer.ini"
    path.write_text(f"[MedSIGHT]\nserveCommand={command}\ntoken=abc,def\nrememberToken=true\n"
                    "consentedHosts=\"a.example, b.example\"\n")
    store = qt.QSettings(str(path), qt.QSettings.IniFormat)
    assert isinstance(store.value(PREFIX + "serveCommand"), (list, tuple))  # what Qt hands over
    loaded = ConnectionSettings.load(store)
    assert (loaded.serve_command, loaded.token) == (command, "abc,def")
    assert split_command(loaded.serve_command)[-2:] == ["--allow-host", "a.example,b.example"]
    assert loaded.consented_hosts == ["a.example", "b.example"]
    assert not loaded.needs_consent("http://b.example:8765")
    loaded.save(store)
    store.sync()
    again = ConnectionSettings.load(qt.QSettings(str(path), qt.QSettings.IniFormat))
    assert (again.serve_command, again.token, again.consented_hosts) == (command, "abc,def", loaded.consented_hosts)


def _stored(path) -> dict:
    """Every key and value in the settings file at ``path``, read afresh."""
    store = qt.QSettings(str(path), qt.QSettings.IniFormat)
    return {str(key): store.value(key) for key in store.allKeys()}


def test_the_self_test_leaves_the_users_settings_as_it_found_them(app, tmp_path):
    """The self-test (MedSIGHTSlicerSelfTest.py) types its engine's address into the panel and connects, which saves
    it: from Slicer's Python console it replaced the user's engine address in Slicer's settings file, and the save at
    Slicer's exit (the widget's cleanup) wrote it again. Inside ``settings_kept`` it is saved as before, after it
    the file, the panel and the shared settings hold the user's again, also after a failed test."""
    path = tmp_path / "Slicer.ini"  # Slicer's settings file: a real QSettings INI file
    store = qt.QSettings(str(path), qt.QSettings.IniFormat)
    user = ConnectionSettings(url="http://10.1.2.3:9000", token="their-token", remember_token=True,
                              serve_command="/opt/medsight/bin/medsight serve --port 9000", stop_engine_on_exit=False,
                              consented_hosts=["10.1.2.3"])
    user.save(store)
    store.sync()
    before = _stored(path)
    settings = ConnectionSettings.load(store)
    form = ConnectionForm(settings, store, qt.QLineEdit(), qt.QLineEdit(), qt.QCheckBox())
    reconnected = []
    test_url = "http://engine.test:8765"

    for failing in (False, True):
        expected = pytest.raises(AssertionError) if failing else contextlib.nullcontext()
        with expected, settings_kept(form, lambda: reconnected.append(form.url_edit.text())):
            form.url_edit.setText(test_url)  # what the self-test does, then widget._connect()
            form.token_edit.setText("")
            form.save()
            settings.record_consent()  # the upload's consent question, answered Yes
            form.save()
            store.sync()
            assert _stored(path)[PREFIX + "url"] == test_url  # saved while the test runs (the old behaviour)
            assert failing is False, "a test that fails"
        form.save()  # the widget's cleanup() at Slicer's exit
        store.sync()
        assert _stored(path) == before
        assert (form.url_edit.text(), form.token_edit.text()) == (user.url, user.token)
        assert settings == user
    assert reconnected == [user.url, user.url]


def test_the_page_says_what_stop_on_exit_switched_means_for_the_running_engine(app, tmp_path):
    """How an engine ends with Slicer is fixed at its start (a pipe on its standard input, or none): one started to
    keep running and then switched to "stop on exit" stopped at Slicer's exit but ran on after a crash
    (test_engine_process: a kept engine outlives a killed Slicer), and the page did not say so. A real process plays
    the engine, started as the module starts it."""
    command = f'"{sys.executable}" -c "import time; time.sleep(60)"'
    for started_to_stop in (False, True):
        shared = ApplicationSettings(lambda: Store())
        shared.settings.stop_engine_on_exit = started_to_stop
        page = shared.add_page(lambda widget: None)
        engine = EngineProcess()
        assert shared.attach(lambda _: None, engine) is shared.settings  # MedSIGHTSlicerWidget.setup
        engine.start(launch_plan(command, dict(os.environ), started_to_stop))
        try:
            page.stop_on_exit.setChecked(started_to_stop)  # as started: nothing to say
            assert page.engine_note.text() == "" and page.engine_note.isHidden()
            page.stop_on_exit.setChecked(not started_to_stop)
            note = page.engine_note.text()
            assert not page.engine_note.isHidden()
            assert ("a crash of Slicer still stops" if started_to_stop else "not if Slicer crashes") in note
            assert "Stop and start it" in note
            page.stop_on_exit.setChecked(started_to_stop)  # switched back
            assert page.engine_note.text() == ""
            page.stop_on_exit.setChecked(not started_to_stop)
        finally:
            engine.stop(wait=True)
        assert page.engine_note.text() == "" and page.engine_note.isHidden()  # its end took the note down
        page.widget.deleteLater()


@pytest.mark.parametrize("ends", ["stop", "crash"])
def test_the_stop_on_exit_note_goes_when_its_engine_ends(app, tmp_path, ends):
    """The note on "stop on exit" switched while an engine runs speaks of that engine: after the user's Stop, or the
    engine's own exit, it stayed up until the next save of the settings (the module refreshed the page only then).
    Their end, as the module's timer reports it, now takes the note down, and only the note: a command being typed
    on the page stays, and nothing is saved. A real process plays the engine; the settings are a real INI file."""
    path = tmp_path / "Slicer.ini"
    shared = ApplicationSettings(lambda: qt.QSettings(str(path), qt.QSettings.IniFormat))
    page = shared.add_page(lambda widget: None)
    changes, finished = [], []
    engine = EngineProcess(on_finished=finished.append)
    shared.attach(changes.append, engine)  # MedSIGHTSlicerWidget.setup
    crash = tmp_path / "crash-now"
    script = tmp_path / "engine.py"
    script.write_text(f"import os, sys, time\nwhile not os.path.exists({str(crash)!r}):\n    time.sleep(0.05)\n"
                      "sys.exit(3)\n")
    engine.start(launch_plan(f'"{sys.executable}" "{script}"', dict(os.environ), shared.settings.stop_engine_on_exit))
    timer = qt.QTimer()  # the module's engine timer
    timer.setInterval(50)
    connect(timer, "timeout", lambda *_: engine.poll())
    try:
        page.stop_on_exit.setChecked(not shared.settings.stop_engine_on_exit)
        assert "Stop and start it" in page.engine_note.text() and not page.engine_note.isHidden()
        assert len(changes) == 1
        typed = "/opt/medsight/bin/medsight serve --port 9"  # no editingFinished yet
        page.serve_command.setText(typed)
        if ends == "stop":
            engine.stop()  # MedSIGHTSlicerWidget.onStopEngine
        else:
            crash.touch()
        timer.start()
        assert wait_for(lambda: app.processEvents() or finished, 30), engine.output
        assert finished[0] != 0 and engine.finished_message(finished[0]) == (None if ends == "stop" else
                                                                               "The engine stopped (exit code 3).")
        assert page.engine_note.text() == "" and page.engine_note.isHidden()
        assert page.serve_command.text() == typed and len(changes) == 1
    finally:
        timer.stop()
        engine.stop(wait=True)
        page.widget.deleteLater()


def test_a_reload_hands_the_note_on_with_the_engine_and_exit_leaves_the_page_alone(app):
    """A developer's Reload hands the running engine to a new widget (``leave_engine``, then the new widget's
    ``attach``): its end still takes the note down. At Slicer's exit the engine is stopped without telling the page
    (nothing is left to show; the cleanup goes on to save the settings). A real process plays the engine."""
    command = f'"{sys.executable}" -c "import time; time.sleep(60)"'
    shared = ApplicationSettings(lambda: Store())
    page = shared.add_page(lambda widget: None)
    engine = EngineProcess()
    shared.attach(lambda _: None, engine)
    try:
        for stop_on_exit in (True, False):
            page.stop_on_exit.setChecked(stop_on_exit)
            engine.start(launch_plan(command, dict(os.environ), stop_on_exit))  # MedSIGHTSlicerWidget.onStartEngine
            page.stop_on_exit.setChecked(not stop_on_exit)
            assert page.engine_note.text() != ""
            if stop_on_exit:
                assert leave_engine(engine, not stop_on_exit, reloading=True) is engine  # the old widget's cleanup
                engine.rebind()
                shared.attach(lambda _: None, engine)  # the reloaded widget's setup
                assert page.engine_note.text() != ""
                engine.stop(wait=True)
                assert page.engine_note.text() == "" and page.engine_note.isHidden()
            else:
                assert leave_engine(engine, not stop_on_exit, reloading=False) is None  # Slicer exits: stopped
                assert not engine.running and page.engine_note.text() != ""
    finally:
        engine.stop(wait=True)
        page.widget.deleteLater()
