"""The `medsight` command line, run in-process on a real volume."""

from __future__ import annotations

import json

import nibabel as nib
import pytest
from nilearn.datasets import load_mni152_template

from medsight.cli import main, parse_slices
from medsight.imaging import read_seg_nrrd, read_volume


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


def test_info_prints_the_computed_sizes(capsys):
    assert main(["info", "--preset", "full"]) == 0
    text = capsys.readouterr().out
    assert "8,642,412,562 parameters" in text and "bf16 16.10 GiB" in text


def test_findings_group_name_and_code_as_the_slicer_module_does():
    """"The liver", "Liver." and "liver" are one finding named "Liver" with the SNOMED liver code; an unlabelled
    region is its own finding named by its code."""
    from types import SimpleNamespace

    from medsight.cli import _findings, _segment

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
