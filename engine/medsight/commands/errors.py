"""How a command shows an error: one line naming the file and the reason, never a traceback; a reader of its
output that left early, which is no error; and Ctrl+C, one line. `run_command` applies them to a command's body, for
the `medsight` command and for the torchrun entry points (`python -m medsight.train.cli`)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import select
import signal
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import NoReturn

#: The exit code when the reader of stdout left early (`medsight ask ... | head -1`): 128 + SIGPIPE, the status
#: git, seq and cat get in the same pipe (killed by the signal), so `set -o pipefail` scripts see what they are used
#: to. (Not SIGPIPE's default action instead: it would also kill `serve` when a client closes its socket.)
READER_LEFT = 141
#: The exit code after Ctrl+C: the shell's code for SIGINT (128 + 2).
INTERRUPTED = 130


def run_command(body: Callable[[], int], prog: str, json_errors: bool = False) -> int:
    """Run a command's `body` and return its exit code; bad input (a ValueError: ImagingError, CheckpointError...)
    and a file that cannot be read or written (an OSError) are one line naming `prog`, and other exceptions are our
    bugs and keep their traceback.

    Under torchrun (RANK set) every rank runs this: Ctrl+C reaches every rank (the terminal's SIGINT, then the
    agent's own), and a traceback per rank plus torchrun's failure report buried the run's output. Rank 0 alone says
    "interrupted"; a reader that left ends the command with 0 there, since torchrun reports any other code as a
    failed rank with a traceback of its own (its final/ is written by then). An error every rank raises alike (a
    config check) is printed by one rank only (`first_to_report`); one rank's own error still by that rank.

    `json_errors` (the command line asked for --json): a script reads stdout, so each of these ends also prints one
    JSON object there, `{"error": {"code", "message"}}` (`JSON_ERROR_CODES`), beside the line on stderr; a refused
    command printed nothing there."""
    rank = os.environ.get("RANK")
    say = partial(_report, prog, json_errors)
    try:
        code = body()
        sys.stdout.flush()  # here, not at interpreter exit: a reader gone by now lands in the except below
        return code
    except BrokenPipeError as err:
        if reader_left():  # the reader of our output left early: nothing is wrong, so no message
            return 0 if rank is not None else READER_LEFT
        return say("file", error_message(err))  # another pipe (a worker's, a socket)
    except UsageError as err:  # printed by the parser (usage and line); here only its JSON object
        if json_errors and err.shown:
            _print_json_error("usage", err.message)
        raise  # exits 2, as argparse does
    except ValueError as err:
        return say("bad_input", error_message(err))
    except OSError as err:
        return say("file", error_message(err))
    except KeyboardInterrupt:
        # One line, not the traceback of wherever it landed (torch's imports, a model step); a second SIGINT (the
        # torchrun agent forwards one) must not interrupt it. Outputs are written whole or not at all, so nothing
        # half-written is left.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if rank in (None, "0"):
            _write_line(f"{prog}: interrupted")
            if json_errors:
                _print_json_error("interrupted", "interrupted")
        return INTERRUPTED


#: The "code" of a --json error object: what kind of refusal it is (its exit code: 2, 130 for "interrupted").
JSON_ERROR_CODES = ("usage", "bad_input", "file", "interrupted")
#: argparse's exit code for a usage error, kept for every refusal.
USAGE = 2


def wants_json(argv: Sequence[str]) -> bool:
    """Whether the command line asks for --json (before any "--": what follows is a value, not an option), read
    before parsing so a refused command line, and one that fails before its command runs, answers in JSON too."""
    argv = list(argv)
    return "--json" in (argv[: argv.index("--")] if "--" in argv else argv)


def _report(prog: str, json_errors: bool, code: str, message: str) -> int:
    """The error line on stderr (once per torchrun run) and, for --json, its JSON object on stdout; returns 2."""
    if report_error(f"{prog}: error: {message}") and json_errors:
        _print_json_error(code, message)
    return USAGE


def _print_json_error(code: str, message: str) -> None:
    try:
        print(json.dumps({"error": {"code": code, "message": message}}), flush=True)
    except OSError:  # stdout gone (the reader left, a full disk): the line on stderr has said it
        silence_stdout()


def report_error(line: str) -> bool:
    """Print an error line on stderr; under torchrun only if no other rank of the run has printed the same one.
    Returns whether it was printed."""
    first = first_to_report(line)
    if first:
        _write_line(line)
    return first


def _write_line(line: str) -> None:
    """`line` and its newline in one write. Python's stderr on a pipe writes through, so `print` made two writes, and
    under torchrun another rank's line landed between a line and its newline: two errors on one line."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class UsageError(SystemExit):
    """A command line argparse refuses, after its parser printed it (`shown`: this process printed it); a SystemExit
    with argparse's code 2, so code that does not know it ends as argparse ends."""

    def __init__(self, message: str, shown: bool) -> None:
        super().__init__(USAGE)
        self.message, self.shown = message, shown


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage error is printed by one rank of a torchrun run (`first_to_report`), not by every
    rank alike; each still exits 2, as argparse does."""

    def error(self, message: str) -> NoReturn:
        line = f"{self.prog}: error: {message}\n"
        shown = first_to_report(line)
        if shown:
            self.print_usage(sys.stderr)
            sys.stderr.write(line)
        raise UsageError(message, shown)


def first_to_report(line: str) -> bool:
    """Whether this process is the first of its torchrun run to report `line` (True outside torchrun).

    Every rank runs the same checks on the same files, so a bad config or data set was refused once per rank: the
    same line N times. The ranks agree through the store torchrun's agent serves at MASTER_ADDR:MASTER_PORT (where
    `init_process_group` meets), which counts each line: the rank that counts it first prints it. A line one rank
    alone raises (its sample, its disk) is still printed; a store that cannot be reached in a few seconds prints.
    Only where torchrun says its agent serves that store (TORCHELASTIC_USE_AGENT_STORE, torch's own test): ranks
    started otherwise (srun, a hand-set RANK) have none there before `init_process_group`, and trying cost each
    rank 5-10 s and a page of c10d connection tracebacks above its one error line."""
    if os.environ.get("RANK") is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return True
    try:
        from datetime import timedelta

        from torch.distributed import TCPStore

        store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=5))
        # Per restart attempt: a restarted worker group (torchrun --max-restarts) reports its errors again.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        key = f"medsight/error/{attempt}/{hashlib.sha256(line.encode()).hexdigest()}"
        return store.add(key, 1) == 1
    except Exception:  # no store (a hand-set RANK, a stopped agent): say it rather than lose it
        return True


def error_message(err: Exception) -> str:
    """An OSError as 'file: reason' (its str() is '[Errno 13] Permission denied: ...'); anything else as is."""
    if isinstance(err, OSError) and err.strerror:
        files = [f for f in (err.filename, err.filename2) if f is not None]
        return f"{' -> '.join(map(str, files))}: {err.strerror}" if files else err.strerror
    return str(err)


def reader_left() -> bool:
    """After a BrokenPipeError: whether it was stdout's reader that left (`medsight ... | head -1`), which is no error.
    Then stdout is pointed at devnull (`silence_stdout`), so nothing more raises; False for another pipe's."""
    if not _stdout_reader_gone():
        return False
    silence_stdout()
    return True


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on its write end): a BrokenPipeError
    that is not stdout's (a worker's pipe, a socket) is a real error. Where poll is missing (Windows) a
    BrokenPipeError is taken to be stdout's, as Python's docs recipe does."""
    if not hasattr(select, "poll"):
        return True
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
    except (OSError, ValueError):  # no file descriptor (stdout replaced in-process): not a pipe we write to
        return False
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def silence_stdout() -> None:
    """Point stdout at devnull once its reader is gone (or it cannot be written: a full disk), so later prints and the
    flush at interpreter exit do not raise or print "Exception ignored ... BrokenPipeError" (the recipe of Python's
    signal docs, "Note on SIGPIPE")."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
