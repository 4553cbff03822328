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
