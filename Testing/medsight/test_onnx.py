"""ONNX export of the vision encoder and the Region Perceiver, and parity of the onnxruntime backend with PyTorch."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from medsight.config import MedSIGHTConfig
from medsight.model.loading import load_model
from medsight.onnx_backend import OnnxVisionBackend
from medsight.onnx_export import MANIFEST_FORMAT, export_onnx


def torch_decode(model, grid: torch.Tensor, queries: torch.Tensor, mask: torch.Tensor):
    """The PyTorch reference decode (no autograd)."""
    with torch.inference_mode():
        return model.region_perceiver.decode(grid, queries, mask)


def assert_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """max |got - ref| <= 1e-4 * max |ref| + 1e-5 (the issue's parity bound)."""
    assert got.shape == ref.shape
    diff = (got.float() - ref.float()).abs().max().item()
    bound = 1e-4 * ref.abs().max().item() + 1e-5
    assert diff <= bound, f"max abs diff {diff:.3g} > {bound:.3g}"


@pytest.fixture(scope="module")
def model():
    return load_model("tiny", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory) -> dict[str, Path]:
    """The TorchScript fallback exporter (about 1 s); the dynamo default (about 20 s) is checked once below."""
    return export_onnx(model, tmp_path_factory.mktemp("onnx_torchscript"), exporter="torchscript")


@pytest.fixture(scope="module")
def backend(exported) -> OnnxVisionBackend:
    return OnnxVisionBackend(exported["manifest"].parent, providers=["CPUExecutionProvider"])


def test_export_writes_three_graphs_and_a_manifest(exported, model):
    for name in ("vision_encoder", "perceiver_encode", "perceiver_decode", "manifest"):
        assert exported[name].is_file()
    manifest = json.loads(exported["manifest"].read_text())
    assert manifest["opset"] >= 17
    assert MedSIGHTConfig.from_dict(manifest["config"]) == model.config
    assert manifest["graphs"]["perceiver_decode"]["inputs"] == ["grid", "codes", "query_mask"]
    assert manifest["position_encoding"] == "constant"
    assert len({g["exporter"] for g in manifest["graphs"].values()}) == 1


def test_opset_below_17_is_refused(model, tmp_path):
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, tmp_path, opset=16)


@pytest.mark.parametrize("batch", [1, 3])
def test_encode_matches_pytorch(model, backend, batch):
    pixels = torch.randn(batch, 3, 56, 56, generator=torch.Generator().manual_seed(batch))
    ref = model.encode(pixels)
    got = backend.encode(pixels)
    for field in ("cls", "patches", "grid", "region_tokens"):
        assert_close(getattr(got, field), getattr(ref, field))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("codes", [1, 4])
def test_decode_matches_pytorch_with_padding(model, backend, batch, codes):
    gen = torch.Generator().manual_seed(10 * batch + codes)
    grid = model.encode(torch.randn(batch, 3, 56, 56, generator=gen)).grid
    queries = torch.randn(batch, codes, 48, generator=gen)
    mask = torch.ones(batch, codes, dtype=torch.bool)
    if codes > 1:
        mask[0, codes // 2 :] = False  # the first sample is padded
    ref_seg, ref_cls = torch_decode(model, grid, queries, mask)
    seg, cls = backend.decode(grid, queries, mask)
    assert seg.shape == (batch, codes, 32, 32)
    assert_close(seg, ref_seg)
    assert_close(cls, ref_cls)
    if codes > 1:
        # Padding never changes a real query's mask, in the graph too.
        alone, _ = backend.decode(grid[:1], queries[:1, : codes // 2])
        assert_close(alone[0], seg[0, : codes // 2])


def test_decode_regions_matches_the_model(model, backend):
    gen = torch.Generator().manual_seed(7)
    grids = model.encode(torch.randn(3, 3, 56, 56, generator=gen)).grid
    hidden = model.config.llm.hidden_size
    states = [torch.randn(2, hidden, generator=gen), torch.randn(0, hidden), torch.randn(4, hidden, generator=gen)]
    ref = model.decode_regions(grids, states)
    got = model.decode_regions(grids, states, backend.region_decode)  # what the Engine runs with the backend
    assert [tuple(r.shape) for r in got] == [tuple(r.shape) for r in ref]
    for g, r in zip(got, ref, strict=True):
        if r.numel():
            assert_close(g, r)


def test_a_model_on_the_sdpa_kernel_exports_graphs_that_match_pytorch(tmp_path):
    """`Engine.load` puts the perceiver on the sdpa kernel, whose fix-up of fully blocked rows is a Python branch on
    the data: traced as is, the example input's branch would be frozen into the graphs. Exported from such a model,
    the graphs still match PyTorch on other inputs, and the model keeps its kernel."""
    model = load_model("tiny", device="cpu", dtype=torch.float32)
    model.region_perceiver.attention_implementation = "sdpa"
    export_onnx(model, tmp_path, exporter="torchscript")
    assert model.region_perceiver.attention_implementation == "sdpa"
    backend = OnnxVisionBackend(tmp_path, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    size, dim = model.config.vision.image_size, model.config.perceiver.dim
    pixels = torch.randn(2, 3, size, size, generator=gen)
    ref = model.encode(pixels)
    assert_close(backend.encode(pixels).region_tokens, ref.region_tokens)
    queries = torch.randn(2, 3, dim, generator=gen)
    ref_seg, _ = torch_decode(model, ref.grid, queries, torch.ones(2, 3, dtype=torch.bool))
    seg, _ = backend.decode(ref.grid, queries)
    assert_close(seg, ref_seg)


def test_dynamo_export_matches_pytorch(model, tmp_path):
    paths = export_onnx(model, tmp_path, optimize=False)  # exporter="auto": dynamo first
    manifest = json.loads(paths["manifest"].read_text())
    assert {g["exporter"] for g in manifest["graphs"].values()} == {"dynamo"}
    backend = OnnxVisionBackend(tmp_path, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(3)
    pixels = torch.randn(3, 3, 56, 56, generator=gen)
    ref, got = model.encode(pixels), backend.encode(pixels)
    for field in ("cls", "patches", "region_tokens"):
        assert_close(getattr(got, field), getattr(ref, field))
    queries = torch.randn(3, 4, 48, generator=gen)
    mask = torch.tensor([[True, True, False, False], [True] * 4, [True, False, False, False]])
    ref_seg, _ = torch_decode(model, ref.grid, queries, mask)
    seg, _ = backend.decode(ref.grid, queries, mask)
    assert_close(seg, ref_seg)


def test_engine_with_the_onnx_backend_answers_like_pytorch(tmp_path):
    """The Engine's ONNX Runtime path: same tokens and masks within 1e-4 of the PyTorch path."""
    import numpy as np

    import medsight
    from medsight.cli import main as cli_main
    from medsight.model.generation import GenerationOptions

    assert cli_main(["export-onnx", "--model", "tiny", "--out", str(tmp_path / "onnx"),
                     "--exporter", "torchscript"]) == 0
    torch_engine = medsight.Engine.load("tiny", device="cpu", dtype=torch.float32)
    onnx_engine = medsight.Engine.load("tiny", device="cpu", dtype=torch.float32, onnx_dir=str(tmp_path / "onnx"))
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (60, 48, 3), dtype=np.uint8) for _ in range(3)]
    options = GenerationOptions(max_new_tokens=6, no_code_fallback=True)
    ours = torch_engine.ask(images, "Segment the liver.", options)
    theirs = onnx_engine.ask(images, "Segment the liver.", options)
    regions = 0
    for a, b in zip(ours, theirs, strict=True):
        assert a.token_ids == b.token_ids
        for ra, rb in zip(a.regions, b.regions, strict=True):
            tol = 1e-4 * float(ra.mask_logits.abs().max()) + 1e-5
            assert float((ra.mask_logits - rb.mask_logits).abs().max()) <= tol
            regions += 1
    assert regions > 0


def test_onnx_backend_with_a_mask_decode_dtype_is_refused(model, backend):
    """The ONNX perceiver decodes in float32: asking for another mask-decode dtype as well is a clear error, not
    a setting silently ignored."""
    import medsight

    with pytest.raises(ValueError, match=r"mask_decode_dtype .* ONNX backend"):
        medsight.Engine(model, vision_backend=backend, mask_decode_dtype=torch.bfloat16)
    assert medsight.Engine(model, vision_backend=backend).mask_decode == backend.region_decode


def test_an_export_of_other_weights_is_refused(model, backend):
    """A stale export (same config, weights of another training run) must never run silently: the Engine refuses
    it, and takes the export of its own weights in any dtype (the graphs run float32)."""
    import copy

    import medsight
    from medsight.model.loading import build_model

    other = build_model(model.config, model.tokenizer, seed=1)
    with pytest.raises(ValueError, match=r"other weights.*export-onnx"):
        medsight.Engine(other, vision_backend=backend)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        medsight.Engine(copy.deepcopy(model).to(dtype), vision_backend=backend)


def test_an_export_of_another_model_is_refused(backend, exported, tmp_path):
    """The demo model with the tiny model's graphs: a clear error naming what differs, not an onnxruntime shape
    error at the first ask; an export without the weights record (older format) is refused the same way."""
    import shutil

    import medsight

    with pytest.raises(ValueError, match=r"image_size"):
        medsight.Engine.load("demo", device="cpu", dtype=torch.float32, onnx_dir=str(exported["manifest"].parent))
    old = tmp_path / "old"
    shutil.copytree(exported["manifest"].parent, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["weights_fingerprint"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"export-onnx"):
        medsight.Engine.load("tiny", device="cpu", dtype=torch.float32, onnx_dir=str(old))


def test_missing_onnx_packages_are_named(exported, tmp_path, monkeypatch, capsys):
    """Without the `onnx` extra: an error naming the missing package and how to install it, not a traceback from
    deep inside torch.onnx (export) or onnxruntime's import (backend)."""
    import sys

    from medsight.cli import main as cli_main

    monkeypatch.setitem(sys.modules, "onnx", None)  # what an environment without the package imports
    assert cli_main(["export-onnx", "--model", "tiny", "--out", str(tmp_path / "onnx")]) == 2
    assert "needs onnx: pip install 'medsight[onnx]'" in capsys.readouterr().err
    assert not (tmp_path / "onnx").exists()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ValueError, match=r"needs onnxruntime: pip install 'medsight\[onnx\]'"):
        OnnxVisionBackend(exported["manifest"].parent)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_an_interrupted_overwrite_leaves_the_old_export_whole(model, exported, tmp_path, monkeypatch):
    """Overwriting an export with another model's and stopping after its first graph (Ctrl-C during a long export)
    leaves the old export as it was, usable by the model it came from, and no half-written files: the new graphs are
    written aside and renamed into place only once all are complete (the old manifest was deleted at the start, so
    the folder was refused and the user had to export again)."""
    import shutil

    import medsight
    from medsight import onnx_export
    from medsight.model.loading import build_model

    folder = tmp_path / "onnx"
    shutil.copytree(exported["manifest"].parent, folder)
    before = _snapshot(folder)
    real_export_one, calls = onnx_export._export_one, []

    def interrupted(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(args[1])
        return real_export_one(*args, **kwargs)

    monkeypatch.setattr(onnx_export, "_export_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(build_model(model.config, model.tokenizer, seed=1), folder, exporter="torchscript")
    assert calls == ["vision_encoder"]
    assert _snapshot(folder) == before
    medsight.Engine(model, vision_backend=OnnxVisionBackend(folder, providers=["CPUExecutionProvider"]))


def test_an_overwrite_never_writes_into_the_old_files(model, exported, tmp_path):
    """onnxruntime maps a graph's .data file into a running engine's memory: an export writing into the old files
    would change (or, shorter, crash) the weights that engine computes with. Every file is replaced by a new one, so
    what a holder of the old files (here hard links, which share the file as a mapping does) reads is unchanged,
    while the folder holds the new export."""
    import os
    import shutil

    from medsight.model.loading import build_model
    from medsight.onnx_export import LOCK_FILE

    folder, held = tmp_path / "onnx", tmp_path / "held"
    shutil.copytree(exported["manifest"].parent, folder)
    held.mkdir()
    for path in folder.iterdir():
        os.link(path, held / path.name)
    before = _snapshot(held)
    export_onnx(build_model(model.config, model.tokenizer, seed=1), folder, exporter="torchscript")
    assert _snapshot(held) == before
    changed = [name for name, data in _snapshot(folder).items() if data != before[name]]
    assert sorted(changed) == sorted(name for name in before if name != LOCK_FILE)  # the lock: no export file


def test_a_graph_from_another_export_is_refused_naming_it(model, exported, tmp_path):
    """Another export of the same config (other weights) has graph files of the same names, inputs and outputs: one
    of them copied in passed every check (config and weights fingerprint are the manifest's) and the engine drew
    masks with the other model's perceiver. Refused at load, naming the file."""
    import shutil

    from medsight.model.loading import build_model

    other = export_onnx(build_model(model.config, model.tokenizer, seed=1), tmp_path / "other",
                        exporter="torchscript")
    folder = tmp_path / "onnx"
    shutil.copytree(exported["manifest"].parent, folder)
    shutil.copy(other["perceiver_decode"], folder / "perceiver_decode.onnx")
    with pytest.raises(ValueError, match=r"perceiver_decode\.onnx is not the file this export wrote.*export-onnx"):
        OnnxVisionBackend(folder, providers=["CPUExecutionProvider"])


def test_an_earlier_exports_weights_file_is_removed(model, exported, tmp_path):
    """A graph past 1 GiB (the full model's ViT) keeps its weights in vision_encoder.onnx.data; re-exported as a
    graph with its weights inside (another model, another exporter), the old .data file (1.2 GB for the full model)
    stayed in the folder, read by nothing."""
    import shutil

    folder = tmp_path / "onnx"
    shutil.copytree(exported["manifest"].parent, folder)
    (folder / "vision_encoder.onnx.data").write_bytes(bytes(1 << 10))  # what such an earlier export left
    export_onnx(model, folder, exporter="torchscript")
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in exported["manifest"].parent.iterdir())
    OnnxVisionBackend(folder, providers=["CPUExecutionProvider"])


def test_the_files_of_an_export_killed_midway_are_removed_by_the_next(model, exported, tmp_path):
    """A killed export (SIGKILL, power loss) cannot clean up its hidden folder of half-written graphs, 2.4 GB for the
    full model; the next export into that folder removes it."""
    import shutil

    from medsight.onnx_export import STAGING_PREFIX

    folder = tmp_path / "onnx"
    shutil.copytree(exported["manifest"].parent, folder)
    leftover = folder / f"{STAGING_PREFIX}killed"
    leftover.mkdir()
    shutil.copy(exported["vision_encoder"], leftover)
    export_onnx(model, folder, exporter="torchscript")
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in exported["manifest"].parent.iterdir())


#: A child process holding the export lock the way an export does: "ready" once loaded, then on a line from the
#: parent it tries the lock, prints "won" (and holds it until its stdin closes) or "refused".
LOCK_HOLDER = """
import importlib.util, pathlib, sys
spec = importlib.util.spec_from_file_location("folder_lock", sys.argv[1])
folder_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(folder_lock)
print("ready", flush=True)
sys.stdin.readline()
try:
    with folder_lock.hold_lock(pathlib.Path(sys.argv[2])):
        print("won", flush=True)
        sys.stdin.read()
except folder_lock.LockHeldError:
    print("refused", flush=True)
"""


def _lock_holder(lock: Path):
    """A started `LOCK_HOLDER` over `lock`, loaded and waiting for the line that makes it try the lock."""
    import subprocess
    import sys

    from medsight import folder_lock

    child = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, folder_lock.__file__, str(lock)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "ready\n"
    return child


def _try_lock(children) -> list[str]:
    """Let every child try the lock at once; what each says."""
    for child in children:
        child.stdin.write("go\n")
        child.stdin.flush()
    return [child.stdout.readline().strip() for child in children]


def _end(child) -> None:
    child.stdin.close()
    child.wait()


def test_an_export_into_a_folder_another_export_is_writing_is_refused(model, exported, tmp_path):
    """Two exports into one folder: the second deleted every hidden working folder there as a killed export's
    leftover, the first's included while it was still writing it. Now the lock a running export holds (another
    process, holding it as an export does) refuses the second, naming the holder, and the first's folder stays."""
    import shutil

    from medsight.onnx_export import LOCK_FILE, STAGING_PREFIX

    folder = tmp_path / "onnx"
    shutil.copytree(exported["manifest"].parent, folder)
    writing = folder / f"{STAGING_PREFIX}running"
    writing.mkdir()
    shutil.copy(exported["vision_encoder"], writing)
    holder = _lock_holder(folder / LOCK_FILE)
    try:
        assert _try_lock([holder]) == ["won"]
        with pytest.raises(ValueError, match=rf"another export is writing to .*onnx \(process {holder.pid}@.*"
                                             rf"{re.escape(LOCK_FILE)} stays"):
            export_onnx(model, folder, exporter="torchscript")
        assert [p.name for p in writing.iterdir()] == [exported["vision_encoder"].name]
    finally:
        _end(holder)


@pytest.mark.skipif(not hasattr(os, "waitid"), reason="os.waitid (POSIX) tells a killed child's end without reaping it")
def test_the_lock_of_a_killed_export_is_taken_without_deleting_it(model, exported, tmp_path):
    """A killed export leaves its lock file: the next export takes it, with no one deleting it, removes the killed
    one's working folder and writes the export. The killed process is not yet reaped, so its pid still names a
    process: the lock of before, which guessed from the pid whether its holder had ended, refused here (as after a
    reboot or a pid reused by another program) and asked for the file to be deleted by hand."""
    import shutil
    import signal

    from medsight.onnx_export import LOCK_FILE, STAGING_PREFIX

    folder = tmp_path / "onnx"
    shutil.copytree(exported["manifest"].parent, folder)
    (folder / f"{STAGING_PREFIX}killed").mkdir()
    holder = _lock_holder(folder / LOCK_FILE)
    assert _try_lock([holder]) == ["won"]
    holder.send_signal(signal.SIGKILL)
    os.waitid(os.P_PID, holder.pid, os.WEXITED | os.WNOWAIT)  # ended, not reaped
    try:
        assert (folder / LOCK_FILE).read_text().startswith(f"{holder.pid}@")
        export_onnx(model, folder, exporter="torchscript")
    finally:
        holder.wait()
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in exported["manifest"].parent.iterdir())
    assert (folder / LOCK_FILE).read_text().startswith(f"{os.getpid()}@")


@pytest.mark.parametrize("racers", [2, 3])
def test_processes_racing_for_a_killed_holders_lock_one_wins(tmp_path, racers):
    """Processes that find the same ended holder's lock at once: exactly one gets it (the lock of before let each
    that saw the holder gone replace the file, so two could both hold it). Each round starts over the lock file the
    previous holder left when it was killed."""
    from medsight.onnx_export import LOCK_FILE

    lock = tmp_path / LOCK_FILE
    first = _lock_holder(lock)
    assert _try_lock([first]) == ["won"]
    first.kill()
    _end(first)
    rounds = 3
    for _ in range(rounds):
        children = [_lock_holder(lock) for _ in range(racers)]
        said = _try_lock(children)
        winners = [child for child, word in zip(children, said, strict=True) if word == "won"]
        assert (len(winners), said.count("refused")) == (1, racers - 1), said
        assert lock.read_text().startswith(f"{winners[0].pid}@")
        winners[0].kill()
        for child in children:
            _end(child)


def _damage_manifest(edit):
    def damage(folder: Path) -> None:
        path = folder / "manifest.json"
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return damage


def _tear(name: str):
    """Keep the first half of a file, as a copy or a write stopped midway does."""
    def damage(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    return damage


def _replace_vision_graph_by_encode(folder: Path) -> None:
    (folder / "vision_encoder.onnx").write_bytes((folder / "perceiver_encode.onnx").read_bytes())


FOLDER_DAMAGE = {
    "a graph is missing": (lambda f: (f / "perceiver_decode.onnx").unlink(), r"lacks perceiver_decode\.onnx"),
    "a graph is torn": (_tear("perceiver_encode.onnx"), r"perceiver_encode\.onnx cannot be loaded"),
    "a graph is another graph": (_replace_vision_graph_by_encode, r"vision_encoder\.onnx is not the vision_encoder"),
    "the manifest is torn": (_tear("manifest.json"), r"manifest\.json is not a readable manifest"),
    "the manifest is of another format": (_damage_manifest(lambda m: {**m, "format": "medsight-onnx/3"}),
                                          rf"format 'medsight-onnx/3', this medsight reads '{MANIFEST_FORMAT}'"),
    # An export of the version before "files" was required: the format check names it (it was "lacks files").
    "the manifest is of the older format": (
        _damage_manifest(lambda m: {**{k: v for k, v in m.items() if k != "files"}, "format": "medsight-onnx/1"}),
        rf"format 'medsight-onnx/1', this medsight reads '{MANIFEST_FORMAT}'"),
    "the manifest is not an object": (_damage_manifest(lambda m: [m]), r"format None"),
    "the manifest lacks its graphs": (_damage_manifest(lambda m: {k: v for k, v in m.items() if k != "graphs"}),
                                      r"lacks graphs"),
    "the manifest lacks its files' digests": (
        _damage_manifest(lambda m: {k: v for k, v in m.items() if k != "files"}), r"lacks files"),
    "the manifest lists no graph files": (_damage_manifest(lambda m: {**m, "files": {}}),
                                          r"does not list the graph files"),
    "the manifest's config is not an object": (_damage_manifest(lambda m: {**m, "config": "tiny"}),
                                               r"manifest\.json holds a config this medsight cannot read"),
    "the manifest's config has a field unknown here": (
        _damage_manifest(lambda m: {**m, "config": {**m["config"], "vision": {**m["config"]["vision"], "new": 1}}}),
        r"manifest\.json holds a config this medsight cannot read \(unknown field"),
}


@pytest.mark.parametrize("damage", FOLDER_DAMAGE)
def test_a_damaged_export_folder_is_refused_naming_the_file(exported, tmp_path, damage):
    """A missing, torn or misplaced graph file and a torn, foreign-version or incomplete manifest: a ValueError naming
    the file and the re-export, at load (onnxruntime's own errors are not ValueErrors, and a manifest of another
    format version was read as if it were this one)."""
    import shutil

    folder = tmp_path / "onnx"
    shutil.copytree(exported["manifest"].parent, folder)
    edit, message = FOLDER_DAMAGE[damage]
    edit(folder)
    with pytest.raises(ValueError, match=message) as caught:
        OnnxVisionBackend(folder, providers=["CPUExecutionProvider"])
    assert "export-onnx" in str(caught.value)


def test_a_manifest_write_stopped_midway_leaves_no_manifest(model, exported, tmp_path, monkeypatch):
    """The manifest marks an export complete: a write that fails after half of it (a full disk) must leave no
    manifest at all, and no temporary file, not a torn one beside the new graphs."""
    import errno
    import shutil

    folder = tmp_path / "onnx"
    shutil.copytree(exported["manifest"].parent, folder)
    real_write_text = Path.write_text

    def disk_full(self: Path, text: str, *args, **kwargs) -> int:
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_onnx(model, folder, exporter="torchscript")
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in exported["manifest"].parent.iterdir()
                                                              if p.name != "manifest.json")
    with pytest.raises(ValueError, match=r"no ONNX export \(manifest.json is missing"):
        OnnxVisionBackend(folder)
