"""Paths to real third-party test data (pydicom, pydicom-data, nibabel, nilearn); all offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _pydicom_files() -> Path:
    import pydicom.data

    return Path(pydicom.data.__file__).parent / "test_files"


def _pydicom_data_store() -> Path:
    import data_store  # the pydicom-data package

    return Path(data_store.__file__).parent / "data"


@pytest.fixture(scope="session")
def pydicom_files() -> Path:
    return _pydicom_files()


@pytest.fixture(scope="session")
def dicom_store() -> Path:
    return _pydicom_data_store()


@pytest.fixture(scope="session")
def dicomdir(pydicom_files: Path) -> Path:
    """pydicom's DICOMDIR test tree: real tiny CT/MR/CR series."""
    return pydicom_files / "dicomdirtests"


@pytest.fixture(scope="session")
def ct_series(dicomdir: Path) -> Path:
    """Five evenly spaced axial CT slices in one folder."""
    return dicomdir / "98892001" / "CT5N"


@pytest.fixture(scope="session")
def nibabel_data() -> Path:
    from nibabel.testing import data_path

    return Path(data_path)


@pytest.fixture(scope="session")
def nilearn_data() -> Path:
    import nilearn.datasets

    return Path(os.path.dirname(nilearn.datasets.__file__)) / "data"


@pytest.fixture(scope="session")
def mni_t1(nilearn_data: Path) -> Path:
    return nilearn_data / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


@pytest.fixture(scope="session")
def mni_gm(nilearn_data: Path) -> Path:
    return nilearn_data / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"


@pytest.fixture(scope="session")
def mni_wm(nilearn_data: Path) -> Path:
    return nilearn_data / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"


@pytest.fixture
def restacked_series(ct_series: Path, tmp_path: Path):
    """A function writing a one-series folder of copies of `ct_series`' first slice, placed at the given distances
    (mm) along its normal: real slice files with slice positions chosen by the test, written with ``decimals``
    decimals (clinical exports often write one or two), optionally with another ImageOrientationPatient."""
    import numpy as np
    import pydicom

    def write(distances, name: str = "restacked", decimals: int = 6, orientation=None) -> Path:
        template = pydicom.dcmread(sorted(ct_series.iterdir())[0])
        if orientation is not None:
            template.ImageOrientationPatient = [f"{x:.6f}" for x in orientation]
        iop = np.asarray(template.ImageOrientationPatient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        start = np.asarray(template.ImagePositionPatient, dtype=float)
        folder = tmp_path / name
        folder.mkdir()
        series_uid = pydicom.uid.generate_uid()
        for k, d in enumerate(distances):
            template.SeriesInstanceUID = series_uid
            template.SOPInstanceUID = pydicom.uid.generate_uid()
            template.InstanceNumber = k + 1
            template.ImagePositionPatient = [f"{x:.{decimals}f}" for x in start + d * normal]
            template.save_as(folder / f"slice{k:04d}.dcm")
        return folder

    return write
