"""Reading a file the user named (a config, a data list), with errors that name the file and what it should be."""

from __future__ import annotations

from pathlib import Path


def read_user_text(path: str | Path, what: str, error: type[ValueError] = ValueError) -> str:
    """The UTF-8 text of `path`; a missing, folder or unreadable one raises `error` naming it and `what` (e.g.
    "data file"), so commands print one line instead of a traceback."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise error(f"{path} is a folder; expected the {what}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"cannot read the {what} {path}: {err}") from None
