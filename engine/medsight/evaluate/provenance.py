"""What produced a report folder's predictions: recorded in ``settings.json``, checked on every rerun.

Predictions resume by question id, so without this a rerun with another model or other generation options would
skip every answered item and report the first run's answers under the new command. The first run in a folder
writes the settings that change answers (model, adapter, vision file, sampling, seed of sampled runs, token
limit, batch, resize mode, dtype); a later run, shard or merge with different ones is refused, naming each
difference (a DiagSeg folder answered without --vqa-data, nothing sampled, records its seed when that run is
added). Where a model, adapter or vision file is a local path it is identified by its files, not by where it
lies or when it was copied (a moved folder, or each node's own copy under torchrun, still matches): their relative
names and sizes, the whole content of small files (configs, tokenizer), and of large ones the safetensors header
(tensor names, shapes, dtypes) plus evenly spaced samples, so an 8B model costs a few MiB of reading. Hidden files
and report folders inside the model folder are left out. A retraining that changes only bytes between the samples
goes unnoticed: use a new --report folder for it. The data files and images folder are recorded for the report
only: each answer carries what it was asked (`medsight.evaluate.runner.input_fingerprint`), checked item by item on
resume. The dtype is recorded as resolved ("auto" is bfloat16 on CUDA, float32 elsewhere). Not recorded: the device
(at one dtype, CPU and GPU differ by float rounding), and the contents behind a Hub id. A folder answered by a
medsight that wrote no settings, or settings with an unresolved dtype, is adopted only on request
(``--adopt-settings``), which records what is missing (a dtype "auto" counts as missing) and changes nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from medsight.atomic_files import replace_file, sync_folder, temporaries_removed_on_sigterm, write_temporary
from medsight.evaluate.readers import DataError
from medsight.user_files import read_user_json

SETTINGS_FILE = "settings.json"
#: Shown in messages and reports, not compared (a folder may move; its files identify it).
DISPLAY_ONLY = ("model", "model_path", "data", "vqa_data", "images")
#: Values older medsight versions recorded that do not say what produced the answers ("auto": either dtype).
UNRESOLVED = {"dtype": "auto"}
ADOPT_FLAG = "--adopt-settings"
#: Files up to this size are hashed whole; larger ones by `SAMPLES` chunks of `SAMPLE_BYTES` (and their header).
SMALL_FILE = 1 << 20
SAMPLES, SAMPLE_BYTES = 16, 1 << 16
#: A safetensors header longer than this is not one (the 8B model's is about 100 kB).
MAX_HEADER = 100 << 20
#: A shard that finds settings.json mid-write (the O_EXCL fallback is not atomic) reads it again this often.
READ_TRIES, READ_PAUSE_S = 5, 0.2


def files_fingerprint(path: Path, skip: Path | None = None) -> str:
    """Hash of the relative names, sizes and content digests of a file or of the model files under a folder;
    `skip` (the report folder) is left out."""
    digest = hashlib.sha256()
    for name, f in _model_files(path, skip):
        try:
            digest.update(f"{name}\0{f.stat().st_size}\0{_content_digest(f)}\n".encode())
        except OSError as err:
            raise DataError(f"cannot read {f} to identify the model files in {path}: {err}") from None
    return digest.hexdigest()[:16]


def _model_files(path: Path, skip: Path | None) -> list[tuple[str, Path]]:
    """(name relative to `path`, file) of every file that may define the model, sorted by name."""
    if path.is_file():
        return [(path.name, path)]
    skipped = skip.resolve() if skip is not None else None
    found = []
    for root, dirs, files in os.walk(path):
        here = Path(root)
        # Pruned in place so os.walk never descends into hidden folders or report folders.
        dirs[:] = [d for d in dirs if not d.startswith(".") and not _is_report(here / d, skipped)]
        found += [((here / f).relative_to(path).as_posix(), here / f)
                  for f in files if not f.startswith(".") and (here / f).is_file()]
    return sorted(found)


def _is_report(folder: Path, skipped: Path | None) -> bool:
    """This run's report folder, or another evaluation's (its predictions grow while models stay put)."""
    if skipped is not None and folder.resolve() == skipped:
        return True
    return (folder / SETTINGS_FILE).is_file() and any(folder.glob("predictions*.jsonl"))


def _content_digest(f: Path) -> str:
    """sha256 of a small file, or of a large one's safetensors header and evenly spaced samples (cheap for GBs)."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        if size <= SMALL_FILE:
            return hashlib.sha256(fh.read()).hexdigest()
        digest = hashlib.sha256(_safetensors_header(fh, size) if f.suffix == ".safetensors" else b"")
        for i in range(SAMPLES):
            fh.seek((size - SAMPLE_BYTES) * i // (SAMPLES - 1))
            digest.update(fh.read(SAMPLE_BYTES))
        return digest.hexdigest()


def _safetensors_header(fh: BinaryIO, size: int) -> bytes:
    """The first 8 + N bytes (N, then the JSON of every tensor's dtype, shape and offsets); none if malformed."""
    fh.seek(0)
    (length,) = struct.unpack("<Q", fh.read(8))
    return fh.read(length) if 8 + length <= min(size, MAX_HEADER) else b""


def source_identity(spec: str | None, skip: Path | None = None) -> str | None:
    """What a --model/--adapter/--vision-file value stands for, independent of how the path was written; `skip`:
    the report folder, left out of a local folder's files."""
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
        return f"local files {files_fingerprint(path, skip)}"
    return f"Hub id {spec}"


def answer_settings(task: str, model: str, adapter: str | None, vision_file: str | None, options: Sequence[Any],
                    dtype: str, report_dir: Path | None = None) -> dict[str, Any]:
    """The settings that change answers, for the `RunOptions` of every generation the task runs (`dtype`: the one
    the model loads in, resolved; `report_dir` is left out of local model files: it may lie inside the model
    folder)."""
    from medsight.model.generation import DEFAULT_MAX_NEW_TOKENS

    first = options[0]
    weights = source_identity(model, report_dir)
    local = weights is not None and weights.startswith("local files")
    return {
        "task": task,
        "model": model,
        "model_path": str(Path(model).expanduser().resolve()) if local else None,
        "model_weights": weights,
        "adapter": source_identity(adapter, report_dir),
        "vision_file": source_identity(vision_file, report_dir),
        "sampling": first.sampling,
        "max_new_tokens": DEFAULT_MAX_NEW_TOKENS if first.max_new_tokens is None else first.max_new_tokens,
        # The seed only matters to sampled generations, the batch only to greedy ones (sampled: one item per call).
        "seed": first.seed if any(o.sampled for o in options) else None,
        "batch": first.batch if any(not o.sampled for o in options) else None,
        "resize_mode": first.resize_mode,
        "dtype": dtype,
    }


def data_settings(data: str | Path, images: str | Path | None, vqa_data: str | Path | None) -> dict[str, Any]:
    """Which data files and images folder were evaluated, shown in the report (not compared: each answer records
    its own inputs, `medsight.evaluate.runner.input_fingerprint`)."""
    data = Path(data).expanduser().resolve()
    return {"data": str(data), "vqa_data": str(Path(vqa_data).expanduser().resolve()) if vqa_data else None,
            "images": str(Path(images).expanduser().resolve() if images is not None
                          else data if data.is_dir() else data.parent)}


def check_settings(report_dir: Path, settings: dict[str, Any], adopt: bool = False) -> None:
    """Record `settings` in a fresh report folder, or refuse if its predictions were made with other ones.

    `adopt` records them in a folder whose predictions have no settings, or settings an older medsight wrote
    without some of them (e.g. "auto" for the dtype): the user vouches that these settings produced them. It never
    replaces a recorded value.
    """
    path = report_dir / SETTINGS_FILE
    if not path.exists():
        if any(report_dir.glob("predictions*.jsonl")) and not adopt:
            raise DataError(f"{report_dir} holds predictions but no {SETTINGS_FILE} (an older medsight made them), "
                            "so which model and options produced them is unknown. If this command's model and "
                            f"options made them, rerun it with {ADOPT_FLAG} to record these settings and resume; "
                            "otherwise choose another --report folder")
        _write_once(path, settings)
    recorded = _read(path)
    unrecorded = [k for k in settings if k not in DISPLAY_ONLY and _unrecorded(recorded, k)]
    # A seed recorded as null: no generation of the folder was sampled (a DiagSeg run without --vqa-data). A sampled
    # one added at the same sampling setting (--vqa-data) changes no recorded answer: its seed is recorded, not refused.
    first_seed = ["seed"] if ("seed" in recorded and recorded["seed"] is None and settings.get("seed") is not None
                              and recorded.get("sampling") == settings.get("sampling")) else []
    differ = [k for k in sorted(recorded.keys() | settings.keys())
              if k not in DISPLAY_ONLY and k not in unrecorded + first_seed and recorded.get(k) != settings.get(k)]
    if differ:
        # seed/batch are null where they do not apply: that follows from a sampling or task change, named anyway.
        shown = [k for k in differ if not (k in ("seed", "batch") and None in (recorded.get(k), settings.get(k)))]
        changes = "; ".join(_difference(k, recorded, settings) for k in shown or differ)
        note = f" ({ADOPT_FLAG} only records settings where none are)" if adopt else ""
        if not any(p.stat().st_size for p in report_dir.glob("predictions*.jsonl")):
            # A run that stopped after recording its settings and before its first answer (a model that did not
            # load, an unreadable first image), or a shard with those settings just starting: no answer is at stake.
            raise DataError(f"{path} records other settings ({changes}), though {report_dir} holds no predictions "
                            "yet: an earlier run stopped before its first answer, or one is starting with them. Rerun "
                            f"with those settings, or, if no run is using the folder, delete {path} and rerun{note}")
        raise DataError(f"{report_dir} holds predictions made with other settings ({changes}). Rerun with the "
                        f"settings in {path} to resume, or choose another --report folder for these ones{note}")
    if unrecorded and not adopt:
        now = ", ".join(f"{k} {json.dumps(settings[k])}" for k in unrecorded)
        raise DataError(f"{path} does not say which {', '.join(unrecorded)} made its predictions (an older medsight "
                        f"wrote it). If this command's ({now}) did, rerun it with {ADOPT_FLAG} to record that and "
                        "resume; otherwise choose another --report folder")
    if unrecorded or first_seed:
        _replace(path, {**recorded, **{k: settings[k] for k in unrecorded + first_seed}})


def _unrecorded(recorded: dict[str, Any], key: str) -> bool:
    return key not in recorded or (key in UNRESOLVED and recorded[key] == UNRESOLVED[key])


def _difference(key: str, recorded: dict[str, Any], settings: dict[str, Any]) -> str:
    if key == "model_weights":
        return (f"model: {recorded.get('model')!r} ({recorded.get(key)}) there, {settings.get('model')!r} "
                f"({settings.get(key)}) now")
    return f"{key}: {json.dumps(recorded.get(key))} there, {json.dumps(settings.get(key))} now"


def _write_once(path: Path, settings: dict[str, Any]) -> None:
    """Create `path` only if absent, first writer wins: shards starting together all compare with the first one's.

    Written under a unique temporary name (shards on several hosts may share a pid) and linked into place, which is
    atomic; where the file system cannot link (FUSE, SMB, FAT) it is created with O_EXCL instead.
    """
    text = (json.dumps(settings, indent=1) + "\n").encode()
    try:
        with temporaries_removed_on_sigterm():
            tmp = write_temporary(path, lambda target: target.write_bytes(text))
            try:
                _link_or_create(tmp, path, text)
            finally:
                os.unlink(tmp)
        sync_folder(path.parent)
    except OSError as err:
        raise DataError(f"cannot record the report's settings in {path}: {err}") from None


def _replace(path: Path, settings: dict[str, Any]) -> None:
    """Rewrite the recorded settings with `settings` (adopting what an older medsight left unrecorded), atomically."""
    try:
        replace_file(path, lambda target: target.write_text(json.dumps(settings, indent=1) + "\n"))
    except OSError as err:
        raise DataError(f"cannot record the report's settings in {path}: {err}") from None


def _link_or_create(tmp: Path, path: Path, text: bytes) -> None:
    """Link the complete `tmp` to `path` unless it exists; create it with O_EXCL where links are unsupported."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another shard recorded its settings first: ours are compared with those
    except OSError:
        _create_exclusive(path, text)  # no hard links here (EPERM, ENOTSUP ...); a disk fault recurs there


def _create_exclusive(path: Path, text: bytes) -> None:
    """Create `path` holding `text` unless it exists (then another shard won); a failed write leaves no file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text)  # one write: a reader sees at worst an incomplete file, and reads again (`_read`)
    except OSError:
        path.unlink(missing_ok=True)  # an empty settings.json would block the folder for good
        raise


def recorded_settings(report_dir: Path) -> dict[str, Any] | None:
    """The settings recorded in `report_dir`, or None where none are."""
    path = report_dir / SETTINGS_FILE
    return _read(path) if path.is_file() else None


def _read(path: Path) -> dict[str, Any]:
    """The recorded settings; read again a few times if incomplete (another shard may be writing them)."""
    for _ in range(READ_TRIES - 1):
        try:
            return _parse(path)
        except DataError:
            time.sleep(READ_PAUSE_S)
    return _parse(path)


def _parse(path: Path) -> dict[str, Any]:
    data = read_user_json(path, "report's recorded settings", DataError)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object of settings")
    return data
