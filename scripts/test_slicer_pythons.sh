#!/usr/bin/env bash
# The Slicer-side tests that need no MRML, under the Pythons 3D Slicer ships: CPython 3.9 (Slicer 5.8) and 3.12
# (Slicer 5.10 and later). Each runs in a throwaway venv holding only what those tests need, with the numpy, pydicom,
# pillow, packaging and typing-extensions that each Slicer release bundles; highdicom is then installed the way the
# module installs it into Slicer (MedSIGHTSlicerLib.packages: the generation that fits the pydicom, with a constraints
# file pinning the rest).
# Needs pyenv's 3.9.18 and 3.12.1 (PYENV_ROOT, default ~/.pyenv) and PyPI. Usage: bash scripts/test_slicer_pythons.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PYENV_ROOT=${PYENV_ROOT:-$HOME/.pyenv}
WORK=$(mktemp -d)
# Set-ups still running (one failed) end before their folders go; "|| true": under set -e a failing command here
# (kill with no job left) would become the script's exit status.
trap 'kill $(jobs -p) 2>/dev/null || true; wait || true; rm -rf "$WORK"' EXIT

# Tests of MedSIGHTSlicerLib that import neither MRML nor the engine.
TESTS=(
  Testing/MedSIGHTSlicerLib/test_client.py
  Testing/MedSIGHTSlicerLib/test_connection_check.py
  Testing/MedSIGHTSlicerLib/test_engine_launch.py
  Testing/MedSIGHTSlicerLib/test_engine_process.py
  Testing/MedSIGHTSlicerLib/test_jobs.py
  Testing/MedSIGHTSlicerLib/test_naming.py
  Testing/MedSIGHTSlicerLib/test_packages.py
  Testing/MedSIGHTSlicerLib/test_seg_writer.py
)

# Python and the packages each Slicer bundles (what the module must live with), from Slicer's SuperBuild
# (External_python-numpy.cmake, External_python-dicom-requirements.cmake, External_python-pythonqt-requirements.cmake,
# CMakeLists.txt's Slicer_REQUIRED_PYTHON_VERSION): Slicer 5.8 (Python 3.9), 5.10 (Python 3.12, numpy 2, pydicom 2)
# and 5.12 / main (Python 3.12, pydicom 3). Slicer builds CPython 3.9.10 and 3.12.10; the patch releases here are
# the ones pyenv has installed here (the same minor versions).
SPECS=("3.9.18 numpy==1.26.4 pydicom==2.4.4 pillow==10.3.0 packaging==24.0 typing-extensions==4.12.1"
       "3.12.1 numpy==2.0.2 pydicom==2.4.4 pillow==11.2.1 packaging==25.0 typing-extensions==4.14.0"
       "3.12.1 numpy==2.4.6 pydicom==3.0.2 pillow==12.2.0 packaging==26.2 typing-extensions==4.15.0")

# One environment: a venv with Slicer's bundled packages, then highdicom as the module installs it.
setup_env() {
  local version=$1 bundled=$2 venv=$3
  local python="$PYENV_ROOT/versions/$version/bin/python"
  if [ ! -x "$python" ]; then
    echo "test_slicer_pythons: no CPython $version at $python" >&2
    return 1
  fi
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check $bundled pytest
  # Everything under MedSIGHTSlicer/ must compile on this Python (the module file too, which needs Slicer to run);
  # compiled in the venv's own copy, so that the environments set up side by side leave nothing in the checkout.
  cp -r MedSIGHTSlicer "$venv/compiled"
  "$venv/bin/python" -m compileall -q "$venv/compiled"  # -q: prints only what fails
  # highdicom exactly as the module's Export installs it into Slicer.
  local requirements
  requirements=$(PYTHONPATH=MedSIGHTSlicer PYTHONDONTWRITEBYTECODE=1 "$venv/bin/python" -c \
    "from MedSIGHTSlicerLib.packages import dicom_seg_requirements as r; print(' '.join(r()))")
  PYTHONPATH=MedSIGHTSlicer PYTHONDONTWRITEBYTECODE=1 "$venv/bin/python" -c \
    "from MedSIGHTSlicerLib.packages import constraints_text; print(constraints_text(), end='')" >"$venv/constraints.txt"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --constraint "$venv/constraints.txt" $requirements
  # The install must have left Slicer's packages as they were.
  PYTHONPATH=MedSIGHTSlicer PYTHONDONTWRITEBYTECODE=1 "$venv/bin/python" -c \
    "from MedSIGHTSlicerLib.packages import constraints_text; import sys; sys.exit(constraints_text() != open(sys.argv[1]).read())" \
    "$venv/constraints.txt"
}

# The three set-ups (two thirds of the time, mostly waiting on pip) run side by side; the tests then one by one.
for i in "${!SPECS[@]}"; do
  read -r version bundled <<<"${SPECS[$i]}"
  setup_env "$version" "$bundled" "$WORK/venv$i" >"$WORK/setup$i.log" 2>&1 &
  pids[$i]=$!
done
for i in "${!SPECS[@]}"; do
  read -r version bundled <<<"${SPECS[$i]}"
  echo "== Slicer-side tests under CPython $version ($bundled)"
  if ! wait "${pids[$i]}"; then
    cat "$WORK/setup$i.log" >&2
    echo "test_slicer_pythons: setting up CPython $version failed" >&2
    exit 1
  fi
  venv="$WORK/venv$i"
  "$venv/bin/python" -m pip list --disable-pip-version-check 2>/dev/null | grep -iE "^(highdicom|pydicom|numpy|pillow) "
  PYTHONPATH="$REPO/MedSIGHTSlicer:$REPO/Testing/support" QT_QPA_PLATFORM=offscreen \
    "$venv/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
done
