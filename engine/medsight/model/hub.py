"""Files on the Hugging Face Hub: `REPO_ID:FILENAME[@REVISION]` addresses, the release layout's file selection, and
the UniMed-CLIP file the release needs but does not ship.

Everything goes through `huggingface_hub` and its cache (downloaded once, shared with other tools; with
`HF_HUB_OFFLINE=1` only the cache is read).
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from medsight.model.checkpoints import CONFIG_FILE, INDEX_FILE, PICKLE_INDEX_FILE, CheckpointError, shard_names

RELEASE_REPO = "Caf0914/MedSIGHT"
LVLM_FOLDER = "medsight_full_instruct"
PERCEIVER_FOLDER = "region_perceiver"


@dataclass(frozen=True)
class HubFile:
    repo_id: str
    filename: str
    revision: str | None = None
    licence: str | None = None
    size: str | None = None  # as published, for messages

    def __str__(self) -> str:
        return f"{self.repo_id}:{self.filename}" + (f"@{self.revision}" if self.revision else "")

    def describe(self) -> str:
        return (f"file {self.filename} of Hugging Face repository {self.repo_id} "
                f"at revision {self.revision or 'main'}")


# The official code loads this file from its authors' own repository; it is not part of the MedSIGHT release.
UNIMED_CLIP = HubFile("UzairK/unimed_clip_vit_l14_base_text_encoder", "unimed_clip_vit_l14_base_text_encoder.pt",
                      licence="CC-BY-NC-4.0", size="4.97 GB")

# The release's checkpoints as the loader finds them: these names with either suffix (.pt as published, .safetensors
# as `python -m medsight.model.unpickling` converts one; of one step the loader takes the converted copy).
CHECKPOINT_SUFFIXES = (".pt", ".safetensors")
PERCEIVER_FILES = (f"{PERCEIVER_FOLDER}/*",)
VISION_FILES = ("*clip*", "*CLIP*")  # a UniMed-CLIP file beside the release
CODEBOOK_FILES = ("codebook*/*", "*codebook*")


def checkpoint_patterns(names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(name + suffix for name in names for suffix in CHECKPOINT_SUFFIXES)


def _step(name: str) -> str:
    """A checkpoint's name without its suffix: a step's .pt and its converted .safetensors share it."""
    return name.removesuffix(next((s for s in CHECKPOINT_SUFFIXES if name.endswith(s)), ""))


def _in_folder_match(name: str, pattern: str) -> bool:
    """`Path.glob`'s match, which the loader searches with: `*` stays within one folder (fnmatch's crosses `/`)."""
    parts, pattern_parts = name.split("/"), pattern.split("/")
    return len(parts) == len(pattern_parts) and all(map(fnmatch.fnmatchcase, parts, pattern_parts))


def loaded_checkpoint(names: Iterable[str], stage: tuple[str, ...]) -> str | None:
    """The checkpoint of a stage (`PERCEIVER_FILES`, `CODEBOOK_FILES`) that the loader takes among relative names
    (a folder's files, a repository's listing), so a download fetches the one that loads: the last step in order of
    the name without its suffix, and of that step the converted .safetensors copy."""
    patterns = checkpoint_patterns(stage)
    found = sorted((n for n in names if any(_in_folder_match(n, p) for p in patterns)),
                   key=lambda n: (_step(n), not n.endswith(".safetensors")))
    return next((n for n in found if _step(n) == _step(found[-1])), None) if found else None


@dataclass(frozen=True)
class LayoutPart:
    """Files of a layout that serve as one (patterns matched as the loader's `Path.glob` does, `_in_folder_match`): a
    download selects every part; the model cannot load without one file of each `needed` part (`missing_from_cache`)."""

    patterns: tuple[str, ...]
    needed: bool = True
    index: str | None = None  # the weights: what is needed is the shards this index names, else model.safetensors


def _model_folder(root: str) -> tuple[LayoutPart, ...]:
    """A Hugging Face model folder's weights and tokenizer (ours at the top, the release's in `LVLM_FOLDER/`)."""
    extras = ("merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
    weights = (f"{root}model*.safetensors", root + INDEX_FILE, f"{root}pytorch_model*.bin", root + PICKLE_INDEX_FILE)
    return (LayoutPart(weights, index=root + INDEX_FILE),
            LayoutPart((f"{root}tokenizer_config.json",)),
            LayoutPart((f"{root}tokenizer.json", f"{root}vocab.json")),
            LayoutPart(tuple(root + name for name in extras), needed=False))


OURS_LAYOUT = (LayoutPart((CONFIG_FILE,)), *_model_folder(""))
OFFICIAL_LAYOUT = (
    LayoutPart(checkpoint_patterns(PERCEIVER_FILES)),
    LayoutPart((f"{LVLM_FOLDER}/config.json",)),
    LayoutPart((f"{LVLM_FOLDER}/generation_config.json",), needed=False),
    *_model_folder(f"{LVLM_FOLDER}/"),
    LayoutPart(checkpoint_patterns(VISION_FILES), needed=False),  # beside the release, where the loader looks
)
CODEBOOK = LayoutPart(checkpoint_patterns(CODEBOOK_FILES))
#: What a folder or repository is when it is neither layout, for errors.
NO_LAYOUT = f"neither our format ({CONFIG_FILE}) nor the official layout ({PERCEIVER_FOLDER}/*.pt + {LVLM_FOLDER}/)"


def _layout(files: list[str], codebook: bool) -> tuple[LayoutPart, ...]:
    """Ours when the files hold `medsight_config.json`, else the official release (with its codebook if asked)."""
    if CONFIG_FILE in files:
        return OURS_LAYOUT
    return (*OFFICIAL_LAYOUT, CODEBOOK) if codebook else OFFICIAL_LAYOUT


def _any_match(files: list[str], patterns: tuple[str, ...]) -> bool:
    """Whether a file matches, as the loader searches a folder (`_in_folder_match`): a file in a subfolder no pattern
    names is not one the model loads, so it neither completes a cached snapshot nor belongs in a download."""
    return any(_in_folder_match(f, pattern) for f in files for pattern in patterns)


_SPEC = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+):(?P<file>[^@:]+?)(?:@(?P<rev>[^@\s]+))?$")
_REPO_SPEC = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[^@\s]+))?$")


def parse_repo(spec: str) -> tuple[str, str | None] | None:
    """`REPO_ID[@REVISION]` (a branch, tag or commit, as `medsight download --revision` takes it) -> (repo id,
    revision or None); anything else -> None."""
    match = _REPO_SPEC.match(str(spec).strip())
    return None if match is None else (match["repo"], match["rev"])


def parse_hub_file(spec: str) -> HubFile | None:
    """`REPO_ID:FILENAME[@REVISION]` -> HubFile; anything else (a local path) -> None."""
    match = _SPEC.match(str(spec).strip())
    if match is None:
        return None
    return HubFile(match["repo"], match["file"], match["rev"])


def resolve_file(spec: str | Path) -> Path:
    """A local file as is; a `REPO_ID:FILENAME[@REVISION]` from the Hugging Face cache (downloaded once)."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    hub = parse_hub_file(str(spec))
    if hub is None and path.name == UNIMED_CLIP.filename:  # the README of old: a bare file name meant the Hub's file
        raise CheckpointError(f"checkpoint file not found: {path}; for the copy on the Hugging Face Hub pass "
                              f"{UNIMED_CLIP} (or --fetch-vision)")
    return path if hub is None else fetch_file(hub)


def fetch_file(hub: HubFile, local_dir: str | Path | None = None) -> Path:
    """`hf_hub_download`: the cached copy if there is one for that revision, else a download (never when offline);
    with `local_dir`, a copy there too."""
    from huggingface_hub import hf_hub_download

    try:
        with _writing(hub.describe(), local_dir):
            return Path(_hub_call(lambda: hf_hub_download(hub.repo_id, hub.filename, revision=hub.revision,
                                                          local_dir=local_dir), hub.describe()))
    except HubUnreachableError as err:
        full = _abbreviated(hub.repo_id, hub.revision)
        hint = (f"; {hub.revision} is a short commit hash, which only the Hub resolves: the cache holds commit "
                f"{' and '.join(full)}, pass the full 40-character hash" if full else _short_hash_hint(hub.revision))
        raise HubUnreachableError(f"{err}{hint}") from None


def cached_file(hub: HubFile) -> Path | None:
    """The cached copy of a hub file, without any network access; None when the cache has none."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(hub.repo_id, hub.filename, revision=hub.revision)
    return Path(found) if isinstance(found, str) else None


def vision_file_for_release(fetch: bool) -> Path:
    """The UniMed-CLIP file for a release that does not carry the tower: from the cache, fetched when asked, or an
    error that says exactly what to get, from where, and under which licence."""
    found = cached_file(UNIMED_CLIP)
    if found is not None:
        return found
    if fetch:
        return fetch_file(UNIMED_CLIP)
    raise CheckpointError(
        f"the MedSIGHT release does not ship its vision encoder: it is the UniMed-CLIP checkpoint "
        f"{UNIMED_CLIP.filename} ({UNIMED_CLIP.size}) from Hugging Face repository {UNIMED_CLIP.repo_id}, licence "
        f"{UNIMED_CLIP.licence} (non-commercial use). Fetch it into the Hugging Face cache with --fetch-vision "
        f"(Python: fetch_vision=True), or pass --vision-file {UNIMED_CLIP} (or a local copy's path)"
    )


def release_files(listing: list[str], codebook: bool = False) -> list[str]:
    """The files of a repository that its layout needs: ours (`medsight_config.json` + safetensors + tokenizer) or
    the official release (the latest perceiver checkpoint, the instruct folder's config, shards and tokenizer;
    the stage-2 codebook only when asked, since answering never uses it)."""
    layout = _layout(listing, codebook)
    patterns = tuple(p for part in layout for p in part.patterns)
    chosen = sorted(f for f in listing if _any_match([f], patterns))
    chosen = [f for f in chosen if not _pickle_beside_safetensors(f, chosen)]
    if layout is OURS_LAYOUT:
        return chosen
    # One checkpoint per stage: the one the loader takes.
    for stage in (PERCEIVER_FILES, CODEBOOK_FILES):
        loaded = loaded_checkpoint(chosen, stage)
        chosen = [f for f in chosen if f == loaded or not _any_match([f], checkpoint_patterns(stage))]
    return chosen


def _cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def why_offline() -> str:
    from huggingface_hub import constants

    return "offline mode is on (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"


def _why_not_downloaded() -> str:
    from huggingface_hub import constants

    return why_offline() + (": run once without it to download" if constants.HF_HUB_OFFLINE else "")


def _pickle_beside_safetensors(name: str, files: list[str]) -> bool:
    """A `pytorch_model*.bin` weights file (or its index) in a folder that also has safetensors weights: the loader
    reads those (`shard_names`), as transformers does, so a download leaves the pickles out."""
    folder, _, base = name.rpartition("/")
    return fnmatch.fnmatchcase(base, "pytorch_model*.bin*") and any(
        f.rpartition("/")[0] == folder and fnmatch.fnmatchcase(f.rpartition("/")[2], "model*.safetensors*")
        for f in files)


@dataclass
class DownloadPlan:
    """What a download will fetch: repository files (path, size in bytes) and extra files from other repositories."""

    repo_id: str
    revision: str | None
    files: list[tuple[str, int]]
    extra: list[tuple[HubFile, int]]
    licence: str | None = None

    @property
    def total(self) -> int:
        return sum(size for _, size in self.files) + sum(size for _, size in self.extra)

    def names(self) -> list[str]:
        """Where the files land in a folder (`--dir`): repository files by their path, extra files by their name."""
        return [name for name, _ in self.files] + [hub.filename for hub, _ in self.extra]

    def lines(self) -> list[str]:
        rows = [f"{_size(size):>10}  {name}" for name, size in self.files]
        rows += [f"{_size(size):>10}  {hub} (licence {hub.licence})" for hub, size in self.extra]
        licence = f", licence {self.licence}" if self.licence else ""
        head = f"{self.repo_id} at {self.revision or 'main'}{licence}: {len(rows)} file(s), {_size(self.total)}"
        return [head, *rows]


def plan_release(repo_id: str, revision: str | None = None, codebook: bool = False,
                 vision: bool = False) -> DownloadPlan:
    """List the repository with sizes (one `model_info` call) and select what its layout needs."""
    from huggingface_hub import HfApi

    info = _hub_call(lambda: HfApi().model_info(repo_id, revision=revision, files_metadata=True),
                     f"Hugging Face repository {repo_id} at revision {revision or 'main'}")
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
    files = release_files(list(sizes), codebook)
    if not files:
        raise CheckpointError(f"Hugging Face repository {repo_id}: no MedSIGHT files ({NO_LAYOUT})")
    extra = []
    if vision and not _any_match(files, checkpoint_patterns(VISION_FILES)):
        extra.append((UNIMED_CLIP, plan_file(UNIMED_CLIP).total))
    licence = getattr(info.card_data, "license", None)
    return DownloadPlan(repo_id, revision, [(f, sizes[f]) for f in files], extra, licence)


def plan_file(hub: HubFile) -> DownloadPlan:
    """One file of a repository, with its size (`get_paths_info`)."""
    from huggingface_hub import HfApi

    found = _hub_call(lambda: HfApi().get_paths_info(hub.repo_id, [hub.filename], revision=hub.revision),
                      hub.describe())
    if not found:
        raise CheckpointError(f"{hub.describe()}: the repository has no such file")
    return DownloadPlan(hub.repo_id, hub.revision, [(hub.filename, found[0].size)], [], hub.licence)


def fetch_release(plan: DownloadPlan, local_dir: str | Path | None = None) -> Path:
    """`snapshot_download` of exactly the planned files (the Hub's own progress bars), then the extra files."""
    from huggingface_hub import snapshot_download

    what = f"Hugging Face repository {plan.repo_id} at revision {plan.revision or 'main'}"
    with _writing(what, local_dir, plan.total):
        folder = _hub_call(lambda: snapshot_download(plan.repo_id, revision=plan.revision, local_dir=local_dir,
                                                     allow_patterns=[name for name, _ in plan.files]), what)
    for hub, _ in plan.extra:  # into the folder too, where the loader looks for `*clip*.pt`
        fetch_file(hub, local_dir=local_dir)
    return Path(folder)


def cached_release(repo_id: str, revision: str | None = None) -> Path:
    """The cached snapshot of a repository at a revision (a branch or tag through the cache's `refs/<revision>`, or a
    commit), without network access (what `HF_HUB_OFFLINE=1` allows)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        # A revision that is the folder of cached branches below it (refs/feature for feature/x) names no cached
        # snapshot: huggingface_hub reads it as a ref file, failing "Is a directory" (Windows: "Permission denied").
        if revision and (_repo_cache_folder(repo_id) / "refs" / revision).is_dir():
            raise LocalEntryNotFoundError(f"refs/{revision} is a folder of branches, not a revision")
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        what = f"Hugging Face repository {repo_id} at revision {revision}"
        full = _abbreviated(repo_id, revision)
        if full:  # cached, but huggingface_hub cannot tell offline that a short hash names it
            raise CheckpointError(f"{what}: a short commit hash, which only the Hub resolves, and "
                                  f"{why_offline()}; the local Hugging Face cache holds commit {' and '.join(full)}: "
                                  f"pass the full 40-character hash ({repo_id}@{full[0]})") from None
        held = cached_revisions(repo_id)
        other = (f"; the cache holds it at revision(s) {', '.join(held)}: pass {repo_id}@REVISION to use one"
                 if held else "")
        raise CheckpointError(f"Hugging Face repository {repo_id} at revision {revision or 'main'}: not in the local "
                              f"Hugging Face cache ({_cache_dir()}) and {_why_not_downloaded()}{other}"
                              f"{_short_hash_hint(revision)}") from None


# A commit hash shortened as git shows it. huggingface_hub resolves a revision offline only through the cache's
# refs/<name> or a snapshot folder named by the full hash, so a short one is "not in the cache" even when it is.
_SHORT_HASH = re.compile(r"^[0-9a-fA-F]{4,39}$")


def _abbreviated(repo_id: str, revision: str | None) -> list[str]:
    """The cached snapshots (full commit hashes) that a short-hash-like revision abbreviates."""
    if revision is None or not _SHORT_HASH.match(revision):
        return []
    return sorted(name for name in _cached_snapshots(repo_id) if name.startswith(revision.lower()))


def _repo_cache_folder(repo_id: str) -> Path:
    """The Hugging Face cache's folder of a model repository (its blobs, refs and snapshots)."""
    from huggingface_hub.file_download import repo_folder_name

    return Path(_cache_dir()) / repo_folder_name(repo_id=repo_id, repo_type="model")


def _cached_snapshots(repo_id: str) -> set[str]:
    """The full commit hashes the cache holds a snapshot of."""
    return {p.name for p in (_repo_cache_folder(repo_id) / "snapshots").glob("*") if p.is_dir()}


def _short_hash_hint(revision: str | None) -> str:
    if revision is None or not _SHORT_HASH.match(revision):
        return ""
    return (f"; if {revision} is a short commit hash: only the Hub resolves one, so pass the full 40-character "
            "hash, or run once online")


def cached_revisions(repo_id: str) -> list[str]:
    """The revisions the cache holds a snapshot of: its refs (branches, tags) and commits no ref names."""
    folder = _repo_cache_folder(repo_id)
    snapshots = _cached_snapshots(repo_id)
    refs = {p.relative_to(folder / "refs").as_posix(): p.read_text().strip()
            for p in (folder / "refs").rglob("*") if p.is_file()}
    named = sorted(ref for ref, commit in refs.items() if commit in snapshots)
    return named + sorted(snapshots - {refs[ref] for ref in named})


def _snapshot_files(folder: Path) -> list[str]:
    """A snapshot's files by relative path; a dangling link (its blob deleted from the cache) is not one."""
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]


def missing_from_cache(folder: Path, codebook: bool = False, vision: bool = False) -> list[str]:
    """The files a cached snapshot's layout needs that it lacks (a download cut short, or made without
    `--codebook` / `--fetch-vision`): what can be said of a release without asking the Hub for its listing."""
    have = _snapshot_files(folder)
    needed: list[tuple[str, ...]] = []  # each entry: one of these must be there
    for part in _layout(have, codebook):
        if part.index is not None:
            needed += _weights_needed(folder, part.index, have)
        elif part.needed:
            needed.append(part.patterns)
    missing = [" or ".join(names) for names in needed if not _any_match(have, names)]
    # The vision file: beside the release (where the loader looks for it) or cached from its repository.
    if vision and cached_file(UNIMED_CLIP) is None and not _any_match(have, checkpoint_patterns(VISION_FILES)):
        missing.append(str(UNIMED_CLIP))
    return missing


def _weights_needed(folder: Path, index: str, have: list[str]) -> list[tuple[str, ...]]:
    """The weight files the loader would read (`shard_names`), or what is missing when it would find none."""
    root = index[: -len(INDEX_FILE)]
    try:
        return [(root + shard,) for shard in shard_names(folder / root)]
    except CheckpointError:  # a download cut short: an index without its shards known, or no weights
        return [(f"a readable {index}",) if index in have else (f"{root}model.safetensors",)]


def cached_download(hub: HubFile | None, repo_id: str, revision: str | None = None, codebook: bool = False,
                    vision: bool = False) -> Path:
    """What a download can do without the Hub: the cached file, or the cached snapshot when it holds every file its
    layout needs; else an error saying what the cache lacks."""
    if hub is not None:
        return fetch_file(hub)  # offline, huggingface_hub answers from its cache or says it has no copy
    folder = cached_release(repo_id, revision)
    _refuse_incomplete(folder, repo_id, revision, missing_from_cache(folder, codebook, vision))
    return folder


def cached_model(repo_id: str, revision: str | None = None) -> Path:
    """The cached snapshot the loader reads without the Hub. One holding some of its layout's files but not all (a
    download cut short, a blob deleted from the cache) is an error saying what it lacks: the loader would call it
    neither layout, or name one missing file as if the release had been damaged."""
    folder = cached_release(repo_id, revision)
    have = _snapshot_files(folder)
    # None of them (another kind of repository, e.g. UniMed-CLIP's, whose file alone a download would not complete):
    # the loader says what it is not.
    if any(part.needed and _any_match(have, part.patterns) for part in _layout(have, codebook=False)):
        _refuse_incomplete(folder, repo_id, revision, missing_from_cache(folder))
    return folder


def _refuse_incomplete(folder: Path, repo_id: str, revision: str | None, missing: list[str]) -> None:
    if missing:
        raise CheckpointError(f"Hugging Face repository {repo_id} at revision {revision or 'main'}: the local Hugging "
                              f"Face cache ({folder}) lacks {', '.join(missing)}, and {_why_not_downloaded()}")


@contextlib.contextmanager
def _writing(what: str, local_dir: str | Path | None, total: int | None = None) -> Iterator[None]:
    """A download's write failure (a full disk, a quota, a file-size limit) names what was downloaded and where: the
    error the Hub client passes on names neither ("No space left on device")."""
    import errno

    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        where = Path(local_dir) if local_dir is not None else Path(_cache_dir())
        needs = f"; the download is {_size(total)} in all" if total else ""
        elsewhere = "" if local_dir is not None else " (or point HF_HUB_CACHE at a disk with room)"
        raise CheckpointError(f"{what}: the download stopped writing into {where} ({err.strerror}{needs}): make "
                              f"room there{elsewhere} and run it again; the files already downloaded are "
                              "kept") from None


class HubUnreachableError(CheckpointError):
    """The Hub could not be asked (offline mode, no connection, a timeout): the cache may still hold the files."""


def _hub_call(call, what: str):
    """Run a Hub request; its failures become one CheckpointError naming what was asked for."""
    import requests
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return call()
    except LocalEntryNotFoundError:  # a download: huggingface_hub looked in its cache before saying so
        raise HubUnreachableError(f"{what}: not in the local Hugging Face cache ({_cache_dir()}) and "
                                  f"{_why_not_downloaded()}") from None
    except (OfflineModeIsEnabled, requests.ConnectionError, requests.Timeout):  # a listing: the cache was not asked
        raise HubUnreachableError(f"{what}: cannot ask the Hugging Face Hub: {_why_not_downloaded()}") from None
    except GatedRepoError:  # a RepositoryNotFoundError too, but it exists: the user has to ask for access
        raise CheckpointError(f"{what}: the repository is gated: request access on its Hugging Face page, then log "
                              "in here with the same account (`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{what}: the repository does not exist or needs a login (`hf auth login`)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{what}: the repository has no such revision") from None
    except EntryNotFoundError:
        raise CheckpointError(f"{what}: the repository has no such file") from None
    except HfHubHTTPError as err:
        raise CheckpointError(f"{what}: request failed ({err})") from None


def _size(n: int) -> str:
    """Decimal units, as the Hub shows file sizes."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
