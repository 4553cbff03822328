"""`python -m medsight` runs the same command line as the `medsight` console script."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-W", "default", "-m", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_python_m_medsight_is_the_medsight_command():
    out = run("medsight", "info", "--preset", "tiny")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("preset tiny: vision ") and "parameters" in out.stdout
    assert "RuntimeWarning" not in out.stderr, out.stderr
    # Its errors are the command's: a usage error exits 2 naming the program.
    wrong = run("medsight", "no-such-command")
    assert wrong.returncode == 2 and "usage: medsight" in wrong.stderr


def test_ctrl_c_mid_ask_is_one_line_and_leaves_no_output(tmp_path):
    """SIGINT while the model answers used to end in a KeyboardInterrupt traceback from wherever it landed."""
    import nibabel as nib
    from nilearn.datasets import load_mni152_template

    volume, out = tmp_path / "mni.nii.gz", tmp_path / "answer.seg.nrrd"
    nib.save(load_mni152_template(resolution=2), volume)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-m", "medsight", "ask", str(volume), "Segment the brain.", "--slices",
                                "all", "--batch", "1", "--model", "tiny", "--device", "cpu", "--out", str(out)],
                               stderr=subprocess.PIPE, env=env)
    seen = b""
    while b"slice" not in seen:  # tqdm's progress bar: the model is loaded and answering
        chunk = os.read(process.stderr.fileno(), 4096)
        assert chunk, seen.decode(errors="replace")
        seen += chunk
    process.send_signal(signal.SIGINT)
    err = (seen + process.stderr.read()).decode(errors="replace")
    assert process.wait(timeout=120) == 130, err
    assert "Traceback" not in err and err.rstrip().endswith("medsight: interrupted"), err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == [volume.name]


def _torch_is_loading(pid: int) -> bool:
    """The process has started importing torch (its first shared library, libtorch_global_deps, is mapped)."""
    try:
        with open(f"/proc/{pid}/maps") as maps:
            return "libtorch" in maps.read()
    except FileNotFoundError:  # it has ended
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc to see when torch starts loading")
@pytest.mark.parametrize("entry", ["python -m medsight", "console script"])
def test_ctrl_c_while_torch_imports_is_one_line(entry):
    """SIGINT in the seconds `medsight ...` spends importing torch printed a KeyboardInterrupt traceback and died of
    the signal (exit -2): the package imported torch and the model before `main` could catch it. Now one line, 130."""
    script = os.path.join(os.path.dirname(sys.executable), "medsight")
    if entry == "console script" and not os.path.exists(script):
        pytest.skip("no medsight console script beside this Python")
    command = [sys.executable, "-m", "medsight"] if entry == "python -m medsight" else [script]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([*command, "info", "--preset", "tiny"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=env, text=True)
    while process.poll() is None and not _torch_is_loading(process.pid):
        time.sleep(0.005)
    assert process.returncode is None, "the command ended before it imported torch"
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert (process.returncode, out, err) == (130, "", "medsight: interrupted\n")


def test_a_reader_that_leaves_early_ends_the_command_quietly():
    """`medsight info | head -1` whose reader is gone: it printed 'medsight: error: Broken pipe' and exited 2, as if
    something had failed. Now no message and 141 (128 + SIGPIPE, what the shell reports for git or seq there)."""
    read_end, write_end = os.pipe()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-W", "default", "-m", "medsight", "info", "--preset", "tiny"],
                               stdout=write_end, stderr=subprocess.PIPE, env=env)
    os.close(write_end)
    os.close(read_end)  # before the child writes anything (it is still importing): every write hits a closed pipe
    _, err = process.communicate(timeout=120)
    assert process.returncode == 141, err.decode(errors="replace")
    assert err == b""  # neither the error line nor Python's "Exception ignored ... BrokenPipeError"


def test_a_broken_pipe_that_is_not_stdouts_stays_an_error(monkeypatch, capsys):
    """Only stdout's reader leaving is quiet: a BrokenPipeError from another pipe is still a one-line error."""
    from medsight import cli

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as stdout:  # a pipe whose reader is still there
        monkeypatch.setattr(sys, "stdout", stdout)
        monkeypatch.setattr(cli, "_info", broken)
        code = cli.main(["info"])
        monkeypatch.undo()
    os.close(read_end)
    assert code == 2 and capsys.readouterr().err == "medsight: error: Broken pipe\n"


def test_ask_whose_reader_left_still_writes_its_segmentation(tmp_path):
    """`medsight ask ... --out F | head -1`, the reader gone before the answers are printed: printing them failed and
    the command stopped before writing F, the file asked for. F is now written, the same as with a reader there."""
    import nibabel as nib
    from nilearn.datasets import load_mni152_template

    from medsight.imaging import read_seg_nrrd

    volume = tmp_path / "mni.nii.gz"
    nib.save(load_mni152_template(resolution=2), volume)
    ask = ["medsight", "ask", str(volume), "Please segment the white matter.", "--slices", "40:42", "--model", "tiny",
           "--max-new-tokens", "6", "--device", "cpu", "--out"]
    read_end, write_end = os.pipe()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-m", *ask, str(tmp_path / "left.seg.nrrd")], stdout=write_end,
                               stderr=subprocess.PIPE, env=env)
    os.close(write_end)
    os.close(read_end)
    _, err = process.communicate(timeout=300)
    err = err.decode(errors="replace")
    assert process.returncode == 141, err
    assert "error" not in err and "Traceback" not in err, err
    stayed = run(*ask, str(tmp_path / "stayed.seg.nrrd"))
    assert stayed.returncode == 0, stayed.stderr
    left, whole = read_seg_nrrd(tmp_path / "left.seg.nrrd"), read_seg_nrrd(tmp_path / "stayed.seg.nrrd")
    assert whole.labelmap.any() and np.array_equal(left.labelmap, whole.labelmap)
    assert [s.name for s in left.segments] == [s.name for s in whole.segments]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a file system that is always full)")
def test_ask_whose_output_cannot_be_printed_still_writes_its_segmentation(tmp_path):
    """`medsight ask ... --out F > log` with the log's disk full: printing the answers failed and the command stopped
    before writing F, so the whole inference was lost. F is now written, and the failed printing is the one error."""
    import nibabel as nib
    from nilearn.datasets import load_mni152_template

    from medsight.imaging import read_seg_nrrd

    volume, out = tmp_path / "mni.nii.gz", tmp_path / "answer.seg.nrrd"
    nib.save(load_mni152_template(resolution=2), volume)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with open("/dev/full", "w") as full:
        process = subprocess.run([sys.executable, "-m", "medsight", "ask", str(volume), "Please segment the white "
                                  "matter.", "--model", "tiny", "--max-new-tokens", "6", "--device", "cpu", "--out",
                                  str(out)], stdout=full, stderr=subprocess.PIPE, env=env, timeout=300)
    err = process.stderr.decode(errors="replace").splitlines()
    assert process.returncode == 2, err
    assert [line for line in err if "error" in line] == ["medsight: error: the answers were not printed: No space "
                                                          "left on device"], err
    assert read_seg_nrrd(out).labelmap.any()


def test_medsight_train_shows_the_runs_progress(tmp_path):
    """Under `medsight train` the trainer's progress lines were never printed: the top-level command had set up
    logging at WARNING first, so the trainer's INFO set-up did nothing (torchrun's entry point showed them)."""
    import json

    from medsight_testing.train_data import write_synthetic

    data = write_synthetic(tmp_path / "data")
    steps = 2
    config = tmp_path / "stage3.json"
    config.write_text(json.dumps({"init_from": "tiny", "max_steps": steps, "batch_size": 1}))
    out = run("medsight", "train", "stage3", "--config", str(config), "--data", str(data["lvlm"]), "--out",
              str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr
    assert [f"step {n}/{steps} loss" in out.stderr for n in range(1, steps + 1)] == [True] * steps, out.stderr
