""""Test connection" without freezing Slicer: the model card is fetched on a worker thread and a timer polls.

Standard library only (plus the client): testable headless against a real or scripted HTTP server.
"""

from __future__ import annotations

from dataclasses import dataclass

from .client import MedSIGHTClient, MedSIGHTError, describe_error
from .jobs import JobRunner
from .protocol import ModelCard

__all__ = ["STARTING_HINT", "CheckOutcome", "ConnectionCheck", "describe_card"]

#: Nothing answers while the local engine this module started still runs: it is loading its model.
STARTING_HINT = ("The local engine started here is still running: it listens once its model is loaded (the engine "
                 "log shows how far it got); test again then. If its log names another address, set the engine URL "
                 "to it.")


@dataclass(frozen=True)
class CheckOutcome:
    """What one check found: ``card`` when the engine answered, else ``None`` and the reason in ``text``."""

    text: str
    card: ModelCard | None = None

    @property
    def ok(self) -> bool:
        return self.card is not None


def describe_card(card: ModelCard) -> str:
    """The status line the module shows for a connected engine."""
    warning = "  RANDOM WEIGHTS: answers are meaningless." if card.random_weights else ""
    return f"Connected: {card.name} {card.version}, {card.parameters:,} parameters.{warning}\n{card.intended_use}"


class ConnectionCheck:
    """One model-card request at a time, off the calling thread; `poll` returns its outcome once, when done."""

    def __init__(self) -> None:
        self._runner = JobRunner()
        self._job = None

    @property
    def busy(self) -> bool:
        return self._job is not None

    def start(self, client: MedSIGHTClient, timeout: float, local_engine_running: bool = False) -> bool:
        """Begin a check; False (and nothing started) while the previous one is still running.

        ``local_engine_running``: the module's "Start local engine" process runs. It listens only once its model is
        loaded, so until then nothing answers; "Is the engine running? Start it with 'medsight serve'" would send
        the user to start a second one."""
        if self._job is not None:
            return False

        def check(job) -> CheckOutcome:
            try:
                card = client.model_card(timeout=timeout)
            except MedSIGHTError as err:
                if local_engine_running and err.code == "connection_error":
                    return CheckOutcome(f"{err.message}. {STARTING_HINT}")
                return CheckOutcome(describe_error(err))  # what went wrong and what to do, as the chat says
            return CheckOutcome(describe_card(card), card)

        self._job = self._runner.start(check, "MedSIGHT connection check")
        return True

    def poll(self) -> CheckOutcome | None:
        for event in self._runner.poll():
            if self._job is None or event.job_id != self._job.job_id or not event.final:
                continue
            self._job = None
            if event.kind == "done":
                return event.data
            return CheckOutcome(f"the check failed: {event.message}")
        return None

    def close(self) -> None:
        self._runner.cancel()
