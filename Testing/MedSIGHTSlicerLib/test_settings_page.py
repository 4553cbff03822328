"""The token is remembered only with "Remember"; the MedSIGHT settings page saves at once; the engine log (PySide6)."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import sys

import pytest

from MedSIGHTSlicerLib.engine_log import MAX_LINES, EngineLog
from MedSIGHTSlicerLib.qt_shim import qt
from MedSIGHTSlicerLib.settings import DEFAULT_SERVE_COMMAND, PREFIX, ConnectionSettings
from MedSIGHTSlicerLib.settings_page import ApplicationSettings, ConnectionForm, SettingsPage
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


def test_question_errors_reach_the_engine_log_refusals_do_not(app):
    import time

    import numpy as np

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
        deadline = time.monotonic() + 30
        while panel.busy:
            assert time.monotonic() < deadline
            app.processEvents()
            time.sleep(0.01)
        assert log.errors == 1 and "cannot reach the MedSIGHT engine" in log.lines()[-1]
    finally:
        panel.close()
        log.widget.deleteLater()
        app.processEvents()
