"""`medsight download` and hub-id loading against a local server speaking the Hub's API, with the real
`huggingface_hub` client: only the chosen layout's files are fetched, sizes are shown first, with progress bars."""

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medsight.model.hub import UNIMED_CLIP, release_files
from medsight_testing.disk import file_size_limit
from medsight_testing.fake_hub import FakeRepo, serve_hub
from medsight_testing.hub_cache import folder_files
from medsight_testing.unimed_clip import save_like_numpy1, unimed_clip_checkpoint

GIB = 2**30
# Files a release repository may hold that no layout needs; declared with their size, never served.
OTHERS = {"region_perceiver/0040000.pt": 2 * GIB, "medsight_full_instruct/optimizer.pt": 3 * GIB,
          "medsight_full_instruct/training_args.bin": GIB, "stage3/mm_projector.bin": GIB}


@pytest.fixture
def repos(release_dir, golden, tmp_path) -> dict[str, FakeRepo]:
    files = {k: v for k, v in folder_files(release_dir).items() if "clip" not in k}  # the release ships no tower
    clip = torch.load(golden / "vision_encoder_clip.pt", weights_only=True)
    visual = {k[len("visual."):]: v for k, v in clip.items() if k.startswith("visual.")}
    vision = save_like_numpy1(unimed_clip_checkpoint(visual, {"w": torch.randn(8, 8)}), tmp_path / "u.pt")
    return {"Caf0914/MedSIGHT": FakeRepo({**files, **OTHERS}, license="apache-2.0"),
            UNIMED_CLIP.repo_id: FakeRepo({UNIMED_CLIP.filename: vision, "unimed_clip_vit_b16.pt": 2 * GIB},
                                          commit="d" * 40, license=UNIMED_CLIP.licence.lower())}


def run(hub, cache: Path, args: list[str], stdin=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(cache),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("HF_TOKEN", None)
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300,
                          stdin=stdin)


def needed(repos, codebook=False) -> set[str]:
    return set(release_files(list(repos["Caf0914/MedSIGHT"].files), codebook))


@pytest.mark.slow
def test_download_fetches_only_the_layout_and_shows_sizes_first(repos, tmp_path):
    layout = needed(repos)
    assert layout and not layout & set(OTHERS) and not any("codebook" in f for f in layout)
    with serve_hub(repos) as hub:
        out = run(hub, tmp_path / "hub", ["-m", "medsight.cli", "download"])
    assert out.returncode == 0, out.stderr
    assert set(hub.downloads) == layout and set(hub.requested) == layout
    snapshot = Path(out.stdout.strip().splitlines()[-1])
    assert set(folder_files(snapshot)) == layout
    # Sizes before the download: a head line with count and total, then one line per file; then progress bars.
    err = out.stderr
    total = sum(repos["Caf0914/MedSIGHT"].size(f) for f in layout)
    head = f"Caf0914/MedSIGHT at main, licence apache-2.0: {len(layout)} file(s), {total / 1e6:.2f} MB"
    assert head in err, err
    shard = "medsight_full_instruct/model-00001-of-00002.safetensors"
    size = repos["Caf0914/MedSIGHT"].size(shard)
    assert f"{size / 1e6:.2f} MB  {shard}" in err or f"{size / 1e3:.2f} kB  {shard}" in err
    assert f"Fetching {len(layout)} files" in err and "100%" in err
    assert err.index(head) < err.index("Fetching")


@pytest.mark.slow
def test_download_codebook_and_vision_only_on_request_into_a_folder(repos, tmp_path):
    layout = needed(repos, codebook=True)
    assert any("codebook" in f for f in layout)
    target = tmp_path / "medsight"
    with serve_hub(repos) as hub:
        out = run(hub, tmp_path / "hub", ["-m", "medsight.cli", "download", "--codebook", "--fetch-vision",
                                          "--dir", str(target)])
    assert out.returncode == 0, out.stderr
    assert set(hub.downloads) == layout | {UNIMED_CLIP.filename}
    assert f"{UNIMED_CLIP} (licence CC-BY-NC-4.0)" in out.stderr
    # One self-contained folder in the release layout, the vision file where the loader looks for `*clip*.pt`.
    files = {k for k in folder_files(target) if not k.startswith(".cache/")}
    assert files == layout | {UNIMED_CLIP.filename}


@pytest.mark.slow
def test_large_download_asks_first_on_a_terminal(repos, tmp_path):
    primary, secondary = pty.openpty()
    os.write(primary, b"n\n")
    try:
        with serve_hub(repos) as hub:
            out = run(hub, tmp_path / "hub", ["-m", "medsight.cli", "download", "--confirm-above", "0"],
                      stdin=secondary)
    finally:
        os.close(primary)
        os.close(secondary)
    assert out.returncode == 1 and "nothing downloaded" in out.stderr
    assert hub.downloads == []


LOAD = """
import sys
from pathlib import Path
from medsight.model.loading import load_model
from medsight_testing.golden import golden_base_config
base = golden_base_config(Path(sys.argv[1]))
model = load_model("Caf0914/MedSIGHT", device="cpu", base_config=base, fetch_vision="--fetch-vision" in sys.argv)
print(float(model.image_encoder.conv1.weight.double().sum()))
"""


@pytest.mark.slow
def test_hub_id_fetches_the_layout_and_the_vision_file_only_with_fetch_vision(repos, tmp_path, golden):
    with serve_hub(repos) as hub:
        refused = run(hub, tmp_path / "hub", ["-c", LOAD, str(golden)])
        assert refused.returncode != 0
        assert f"{UNIMED_CLIP.filename} (4.97 GB) from Hugging Face repository {UNIMED_CLIP.repo_id}, licence " \
               f"CC-BY-NC-4.0" in refused.stderr
        assert UNIMED_CLIP.filename not in hub.downloads
        loaded = run(hub, tmp_path / "hub", ["-c", LOAD, str(golden), "--fetch-vision"])
    assert loaded.returncode == 0, loaded.stderr
    assert set(hub.downloads) == needed(repos) | {UNIMED_CLIP.filename}
    expected = torch.load(golden / "vision_encoder_clip.pt", weights_only=True)["visual.conv1.weight"]
    assert float(loaded.stdout.strip().splitlines()[-1]) == pytest.approx(float(expected.double().sum()))


LOAD_OFFLINE = """
import sys
from pathlib import Path
from medsight.model.loading import load_model
from medsight_testing.golden import golden_base_config
model = load_model(sys.argv[2], device="cpu", base_config=golden_base_config(Path(sys.argv[1])))
print(model.weights_source)
"""


@pytest.mark.slow
def test_a_revision_downloaded_with_revision_loads_offline(repos, tmp_path, golden):
    """`download --revision v1.0` caches refs/v1.0; offline a model source found only main, and could name no other."""
    with serve_hub(repos) as hub:
        out = run(hub, tmp_path / "hub", ["-m", "medsight.cli", "download", "--revision", "v1.0", "--fetch-vision"])
    assert out.returncode == 0, out.stderr
    assert "Caf0914/MedSIGHT at v1.0" in out.stderr
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "PYTHONPATH": os.pathsep.join(sys.path)}
    load = [sys.executable, "-c", LOAD_OFFLINE, str(golden)]
    loaded = subprocess.run([*load, "Caf0914/MedSIGHT@v1.0"], env=env, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip().splitlines()[-1] == "Caf0914/MedSIGHT@v1.0"
    main = subprocess.run([*load, "Caf0914/MedSIGHT"], env=env, capture_output=True, text=True, timeout=300)
    assert main.returncode != 0
    assert "Caf0914/MedSIGHT at revision main: not in the local Hugging Face cache" in main.stderr
    assert "the cache holds it at revision(s) v1.0: pass Caf0914/MedSIGHT@REVISION" in main.stderr
    # The download command takes the same spelling, and offline finds that revision complete in the cache.
    again = subprocess.run([sys.executable, "-m", "medsight.cli", "download", "Caf0914/MedSIGHT@v1.0"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "holds everything needed" in again.stderr, again.stderr
    assert Path(again.stdout.strip()) == Path(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_download_into_a_folder_keeps_the_users_own_files_unless_overwrite(repos, tmp_path):
    """--dir holding a file of the release that no download put there (the user's fine-tuned weights, an edited
    config) is refused before anything is fetched: the Hub client deleted it and put the Hub's copy in its place.
    Files an earlier download put there (a rerun, a resumed download) are no reason to refuse."""
    target = tmp_path / "medsight"
    config = next(f for f in sorted(needed(repos)) if f.endswith("config.json"))
    own = b'{"edited": "by the user"}'
    (target / config).parent.mkdir(parents=True)
    (target / config).write_bytes(own)
    with serve_hub(repos) as hub:
        refused = run(hub, tmp_path / "hub", ["-m", "medsight.cli", "download", "--dir", str(target)])
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.strip().splitlines()[-1] == (
            f"medsight: error: --dir {target} already holds {config}, not as a download left it: pass --overwrite "
            "to replace it, or choose another folder")
        assert hub.downloads == [] and (target / config).read_bytes() == own
        (target / config).unlink()
        first = run(hub, tmp_path / "hub", ["-m", "medsight.cli", "download", "--dir", str(target)])
        again = run(hub, tmp_path / "hub", ["-m", "medsight.cli", "download", "--dir", str(target)])
        (target / config).write_bytes(own)
        (target / ".cache/huggingface/download" / f"{config}.metadata").unlink()
        replaced = run(hub, tmp_path / "hub", ["-m", "medsight.cli", "download", "--dir", str(target),
                                               "--overwrite"])
    assert (first.returncode, again.returncode, replaced.returncode) == (0, 0, 0), (again.stderr, replaced.stderr)
    assert (target / config).read_bytes() == repos["Caf0914/MedSIGHT"].body(config)


@pytest.mark.slow
@pytest.mark.parametrize("into", ["cache", "dir"])
def test_a_full_disk_during_download_names_what_and_where_and_a_second_run_completes(repos, tmp_path, into):
    """A write failing midway (a full disk) ended `medsight download` with 'medsight: error: File too large' (or 'No
    space left on device'): no file, no folder, no word of what to do. Now it names the repository, the folder
    written into and the download's size; the run after it completes the download."""
    cache = tmp_path / "hub"
    folder = tmp_path / "copy"
    args = ["-m", "medsight.cli", "download", *(["--dir", str(folder)] if into == "dir" else [])]
    layout = needed(repos)
    sizes = [repos["Caf0914/MedSIGHT"].size(f) for f in layout]
    with serve_hub(repos) as hub:
        with file_size_limit(max(sizes) // 2):  # the largest file cannot be written whole
            out = run(hub, cache, args)
        assert out.returncode == 2 and out.stdout == ""
        where = folder if into == "dir" else cache
        assert (f"medsight: error: Hugging Face repository Caf0914/MedSIGHT at revision main: the download stopped "
                f"writing into {where} (File too large; the download is {sum(sizes) / 1e6:.2f} MB in all): make room "
                "there") in out.stderr and "Traceback" not in out.stderr
        again = run(hub, cache, args)
    assert again.returncode == 0, again.stderr
    assert layout <= set(folder_files(Path(again.stdout.strip())))
