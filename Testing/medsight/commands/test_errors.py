"""`run_command`: Ctrl+C is one line, from one process of a torchrun run (its other ranks stay silent); an error every
rank raises alike is printed once."""

from __future__ import annotations

import io
import json
from collections.abc import Callable

import pytest

from medsight.commands.errors import INTERRUPTED, run_command


def interrupted() -> int:
    raise KeyboardInterrupt


@pytest.mark.parametrize(("rank", "said"), [(None, "prog: interrupted\n"), ("0", "prog: interrupted\n"), ("1", "")])
def test_ctrl_c_is_one_line_from_rank_0_only(rank, said, monkeypatch, capsys):
    import signal

    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    handler = signal.getsignal(signal.SIGINT)
    try:
        assert run_command(interrupted, "prog") == INTERRUPTED
    finally:
        signal.signal(signal.SIGINT, handler)  # run_command ignores a second Ctrl+C from then on
    assert capsys.readouterr().err == said


def test_ctrl_c_under_json_also_prints_its_json_object(monkeypatch, capsys):
    import signal

    monkeypatch.delenv("RANK", raising=False)
    handler = signal.getsignal(signal.SIGINT)
    try:
        assert run_command(interrupted, "prog", json_errors=True) == INTERRUPTED
    finally:
        signal.signal(signal.SIGINT, handler)
    said = capsys.readouterr()
    assert json.loads(said.out) == {"error": {"code": "interrupted", "message": "interrupted"}}
    assert said.err == "prog: interrupted\n"


def refused(line: str) -> Callable[[], int]:
    def body() -> int:
        raise ValueError(line)

    return body


@pytest.fixture
def agent_store(monkeypatch):
    """A store where torchrun's agent serves one (MASTER_ADDR:MASTER_PORT), with torchrun saying it does."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    return store


def test_under_torchrun_each_error_line_is_printed_by_one_rank(agent_store, monkeypatch, capsys):
    """Every rank of a torchrun run checks the same config and data: each printed the same refusal (N lines for N
    ranks). The ranks count the lines in torchrun's store: a line already printed by one rank is not printed again,
    and a line of one rank's own (its sample, its disk) still is; every rank exits 2."""
    lines = ["field 'lr' is 0 (number); expected a number > 0"] * 2 + ["item 3: cannot read the image a.png"]
    said = []
    for rank, line in enumerate(lines):
        monkeypatch.setenv("RANK", str(rank))
        assert run_command(refused(line), "prog") == 2
        said.append(capsys.readouterr().err)
    assert said == [f"prog: error: {lines[0]}\n", "", f"prog: error: {lines[2]}\n"]


def _usage_errors_of_two_ranks(parser, monkeypatch, capsys) -> list[str]:
    """What each of two ranks prints when `parser` is given no arguments; each must exit 2, as argparse does."""
    said = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        with pytest.raises(SystemExit) as stopped:
            parser.parse_args([])
        assert stopped.value.code == 2
        said.append(capsys.readouterr().err)
    return said


def test_under_torchrun_a_usage_error_is_printed_by_one_rank(agent_store, monkeypatch, capsys):
    """argparse printed its usage and error on every rank (`torchrun ... -m medsight.train.cli stage3` without
    --data: the same 4 lines twice). `CommandParser` prints them once; every rank exits 2, as argparse does."""
    from medsight.commands.errors import CommandParser

    parser = CommandParser(prog="prog")
    parser.add_argument("--data", required=True)
    said = _usage_errors_of_two_ranks(parser, monkeypatch, capsys)
    assert said[0].startswith("usage: prog") and said[0].endswith("prog: error: the following arguments are "
                                                                   "required: --data\n")
    assert said[1] == ""


def test_ranks_not_started_by_torchrun_print_at_once(monkeypatch, capfd):
    """Ranks started without torchrun (srun with env:// rendezvous, a hand-set RANK) have no store at MASTER_ADDR:
    MASTER_PORT before `init_process_group`: each tried to connect, and printed a page of c10d connection tracebacks
    (after 5-10 s) above its error line."""
    from medsight_testing.live_server import free_port

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))  # nothing listens there
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    monkeypatch.setenv("RANK", "1")
    line = "field 'lr' is 0 (number); expected a number > 0"
    assert run_command(refused(line), "prog") == 2
    assert capfd.readouterr().err == f"prog: error: {line}\n"


@pytest.mark.parametrize("command", ["train", "eval"])
def test_under_torchrun_the_usage_error_of_train_and_eval_is_printed_by_one_rank(command, agent_store, monkeypatch,
                                                                                 capsys):
    """`medsight eval` runs under torchrun as train does, but its parser was a plain ArgumentParser: a usage error
    (no --data) was printed by every rank. Both commands' parsers print it once; every rank exits 2."""
    from medsight.evaluate.cli import parser as eval_parser
    from medsight.train.cli import parser as train_parser

    parser = {"train": train_parser, "eval": eval_parser}[command]()
    said = _usage_errors_of_two_ranks(parser, monkeypatch, capsys)
    assert said[0].startswith(f"usage: {parser.prog}") and f"{parser.prog}: error: " in said[0]
    assert said[1] == ""


class Writes(io.RawIOBase):
    """A raw byte stream that keeps each write it is given, as the pipe under a torchrun rank's stderr sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.chunks.append(bytes(data))
        return len(data)


@pytest.mark.parametrize("body", [interrupted, refused("the file is truncated")], ids=["ctrl_c", "error"])
def test_an_error_line_reaches_a_pipe_in_one_write(body, monkeypatch):
    """Python's stderr on a pipe writes through (as each rank's is under torchrun): `print` wrote a line and then its
    newline, and another rank's line landed between them, two errors on one line (a clean-clone CI run)."""
    import signal
    import sys

    monkeypatch.delenv("RANK", raising=False)
    pipe = Writes()
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(pipe, encoding="utf-8", write_through=True))  # as Python's
    handler = signal.getsignal(signal.SIGINT)
    try:
        run_command(body, "prog")
    finally:
        signal.signal(signal.SIGINT, handler)
    (line,) = pipe.chunks
    assert line.startswith(b"prog: ") and line.endswith(b"\n") and line.count(b"\n") == 1, line
