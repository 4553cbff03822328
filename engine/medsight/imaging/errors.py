"""The one exception type raised for bad imaging input."""

from __future__ import annotations

import os


class ImagingError(ValueError):
    """Bad or unsupported imaging input; the message names the file and the problem."""

    def __init__(self, problem: str, path: str | os.PathLike[str] | None = None) -> None:
        self.problem = problem
        self.path = None if path is None else os.fspath(path)
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


def not_a_file(path: str | os.PathLike[str], missing: str = "no such file") -> ImagingError:
    """The error for an input path that is no regular file: what it is when it exists (a FIFO, /dev/null), else
    ``missing``."""
    from medsight.user_files import special_file_kind

    kind = special_file_kind(path)
    return ImagingError(f"is {kind}, not a file" if kind else missing, path)
