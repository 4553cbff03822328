"""The MedSIGHT page of Slicer's Application Settings: the settings a user sets once.

The module panel keeps what is used while working (engine URL, token and its "Remember" box, Test connection,
Start/Stop engine); this page holds the rest: the command that starts the local engine, whether it stops with
Slicer, and the remote engines the user agreed to send images to (with a way to withdraw that). Every edit is
saved at once through ``ConnectionSettings.save`` and reported to the host (``on_changed``), so the module and the
page never disagree.

In Slicer the module object owns one ``ApplicationSettings``: it adds the page to Application Settings once, at
start-up, and each module widget Slicer makes (a developer's Reload makes another) attaches to it. The module file
wraps ``page.widget`` in a ``ctk.ctkSettingsPanel``; the tests use the widget directly (PySide6).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .qt_shim import connect, prop, qt
from .settings import DEFAULT_SERVE_COMMAND, ConnectionSettings

__all__ = ["ApplicationSettings", "ConnectionForm", "SettingsPage", "settings_kept"]


class ConnectionForm:
    """The module panel's connection fields (engine URL, token and its "Remember" box) over the settings the page
    shares.

    "Remember" changes only when the box is toggled (by the user): ``save`` never reads the box back. So a token
    forgotten on the settings page stays forgotten, also through the save at Slicer's exit, until the user ticks
    "Remember" again; ``load`` (the module calls it when the page changed the settings) unticks the box to match.
    """

    def __init__(self, settings: ConnectionSettings, store: Any, url_edit: Any, token_edit: Any,
                 remember_box: Any) -> None:
        self.settings, self.store = settings, store
        self.url_edit, self.token_edit, self.remember_box = url_edit, token_edit, remember_box
        #: Called after every save (the module refreshes the settings page with it).
        self.on_saved: Callable[[ConnectionSettings], None] | None = None
        self.load()
        connect(remember_box, "toggled", self._remember_toggled)

    def load(self) -> None:
        """Show ``self.settings`` in the fields."""
        self.url_edit.setText(self.settings.url)
        self.token_edit.setText(self.settings.token)
        self.remember_box.blockSignals(True)  # showing the setting is not the user ticking the box
        self.remember_box.setChecked(self.settings.remember_token)
        self.remember_box.blockSignals(False)

    def save(self) -> None:
        """Take the URL and token from the fields and save; "Remember" stays as the settings have it."""
        self.settings.set_connection(str(prop(self.url_edit, "text")), str(prop(self.token_edit, "text")))
        self.settings.save(self.store)
        if self.on_saved is not None:
            self.on_saved(self.settings)

    def _remember_toggled(self, checked: Any) -> None:
        self.settings.remember_token = bool(checked)
        self.save()


@contextmanager
def settings_kept(form: ConnectionForm, reconnect: Callable[[], None] | None = None) -> Iterator[None]:
    """The user's settings as they were before the block, also when it raises: in the form's fields, in the settings
    the module and its page share (cleanup() saves those at Slicer's exit) and in the store; then ``reconnect()``
    (the module's ``_connect``: its client is the user's engine's again).

    For the module's self-test, which drives the panel with its own engine's address: run from Slicer's Python
    console (not under ``--testing``, whose settings are a throwaway file), it saved that address over the user's,
    and a token the user had typed for this session was gone from the panel."""
    kept = dataclasses.replace(form.settings, consented_hosts=list(form.settings.consented_hosts))
    try:
        yield
    finally:
        for each in dataclasses.fields(kept):  # in place: the module, its page and the form share this object
            setattr(form.settings, each.name, getattr(kept, each.name))
        form.load()
        form.save()
        if reconnect is not None:
            reconnect()


class SettingsPage:
    """Form widgets over ``settings`` (a ``ConnectionSettings``), saved into ``store`` (QSettings-like)."""

    def __init__(self, settings: ConnectionSettings, store: Any, parent: Any = None) -> None:
        self.settings = settings
        self.store = store
        self.on_changed: Callable[[ConnectionSettings], None] | None = None
        self.widget = qt.QWidget(parent) if parent is not None else qt.QWidget()
        self.widget.setObjectName("MedSIGHTSettingsPage")
        form = qt.QFormLayout(self.widget)

        self.serve_command = qt.QLineEdit()
        self.serve_command.setObjectName("serveCommandLineEdit")
        self.serve_command.setToolTip("The command 'Start local engine' runs, e.g. " + DEFAULT_SERVE_COMMAND)
        form.addRow("Local engine command:", self.serve_command)
        self.stop_on_exit = qt.QCheckBox("Stop the local engine when Slicer exits")
        self.stop_on_exit.setObjectName("stopOnExitCheckBox")
        form.addRow("", self.stop_on_exit)
        #: The module's ``EngineProcess`` (``set_engine``): the note says what the box means for it.
        self.engine: Any = None
        self.engine_note = qt.QLabel()
        self.engine_note.setObjectName("stopOnExitNoteLabel")
        self.engine_note.setWordWrap(True)
        form.addRow("", self.engine_note)

        self.consents = qt.QListWidget()
        self.consents.setObjectName("consentedHostsList")
        self.consents.setToolTip("Remote engines you agreed to send images to")
        self.consents.setMaximumHeight(90)
        form.addRow("Images may be sent to:", self.consents)
        self.forget_button = qt.QPushButton("Forget these agreements")
        self.forget_button.setObjectName("forgetConsentsButton")
        self.forget_button.setToolTip("Ask again before the next upload to any remote engine")
        form.addRow("", self.forget_button)
        self.forget_token_button = qt.QPushButton("Forget the remembered token")
        self.forget_token_button.setObjectName("forgetTokenButton")
        form.addRow("", self.forget_token_button)

        self.load()
        connect(self.serve_command, "editingFinished", lambda *_: self._edited())
        connect(self.stop_on_exit, "toggled", lambda *_: self._edited())
        connect(self.forget_button, "clicked", lambda *_: self.forget_consents())
        connect(self.forget_token_button, "clicked", lambda *_: self.forget_token())

    def load(self) -> None:
        """Show ``self.settings`` (after the module changed them)."""
        self.serve_command.setText(self.settings.serve_command)
        self.stop_on_exit.setChecked(self.settings.stop_engine_on_exit)
        self.consents.clear()
        for host in self.settings.consented_hosts:
            self.consents.addItem(host)
        self.forget_button.setEnabled(bool(self.settings.consented_hosts))
        self.forget_token_button.setEnabled(self.settings.remember_token and bool(self.settings.token))
        self.show_engine_note()

    def set_engine(self, engine: Any) -> None:
        """Say what the box means for ``engine`` (an ``EngineProcess``, or None), and keep saying it as it starts and
        ends: a note left up after the user's Stop, or after a crash, spoke of an engine no longer running until the
        next save of the settings."""
        if self.engine is not None:
            self.engine.remove_listener(self.show_engine_note)
        self.engine = engine
        if engine is not None:
            engine.add_listener(self.show_engine_note)
        self.show_engine_note()

    def show_engine_note(self) -> None:
        """The note on "stop on exit" for the engine as it is now. Only the note: the engine's start or end does not
        reload the fields, so a command being typed is not replaced."""
        note = "" if self.engine is None else self.engine.exit_setting_note(self.settings.stop_engine_on_exit)
        self.engine_note.setText(note)
        self.engine_note.setVisible(bool(note))

    def _edited(self) -> None:
        command = str(prop(self.serve_command, "text")).strip()
        self.settings.serve_command = command or DEFAULT_SERVE_COMMAND
        self.settings.stop_engine_on_exit = bool(self.stop_on_exit.isChecked())
        self._save()

    def forget_consents(self) -> None:
        self.settings.consented_hosts = []
        self._save()

    def forget_token(self) -> None:
        """Stop remembering the token (it stays in use for this session)."""
        self.settings.remember_token = False
        self._save()

    def _save(self) -> None:
        self.settings.save(self.store)
        self.load()
        if self.on_changed is not None:
            self.on_changed(self.settings)


class ApplicationSettings:
    """The one ``ConnectionSettings`` and the one settings page of a Slicer session.

    Slicer makes the module object once, at start-up, but its widget only when the module is first shown, and again
    on a developer's Reload. A page added by each widget would be missing until the module was shown, and a Reload
    would add a second page whose edits went to a widget already cleaned up. So the module object owns this: the page
    is added once, and each widget ``attach``es, sharing the settings and becoming the one told of the page's edits.

    Args:
        store: () -> a QSettings-like store (a new one per use, as Slicer code does with ``qt.QSettings()``).
    """

    def __init__(self, store: Callable[[], Any]) -> None:
        self.store = store
        self.settings = ConnectionSettings.load(store())
        self.page: SettingsPage | None = None
        self.panel: Any = None  # what ``add_panel`` made of the page (kept: the dialog does not own the wrapper)
        self.engine: Any = None  # the attached widget's EngineProcess
        self._on_changed: Callable[[ConnectionSettings], None] | None = None

    def add_page(self, add_panel: Callable[[Any], Any]) -> SettingsPage:
        """Make the page and give its widget to ``add_panel`` (which puts it in the settings dialog); only once."""
        if self.page is None:
            self.page = SettingsPage(self.settings, self.store())
            self.page.on_changed = self._page_changed
            self.page.set_engine(self.engine)
            self.panel = add_panel(self.page.widget)
        return self.page

    def attach(self, on_changed: Callable[[ConnectionSettings], None], engine: Any = None) -> ConnectionSettings:
        """A new module widget: from now on the page's edits go to ``on_changed`` (not to an earlier widget), and its
        note on "stop on exit" is about ``engine`` (the widget's ``EngineProcess``)."""
        self._on_changed = on_changed
        self.engine = engine
        if self.page is not None:
            self.page.set_engine(engine)
            self.page.load()
        return self.settings

    def show_saved(self) -> None:
        """The module saved the settings (URL, token, "Remember"; also right before it starts the engine): the page
        shows them."""
        if self.page is not None:
            self.page.load()

    def _page_changed(self, settings: ConnectionSettings) -> None:
        if self._on_changed is not None:
            self._on_changed(settings)
