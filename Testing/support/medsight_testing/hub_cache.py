"""Hugging Face Hub repositories laid out in the hub's own cache format, for offline tests.

`huggingface_hub` keeps a repository as `models--OWNER--NAME/` with `blobs/<etag>` (the file contents),
`snapshots/<commit>/<path>` (relative symlinks into blobs) and `refs/<branch>` (the commit a branch points to).
Tests point `huggingface_hub.constants.HF_HUB_CACHE` at the folder these helpers write.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def repo_folder(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def cache_repo(cache: Path, repo_id: str, files: dict[str, Path | int], commit: str = "0" * 40,
               ref: str | None = "main") -> Path:
    """Cache `files` (repository path -> a file to copy, or a size in bytes for a sparse filler file) as one
    snapshot of `repo_id` at `commit`, with `ref` pointing to it; returns the snapshot folder."""
    folder = repo_folder(cache, repo_id)
    snapshot = folder / "snapshots" / commit
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        blob = folder / "blobs" / hashlib.sha256(f"{commit}/{name}".encode()).hexdigest()
        if isinstance(content, int):
            with open(blob, "wb") as f:
                f.truncate(content)  # sparse: large on paper, no disk used
        else:
            shutil.copyfile(content, blob)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
    return snapshot


def folder_files(root: Path) -> dict[str, Path]:
    """Every file below `root` by its path relative to it (a release folder, as a repository's file list)."""
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
