"""Where a command may write: never over a file it reads, not over an existing file unless asked, and only where new
files can be made. Checked before any work, so a refused output costs no model load or inference."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from medsight.atomic_files import written_file
from medsight.user_files import special_file_kind


def check_output(path: str, what: str, source: str, overwrite: bool) -> None:
    """Refuse an output that is a file the command reads, an existing file (unless --overwrite), a folder, or in a
    folder where no file can be created. `what` names the option in the message."""
    if _is_input(Path(path), Path(source)):
        raise ValueError(f"{what} {path} is {'inside ' if os.path.isdir(source) else ''}the input {source}: "
                         "choose another file name (the input is never replaced)")
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is a folder: give a file name")
    if os.path.exists(path) and not os.path.isfile(path):
        # A device or pipe (/dev/null, a FIFO), or a link to one: the atomic write would have replaced it by a
        # regular file (as root, /dev/null itself).
        kind = special_file_kind(path) or "not a regular file"
        raise ValueError(f"{what} {path} is {kind}, not a file: give a file name")
    if os.path.lexists(path) and not overwrite:
        raise ValueError(f"{what} {path} already exists: pass --overwrite to replace it")
    check_folder_writable(os.fspath(written_file(path)), f"{what} {path}")  # a link's target is what gets written


def _is_input(target: Path, source: Path) -> bool:
    """Whether writing `target` would change the input: the same file (a link or another spelling of it), one of an
    Analyze .hdr/.img pair, or any file inside a DICOM series folder."""
    if source.is_dir():
        return target.resolve().is_relative_to(source.resolve())
    pair = {".hdr": ".img", ".img": ".hdr"}.get(source.suffix.lower())
    return any(_same_file(target, read) for read in ((source, source.with_suffix(pair)) if pair else (source,)))


def _same_file(a: Path, b: Path) -> bool:
    # samefile also sees hard links; the resolved paths cover a file not written yet.
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


def check_folder_writable(path: str, label: str) -> None:
    """The nearest existing folder above `path` must take a new file (missing folders below it are created when
    writing). A real probe file, because os.access says yes to root even on read-only file systems. `label` (the
    option and its value) starts the message."""
    folder = Path(os.path.abspath(path)).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{label}: {folder} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ValueError(f"{label}: cannot create files in {folder} ({err.strerror})") from None


def check_export_folder(out: str, overwrite: bool) -> None:
    """--out must be a folder (or not exist yet) where new files can be made, holding none of the files the export
    writes unless --overwrite."""
    from medsight.onnx_export import EXPORT_FILES, MANIFEST_FILE

    if os.path.lexists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file: give a folder (created if missing)")
    present = [name for name in EXPORT_FILES if os.path.lexists(os.path.join(out, name))]
    if present and not overwrite:
        raise ValueError(f"--out {out} already holds {', '.join(present)}: pass --overwrite to replace them")
    check_folder_writable(os.path.join(out, MANIFEST_FILE), f"--out {out}")


def check_download_folder(folder: str, names: list[str], overwrite: bool) -> None:
    """--dir of `medsight download` must not hold a file of the download that no download left there as it is (the
    user's fine-tuned weights, an edited config), unless --overwrite: the Hub client deletes such a file and puts the
    Hub's copy in its place. Files a download left unchanged (its record beside them) are checked and kept by the
    client, so a rerun or a resumed download is no reason to refuse."""
    from huggingface_hub._local_folder import read_download_metadata

    if overwrite:
        return
    # Only for files present: the record's reader creates the folders of a file it is asked about.
    kept = [name for name in names if os.path.lexists(os.path.join(folder, name))
            and read_download_metadata(Path(folder), name) is None]
    if kept:
        raise ValueError(f"--dir {folder} already holds {', '.join(kept)}, not as a download left "
                         f"{'it' if len(kept) == 1 else 'them'}: pass --overwrite to replace "
                         f"{'it' if len(kept) == 1 else 'them'}, or choose another folder")
