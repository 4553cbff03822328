"""`run_command`: Ctrl+C is one line, from one process of a torchrun run (its other ranks stay silent)."""

from __future__ import annotations

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
