"""The `medsight` command line, run in-process on a real volume."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom.data
import pytest
import torch
from nilearn.datasets import load_mni152_template
from PIL import Image

from medsight.cli import _parser, main
from medsight.commands.ask import parse_slices
from medsight.imaging import read_seg_nrrd, read_volume
from medsight_testing.dicom_series import add_localizers, write_tilted_series, write_uneven_series
from medsight_testing.disk import file_size_limit


@pytest.fixture(scope="module")
def mni_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("mni") / "mni152.nii.gz"
    nib.save(load_mni152_template(resolution=2), path)
    return path


def test_ask_json_with_segmentation_and_overlay(mni_path, tmp_path, capsys):
    out, overlay = tmp_path / "answer.seg.nrrd", tmp_path / "overlay.png"
    rc = main(["ask", str(mni_path), "Please segment the white matter.", "--slices", "40:43", "--json", "--model",
               "tiny", "--max-new-tokens", "6", "--device", "cpu", "--out", str(out), "--overlay", str(overlay)])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert isinstance(result["answer"], str) and [s["index"] for s in result["slices"]] == [40, 41, 42]
    assert result["regions"], "the random tiny model emits codes, so there are regions"
    seg = read_seg_nrrd(out)
    volume = read_volume(mni_path)
    assert seg.labelmap.shape == volume.shape
    assert overlay.stat().st_size > 0
    # Voxels are only ever written on the asked slices (axial = array axis k for this template).
    touched = sorted({int(k) for k in seg.labelmap.nonzero()[0]})
    assert set(touched) <= {40, 41, 42}


def test_default_model_is_the_embedded_demo_model(mni_path, tmp_path, capsys):
    """No --model: the trained demo model answers about the real MRI with a labelled white-matter mask."""
    out = tmp_path / "wm.seg.nrrd"
    assert main(["ask", str(mni_path), "Please segment the white matter.", "--json", "--device", "cpu",
                 "--max-new-tokens", "48", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    labels = [r["label"].lower() for r in result["regions"]]
    assert "white matter" in labels, result
    assert [s.name for s in read_seg_nrrd(out).segments] == ["White matter"]


def test_sdpa_perceiver_flag_gives_the_eager_answer(mni_path, capsys):
    base = ["ask", str(mni_path), "Please segment the white matter.", "--json", "--model", "tiny",
            "--max-new-tokens", "6", "--device", "cpu"]
    results = []
    for kernel in ("eager", "sdpa"):
        assert main([*base, "--perceiver-attention", kernel]) == 0
        results.append(json.loads(capsys.readouterr().out))
    eager, sdpa = results
    assert eager["answer"] == sdpa["answer"] and eager["regions"]
    for a, b in zip(eager["regions"], sdpa["regions"], strict=True):
        assert a["code"] == b["code"] and abs(a["probability"] - b["probability"]) <= 1e-4
        assert abs(a["pixels"] - b["pixels"]) <= 2  # a logit within float rounding of 0 may flip


def test_parse_slices():
    assert parse_slices(None, 9) == [4]
    assert parse_slices("all", 3) == [0, 1, 2]
    assert parse_slices("2:5", 9) == [2, 3, 4]
    assert parse_slices("7,1,7", 9) == [1, 7]
    with pytest.raises(ValueError, match=r"outside 0\.\.8"):
        parse_slices("9", 9)
    with pytest.raises(ValueError, match="comma-separated list of integers"):
        parse_slices("a-b", 9)


def test_slice_range_reaching_outside_the_plane_is_refused():
    """Python slicing clipped '180:300' on 189 slices to 180..188 (and took '-3:' as the last three)."""
    assert parse_slices("180:189", 189) == list(range(180, 189))
    assert parse_slices(":2", 189) == [0, 1]
    for spec in ("180:300", "-3:", "5:5"):
        with pytest.raises(ValueError, match=r"outside 0\.\.188"):
            parse_slices(spec, 189)


def test_errors_are_one_line_with_exit_code_2(mni_path, tmp_path, capsys):
    assert main(["ask", str(tmp_path / "missing.nii"), "q"]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["ask", str(mni_path), "q", "--slices", "999", "--device", "cpu"]) == 2
    assert "outside 0.." in capsys.readouterr().err
    for blank in ("", "   "):
        assert main(["ask", str(mni_path), blank, "--device", "cpu"]) == 2
        assert "question is empty" in capsys.readouterr().err
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "without a token" in capsys.readouterr().err


def _refused(argv: list[str], capsys) -> tuple[int, dict, str]:
    """Exit code, the one JSON object on stdout, the last stderr line of a command line `main` refuses."""
    try:
        code = main(argv)
    except SystemExit as stopped:  # argparse's usage error
        code = stopped.code
    said = capsys.readouterr()
    return code, json.loads(said.out), said.err.splitlines()[-1]


def test_every_refusal_under_json_prints_one_json_error_beside_the_stderr_line(mni_path, tmp_path, capsys):
    """`--json` printed nothing on stdout for a command refused before its model ran: a script parsing stdout got no
    object to read. Each refusal, whatever command and whichever stage refused it, prints one error object there."""
    data = tmp_path / "vqa.json"
    data.write_text("[]")
    codes = set()
    for argv, code in [
        (["ask", str(tmp_path / "missing.nii"), "q", "--json"], "bad_input"),
        (["ask", str(mni_path), "q", "--slices", "999", "--device", "cpu", "--json"], "bad_input"),
        (["ask", str(mni_path), "--json"], "usage"),
        (["ask", str(mni_path), "q", "--json", "--batch", "0"], "usage"),
        (["info", "--preset", "nope", "--json"], "bad_input"),
        (["info", "--json", "--colour"], "usage"),
        (["eval", "vqa", "--data", str(data), "--report", str(tmp_path / "r"), "--json"], "bad_input"),
        (["eval", "vqa", "--json"], "usage"),
        (["serve", "--json"], "usage"),
    ]:
        exit_code, said, line = _refused(argv, capsys)
        assert (exit_code, list(said), list(said["error"]), said["error"]["code"]) == (2, ["error"],
                                                                                       ["code", "message"], code)
        assert line.endswith(f" error: {said['error']['message']}")
        codes.add(code)
    from medsight.commands.errors import JSON_ERROR_CODES

    assert codes <= set(JSON_ERROR_CODES)
    # The same refusals without --json print nothing on stdout.
    assert main(["info", "--preset", "nope"]) == 2 and capsys.readouterr().out == ""
    # A "--json" after "--" is a value (here the question), not the option.
    assert main(["ask", str(tmp_path / "missing.nii"), "--", "--json"]) == 2 and capsys.readouterr().out == ""


def test_info_json_gives_the_sizes_it_prints(capsys):
    from medsight.config import get_preset
    from medsight.model.sizes import kv_cache_bytes_per_token, model_size

    assert main(["info", "--preset", "tiny", "--json"]) == 0
    said = json.loads(capsys.readouterr().out)
    size, config = model_size(get_preset("tiny")), get_preset("tiny")
    assert said["parameters"] == {"vision": size.vision, "perceiver": size.perceiver,
                                  "language_model": size.language_model, "total": size.total}
    assert said["weight_bytes"] == {"bf16": size.weight_bytes(), "fp32": 4 * size.total}
    assert said["kv_cache_bytes_per_token"] == kv_cache_bytes_per_token(config) and said["preset"] == config.name


def test_a_volume_no_window_shows_is_refused_before_the_model_loads(tmp_path, capsys):
    """A constant volume at 1e31 has no usable percentile window: the model was loaded first (minutes for the full
    model), then the first batch failed."""
    path = tmp_path / "huge.nii.gz"
    nib.save(nib.Nifti1Image(np.full((12, 10, 3), 1e31, np.float32), np.eye(4)), path)
    assert main(["ask", str(path), "Where?", "--model", "tiny", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "the volume's values give the window 1e+31..1e+31" in err and "random weights" not in err, err


def test_the_percentile_window_is_worked_out_once_for_every_batch(mni_path, monkeypatch, capsys):
    """Each batch read and sorted the whole volume again for the same window (0.7 s a batch at 256 x 256 x 300)."""
    from medsight.imaging import window as window_module

    reads = []
    real = window_module.robust_window
    monkeypatch.setattr(window_module, "robust_window", lambda *a, **k: reads.append(1) or real(*a, **k))
    slices = 4
    assert main(["ask", str(mni_path), "Where?", "--slices", f"40:{40 + slices}", "--batch", "1", "--model", "tiny",
                 "--max-new-tokens", "1", "--device", "cpu", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["slices"]) == slices
    assert len(reads) == 1


def test_info_prints_the_computed_sizes(capsys):
    assert main(["info", "--preset", "full"]) == 0
    text = capsys.readouterr().out
    assert "8,642,412,562 parameters" in text and "bf16 16.10 GiB" in text


def test_info_on_the_demo_preset_also_counts_the_embedded_demo_model(capsys):
    """The demo preset's count was all it printed, though `--model demo` loads a model with its own vocabulary and
    classes (another count)."""
    from medsight.model.loading import load_model

    assert main(["info", "--preset", "demo"]) == 0
    text = capsys.readouterr().out
    model = load_model("demo", device="cpu")
    # The parts info counts (the codebook that came with it serves training only).
    loaded = sum(p.numel() for part in (model.image_encoder, model.region_perceiver, model.language_model)
                 for p in part.parameters())
    assert f"--model demo) is sized to its training data: {loaded:,} parameters" in text


def test_findings_group_name_and_code_as_the_slicer_module_does():
    """"The liver", "Liver." and "liver" are one finding named "Liver" with the SNOMED liver code; an unlabelled
    region is its own finding named by its code."""
    from types import SimpleNamespace

    from medsight.commands.ask_outputs import _findings, _segment

    def region(label, code):
        return SimpleNamespace(label=label, code=code)

    answers = [SimpleNamespace(regions=[region("The liver", "[M0_1]"), region("", "[M0_9]")]),
               SimpleNamespace(regions=[region("Liver.", "[M0_2]"), region("liver", "[M0_1]")])]
    findings = _findings(answers)
    assert list(findings) == ["liver", "[M0_9]"]
    liver = _segment(1, findings["liver"], [])
    assert (liver.name, liver.region_code, liver.terminology.type.value) == ("Liver", "[M0_1]", "10200004")
    assert _segment(2, findings["[M0_9]"], [liver.color]).name == "[M0_9]"
    assert _segment(2, findings["[M0_9]"], [liver.color]).color != liver.color


# -- outputs, messages and refusals ---------------------------------------------------------------------------------

Q = "Please segment the white matter."
TINY = ["--model", "tiny", "--max-new-tokens", "6", "--device", "cpu"]
# A model that cannot load: a check that must come before the model shows its own message, not this one's.
NO_MODEL = ["--model", "/no/such/model/folder", "--device", "cpu"]
PYDICOM_FILES = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent


@pytest.fixture
def brain(mni_path, tmp_path) -> Path:
    """A copy of the MNI volume beside a BIDS-style sidecar the user wrote."""
    path = tmp_path / "data" / "brain.nii.gz"
    path.parent.mkdir()
    shutil.copy(mni_path, path)
    path.with_name("brain.json").write_text('{"RepetitionTime": 2.0}')
    return path


def _err(capsys) -> str:
    return capsys.readouterr().err


def test_outputs_never_replace_the_input(brain, tmp_path, capsys):
    before = brain.read_bytes()
    os.link(brain, tmp_path / "link.nii.gz")
    for out in (brain, tmp_path / "data" / ".." / "data" / "brain.nii.gz", tmp_path / "link.nii.gz"):
        for overwrite in ([], ["--overwrite"]):  # not even with --overwrite
            assert main(["ask", str(brain), Q, "--out", str(out), *overwrite, *NO_MODEL]) == 2
            assert f"--out {out} is the input" in _err(capsys)
    picture = tmp_path / "xray.png"
    Image.fromarray(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)).save(picture)
    picture_bytes = picture.read_bytes()
    assert main(["ask", str(picture), Q, "--overlay", str(picture), "--overwrite", *NO_MODEL]) == 2
    assert "--overlay" in _err(capsys)
    series = shutil.copytree(PYDICOM_FILES / "dicomdirtests" / "98892001" / "CT5N", tmp_path / "ct")
    assert main(["ask", str(series), Q, "--out", str(series / "seg.dcm"), *NO_MODEL]) == 2
    assert "is inside the input" in _err(capsys)
    assert brain.read_bytes() == before and picture.read_bytes() == picture_bytes
    assert not (series / "seg.dcm").exists()


def test_existing_outputs_are_kept_unless_overwrite(brain, tmp_path, capsys):
    """The user's brain.json next to --out brain.nii is a sidecar we would write: refused like the file itself."""
    sidecar_owner = brain.with_name("brain.nii")
    assert main(["ask", str(brain), Q, "--out", str(sidecar_owner), *NO_MODEL]) == 2
    assert "its labels sidecar" in _err(capsys) and brain.with_name("brain.json").read_text().startswith('{"Rep')
    out, overlay = tmp_path / "old.seg.nrrd", tmp_path / "old.png"
    out.write_text("keep me")
    overlay.write_text("keep me too")
    for option, path in (("--out", out), ("--overlay", overlay)):
        assert main(["ask", str(brain), Q, option, str(path), *NO_MODEL]) == 2
        assert f"{option} {path} already exists: pass --overwrite" in _err(capsys)
    assert out.read_text() == "keep me" and overlay.read_text() == "keep me too"
    assert main(["ask", str(brain), Q, "--out", str(out), "--overlay", str(overlay), "--overwrite", *TINY]) == 0
    assert read_seg_nrrd(out).labelmap.any() and Image.open(overlay).format == "PNG"


def test_an_overwrite_that_cannot_be_written_keeps_the_earlier_outputs(brain, tmp_path, capsys):
    """--overwrite replaced the earlier segmentation and overlay only once the new ones are whole: a write cut
    short (the file-size limit stands for a full disk or Ctrl+C) used to leave torn files under their names."""
    out, overlay = tmp_path / "wm.seg.nrrd", tmp_path / "wm.png"
    args = ["ask", str(brain), Q, "--out", str(out), "--overlay", str(overlay), "--overwrite", *TINY]
    assert main(args) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with file_size_limit(min(out.stat().st_size, overlay.stat().st_size) // 2):
        assert main(args) == 2
    err = _err(capsys)
    assert f"--out {out} not written" in err and f"--overlay {overlay} not written" in err, err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before

def test_overwrite_through_a_link_replaces_its_target_and_keeps_the_link(brain, tmp_path):
    """--out and --overlay named by a symbolic link: --overwrite replaced the link by a new file (the rename went onto
    the link) and left the target, the file the user meant, with its old content."""
    results = tmp_path / "results"
    results.mkdir()
    links = {"--out": tmp_path / "latest.seg.nrrd", "--overlay": tmp_path / "latest.png"}
    targets = {option: results / f"case1{''.join(link.suffixes)}" for option, link in links.items()}
    for option, link in links.items():
        targets[option].write_text("earlier result")
        link.symlink_to(targets[option])
    options = [str(x) for option, link in links.items() for x in (option, link)]
    assert main(["ask", str(brain), Q, *options, "--overwrite", *TINY]) == 0
    assert all(link.is_symlink() and link.resolve() == targets[option] for option, link in links.items())
    assert read_seg_nrrd(targets["--out"]).labelmap.shape == read_volume(brain).shape
    assert Image.open(targets["--overlay"]).format == "PNG"
    assert sorted(p.name for p in results.iterdir()) == sorted(t.name for t in targets.values())  # no temporaries


def test_a_link_to_a_file_not_made_yet_gets_its_missing_folders(brain, tmp_path, capsys):
    """A link whose target (and its folder) does not exist yet: the link's folder was created, not the target's, so
    the write failed after the whole inference, naming a temporary file; a target no folder can be made for was found
    only then too."""
    blocked = tmp_path / "blocked.png"
    blocked.symlink_to(brain / "sub" / "ov.png")  # below a file
    assert main(["ask", str(brain), Q, "--overlay", str(blocked), "--overwrite", *NO_MODEL]) == 2
    assert _err(capsys).splitlines() == [f"medsight: error: --overlay {blocked}: {brain} is a file, not a folder"]
    results = tmp_path / "results" / "case1"
    links = {"--out": tmp_path / "latest.nii.gz", "--overlay": tmp_path / "latest.png"}
    for link in links.values():
        link.symlink_to(results / link.name)
    options = [str(x) for option, link in links.items() for x in (option, link)]
    assert main(["ask", str(brain), Q, *options, "--overwrite", *TINY]) == 0
    assert all(link.is_symlink() for link in links.values())
    assert sorted(p.name for p in results.iterdir()) == ["latest.json", "latest.nii.gz", "latest.png"]
    assert nib.load(results / "latest.nii.gz").shape == nib.load(brain).shape


def test_a_nifti_written_through_a_link_gets_its_labels_beside_the_target(brain, tmp_path):
    """The labelmap went to the link's target, its sidecar beside the link: the target kept its old labels."""
    from medsight.imaging import read_nifti_labelmap

    target = tmp_path / "results" / "case1.nii.gz"
    target.parent.mkdir()
    target.write_text("earlier labelmap")
    target.with_name("case1.json").write_text('{"labels": {"1": "earlier label"}}')
    link = tmp_path / "latest.nii.gz"
    link.symlink_to(target)
    assert main(["ask", str(brain), Q, "--out", str(link), "--overwrite", *TINY]) == 0
    seg = read_nifti_labelmap(target)
    assert seg.labelmap.shape == read_volume(brain).shape and seg.segments
    assert "earlier label" not in [s.name for s in seg.segments]
    assert link.is_symlink() and not (tmp_path / "latest.json").exists()
    # Read back through the link, as written: the reader found no sidecar beside the link.
    assert [s.name for s in read_nifti_labelmap(link).segments] == [s.name for s in seg.segments]


def test_an_output_that_is_a_pipe_or_a_link_to_one_is_refused(brain, tmp_path, capsys):
    """--overwrite renamed a regular file over a named pipe (and over a device: `--out /dev/null` as root replaced
    the system's /dev/null); refused now, before the model loads."""
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)
    link = tmp_path / "link.seg.nrrd"
    link.symlink_to(pipe)
    null = tmp_path / "null.png"
    null.symlink_to(os.devnull)
    # Named as user_files.special_file_kind names it (the one wording of what a special file is).
    for option, path, kind in (("--overlay", pipe, "a named pipe (FIFO)"), ("--out", link, "a named pipe (FIFO)"),
                               ("--overlay", null, "a character device")):
        assert main(["ask", str(brain), Q, option, str(path), "--overwrite", *NO_MODEL]) == 2
        assert _err(capsys).splitlines() == [f"medsight: error: {option} {path} is {kind}, not a file: give a file "
                                             "name"]
    assert stat.S_ISFIFO(pipe.stat().st_mode) and link.is_symlink()


def test_missing_output_folders_are_created(brain, tmp_path):
    out, overlay = tmp_path / "a" / "b" / "wm.seg.nrrd", tmp_path / "c" / "ov.png"
    assert main(["ask", str(brain), Q, "--out", str(out), "--overlay", str(overlay), *TINY]) == 0
    assert out.is_file() and overlay.is_file()


def test_nifti_out_stays_in_the_input_space(mni_path, tmp_path):
    """--out x.nii.gz for an MNI152-space input (codes 4) is labelled MNI152 with the input's affine, not scanner."""
    src = nib.load(mni_path)
    mni = nib.Nifti1Image(np.asanyarray(src.dataobj), None, src.header.copy())
    mni.set_qform(src.affine, code=4)
    mni.set_sform(src.affine, code=4)
    nib.save(mni, tmp_path / "mni4.nii.gz")
    out = tmp_path / "mask.nii.gz"
    assert main(["ask", str(tmp_path / "mni4.nii.gz"), Q, "--slices", "40:42", "--out", str(out), *TINY]) == 0
    mask = nib.load(out)
    assert (int(mask.header["qform_code"]), int(mask.header["sform_code"])) == (4, 4)
    assert np.allclose(mask.header.get_qform(), src.affine) and np.allclose(mask.affine, src.affine)


def _unwritable(folder: str) -> bool:
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return True
    return False


def test_bad_outputs_and_options_fail_before_the_model_naming_the_option(brain, tmp_path, capsys):
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "folder.seg.nrrd").mkdir()
    picture = tmp_path / "slice.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(picture)
    cases = [
        (["--out", str(tmp_path / "x.dcm")], "--out", "needs an input read from DICOM images"),
        (["--overlay", str(tmp_path / "ov.jpg")], "--overlay", "ending in .png"),
        (["--overlay", str(tmp_path / "folder.png")], "--overlay", "is a folder"),
        (["--out", str(tmp_path / "folder.seg.nrrd")], "--out", "is a folder"),
        (["--overlay", str(picture / "ov.png")], "--overlay", "is a file, not a folder"),
        # Checked against the input read, as the Engine checks it (it was, once the model had loaded).
        (["--window", "lung"], "--window", "preset 'lung' is in Hounsfield units and needs CT, not OT"),
        (["--window", "lungs"], "--window", "unknown window preset 'lungs'; known: abdomen, lung"),
    ]
    if _unwritable("/sys"):  # sysfs refuses new files, even to root
        cases.append((["--overlay", "/sys/ov.png"], "--overlay", "cannot create files in /sys"))
    for extra, option, problem in cases:
        assert main(["ask", str(brain), Q, *extra, *NO_MODEL]) == 2, extra
        err = _err(capsys)
        assert err.startswith(f"medsight: error: {option} ") and problem in err, err


def test_answers_are_printed_when_a_write_fails(brain, tmp_path, capsys):
    """The demo model finds no white matter on the first slices: --out has nothing to write, after the answers."""
    out, overlay = tmp_path / "wm.seg.nrrd", tmp_path / "ov.png"
    args = ["ask", str(brain), Q, "--slices", "0:2", "--device", "cpu", "--max-new-tokens", "24", "--out", str(out)]
    assert main([*args, "--json", "--overlay", str(overlay)]) == 2
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert [s["index"] for s in result["slices"]] == [0, 1] and result["regions"] == []
    assert result["out"] is None and result["overlay"] == str(overlay) and overlay.is_file()
    assert result["errors"] == [f"--out {out} not written: the answer has no regions: nothing to write"]
    assert result["errors"][0] in captured.err and not out.exists()
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith("[axial slice 0] ") and "[axial slice 1] " in captured.out
    assert "not written" in captured.err


def test_clear_errors_instead_of_tracebacks(brain, tmp_path, capsys):
    assert main(["ask", str(brain), Q, "--model", "tiny", "--device", "gpu"]) == 2
    assert "device 'gpu' is not a device name: use cpu, cuda" in _err(capsys)
    if not torch.cuda.is_available():
        assert main(["ask", str(brain), Q, "--model", "tiny", "--device", "cuda"]) == 2
        assert "CUDA is not available" in _err(capsys)
    (tmp_path / "audit").mkdir()
    assert main(["serve", "--model", "tiny", "--audit", str(tmp_path / "audit")]) == 2
    assert f"--audit {tmp_path / 'audit'}" in _err(capsys)
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--port", "99999"])
    assert exit_info.value.code == 2 and "outside 1..65535" in _err(capsys)
    assert main(["export-onnx", "--out", str(brain)]) == 2
    assert f"--out {brain} is a file" in _err(capsys)



@pytest.mark.parametrize(("command", "option", "value", "problem"), [
    ("serve", "--threads", "-2", "-2 is not >= 1"),  # the compute thread died; every ask waited forever
    ("serve", "--timeout", "0", "0 is not > 0"),  # every ask cancelled at once, with an empty answer
    ("serve", "--timeout", "nan", "nan is not > 0"),
    ("serve", "--max-upload-mb", "-5", "-5 is not >= 1"),  # every upload refused: "exceeds the limit of -5242880"
    ("serve", "--ask-memory-mb", "0", "0 is not >= 1"),  # every ask refused
    ("serve", "--max-waiting", "-1", "-1 is not >= 0"),  # refused only once the model had loaded
    ("serve", "--max-upload-mb", "1.5", "'1.5' is not an integer"),
    ("ask", "--batch", "-3", "-3 is not >= 1"),  # silently taken as 1
    ("ask", "--max-new-tokens", "0", "0 is not >= 1"),  # refused only once the model had loaded
])
def test_numbers_out_of_range_are_refused_before_anything_starts(command, option, value, problem, capsys):
    """The server started with any of these and then failed every request; each is now a usage error naming it."""
    args = [command, *(["in.nii.gz", Q] if command == "ask" else []), option, value]
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(args)
    assert exit_info.value.code == 2
    assert _err(capsys).splitlines()[-1] == f"medsight {command}: error: argument {option}: {problem}"

def test_blank_question_and_old_opset_are_refused_before_the_model_loads(brain, tmp_path, capsys):
    """Both were refused only once the model had loaded (minutes for the full model): NO_MODEL cannot load, so
    its error would show instead had the model been loaded first."""
    for question in ("", "  \n "):
        assert main(["ask", str(brain), question, *NO_MODEL]) == 2
        assert _err(capsys).splitlines() == ["medsight: error: the question is empty; ask something about the image"]
    assert main(["export-onnx", "--out", str(tmp_path / "onnx"), "--opset", "16", *NO_MODEL[:2]]) == 2
    assert _err(capsys).splitlines() == ["medsight: error: opset must be >= 17 (LayerNormalization), not 16"]
    assert not (tmp_path / "onnx").exists()


@pytest.mark.parametrize(("command", "option"), [
    ("ask", "--out"), ("ask", "--overlay"),  # nothing written, exit code 0
    ("serve", "--audit"),  # no audit log kept
    ("serve", "--token-file"),  # fell back to MEDSIGHT_TOKEN or no token at all
    ("ask", "--adapter"), ("serve", "--adapter"), ("ask", "--vision-file"),  # answered without them
    ("export-onnx", "--out"),  # wrote the graphs into the current folder
    ("download", "--dir"),  # cached only
])
def test_an_empty_file_name_is_refused_not_taken_as_not_given(command, option, capsys):
    """`--out "$UNSET"`: an empty name was taken as no option at all, and the command went on without it."""
    args = [command, *(["in.nii.gz", Q] if command == "ask" else []), option, ""]
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(args)
    assert exit_info.value.code == 2
    assert _err(capsys).splitlines()[-1] == (f"medsight {command}: error: argument {option}: an empty name: give a "
                                             "file or folder")


def test_export_onnx_keeps_an_earlier_export_unless_overwrite(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text("{}")
    assert main(["export-onnx", "--model", "tiny", "--out", str(tmp_path)]) == 2
    assert "already holds manifest.json: pass --overwrite" in _err(capsys)
    assert (tmp_path / "manifest.json").read_text() == "{}"


def test_vision_file_is_refused_for_a_model_that_ignores_it(brain, capsys):
    assert main(["ask", str(brain), Q, "--vision-file", "nofile.pt", *TINY]) == 2
    assert "--model tiny does not use a vision file" in _err(capsys)


def test_series_is_refused_for_an_input_that_is_not_a_dicom_folder(brain, capsys):
    assert main(["ask", str(brain), Q, "--series", "1.2.3", *TINY]) == 2
    assert "--series 1.2.3: only a DICOM folder holds several series" in _err(capsys)


def test_dicom_messages_speak_of_the_command_line(capsys):
    import data_store  # pydicom-data: a real DICOM SEG

    folder = PYDICOM_FILES / "dicomdirtests" / "98892003" / "MR2"
    assert main(["ask", str(folder), Q, *NO_MODEL]) == 2
    err = _err(capsys)
    assert "3 series found; choose one with --series" in err and "series_uid" not in err
    seg = Path(data_store.__file__).parent / "data" / "liver.dcm"
    for path, kind in ((PYDICOM_FILES / "rtstruct.dcm", "RT Structure Set Storage"), (seg, "a DICOM SEG")):
        assert main(["ask", str(path), Q, *NO_MODEL]) == 2
        err = _err(capsys)
        assert kind in err and "not an image: medsight ask needs an image" in err, err
        assert "force=True" not in err and "read_dicom_seg" not in err


def test_a_2d_image_in_another_plane_is_asked_about_in_that_plane(tmp_path, capsys):
    """A coronal radiograph saved as NIfTI (one voxel thick front to back) has only coronal slices: without --plane
    the command asks about it there instead of refusing the default axial plane."""
    pixels = np.random.default_rng(0).integers(0, 255, (24, 1, 32)).astype(np.int16)
    path = tmp_path / "coronal.nii.gz"
    nib.save(nib.Nifti1Image(pixels, np.eye(4)), path)
    assert main(["ask", str(path), "Where is the heart?", "--model", "tiny", "--max-new-tokens", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [s["plane"] for s in result["slices"]] == ["coronal"]
    assert main(["ask", str(path), "Where is the heart?", "--model", "tiny", "--plane", "axial"]) == 2
    assert "only the coronal plane has slices" in capsys.readouterr().err


def test_overlay_of_a_monochrome1_image_is_shown_as_the_model_saw_it(tmp_path):
    # MONOCHROME1 (low values white): the engine inverts the display for the model, the overlay PNG did not, so it
    # showed the negative of what the model saw and of what a viewer shows.
    from medsight.imaging import extract_slice, to_rgb

    ds = pydicom.dcmread(Path(pydicom.data.__file__).parent / "test_files" / "MR_small.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    path = tmp_path / "mono1.dcm"
    ds.save_as(path)
    overlay = tmp_path / "ov.png"
    assert main(["ask", str(path), "What is shown?", "--overlay", str(overlay), "--model", "tiny",
                 "--max-new-tokens", "6", "--device", "cpu"]) == 0
    volume = read_volume(path)
    shown = to_rgb(extract_slice(volume, "axial", 0).pixels, volume.modality, window_from=volume.array, invert=True)
    png = np.asarray(Image.open(overlay).convert("RGB"))
    grey = (png[..., 0] == png[..., 1]) & (png[..., 1] == png[..., 2])  # pixels no region colours
    assert volume.invert_display and grey.sum() > grey.size // 4
    assert np.array_equal(png[grey], shown[grey])


def test_modality_is_taken_as_the_engine_keeps_it_or_refused(tmp_path, capsys):
    """--modality "CT " (a pasted space) was another modality than CT: the CT slice got a percentile window instead
    of CT's (overlay pixels differed by up to 229 grey levels); a value the server's upload refuses ran too."""
    ct = PYDICOM_FILES / "CT_small.dcm"
    overlays = {}
    for modality in ("CT", " ct "):
        overlays[modality] = tmp_path / f"{len(overlays)}.png"
        assert main(["ask", str(ct), "What is shown?", "--modality", modality, "--overlay", str(overlays[modality]),
                     "--model", "tiny", "--max-new-tokens", "2", "--device", "cpu"]) == 0
    pixels = [np.asarray(Image.open(path).convert("RGB"), dtype=int) for path in overlays.values()]
    assert pixels[0].shape == pixels[1].shape and np.abs(pixels[0] - pixels[1]).max() == 0
    capsys.readouterr()
    for bad in ("C-T", "", "X" * 17):
        with pytest.raises(SystemExit) as exit_info:
            _parser().parse_args(["ask", str(ct), Q, "--modality", bad])
        assert exit_info.value.code == 2
        assert _err(capsys).splitlines()[-1] == (f"medsight ask: error: argument --modality: {bad!r} is not a "
                                                 "modality: use letters and digits, at most 16 (CT, MR, US, ...)")


def test_localizer_left_out_of_a_series_is_noted(tmp_path, capsys):
    """A CT series folder holding its scout was refused as a mixed series; the stack is answered about, and the user
    is told what of the series is not in it."""
    series = shutil.copytree(PYDICOM_FILES / "dicomdirtests" / "98892001" / "CT5N", tmp_path / "ct")
    add_localizers(series, 1)
    assert main(["ask", str(series), "What is shown?", *TINY, "--json"]) == 0
    captured = capsys.readouterr()
    said = "1 image flagged LOCALIZER (ImageType)"
    assert f"note: left out of the volume: {said}" in captured.err.splitlines()
    # A script reading --json learns it too (it was on stderr alone); a whole series says nothing was left out.
    result = json.loads(captured.out)
    assert result["answer"] is not None and result["left_out"] == said
    (series / "scout0.dcm").unlink()
    assert main(["ask", str(series), "What is shown?", *TINY, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["left_out"], result["nan_filled"], result["resampled"]) == (None, None, None)


def test_nan_voxels_filled_are_noted(mni_path, tmp_path, capsys):
    """A NIfTI with NaN outside the brain (as MR pipelines write it) was refused; it is answered about, and the user is
    told how many voxels were read as the minimum."""
    img = nib.load(mni_path)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    data[data == data.min()] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), tmp_path / "nan.nii.gz")
    assert main(["ask", str(tmp_path / "nan.nii.gz"), "What is shown?", *TINY, "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    said = f"{int(np.isnan(data).sum())} NaN voxels (of {data.size}) read as the volume's minimum"
    assert result["answer"] is not None and result["nan_filled"].startswith(said)  # stdout alone says it too
    assert any(line.startswith(f"note: {said}") for line in captured.err.splitlines())


@pytest.mark.parametrize(("write", "option", "said"), [
    (lambda template, folder: write_tilted_series(template, folder, 6, 2.5, 15.0), "--regularize-tilt",
     "gantry tilt of 15.0 degrees"),
    (lambda template, folder: write_uneven_series(template, folder, [0.0, 2.5, 5.0, 10.0, 12.5, 15.0]),
     "--regularize-spacing", "uneven slice spacing (steps of 2.500 to 5.000 mm)"),
], ids=["tilt", "spacing"])
def test_irregular_series_needs_its_regularize_option_and_is_noted(tmp_path, capsys, write, option, said):
    """A gantry-tilted CT series, or one with a missing slice, was refused with no way to read it: without its option
    the error names it (before the model loads); with it the resampled series is answered about and the user told,
    and a DICOM SEG --out, which could not reference the resampled grid, is refused before the model loads."""
    template = sorted((PYDICOM_FILES / "dicomdirtests" / "98892001" / "CT5N").iterdir())[0]
    series = write(template, tmp_path / "irregular")
    assert main(["ask", str(series), "What is shown?", *NO_MODEL]) == 2
    assert f"medsight ask {option}" in _err(capsys)
    assert main(["ask", str(series), "What is shown?", *NO_MODEL, option, "--out", str(tmp_path / "seg.dcm")]) == 2
    assert "was resampled from its DICOM images" in _err(capsys)
    assert main(["ask", str(series), "What is shown?", *TINY, "--json", option]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["answer"] is not None and result["resampled"].startswith(said)  # a script reading stdout learns it
    assert any(line.startswith(f"note: resampled: {said}") for line in captured.err.splitlines())


def test_lossy_compressed_dicom_is_noted(capsys):
    """A lossy-compressed image (12-bit JPEG here) was answered about without a word on its compression."""
    said = "note: the image was lossy compressed (JPEG Extended (Process 2 and 4), ratio 76:1)"
    for path, note in ((PYDICOM_FILES / "JPEG-lossy.dcm", said), (PYDICOM_FILES / "CT_small.dcm", None)):
        assert main(["ask", str(path), "What is shown?", *TINY, "--json"]) == 0
        captured = capsys.readouterr()
        result = json.loads(captured.out)
        assert result["answer"] is not None
        assert (note in captured.err) if note else "lossy" not in captured.err
        # The same words in the JSON a script reads (they were on stderr alone), null when nothing was lossy.
        assert result["lossy_compression"] == (note.split("(", 1)[1].rsplit(")", 1)[0] if note else None)
