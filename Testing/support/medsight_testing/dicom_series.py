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
