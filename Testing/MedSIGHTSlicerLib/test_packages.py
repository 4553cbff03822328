"""What the module pip-installs into Slicer: a highdicom that fits Slicer's pydicom, never touching Slicer's own
packages (issue 18, defect 2). Standard library only: also runs under Slicer's Pythons."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from medsight_testing.pip import UNINSTALLABLE, SlicerPackagingPipInstall, pip_install
from MedSIGHTSlicerLib.packages import (
    PINNED,
    constraints_file,
    constraints_text,
    dicom_seg_requirements,
    ensure,
    installed_versions,
    missing,
    pip_install_without_dialogs,
    requirement_name,
)


def test_highdicom_follows_the_bundled_pydicom():
    assert dicom_seg_requirements({"pydicom": "2.4.4"}) == ["highdicom>=0.22,<0.23"]  # Slicer 5.8 and 5.10
    assert dicom_seg_requirements({"pydicom": "3.0.1"}) == ["highdicom>=0.23,<1"]
    assert dicom_seg_requirements({}) == ["highdicom>=0.23,<1"]


def test_constraints_pin_what_slicer_ships():
    versions = {"pydicom": "2.4.4", "pillow": "10.4.0", "numpy": "1.26.4"}
    assert constraints_text(versions) == "numpy==1.26.4\npillow==10.4.0\npydicom==2.4.4\n"
    with constraints_file(versions) as path:
        assert Path(path).read_text() == constraints_text(versions)
    assert not Path(path).exists()
    here = installed_versions()
    assert set(here) <= set(PINNED) and "numpy" in here


def test_requirement_names_and_missing():
    assert requirement_name("highdicom>=0.22,<0.23") == "highdicom"
    assert requirement_name("typing-extensions; python_version<'3.10'") == "typing-extensions"
    assert missing(["numpy>=1", "pillow", "medsight-no-such-package<2"]) == ["medsight-no-such-package<2"]


def test_pip_honours_the_constraints(tmp_path):
    """pip itself refuses a plan that would change a pinned package (resolution only, nothing is installed)."""
    versions = installed_versions(["numpy"])
    pinned = f"numpy=={versions['numpy']}"
    with constraints_file({"numpy": "0.0.1"}) as path:
        refused = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index",
                                  "--constraint", path, pinned], capture_output=True, text=True)
    assert refused.returncode != 0 and "numpy" in (refused.stderr + refused.stdout)


def test_ensure_asks_first_and_declining_installs_nothing():
    questions, installs = [], []
    assert ensure(["numpy"], "Export", questions.append, installs.append) is True  # nothing missing: no question
    assert ensure([UNINSTALLABLE, "numpy"], "DICOM SEG export", lambda q: questions.append(q) or False,
                  installs.append) is False
    assert questions == ["DICOM SEG export needs the Python package(s) medsight-no-such-package. "
                         "Install them into 3D Slicer now?"]
    assert installs == []


def test_ensure_installs_with_the_constraints_and_a_failed_pip_is_one_clear_error():
    """pip's failure becomes a ValueError naming the package and pip's exit status (Slicer's CalledProcessError reads
    as a pip command line with a temporary file in it); the constraints file is gone afterwards. Before, the module's
    ensure_packages let CalledProcessError through after its own error dialog, so the user got two errors."""
    calls = []

    def install(args: list[str]) -> None:
        constraints = args[args.index("--constraint") + 1]
        calls.append((args, Path(constraints).read_text()))
        pip_install(args)

    with pytest.raises(ValueError) as failed:
        ensure([UNINSTALLABLE], "DICOM SEG export", lambda q: True, install)
    assert str(failed.value) == ("installing medsight-no-such-package into Slicer's Python failed (pip exit status 1); "
                                 "pip's output is in the Python console")
    (args, constraints_seen), = calls
    assert args[0] == UNINSTALLABLE and constraints_seen == constraints_text()
    assert not Path(args[args.index("--constraint") + 1]).exists()


def test_an_install_that_leaves_the_package_unimportable_is_one_clear_error():
    """pip can succeed into a folder Slicer's Python does not search (a user site it leaves out); ensure said the
    packages were there, and the export then failed on an ImportError. Now that is refused, naming the package."""
    installs = []
    with pytest.raises(ValueError) as failed:
        ensure([UNINSTALLABLE, "numpy"], "DICOM SEG export", lambda q: True, installs.append)
    assert str(failed.value).startswith(f"pip installed {requirement_name(UNINSTALLABLE)}, but Slicer's Python "
                                        "cannot import it; restart 3D Slicer")
    assert [args[0] for args in installs] == [UNINSTALLABLE]


@pytest.mark.parametrize("slicer_version", ["5.8", "5.12"])
def test_slicer_pip_install_shows_no_dialog_of_its_own(slicer_version):
    """Slicer 5.12's pip_install(requirements, **kwargs) shows a progress dialog and, when pip fails, an error dialog
    before it raises; the module then said "Export failed" about the same failure. It is now asked for no dialogs
    (show_progress=False), and 5.8's pip_install(requirements), which takes no keywords, is called as before: either
    way the one error is the ValueError that names the package."""
    slicer_512 = SlicerPackagingPipInstall()
    slicer_pip_install = slicer_512 if slicer_version == "5.12" else pip_install

    with pytest.raises(ValueError, match=r"^installing medsight-no-such-package into Slicer's Python failed \(pip "
                                         r"exit status 1\)"):
        ensure([UNINSTALLABLE], "DICOM SEG export", lambda q: True,
               lambda args: pip_install_without_dialogs(slicer_pip_install, args))
    assert slicer_512.dialogs == []
