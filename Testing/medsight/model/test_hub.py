"""Hub-addressable files, read through the Hugging Face cache offline (laid out in the hub's own cache format)."""

import json
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from medsight.model.checkpoints import CheckpointError
from medsight.model.hub import UNIMED_CLIP, parse_hub_file, resolve_file
from medsight.model.loading import load_model
from medsight_testing.golden import golden_base_config
from medsight_testing.hub_cache import cache_repo, folder_files, repo_folder
from medsight_testing.unimed_clip import save_like_numpy1, unimed_clip_checkpoint

VISION_REPO = "UzairK/unimed_clip_vit_l14_base_text_encoder"
VISION_FILE = "unimed_clip_vit_l14_base_text_encoder.pt"
COMMIT = "a" * 40


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(folder))
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # these tests must never reach the network
    return folder


@pytest.fixture
def vision_tower(golden) -> dict[str, torch.Tensor]:
    clip = torch.load(golden / "vision_encoder_clip.pt", weights_only=True)
    return {k[len("visual."):]: v for k, v in clip.items() if k.startswith("visual.")}


@pytest.fixture
def unimed_file(tmp_path, vision_tower) -> Path:
    """A UniMed-CLIP file in the published layout (training checkpoint, numpy 1 pickle)."""
    text = {"embeddings.word_embeddings.weight": torch.randn(50, 16)}
    return save_like_numpy1(unimed_clip_checkpoint(vision_tower, text), tmp_path / VISION_FILE)


def release_needed(release_dir: Path) -> dict[str, Path]:
    """What the release repository holds that the engine needs: perceiver checkpoint and the instruct folder."""
    return {k: v for k, v in folder_files(release_dir).items() if k.startswith(("region_perceiver/",
                                                                                 "medsight_full_instruct/"))}


def test_hub_address_parsing():
    assert parse_hub_file(f"{VISION_REPO}:{VISION_FILE}@v1.0") == parse_hub_file(f"{VISION_REPO}:{VISION_FILE}@v1.0")
    hub = parse_hub_file(f"{VISION_REPO}:sub/dir/{VISION_FILE}@{COMMIT}")
    assert (hub.repo_id, hub.filename, hub.revision) == (VISION_REPO, f"sub/dir/{VISION_FILE}", COMMIT)
    assert parse_hub_file(f"{VISION_REPO}:{VISION_FILE}").revision is None
    for local in ("unimed.pt", "C:\\models\\unimed.pt", "/abs/path/unimed.pt", "relative/dir/unimed.pt"):
        assert parse_hub_file(local) is None
    # The bare file name the README once showed: not found locally, and the error gives the Hub address.
    with pytest.raises(CheckpointError, match=f"pass {VISION_REPO}:{VISION_FILE}"):
        resolve_file(VISION_FILE)


def test_repo_file_address_resolves_through_the_cache_offline(cache, unimed_file, vision_tower, release_dir, golden):
    snapshot = cache_repo(cache, VISION_REPO, {VISION_FILE: unimed_file}, commit=COMMIT)
    for spec in (f"{VISION_REPO}:{VISION_FILE}", f"{VISION_REPO}:{VISION_FILE}@main",
                 f"{VISION_REPO}:{VISION_FILE}@{COMMIT}"):
        assert resolve_file(spec) == snapshot / VISION_FILE
    # Through the loader, as --vision-file passes it: the tower is the cached file's.
    model = load_model(release_dir, device="cpu", base_config=golden_base_config(golden),
                       vision_file=f"{VISION_REPO}:{VISION_FILE}")
    assert torch.equal(model.image_encoder.conv1.weight, vision_tower["conv1.weight"])


@pytest.mark.parametrize(("spec", "revision"), [
    (f"{VISION_REPO}:missing.pt", "main"),
    (f"{VISION_REPO}:{VISION_FILE}@v2", "v2"),
    (f"someone/absent:{VISION_FILE}@{COMMIT}", COMMIT),
])
def test_missing_hub_file_gives_one_message_naming_repo_file_and_revision(cache, unimed_file, spec, revision):
    cache_repo(cache, VISION_REPO, {VISION_FILE: unimed_file}, commit=COMMIT)
    hub = parse_hub_file(spec)
    with pytest.raises(CheckpointError) as err:
        resolve_file(spec)
    message = str(err.value)
    assert "\n" not in message
    assert f"file {hub.filename} of Hugging Face repository {hub.repo_id} at revision {revision}" in message
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in message


def test_release_without_vision_file_says_which_file_from_which_repository(cache, release_dir, golden):
    cache_repo(cache, "Caf0914/MedSIGHT", release_needed(release_dir))
    with pytest.raises(CheckpointError) as err:
        load_model("Caf0914/MedSIGHT", device="cpu", base_config=golden_base_config(golden))
    message = str(err.value)
    assert (UNIMED_CLIP.repo_id, UNIMED_CLIP.filename, UNIMED_CLIP.licence) == (VISION_REPO, VISION_FILE,
                                                                             "CC-BY-NC-4.0")
    for part in (VISION_REPO, VISION_FILE, "CC-BY-NC-4.0", "--fetch-vision",
                 f"--vision-file {VISION_REPO}:{VISION_FILE}"):
        assert part in message
    # --fetch-vision offline, with nothing cached: the download is refused with the file, repository and revision.
    with pytest.raises(CheckpointError, match=f"file {VISION_FILE} of Hugging Face repository {VISION_REPO} at "
                                              "revision main: not in the local Hugging Face cache"):
        load_model("Caf0914/MedSIGHT", device="cpu", base_config=golden_base_config(golden), fetch_vision=True)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="watches file opens with Linux inotify")
def test_offline_loading_opens_only_the_needed_files(cache, release_dir, unimed_file, vision_tower, golden):
    """A partial snapshot (only what the layout needs) plus other large files: loading opens only the needed."""
    from inotify_simple import INotify, flags

    gib = 2**30
    others = {"region_perceiver/0040000.pt": 2 * gib, "medsight_full_instruct/optimizer.pt": 3 * gib,
              "medsight_full_instruct/training_args.bin": gib, "stage3/mm_projector.bin": gib}
    release = cache_repo(cache, "Caf0914/MedSIGHT", {**release_needed(release_dir), **others})
    vision = cache_repo(cache, VISION_REPO, {VISION_FILE: unimed_file, "unimed_clip_vit_b16.pt": 2 * gib})
    blob_to_file = {link.resolve().name: f"{repo}:{name}"
                    for repo, snapshot in (("Caf0914/MedSIGHT", release), (VISION_REPO, vision))
                    for name, link in folder_files(snapshot).items()}
    needed = {f"Caf0914/MedSIGHT:{k}" for k in release_needed(release_dir)} | {f"{VISION_REPO}:{VISION_FILE}"}

    watcher = INotify()
    for repo in ("Caf0914/MedSIGHT", VISION_REPO):
        watcher.add_watch(str(repo_folder(cache, repo) / "blobs"), flags.OPEN | flags.ACCESS)
    try:
        model = load_model("Caf0914/MedSIGHT", device="cpu", base_config=golden_base_config(golden))
        opened = {blob_to_file[event.name] for event in watcher.read(timeout=0) if event.name}
    finally:
        watcher.close()
    assert opened - needed == set()
    assert {f"Caf0914/MedSIGHT:{k}" for k in others} & opened == set()
    assert {"Caf0914/MedSIGHT:region_perceiver/0079280.pt", f"{VISION_REPO}:{VISION_FILE}"} <= opened
    assert torch.equal(model.image_encoder.conv1.weight, vision_tower["conv1.weight"])


def test_a_cached_release_loads_when_the_hub_cannot_be_reached(cache, release_dir, golden, monkeypatch):
    """Online mode without a connection (a firewalled hospital network): the cached snapshot serves, as
    huggingface_hub does for single files; the error said the cache lacked a model it held."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on: every connection is refused at once
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{closed}")
    cache_repo(cache, "Caf0914/MedSIGHT", folder_files(release_dir))
    model = load_model("Caf0914/MedSIGHT", device="cpu", base_config=golden_base_config(golden))
    assert model.config.vision.grid_size > 0 and model.weights_source == "Caf0914/MedSIGHT"
    with pytest.raises(CheckpointError, match=r"someone/absent at revision main: not in the local Hugging Face "
                                              r"cache .* and the Hub could not be reached"):
        load_model("someone/absent", device="cpu", base_config=golden_base_config(golden))


def test_a_gated_repository_is_not_called_missing():
    """huggingface_hub's GatedRepoError is a RepositoryNotFoundError: it was reported as 'does not exist'."""
    from huggingface_hub.errors import GatedRepoError

    from medsight.model.hub import HubFile, fetch_file

    def gated(*args, **kwargs):
        raise GatedRepoError("403 Client Error. Cannot access gated repo for url https://huggingface.co/...")

    hub = HubFile("someone/gated-model", "weights.pt")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("huggingface_hub.hf_hub_download", gated)
        with pytest.raises(CheckpointError, match=r"file weights\.pt of Hugging Face repository someone/gated-model "
                                                  r"at revision main: the repository is gated: request access"):
            fetch_file(hub)


def test_offline_a_hub_id_finds_the_revision_it_was_downloaded_at(cache, release_dir, unimed_file, golden):
    """`medsight download --revision v1.0` caches the snapshot under refs/v1.0; offline only `main` was looked up, and
    a model source could name no revision at all."""
    commit = "b" * 40
    cache_repo(cache, "Caf0914/MedSIGHT", release_needed(release_dir), commit=commit, ref="v1.0")  # no main
    cache_repo(cache, VISION_REPO, {VISION_FILE: unimed_file})
    base = golden_base_config(golden)
    for source in ("Caf0914/MedSIGHT@v1.0", f"Caf0914/MedSIGHT@{commit}"):
        model = load_model(source, device="cpu", base_config=base)
        assert model.weights_source == source and model.config.vision.grid_size > 0
    # main is not cached: the error names the revision asked for and the revisions the cache holds.
    with pytest.raises(CheckpointError, match=r"Hugging Face repository Caf0914/MedSIGHT at revision main: not in "
                                              r"the local Hugging Face cache \(.*\) and offline mode is on .*the cache "
                                              r"holds it at revision\(s\) v1.0: pass Caf0914/MedSIGHT@REVISION"):
        load_model("Caf0914/MedSIGHT", device="cpu", base_config=base)
    with pytest.raises(CheckpointError, match=r"Caf0914/MedSIGHT at revision v2: not in the local Hugging Face cache"):
        load_model("Caf0914/MedSIGHT@v2", device="cpu", base_config=base)


def test_download_offline_reports_what_the_cache_holds(cache, release_dir, unimed_file, capsys):
    """`medsight download` offline said 'not in the local Hugging Face cache' without looking there (the Hub's
    listing call failed first): now it checks the cached snapshot against the layout."""
    from medsight.cli import main

    def download(*args: str) -> tuple[int, str, str]:
        code = main(["download", *args])
        out = capsys.readouterr()
        return code, out.out.strip(), out.err.strip()

    needed = release_needed(release_dir)
    shard = "medsight_full_instruct/model-00002-of-00002.safetensors"
    assert shard in needed  # the fixture's LVLM is sharded: a download cut short lacks a shard its index names
    cache_repo(cache, "Caf0914/MedSIGHT", {k: v for k, v in needed.items() if k != shard})
    code, out, err = download()
    assert code == 2 and out == ""
    assert f"the local Hugging Face cache ({repo_folder(cache, 'Caf0914/MedSIGHT')}" in err
    assert f"lacks {shard}, and offline mode is on (HF_HUB_OFFLINE=1)" in err and "\n" not in err

    snapshot = cache_repo(cache, "Caf0914/MedSIGHT", {shard: needed[shard]})  # the rest of the download
    code, out, err = download()
    assert (code, out) == (0, str(snapshot)) and "the local Hugging Face cache holds everything needed" in err
    # The vision file and the codebook are checked when asked for, by name.
    code, out, err = download("--fetch-vision", "--codebook")
    codebook = "codebook*/*.pt or codebook*/*.safetensors or *codebook*.pt or *codebook*.safetensors"
    assert code == 2 and f"lacks {codebook}, {UNIMED_CLIP}, and offline mode" in err
    vision = cache_repo(cache, VISION_REPO, {VISION_FILE: unimed_file})
    assert download("--fetch-vision")[:2] == (0, str(snapshot))
    assert download(f"{VISION_REPO}:{VISION_FILE}")[:2] == (0, str(vision / VISION_FILE))
    # A revision not cached, and a file not cached: said as such.
    code, _, err = download("--revision", "v2")
    assert code == 2 and "Caf0914/MedSIGHT at revision v2: not in the local Hugging Face cache" in err
    code, _, err = download(f"{VISION_REPO}:other.pt")
    assert code == 2 and f"file other.pt of Hugging Face repository {VISION_REPO} at revision main: not in the " \
                         "local Hugging Face cache" in err
    # --dir cannot be filled from the Hub: nothing is claimed to have been copied.
    code, out, err = download("--dir", str(cache.parent / "copy"))
    assert code == 2 and out == "" and f"nothing was copied into {cache.parent / 'copy'}" in err

    # Online, with the Hub unreachable (a firewalled network): the same answer from the cache, for that reason.
    import socket

    with socket.socket() as probe:  # a port nothing listens on: every connection is refused at once
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        patch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{closed}")
        code, out, err = download()
    assert (code, out) == (0, str(snapshot)) and "(the Hub could not be reached)" in err


@pytest.mark.parametrize("source", ["Caf0914/MedSIGHT@v1", f"{VISION_REPO}:{VISION_FILE}@v1"])
def test_download_refuses_two_different_revisions(source, capsys):
    """`download REPO@A --revision B` fetched A without a word about B."""
    from medsight.cli import main

    assert main(["download", source, "--revision", "v2"]) == 2
    err = capsys.readouterr().err
    assert "two revisions asked for: @v1" in err and "--revision v2" in err and "\n" not in err.strip()
    assert main(["download", source, "--revision", "v1", "--dir", "/nonexistent/never"]) == 2  # the same one: on
    assert "two revisions" not in capsys.readouterr().err


def test_download_and_cache_check_take_the_files_the_loader_loads(cache, golden, tmp_path):
    """The release layout was written three times: the download took `*.pt` checkpoints only and the cache check
    asked for them, while the loader also finds the .safetensors copies `medsight.model.unpickling` converts; a
    release of converted checkpoints loaded from a folder, but its download left them out and was called
    incomplete."""
    from medsight.model.hub import missing_from_cache, release_files
    from medsight.model.unpickling import convert_trusted
    from medsight_testing.release import write_release

    root = write_release(golden, tmp_path / "r", sharded=False)
    converted = []
    for pt in (root / "region_perceiver" / "0079280.pt", root / "unimed_clip_vit_l14.pt",
               root / "codebook" / "0035673.pt"):
        convert_trusted(pt, pt.with_suffix(".safetensors"))
        pt.unlink()
        converted.append(pt.with_suffix(".safetensors").relative_to(root).as_posix())
    chosen = release_files(list(folder_files(root)), codebook=True)
    assert set(converted) <= set(chosen)
    snapshot = cache_repo(cache, "Caf0914/MedSIGHT", {name: root / name for name in chosen})
    assert missing_from_cache(snapshot, codebook=True, vision=True) == []
    from_folder = load_model(root, device="cpu", base_config=golden_base_config(golden))
    downloaded = load_model(snapshot, device="cpu", base_config=golden_base_config(golden))
    for part in ("image_encoder", "region_perceiver", "codebook"):
        a, b = getattr(from_folder, part).state_dict(), getattr(downloaded, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


@pytest.mark.parametrize("checkpoints", [
    # The download kept the last name in plain sorted order, the loader the last by name without suffix ...
    ["region_perceiver/0079280.pt", "region_perceiver/0079280.b.pt"],
    ["region_perceiver/0079280.pt", "region_perceiver/0079280-1.safetensors"],
    ["codebook/0035673.pt", "codebook/0035673.1.pt", "codebook/0035673.safetensors"],
    # ... and matched across folders, where the loader searches one: it kept old/ and dropped what loads.
    ["region_perceiver/0079280.pt", "region_perceiver/old/0099999.pt"],
    # Where they agreed: the converted copy of the last step.
    ["region_perceiver/0040000.pt", "region_perceiver/0079280.pt", "region_perceiver/0079280.safetensors"],
])
def test_the_download_selects_the_checkpoint_the_loader_takes(tmp_path, checkpoints):
    from medsight.model.hub import LVLM_FOLDER, release_files
    from medsight.model.loading import _find_official_files

    lvlm = [f"{LVLM_FOLDER}/{name}" for name in ("config.json", "model.safetensors", "tokenizer_config.json",
                                                  "tokenizer.json")]
    for name in checkpoints + lvlm:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    downloaded = [f for f in release_files(checkpoints + lvlm, codebook=True) if f in checkpoints]
    found = _find_official_files(tmp_path)
    loaded = [found[part].relative_to(tmp_path).as_posix() for part in ("perceiver", "codebook") if found[part]]
    assert len(loaded) == 1 and downloaded == loaded


#: The release's checkpoint of each part, where the loader looks for it.
RELEASE_CHECKPOINTS = {"perceiver": "region_perceiver/0079280.pt", "vision": "unimed_clip_vit_l14.pt",
                       "codebook": "codebook/0035673.pt"}


@pytest.mark.parametrize("part, nested", [("perceiver", "region_perceiver/old/0099999.pt"),
                                          ("vision", "old/unimed_clip_vit_l14.pt"),
                                          ("codebook", "codebook/old/0035673.pt")])
def test_the_cache_check_and_the_download_ignore_checkpoints_where_the_loader_does_not_look(cache, tmp_path, part,
                                                                                            nested):
    """The offline cache check (and the download's selection) matched `*` across folders, where the loader searches
    one: a snapshot whose perceiver, vision file or codebook lay only in a subfolder was called complete and then
    failed to load, and a download fetched a 5 GB UniMed-CLIP copy from old/ that the loader never reads."""
    from medsight.model.hub import LVLM_FOLDER, missing_from_cache, release_files
    from medsight.model.loading import _find_official_files

    lvlm = [f"{LVLM_FOLDER}/{name}" for name in ("config.json", "model.safetensors", "tokenizer_config.json",
                                                  "tokenizer.json")]
    present = [name for p, name in RELEASE_CHECKPOINTS.items() if p != part] + [nested]
    for name in lvlm + present:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = _find_official_files(tmp_path)
    assert [p for p in RELEASE_CHECKPOINTS if found[p] is None] == [part]  # the loader does not see the nested file
    missing = missing_from_cache(tmp_path, codebook=True, vision=True)
    assert len(missing) == 1 and (str(UNIMED_CLIP) if part == "vision" else Path(nested).parts[0]) in missing[0]
    assert nested not in release_files(lvlm + present, codebook=True)


@pytest.mark.parametrize("cut_short", ["region_perceiver/0079280.pt",
                                       "medsight_full_instruct/model-00002-of-00002.safetensors"])
@pytest.mark.parametrize("how", ["still downloading", "blob deleted"])
def test_a_release_download_cut_short_says_what_the_cache_lacks(cache, release_dir, golden, cut_short, how):
    """A cached snapshot that lacks one of the release's files (huggingface_hub links it only once its blob is
    whole: until then there is a `.incomplete` blob; or the blob was deleted, leaving a dangling link) was called
    "neither our format nor the official layout" for the perceiver, and a missing shard was reported as a damaged
    release; `medsight download` said what the cache lacked and how to get it, and now the loader does too."""
    from medsight.model.hub import RELEASE_REPO

    snapshot = cache_repo(cache, RELEASE_REPO, folder_files(release_dir))
    link = snapshot / cut_short
    blob = link.resolve()
    if how == "still downloading":
        link.unlink()
        blob.rename(blob.with_name(blob.name + ".incomplete"))
    else:
        blob.unlink()
    expected = (rf"{RELEASE_REPO} at revision main: the local Hugging Face cache \(.*\) lacks "
                rf"{Path(cut_short).parent}/.*, and offline mode is on \(HF_HUB_OFFLINE=1\): run once without it")
    with pytest.raises(CheckpointError, match=expected):
        load_model(RELEASE_REPO, device="cpu", base_config=golden_base_config(golden))


def test_a_cached_repository_of_another_kind_is_not_called_a_release_cut_short(cache, unimed_file):
    """The UniMed-CLIP repository given as the model: its `*clip*` file is one a release may hold beside it, but
    no download of that repository would make it a model, so it is not called incomplete."""
    cache_repo(cache, VISION_REPO, {VISION_FILE: unimed_file})
    with pytest.raises(CheckpointError, match=r"neither our format \(medsight_config\.json\) nor the official layout"):
        load_model(VISION_REPO, device="cpu")


def test_a_release_of_pytorch_pickle_weights_downloads_them_and_one_of_both_formats_only_the_safetensors(
        cache, release_dir, tmp_path):
    """The download selected `model*.safetensors` only, so a repository saved with pytorch_model*.bin (which the
    loader reads) downloaded without weights; where a folder has both formats, the loader reads the safetensors and
    the download must not fetch the same weights twice."""
    from medsight.model.hub import RELEASE_REPO, missing_from_cache, release_files

    files = folder_files(release_dir)
    lvlm = "medsight_full_instruct/"
    safetensors = {name for name in files if name.startswith(lvlm + "model")}
    pickles = {lvlm + "pytorch_model-00001-of-00002.bin", lvlm + "pytorch_model-00002-of-00002.bin",
               lvlm + "pytorch_model.bin.index.json"}
    assert safetensors and safetensors <= set(release_files(list(files)))
    both = release_files([*files, *pickles])
    assert safetensors <= set(both) and not pickles & set(both)
    only_pickles = [name for name in files if name not in safetensors] + sorted(pickles)
    assert pickles <= set(release_files(only_pickles))
    index = tmp_path / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"weight_map": {"lm_head.weight": "pytorch_model-00001-of-00002.bin",
                                                "model.norm.weight": "pytorch_model-00002-of-00002.bin"}}))
    contents = {**files, lvlm + index.name: index}
    snapshot = cache_repo(cache, RELEASE_REPO, {name: contents.get(name, 1) for name in only_pickles})
    assert missing_from_cache(snapshot) == []
    (snapshot / lvlm / "pytorch_model-00002-of-00002.bin").unlink()
    assert missing_from_cache(snapshot) == [lvlm + "pytorch_model-00002-of-00002.bin"]


def test_a_short_commit_hash_offline_names_the_full_hash_the_cache_holds(cache, release_dir, unimed_file, capsys):
    """huggingface_hub resolves a revision offline only by a ref or the full hash, so a short hash (as git shows it)
    of a cached snapshot was called 'not in the local Hugging Face cache' (the cache holding it 'at main'): the user
    is told it is a short hash and which full hash to pass."""
    from medsight.cli import main
    from medsight.model.hub import RELEASE_REPO

    commit = "3f2a9c1b" + "7" * 32
    cache_repo(cache, RELEASE_REPO, release_needed(release_dir), commit=commit)
    cache_repo(cache, VISION_REPO, {VISION_FILE: unimed_file}, commit=commit)
    short = commit[:7]
    with pytest.raises(CheckpointError, match=rf"at revision {short}: a short commit hash, which only the Hub "
                                              rf"resolves, .* holds commit {commit}: pass the full 40-character hash "
                                              rf"\({RELEASE_REPO}@{commit}\)"):
        load_model(f"{RELEASE_REPO}@{short}", device="cpu")
    assert main(["download", "--revision", short.upper()]) == 2
    assert f"holds commit {commit}: pass the full" in capsys.readouterr().err
    assert main(["download", f"{VISION_REPO}:{VISION_FILE}@{short}"]) == 2
    assert f"the cache holds commit {commit}, pass the full 40-character hash" in capsys.readouterr().err
    # The full hash loads; a short-hash-like revision the cache does not abbreviate gets the hint alone.
    assert main(["download", "--revision", commit]) == 0
    assert main(["download", "--revision", "abcdef1"]) == 2
    err = capsys.readouterr().err
    assert "not in the local Hugging Face cache" in err and "if abcdef1 is a short commit hash" in err


@pytest.mark.parametrize("weights", ["model-{:05d}-of-{:05d}.safetensors", "pytorch_model-{:05d}-of-{:05d}.bin"])
def test_a_sharded_download_cut_short_before_its_index_says_which_shard_the_cache_lacks(cache, release_dir, golden,
                                                                                        weights):
    """A snapshot holding the first shard but neither the index nor the last shard (the download cut short before
    both had arrived) was called complete by the cache check; the loader then read the shards it found and said
    the weights did not fit the model (missing key(s) lm_head.weight, ...). The shards' names count them: the
    missing one is named, by the cache check and by the loader reading a folder."""
    from medsight.model.hub import LVLM_FOLDER, RELEASE_REPO, missing_from_cache

    lvlm = f"{LVLM_FOLDER}/"
    others = {k: v for k, v in release_needed(release_dir).items()
              if not Path(k).name.startswith(("model", "pytorch_model"))}
    count = len(list((release_dir / LVLM_FOLDER).glob("model-*.safetensors")))
    assert count > 1  # the fixture's LVLM is sharded
    shards = [lvlm + weights.format(i, count) for i in range(1, count + 1)]
    snapshot = cache_repo(cache, RELEASE_REPO, {**others, shards[0]: 1})
    assert missing_from_cache(snapshot) == shards[1:]
    with pytest.raises(CheckpointError, match=rf"cache \(.*\) lacks {', '.join(shards[1:])}, and offline mode"):
        load_model(RELEASE_REPO, device="cpu", base_config=golden_base_config(golden))


def test_a_revision_that_is_the_folder_of_cached_branches_is_called_not_cached(cache, release_dir, capsys):
    """The cache keeps branch feature/x as refs/feature/x: offline, revision `feature` ended in 'medsight: error:
    .../refs/feature: Is a directory' (huggingface_hub read the folder as a ref), naming neither the revision nor
    what the cache holds."""
    from medsight.cli import main
    from medsight.model.hub import RELEASE_REPO

    cache_repo(cache, RELEASE_REPO, release_needed(release_dir), commit=COMMIT, ref=None)
    ref = repo_folder(cache, RELEASE_REPO) / "refs" / "feature" / "x"
    ref.parent.mkdir(parents=True)
    ref.write_text(COMMIT)
    assert main(["download", "--revision", "feature/x"]) == 0
    assert main(["download", "--revision", "feature"]) == 2
    err = capsys.readouterr().err
    assert (f"{RELEASE_REPO} at revision feature: not in the local Hugging Face cache" in err
            and "the cache holds it at revision(s) feature/x" in err)
