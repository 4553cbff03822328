"""The one check of a file the user named: missing, a folder, or a special file, each said as what it is."""

from __future__ import annotations

import os

import pytest

from medsight.user_files import check_user_file


def test_a_named_file_that_is_no_file_says_what_it_is(tmp_path):
    fifo = tmp_path / "train.json"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=rf"^{fifo} is a named pipe \(FIFO\), not a file; expected the data file$"):
        check_user_file(fifo, "data file")
    with pytest.raises(ValueError, match=r"^/dev/null is a character device, not a file; expected the data file$"):
        check_user_file("/dev/null", "data file")
    with pytest.raises(ValueError, match=rf"^{tmp_path} is a folder; expected the data file$"):
        check_user_file(tmp_path, "data file")
    with pytest.raises(ValueError, match=rf"^data file not found: {tmp_path / 'nope.json'}$"):
        check_user_file(tmp_path / "nope.json", "data file")
    (tmp_path / "ok.json").write_text("{}")
    check_user_file(tmp_path / "ok.json", "data file")
