"""Real-world DICOM series shapes made from pydicom's real files."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pydicom.data

#: Orientations of a scout: coronal and sagittal (a scanner's localizer images are taken across the axial stack).
SCOUT_ORIENTATIONS = ([1, 0, 0, 0, 0, -1], [0, 1, 0, 0, 0, -1])


def add_localizers(folder: Path, count: int, flagged: bool = True) -> list[Path]:
    """Write ``count`` localizer images into the series in ``folder``: pydicom's CT_small.dcm (another size) in the
    series' UIDs, coronal then sagittal, with ImageType ORIGINAL\\PRIMARY\\LOCALIZER when ``flagged`` (GE and Siemens
    put their scout in the CT series like this; some scanners leave the flag out)."""
    first = pydicom.dcmread(sorted(folder.iterdir())[0], stop_before_pixels=True)
    written = []
    for k in range(count):
        scout = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
        for tag in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
            setattr(scout, tag, first.get(tag))
        scout.SOPInstanceUID = pydicom.uid.generate_uid()
        scout.InstanceNumber = 1000 + k
        scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"] if flagged else ["ORIGINAL", "PRIMARY"]
        scout.ImageOrientationPatient = SCOUT_ORIENTATIONS[k % len(SCOUT_ORIENTATIONS)]
        scout.ImagePositionPatient = [-100.0, -100.0 + k, 100.0]
        written.append(folder / f"scout{k}.dcm")
        scout.save_as(written[-1])
    return written


def _tilted_ct(template: Path, tilt_degrees: float) -> pydicom.Dataset:
    """``template``'s slice tilted by ``tilt_degrees`` about the patient's left-right axis, stored as signed 16-bit
    values rescaled by -1024."""
    import numpy as np

    ds = pydicom.dcmread(template)
    tilt = np.deg2rad(tilt_degrees)
    ds.ImageOrientationPatient = [1, 0, 0, 0, f"{np.cos(tilt):.6f}", f"{-np.sin(tilt):.6f}"]
    ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    return ds


def write_tilted_series(template: Path, folder: Path, count: int, step: float, tilt_degrees: float) -> Path:
    """A CT series acquired with a tilted gantry, as scanners write it: ``template``'s slice (pydicom's CT5N) tilted
    by ``tilt_degrees`` about the patient's left-right axis, the table moving ``step`` mm along the body axis between
    slices, so the positions drift within the slices' planes. Each slice's stored values are a ramp, 100 k + 10 j + i
    (rescaled by -1024), which linear interpolation reproduces exactly."""
    import numpy as np

    ds = _tilted_ct(template, tilt_degrees)
    start = np.asarray(ds.ImagePositionPatient, dtype=float)
    j, i = np.mgrid[: ds.Rows, : ds.Columns]
    folder.mkdir()
    series_uid = pydicom.uid.generate_uid()
    for k in range(count):
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.InstanceNumber = series_uid, pydicom.uid.generate_uid(), k + 1
        ds.ImagePositionPatient = [f"{x:.4f}" for x in start + np.array([0.0, 0.0, step * k])]
        ds.PixelData = (100 * k + 10 * j + i).astype(np.int16).tobytes()
        ds.save_as(folder / f"slice{k:04d}.dcm")
    return folder


#: Stored value per mm along the slices' normal in `write_uneven_series`.
VALUE_PER_MM = 100


def write_uneven_series(template: Path, folder: Path, table_mm, tilt_degrees: float = 0.0) -> Path:
    """A CT series with unevenly spaced slices, as scanners write one with a missing slice or a drifting table step:
    ``template``'s slice (pydicom's CT5N), tilted by ``tilt_degrees`` as `write_tilted_series` does, at the table
    positions ``table_mm`` (mm along the body axis from its own position). Each slice's stored values are a ramp in
    patient space, VALUE_PER_MM d + 10 j + i (rescaled by -1024), d the slice's distance along its normal from the
    first slice's (mm), rounded to an integer: linear interpolation between slices reproduces it."""
    import numpy as np

    ds = _tilted_ct(template, tilt_degrees)
    start = np.asarray(ds.ImagePositionPatient, dtype=float)
    normal = np.cross(*np.asarray(ds.ImageOrientationPatient, dtype=float).reshape(2, 3))
    j, i = np.mgrid[: ds.Rows, : ds.Columns]
    folder.mkdir()
    series_uid = pydicom.uid.generate_uid()
    for k, z in enumerate(table_mm):
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.InstanceNumber = series_uid, pydicom.uid.generate_uid(), k + 1
        position = start + np.array([0.0, 0.0, z])
        ds.ImagePositionPatient = [f"{x:.4f}" for x in position]
        d = (position - start) @ normal
        ds.PixelData = (np.rint(VALUE_PER_MM * d) + 10 * j + i).astype(np.int16).tobytes()
        ds.save_as(folder / f"slice{k:04d}.dcm")
    return folder
