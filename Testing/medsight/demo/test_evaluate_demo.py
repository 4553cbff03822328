"""`python -m medsight.demo.evaluate_demo`: bad input is one line naming the file."""

import subprocess
import sys


def test_a_missing_model_or_data_folder_is_named_without_a_traceback(tmp_path):
    """A wrong model or data path ended the demo evaluation with a FileNotFoundError traceback."""
    missing = tmp_path / "no_model"
    done = subprocess.run([sys.executable, "-m", "medsight.demo.evaluate_demo", str(missing), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("python -m medsight.demo.evaluate_demo: error: ")
    assert str(missing) in done.stderr and "No such file or directory" in done.stderr


def test_an_empty_folder_name_is_refused_not_taken_as_the_current_folder(tmp_path, capsys):
    """`--report "$UNSET"` (or an empty model or data name) became the current folder: the report was written
    wherever the command was started. Each is now refused, naming the argument, before anything is read."""
    import pytest

    from medsight.demo.evaluate_demo import main

    for argv, named in (([str(tmp_path), str(tmp_path), "--report", ""], "--report"),
                        (["", str(tmp_path)], "model"), ([str(tmp_path), ""], "data")):
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        assert stopped.value.code == 2
        assert f"argument {named}: an empty name" in capsys.readouterr().err
