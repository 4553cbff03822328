"""What produced a report folder's predictions: recorded in ``settings.json``, checked on every rerun.

Predictions resume by question id, so without this a rerun with another model or other generation options would
skip every answered item and report the first run's answers under the new command. The first run in a folder
writes the settings that change answers (model, adapter, vision file, sampling, seed of sampled runs, token
limit, batch, resize mode, dtype); a later run, shard or merge with different ones is refused, naming each
difference. Where a model, adapter or vision file is a local path it is identified by its files (names, sizes and
modification times: cheap, and any retraining into the folder changes them), not by where it lies, so a moved
folder still matches. Not recorded: the device, and the contents behind a Hub id.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medsight.evaluate.readers import DataError

SETTINGS_FILE = "settings.json"
#: Shown in messages and reports, not compared (a folder may move; its files identify it).
DISPLAY_ONLY = ("model", "model_path")


def files_fingerprint(path: Path) -> str:
    """Hash of the names, sizes and modification times of a file or of every file under a folder."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for f in files:
        stat = f.stat()
        name = f.name if f == path else f.relative_to(path).as_posix()
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def source_identity(spec: str | None) -> str | None:
    """What a --model/--adapter/--vision-file value stands for, independent of how the path was written."""
    from medsight.config import PRESETS
    from medsight.model.loading import EMBEDDED

    if spec is None:
        return None
    if spec in EMBEDDED:
        return f"embedded {spec} model"
    if spec in PRESETS:
        return f"{spec} preset, random weights"
    path = Path(spec).expanduser()
    if path.exists():
        return f"local files {files_fingerprint(path)}"
    return f"Hub id {spec}"


def answer_settings(task: str, model: str, adapter: str | None, vision_file: str | None, options: Sequence[Any],
                    dtype: str | None) -> dict[str, Any]:
    """The settings that change answers, for the `RunOptions` of every generation the task runs."""
    from medsight.model.generation import DEFAULT_MAX_NEW_TOKENS

    first = options[0]
    weights = source_identity(model)
    local = weights is not None and weights.startswith("local files")
    return {
        "task": task,
        "model": model,
        "model_path": str(Path(model).expanduser().resolve()) if local else None,
        "model_weights": weights,
        "adapter": source_identity(adapter),
        "vision_file": source_identity(vision_file),
        "sampling": first.sampling,
        "max_new_tokens": DEFAULT_MAX_NEW_TOKENS if first.max_new_tokens is None else first.max_new_tokens,
        # The seed only matters to sampled generations, the batch only to greedy ones (sampled: one item per call).
        "seed": first.seed if any(o.sampled for o in options) else None,
        "batch": first.batch if any(not o.sampled for o in options) else None,
        "resize_mode": first.resize_mode,
        "dtype": dtype or "auto",
    }


def check_settings(report_dir: Path, settings: dict[str, Any]) -> None:
    """Record `settings` in a fresh report folder, or refuse if its predictions were made with other ones."""
    path = report_dir / SETTINGS_FILE
    if not path.exists():
        if any(report_dir.glob("predictions*.jsonl")):
            raise DataError(f"{report_dir} holds predictions but no {SETTINGS_FILE} (an older medsight made them), "
                            "so which model and options produced them is unknown; choose another --report folder")
        _write_once(path, settings)
    recorded = _read(path)
    differ = [k for k in sorted(recorded.keys() | settings.keys())
              if k not in DISPLAY_ONLY and recorded.get(k) != settings.get(k)]
    if differ:
        # seed/batch are null where they do not apply: that follows from a sampling or task change, named anyway.
        shown = [k for k in differ if not (k in ("seed", "batch") and None in (recorded.get(k), settings.get(k)))]
        changes = "; ".join(_difference(k, recorded, settings) for k in shown or differ)
        raise DataError(f"{report_dir} holds predictions made with other settings ({changes}). Rerun with the "
                        f"settings in {path} to resume, or choose another --report folder for these ones")


def _difference(key: str, recorded: dict[str, Any], settings: dict[str, Any]) -> str:
    if key == "model_weights":
        return (f"model: {recorded.get('model')!r} ({recorded.get(key)}) there, {settings.get('model')!r} "
                f"({settings.get(key)}) now")
    return f"{key}: {json.dumps(recorded.get(key))} there, {json.dumps(settings.get(key))} now"


def _write_once(path: Path, settings: dict[str, Any]) -> None:
    """Create `path` atomically and only if absent: shards starting together all compare with the first one's."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another shard recorded its settings first: ours are compared with those
    finally:
        tmp.unlink()


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read the report's recorded settings ({err})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object of settings")
    return data
