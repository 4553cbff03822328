"""DICOM readers: a series folder (SimpleITK/GDCM) and single or multi-frame files (pydicom; GDCM decodes the
compressed pixel data pydicom has no decoder for).

Geometry is computed from the headers and validated (one orientation, one grid, evenly spaced
slices, no duplicates); anything else is refused rather than resampled. The slice spacing is ITK's (first to last
slice over n - 1), so a volume lies on the grid 3D Slicer shows for the same series; where Slicer adds an
"acquisition geometry regularization" transform for slices off that grid, this reader refuses a slice more than
SPACING_RTOL of a spacing off it, plus the rounding of positions written with few decimals, unless asked to resample
such a series (regularize_spacing; regularize_tilt for slices drifting within their plane: `regularize`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import decimal
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk  # noqa: N813  (the universal alias)
from pydicom.errors import InvalidDicomError

from .errors import ImagingError, not_a_file
from .regularize import resample_spacing, resample_tilted, tilt_degrees
from .volume import MAX_VOXELS, Volume, check_size, check_voxels

# Relative slice-spacing deviation tolerated before calling a stack uneven (scanner round-off is ~1e-4): of each step
# from the median step, and of each slice's position from the evenly spaced grid. Positions written with few decimals
# widen both by their rounding (_position_rounding), at most by a spacing over POSITION_ROUNDING_MAX_FRACTION.
SPACING_RTOL = 0.01
POSITION_ROUNDING_MAX_FRACTION = 1 / 8
ORIENTATION_ATOL = 1e-4
#: Images of another orientation beside a series' stack, not flagged LOCALIZER, left out as its scout: a scout is one
#: to three images (one per plane); more is a mixed series, refused.
MAX_UNFLAGGED_LOCALIZERS = 3
#: ... and only when taken across the stack: a scout is coronal or sagittal beside axial slices. An image whose plane
#: lies within this angle of the stack's is one of its slices with another orientation (a mixed series), not a scout.
LOCALIZER_MIN_ANGLE_DEGREES = 45.0
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


class NotAnImageError(ImagingError):
    """A DICOM object without an image (SEG, RT Structure Set, SR, ...); ``kind`` says what it is, so that a caller
    (the command line) can word its own advice."""

    def __init__(self, problem: str, path: str, kind: str) -> None:
        self.kind = kind
        super().__init__(problem, path)


class SeriesChoiceError(ImagingError):
    """A folder holds several series and none was chosen; ``series`` lists them."""

    def __init__(self, series: list[SeriesInfo], folder: str) -> None:
        self.series = series
        listing = series_listing(series)
        super().__init__(f"{len(series)} series found; choose one with series_uid=:\n  {listing}", folder)


@dataclass(frozen=True)
class SeriesInfo:
    """One series found in a folder (no patient identifiers)."""

    series_uid: str
    n_files: int
    modality: str
    description: str
    #: The series' files in GDCM's order (each GDCM call rescans the whole folder: kept, not asked again).
    files: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def __str__(self) -> str:
        return f"{self.series_uid}  {self.modality:<6} {self.n_files:>4} files  {self.description}"


_HEADER_ERRORS = (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError)


def series_listing(series: list[SeriesInfo]) -> str:
    return "\n  ".join(str(s) for s in series)


def _header(path: str) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError as exc:
        # No 128-byte preamble and 'DICM' prefix: older writers omit them (pydicom's test rtstruct.dcm).
        ds = _header_without_preamble(path)
        if ds is None:
            raise ImagingError("unreadable DICOM file (no 'DICM' prefix and no DICOM header)", path) from exc
        return ds
    except _HEADER_ERRORS as exc:
        raise ImagingError(f"unreadable DICOM file ({exc})", path) from exc


def _header_without_preamble(path: str) -> pydicom.Dataset | None:
    """The header read without the 'DICM' check, when it is a DICOM object (has a SOP class), else None."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except _HEADER_ERRORS:
        return None
    return ds if "SOPClassUID" in ds else None


def _int(ds: pydicom.Dataset, tag: str, path: str, default: int | None = None) -> int:
    """An integer attribute; a malformed value names the file and the attribute (int() alone names neither)."""
    value = ds.get(tag)
    try:
        return int(value) if default is None else int(value or default)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ImagingError(f"missing or malformed {tag} {value!r} (an integer is expected)", path) from None


def _float(ds: pydicom.Dataset, tag: str, path: str, default: float) -> float:
    """A number attribute (``default`` when absent, empty or 0); a malformed value names the file and the attribute
    (pydicom hands an unparsable DS over as text, and float() alone names neither)."""
    value = ds.get(tag)
    if not value:
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not np.isfinite(number):
        raise ImagingError(f"malformed {tag} {str(value)!r} (a number is expected)", path)
    return number


def _require_image(ds: pydicom.Dataset, path: str) -> None:
    if ds.get("SOPClassUID") == SEG_SOP_CLASS:
        raise NotAnImageError("is a DICOM SEG, not an image; read it with read_dicom_seg()", path,
                              "a DICOM SEG (a segmentation)")
    has_pixels = any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    if not has_pixels and not ("Rows" in ds and "Columns" in ds):
        sop = ds.get("SOPClassUID")
        name = getattr(sop, "name", sop) or "unknown SOP class"
        modality = ds.get("Modality", "?")
        raise NotAnImageError(f"non-image DICOM ({name}, modality {modality}): no pixel data", path,
                              f"a DICOM {name} object (modality {modality}) with no pixel data")


def _image_series(series: list[SeriesInfo]) -> tuple[list[SeriesInfo], str | None]:
    """The series that are images, and the folder's non-image objects (SEG, RT Structure Set, SR, ...: GDCM lists
    a SEG as a series) in words, None when there are none. A SEG saved beside its CT made the folder "2 series"
    though only one can be asked about; 3D Slicer, too, loads a SEG as a segmentation, not as a volume."""
    images, others = [], []
    for s in series:
        try:
            _require_image(_header(s.files[0]), s.files[0])
            images.append(s)
        except NotAnImageError as err:
            named = f" ({s.description})" if s.description else ""
            others.append(f"{err.kind}, series {s.series_uid}{named}, in the folder (not an image)")
    return images, ("; ".join(others) or None)


@contextlib.contextmanager
def _decoder_tracebacks_unlogged() -> Iterator[None]:
    """pydicom logs each failed decoder's traceback before it raises; the ImagingError we raise reports it."""
    loggers = [logging.getLogger(name) for name in ("pydicom", "pydicom.pixels.decoders.base")]
    for logger in loggers:
        logger.addFilter(_without_traceback)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(_without_traceback)


def _without_traceback(record: logging.LogRecord) -> bool:
    return record.exc_info is None  # warnings and plain messages still show


def _last_line(message: str) -> str:
    """The last line of a library's error (GDCM's and pydicom's say what went wrong there, after their context)."""
    return message.strip().splitlines()[-1].strip() if message.strip() else message


def _gdcm_scan(scan: Callable[..., tuple[str, ...]], folder: str, *args: str) -> tuple[str, ...]:
    """A GDCM folder scan; GDCM stops at the first file it cannot parse (pydicom's rtdose_1frame.dcm does it) with a
    RuntimeError that names neither the folder nor the way out. ITK's warning for a folder without series (three
    lines of C++ source location on stderr) is kept quiet: the caller's error says it in one line."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return scan(folder, *args)
    except RuntimeError as exc:
        why = _last_line(str(exc))
        raise ImagingError(
            f"GDCM cannot scan this folder for series: a file in it is malformed ({why}); "
            "put the series' files in a folder of their own, or read the image file directly",
            folder,
        ) from exc
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def list_dicom_series(folder: str | os.PathLike[str]) -> list[SeriesInfo]:
    """The image series in ``folder`` (not recursive), as GDCM groups them."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ImagingError("not a folder", folder)
    uids = _gdcm_scan(sitk.ImageSeriesReader.GetGDCMSeriesIDs, folder)
    out = []
    for uid in uids:
        files = _gdcm_scan(sitk.ImageSeriesReader.GetGDCMSeriesFileNames, folder, uid)
        ds = _header(files[0])
        out.append(
            SeriesInfo(uid, len(files), str(ds.get("Modality", "?")), str(ds.get("SeriesDescription", "")),
                       tuple(files))
        )
    return out


DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: Subfolders named when a folder without series has DICOM files further down (a study or CD export's root), and how
#: far down and through how many folders they are looked for (an export nests patient/study/series: 3 levels).
SUBFOLDERS_NAMED = 5
SUBFOLDERS_DEPTH = 4
SUBFOLDERS_VISITED = 200


def _subfolders_hint(folder: str) -> str:
    """Where a folder without series of its own (an export's root, beside its DICOMDIR) holds DICOM files further
    down: the first SUBFOLDERS_NAMED such folders, to give one of them instead; "" when there are none."""
    found, more = [], False
    for visited, (root, dirs, files) in enumerate(os.walk(folder)):
        depth = os.path.relpath(root, folder).count(os.sep) + 1
        dirs[:] = sorted(dirs) if depth < SUBFOLDERS_DEPTH else []
        if visited == SUBFOLDERS_VISITED:
            break
        if root == folder or not any(_has_dicom_prefix(os.path.join(root, f)) for f in sorted(files)):
            continue
        if len(found) == SUBFOLDERS_NAMED:
            more = True
            break
        found.append(os.path.relpath(root, folder))
    if not found:
        return ""
    return (f"; its subfolders hold DICOM files ({', '.join(found)}{', ...' if more else ''}): give the folder of "
            "one series")


def _has_dicom_prefix(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _refuse_skipped_members(folder: str, first: pydicom.Dataset, series: list[SeriesInfo]) -> None:
    """GDCM leaves out, without a word, the files it cannot parse (a truncated copy, a damaged disk): a lost first
    or last slice would give a shorter volume that nothing flags. Refuse a left-out DICOM file that may be one of
    the slices of ``first``'s series."""
    listed = {os.path.realpath(f) for s in series for f in s.files}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_file() or os.path.realpath(entry.path) in listed:
            continue
        try:
            with open(entry.path, "rb") as f:
                if f.read(132)[128:] != b"DICM":
                    continue  # not DICOM (a README, a picture)
            ds = pydicom.dcmread(entry.path, stop_before_pixels=True)
        except _HEADER_ERRORS:
            ds = None
        if ds is None or _may_be_a_slice_of(ds, first):
            named = ds is not None and "SeriesInstanceUID" in ds
            raise ImagingError(
                f"{entry.name} {'belongs to this series but ' if named else ''}cannot be read as an image "
                "(truncated or damaged file?): the series would miss a slice; replace or remove the file",
                folder,
            )


def _may_be_a_slice_of(ds: pydicom.Dataset, first: pydicom.Dataset) -> bool:
    """A header of the same kind of image in the same series, or one that breaks off before it says which."""
    if "SOPClassUID" in ds and ds.SOPClassUID != first.get("SOPClassUID"):
        return False  # another kind of object (RT Structure Set, SR, ...)
    if "SeriesInstanceUID" in ds:
        return ds.SeriesInstanceUID == first.get("SeriesInstanceUID")
    return "SOPClassUID" not in ds and ds.file_meta.get("MediaStorageSOPClassUID") != DICOMDIR_SOP_CLASS


def _vec(values: Sequence[float], n: int, what: str, path: str) -> np.ndarray:
    try:
        v = np.asarray([float(x) for x in values], dtype=float)
    except (TypeError, ValueError) as exc:
        raise ImagingError(f"malformed {what} {values!r}", path) from exc
    if v.shape != (n,) or not np.all(np.isfinite(v)):
        raise ImagingError(f"malformed {what} {values!r}", path)
    return v


def _written_rounding(values: Sequence[object]) -> np.ndarray:
    """Half a unit in the last written digit of each decimal string (DS): how far each value may lie from the number
    the scanner computed. Exports often write positions with one or two decimals ("-125.5\\-125.5\\37.3")."""
    out = []
    for value in values:
        text = str(getattr(value, "original_string", None) or value).strip()
        try:
            exponent = decimal.Decimal(text).as_tuple().exponent
        except decimal.InvalidOperation:
            exponent = 0  # _vec has refused what is no number; this is never reached for a position it took
        out.append(0.5 * 10.0 ** exponent if isinstance(exponent, int) else 0.0)
    return np.asarray(out, dtype=float)


def _position_rounding(rounding: list[np.ndarray] | None, normal: np.ndarray) -> tuple[float, float]:
    """(along the normal, in the plane: per coordinate): how far written positions with these `_written_rounding`s may
    lie from the true ones, in mm. Per coordinate, the finest any position is written to: writers that strip trailing
    zeros write an exact whole value as "40" or "-143" beside "41.25", which is no rounding to 1 mm (taking each
    position's own widened the checks by up to a spacing over 1 / POSITION_ROUNDING_MAX_FRACTION: a 45 % gap or a
    1 degree tilt read without a word)."""
    if not rounding:
        return 0.0, 0.0
    r, a = np.asarray(rounding).min(axis=0), np.abs(normal)
    # In the plane: per coordinate (the shear check takes the largest), the rounding of a position less its part along
    # the normal, |e_i - n_i (e . n)|; an axial stack's whole-mm z ("40") is no in-plane rounding.
    in_plane = r * (1 - a**2) + a * (a @ r - a * r)
    return float(r @ a), float(in_plane.max())


def _rounding_allowance(along: float, step: float) -> float:
    """The rounding along the normal the spacing checks allow for: at most a spacing over
    1 / POSITION_ROUNDING_MAX_FRACTION, so a missing slice (a step twice the spacing) is still refused."""
    return min(along, POSITION_ROUNDING_MAX_FRACTION * step)


def _images(count: int) -> str:
    return f"{count} image{'s' if count != 1 else ''}"


def _is_localizer(ds: pydicom.Dataset) -> bool:
    return any(str(v).strip().upper() == "LOCALIZER" for v in np.atleast_1d(ds.get("ImageType") or []))


def _without_localizers(
    files: list[str], headers: list[pydicom.Dataset]
) -> tuple[list[str], list[pydicom.Dataset], str | None]:
    """The series' stack without its localizer (scout) images, and what was left out, in words (None: nothing).

    Scanners put the scout in the CT series (GE, Siemens CBCT: ImageType LOCALIZER), some without the flag; 3D
    Slicer then offers the series without it (its subseries by ImageType and by orientation). Left out: images
    flagged LOCALIZER beside unflagged ones, and up to MAX_UNFLAGGED_LOCALIZERS images of other orientations across
    (LOCALIZER_MIN_ANGLE_DEGREES) a larger stack of one; anything else is left to the mixed-series checks."""
    said = []
    flagged = [_is_localizer(ds) for ds in headers]
    if any(flagged) and not all(flagged):
        said.append(f"{_images(sum(flagged))} flagged LOCALIZER (ImageType)")
        files = [f for f, x in zip(files, flagged, strict=True) if not x]
        headers = [ds for ds, x in zip(headers, flagged, strict=True) if not x]
    if all("ImageOrientationPatient" in ds for ds in headers):
        orients = np.array([_vec(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", f)
                            for f, ds in zip(files, headers, strict=True)])
        group_of = np.full(len(files), -1)
        for k in range(len(files)):
            if group_of[k] < 0:
                group_of[(group_of < 0) & np.all(np.abs(orients - orients[k]) <= ORIENTATION_ATOL, axis=1)] = k
        sizes = sorted(np.bincount(group_of)[np.unique(group_of)], reverse=True)
        main = int(np.argmax(np.bincount(group_of)))
        others = len(files) - sizes[0]
        normals = np.cross(orients[:, :3], orients[:, 3:])
        across = np.abs(normals[group_of != main] @ normals[main]) <= np.cos(np.deg2rad(LOCALIZER_MIN_ANGLE_DEGREES))
        if 0 < others <= MAX_UNFLAGGED_LOCALIZERS and sizes[0] > max(others, sizes[1]) and across.all():
            said.append(f"{_images(others)} in another orientation than the other {sizes[0]} (a localizer?)")
            files = [f for f, g in zip(files, group_of, strict=True) if g == main]
            headers = [ds for ds, g in zip(headers, group_of, strict=True) if g == main]
    return files, headers, (" and ".join(said) if said else None)


#: Attributes that tell the stacks of one series apart when its slices share positions (echoes, time points, ...).
STACK_ATTRIBUTES = ("EchoNumbers", "EchoTime", "TemporalPositionIdentifier", "TriggerTime", "DiffusionBValue",
                    "AcquisitionNumber")


def _stacks_hint(headers: Sequence[pydicom.Dataset]) -> str:
    """The first of STACK_ATTRIBUTES whose value varies across the series, with its values, in words ("" if none):
    what a user needs to split the files into one folder per stack."""
    for tag in STACK_ATTRIBUTES:
        values = sorted({str(ds.get(tag, "")).strip() for ds in headers})
        if len(values) > 1:
            shown = ", ".join(v or "none" for v in values[:4]) + (", ..." if len(values) > 4 else "")
            return f" (the files differ in {tag}: {shown}); put each stack's files in a folder of their own"
    return ""


def _stack_geometry(
    positions: list[np.ndarray],
    iop: np.ndarray,
    pixel_spacing: np.ndarray,
    labels: list[str],
    path: str,
    default_dz: float,
    rounding: list[np.ndarray] | None = None,
    stacks_hint: Callable[[], str] | None = None,
    regularize_tilt: bool | None = None,
    regularize_spacing: bool | None = None,
) -> tuple[np.ndarray, tuple, tuple, np.ndarray]:
    """Sort slices along the normal and check they form one evenly spaced stack.

    ``regularize_tilt``: True lets slices drift within their plane (a gantry tilt; the caller resamples them); False
    refuses it naming the option; None (a multi-frame file, which has no such option) refuses it.
    ``regularize_spacing``: the same for slices unevenly spaced along the normal (`_uneven_spacing`); the spacing
    returned is ITK's (first to last slice over n - 1) either way: the grid the caller resamples them onto.

    ``rounding``: each position's `_written_rounding`; the checks allow for it, as a real CT whose positions are
    written to 0.1 mm steps 0.6 and 0.7 mm for 0.625 mm slices (3D Slicer warns and loads it). ``stacks_hint`` gives
    the end of the error for slices sharing a position (`_stacks_hint`; only then worked out).
    Returns (order, spacing (i, j, k), origin, direction) in LPS.
    """
    row_dir, col_dir = iop[:3], iop[3:]  # row_dir: along a row (increasing column index)
    if (
        abs(np.linalg.norm(row_dir) - 1) > 1e-3
        or abs(np.linalg.norm(col_dir) - 1) > 1e-3
        or abs(row_dir @ col_dir) > 1e-3
    ):
        raise ImagingError(f"ImageOrientationPatient {iop.tolist()} is not two orthonormal vectors", path)
    normal = np.cross(row_dir, col_dir)
    pos = np.asarray(positions)
    dist = pos @ normal
    order = np.argsort(dist, kind="stable")
    dist = dist[order]
    if len(pos) > 1:
        steps = np.diff(dist)
        dup = np.flatnonzero(steps < 1e-3)
        if dup.size:
            a, b = labels[order[dup[0]]], labels[order[dup[0] + 1]]
            raise ImagingError(
                f"{dup.size} duplicate slice position(s) (e.g. {a} and {b} at "
                f"{dist[dup[0]]:.3f} mm): several stacks, time points or 4D data{stacks_hint() if stacks_hint else ''}",
                path,
            )
        along, in_plane = _position_rounding(rounding, normal)
        uneven = _uneven_spacing(dist, labels, order, along)
        if uneven and not regularize_spacing:
            option = ("; read it with regularize_spacing=True (medsight ask --regularize-spacing) to resample it onto "
                      "an evenly spaced grid, as 3D Slicer's acquisition geometry regularization does"
                      if regularize_spacing is False else "")
            raise ImagingError(uneven + option, path)
        dz = float(dist[-1] - dist[0]) / (len(dist) - 1)
        drift = _in_plane_drift(pos[order], normal)
        if np.abs(drift).max() > _drift_tolerance(pixel_spacing, in_plane) and not regularize_tilt:
            option = ("; read it with regularize_tilt=True (medsight ask --regularize-tilt) to resample the slices "
                      "onto a regular grid, as 3D Slicer's acquisition geometry regularization does"
                      if regularize_tilt is False else "")
            raise ImagingError(
                f"slices are not stacked along their normal but drift {np.linalg.norm(drift, axis=1).max():.3f} mm "
                f"within their plane (a gantry tilt of {tilt_degrees(pos[order], normal):.1f} degrees, or a shear)"
                f"{option}",
                path,
            )
    else:
        dz = default_dz
    direction = np.stack([row_dir, col_dir, normal], axis=1)
    spacing = (float(pixel_spacing[1]), float(pixel_spacing[0]), float(dz))
    return order, spacing, tuple(pos[order[0]]), direction


def _in_plane_drift(sorted_positions: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Each slice position's offset from the first, less its part along the normal: non-zero for a tilted (sheared)
    stack, which a direction matrix cannot express."""
    relative = sorted_positions - sorted_positions[0]
    return relative - np.outer(relative @ normal, normal)


def _drift_tolerance(pixel_spacing: np.ndarray, in_plane_rounding: float) -> float:
    """The in-plane drift (mm, per coordinate) a stack may show and still be read unsheared: round-off, and twice the
    rounding of positions written with few decimals."""
    return max(1e-3, 0.01 * float(pixel_spacing.min())) + 2 * in_plane_rounding


def _uneven_spacing(dist: np.ndarray, labels: list[str], order: np.ndarray, along: float) -> str | None:
    """Why the sorted slice distances ``dist`` (positions written to ``along`` mm along the normal) are not one evenly
    spaced stack, in words; None when they are.

    Each step is checked against the median step (a missing slice), and each slice against ITK's grid (first to last
    slice over n - 1, the spacing ITK's series reader, and so 3D Slicer, sets): steps that each pass may still drift
    (400 slices stepping 0.625 then 0.631 mm). Slicer adds an "acquisition geometry regularization" transform for a
    slice more than 0.001 mm off its grid; a slice more than SPACING_RTOL of a spacing off it is uneven here, as its
    masks would be carried that far from where the slice was taken. Positions written with few decimals widen both
    checks by their rounding: a step and the median step each differ from the true ones by up to twice a position's
    rounding, and a slice and the grid each by up to once."""
    steps = np.diff(dist)
    typical = float(np.median(steps))
    dz = float(dist[-1] - dist[0]) / (len(dist) - 1)  # less rounded than any one step
    allowed = _rounding_allowance(along, min(typical, dz))
    coarse = (f"; ImagePositionPatient is rounded by up to {along:g} mm, too coarse for {dz:.3f} mm slices"
              if along > allowed else "")
    worst = int(np.argmax(np.abs(steps - typical)))
    if abs(steps[worst] - typical) > SPACING_RTOL * typical + 4 * allowed:
        return (f"uneven slice spacing: {steps[worst]:.3f} mm between {labels[order[worst]]} and "
                f"{labels[order[worst + 1]]}, {typical:.3f} mm elsewhere (missing slices?){coarse}")
    off = dist - dist[0] - dz * np.arange(len(dist))
    worst = int(np.argmax(np.abs(off)))
    if abs(off[worst]) > SPACING_RTOL * dz + 2 * allowed:
        return (f"uneven slice spacing: steps drift from {steps.min():.3f} to {steps.max():.3f} mm, so "
                f"{labels[order[worst]]} lies {abs(off[worst]):.3f} mm from its place on an evenly spaced grid of "
                f"{dz:.4f} mm (first to last slice){coarse}")
    return None


def _fmt(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{float(x):.6g}" for x in values) + "]"


def _slice_thickness(ds: pydicom.Dataset) -> float:
    for tag in ("SpacingBetweenSlices", "SliceThickness"):
        try:
            v = float(ds.get(tag) or 0)
        except (TypeError, ValueError):
            v = 0.0
        if v > 0:
            return v
    return 1.0


def _modality(ds: pydicom.Dataset, modality: str | None) -> str:
    return (modality or str(ds.get("Modality", "") or "OT")).upper()


def _sop_instance_uid(ds: pydicom.Dataset) -> str:
    """The image's SOP Instance UID: a file whose data set leaves it out (an exported or stripped copy) still has it
    in its meta header, the same UID by definition; "" when neither has it."""
    uid = ds.get("SOPInstanceUID") or ds.get("file_meta", pydicom.Dataset()).get("MediaStorageSOPInstanceUID")
    return str(uid or "")


def _uids(ds: pydicom.Dataset) -> dict[str, str | None]:
    def get(tag: str) -> str | None:
        v = ds.get(tag)
        return str(v) if v else None

    return {
        "series_uid": get("SeriesInstanceUID"),
        "study_uid": get("StudyInstanceUID"),
        "frame_of_reference_uid": get("FrameOfReferenceUID"),
    }


#: Transfer syntaxes that are lossy by definition; JPEG 2000 and HTJ2K may be either, and say so in
#: LossyImageCompression, as must a file decompressed from a lossy one.
LOSSY_TRANSFER_SYNTAXES = frozenset(
    {pydicom.uid.JPEGBaseline8Bit, pydicom.uid.JPEGExtended12Bit, pydicom.uid.JPEGLSNearLossless,
     *pydicom.uid.MPEGTransferSyntaxes}
)
_MAYBE_LOSSY_TRANSFER_SYNTAXES = frozenset({pydicom.uid.JPEG2000, pydicom.uid.JPEG2000MC, pydicom.uid.HTJ2K})
_LOSSY_METHODS = {"ISO_10918_1": "JPEG", "ISO_14495_1": "JPEG-LS near-lossless", "ISO_15444_1": "JPEG 2000",
                  "ISO_15444_15": "HTJ2K", "ISO_13818_2": "MPEG-2", "ISO_14496_10": "H.264", "ISO_23008_2": "HEVC"}


def _lossy_compression(ds: pydicom.Dataset) -> str | None:
    """The lossy compression the pixels went through, in words (transfer syntax or method, and ratio), else None."""
    ts = ds.get("file_meta", pydicom.Dataset()).get("TransferSyntaxUID")
    flagged = str(ds.get("LossyImageCompression", "")).strip() == "01"
    if ts not in LOSSY_TRANSFER_SYNTAXES and not flagged:
        return None
    if ts in LOSSY_TRANSFER_SYNTAXES or ts in _MAYBE_LOSSY_TRANSFER_SYNTAXES:
        what = ts.name
    else:  # stored uncompressed or lossless now: the method (0028,2114) names the earlier compression
        methods = [str(m) for m in np.atleast_1d(ds.get("LossyImageCompressionMethod") or [])]
        what = "earlier " + (" then ".join(_LOSSY_METHODS.get(m, m) for m in methods) or "lossy") + " compression"
    ratios = []
    for r in np.atleast_1d(ds.get("LossyImageCompressionRatio") or []):
        with contextlib.suppress(TypeError, ValueError):  # a malformed ratio must not cost the image
            ratios.append(f"{float(r):g}:1")
    return what + (f", ratio {' then '.join(ratios)}" if ratios else "")


def _series_lossy_compression(headers: Sequence[pydicom.Dataset]) -> str | None:
    found = [c for c in map(_lossy_compression, headers) if c]
    if not found:
        return None
    kinds = "; ".join(dict.fromkeys(found))
    return kinds if len(found) == len(headers) else f"{len(found)} of {len(headers)} files: {kinds}"


def _compact(array: np.ndarray) -> np.ndarray:
    """Integer HU stay integers (int16 when they fit) so labelmaps and windows stay exact. Colour samples (a trailing
    axis of 3) are left unsigned: a colour Volume refuses signed samples as a vector field."""
    if np.issubdtype(array.dtype, np.integer) and array.size and array.ndim != 4:
        lo, hi = int(array.min()), int(array.max())
        for dt in (np.int16, np.int32):
            if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
                return array.astype(dt, copy=False)
    return array


def read_dicom_series(
    folder: str | os.PathLike[str],
    series_uid: str | None = None,
    modality: str | None = None,
    max_voxels: int = MAX_VOXELS,
    regularize_tilt: bool = False,
    regularize_spacing: bool = False,
) -> Volume:
    """Read one series from a folder with SimpleITK's GDCM series reader.

    With several series in the folder, ``series_uid`` must name one; the error lists them. A series whose slices
    drift within their plane (gantry tilt) is refused unless ``regularize_tilt``, and one whose slices are unevenly
    spaced (a missing slice, a drifting step) unless ``regularize_spacing``: each resamples it onto a regular grid
    (`medsight.imaging.regularize`); the volume's ``resampled`` then says so.
    """
    folder = os.fspath(folder)
    series = list_dicom_series(folder)
    if not series:
        raise ImagingError("no DICOM image series found in this folder" + _subfolders_hint(folder), folder)
    not_chosen = None
    if series_uid is None:
        images, not_chosen = _image_series(series)
        if len(images) > 1:
            raise SeriesChoiceError(images, folder)
        series_uid = (images or series)[0].series_uid  # only non-images: its reading below says what it is
    elif series_uid not in {s.series_uid for s in series}:
        raise ImagingError(
            f"series {series_uid} not found; present: " + ", ".join(s.series_uid for s in series), folder
        )
    files = list(next(s.files for s in series if s.series_uid == series_uid))
    headers = [_header(f) for f in files]
    _refuse_skipped_members(folder, headers[0], series)
    for f, ds in zip(files, headers, strict=True):
        _require_image(ds, f)
    files, headers, left_out = _without_localizers(files, headers)
    left_out = " and ".join(filter(None, (left_out, not_chosen))) or None
    if len(files) == 1:
        return dataclasses.replace(read_dicom_file(files[0], modality=modality, max_voxels=max_voxels),
                                   left_out=left_out)
    first = headers[0]
    if _int(first, "NumberOfFrames", files[0], 1) > 1:
        raise ImagingError(
            f"series {series_uid} mixes {len(files)} multi-frame files; read them one by one", folder
        )

    def same(tag: str, what: str, atol: float = 0.0) -> None:
        ref = first.get(tag)
        for f, ds in zip(files[1:], headers[1:], strict=True):
            v = ds.get(tag)
            if ref is None or v is None:
                if ref is not v:
                    raise ImagingError(f"mixed series: {what} missing in some files ({f})", folder)
                continue
            a, b = np.atleast_1d(np.asarray(ref, dtype=float)), np.atleast_1d(np.asarray(v, dtype=float))
            if a.shape != b.shape or not np.allclose(a, b, atol=atol, rtol=0):
                raise ImagingError(
                    f"mixed series: {what} {_fmt(a)} in {os.path.basename(files[0])} but "
                    f"{_fmt(b)} in {os.path.basename(f)}",
                    folder,
                )

    same("Rows", "rows")
    same("Columns", "columns")
    same("SamplesPerPixel", "samples per pixel")
    same("ImageOrientationPatient", "orientations", ORIENTATION_ATOL)
    same("PixelSpacing", "pixel spacings", 1e-4)
    # One display polarity for the whole volume: GDCM inverts only the MONOCHROME1 slices' values (and the first
    # file alone decides invert_display), so a mixed series would come back with some slices negated. Palette
    # indices beside grey values would be read as one or the other throughout. (RGB beside YBR is fine: both decode
    # to RGB.)
    photometric = str(first.get("PhotometricInterpretation", ""))
    monochrome1 = photometric == "MONOCHROME1"
    palette = photometric == "PALETTE COLOR"
    for f, ds in zip(files[1:], headers[1:], strict=True):
        other = str(ds.get("PhotometricInterpretation", ""))
        if (other == "MONOCHROME1") != monochrome1 or (other == "PALETTE COLOR") != palette:
            why = ("colour from a palette in some slices, grey in others" if palette or other == "PALETTE COLOR"
                   else "low values shown white in some slices, black in others")
            raise ImagingError(
                f"mixed series: photometric interpretation {photometric or 'missing'} in "
                f"{os.path.basename(files[0])} but {other or 'missing'} in {os.path.basename(f)} ({why})",
                folder,
            )
    for f, ds in zip(files, headers, strict=True):
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if tag not in ds:
                raise ImagingError(f"no {tag}: cannot place the slice in patient space", f)
    iop = _vec(first.ImageOrientationPatient, 6, "ImageOrientationPatient", files[0])
    ps = _vec(first.PixelSpacing, 2, "PixelSpacing", files[0])
    positions = [
        _vec(ds.ImagePositionPatient, 3, "ImagePositionPatient", f)
        for f, ds in zip(files, headers, strict=True)
    ]
    rounding = [_written_rounding(ds.ImagePositionPatient) for ds in headers]
    order, spacing, origin, direction = _stack_geometry(
        positions, iop, ps, [os.path.basename(f) for f in files], folder, _slice_thickness(first), rounding,
        lambda: _stacks_hint(headers), regularize_tilt, regularize_spacing,
    )
    files = [files[i] for i in order]
    headers = [headers[i] for i in order]
    spp = _int(first, "SamplesPerPixel", files[0], 1)
    rows, columns = _int(first, "Rows", files[0]), _int(first, "Columns", files[0])
    check_size((len(files), rows, columns, spp), folder, max_voxels)

    # Colour pixels have no Modality LUT or rescale (PS3.3 C.11.1: only monochrome), but GDCM applies a
    # RescaleSlope/Intercept found in a colour file to its samples (wrapping them): colour is taken from pydicom.
    colour = spp == 3 or palette
    if colour or monochrome1 or any("ModalityLUTSequence" in ds for ds in headers):
        # GDCM turns MONOCHROME1 into MONOCHROME2 by inverting the stored values, which falsifies the rescaled values
        # (HU) and, with invert_display, inverts the display twice; and it ignores a Modality LUT: take pydicom's
        # values, as read_dicom_file does. GDCM reads only the first slice's header, for the geometry cross-check
        # below (its series reader takes origin and direction from there too): decoding the series there as well
        # would cost a second decode and a second copy of the pixels.
        array = _compact(np.stack([read_dicom_file(f, max_voxels=max_voxels).array[0] for f in files]))
        gdcm: sitk.Image | sitk.ImageFileReader = _gdcm_header(files[0])
    else:
        gdcm = _gdcm_series(files, headers, spacing, direction, rounding, folder, quiet=regularize_spacing)
        array = _compact(sitk.GetArrayFromImage(gdcm))
    want = (len(files), rows, columns) + ((3,) if colour else ())
    if array.shape != want:
        raise ImagingError(f"pixel data has shape {array.shape}, headers say {want}", folder)
    # Cross-check: GDCM's geometry must agree with ours, or something is off with the headers.
    itk_m = np.asarray(gdcm.GetDirection()).reshape(3, 3)
    if not (np.allclose(itk_m, direction, atol=1e-4) and np.allclose(gdcm.GetOrigin(), origin, atol=1e-3)):
        raise ImagingError("GDCM and header geometry disagree (inconsistent slice headers)", folder)
    check_voxels(array, folder)
    done = []
    sorted_positions = np.asarray(positions)[order]
    along, in_plane = _position_rounding(rounding, direction[:, 2])
    if regularize_tilt and np.abs(_in_plane_drift(sorted_positions, direction[:, 2])).max() > _drift_tolerance(
            ps, in_plane):  # the same test that refuses the stack without the option
        array, origin, tilt = resample_tilted(array, sorted_positions, direction, spacing, folder, max_voxels)
        done.append(tilt)
    distances = sorted_positions @ direction[:, 2]
    if regularize_spacing and _uneven_spacing(distances, files, np.arange(len(files)), along):  # the same test
        array, uneven = resample_spacing(array, distances, spacing, folder)  # after the tilt: slices now aligned
        done.append(uneven)
    resampled = "; ".join(done) or None
    return Volume(
        array=array,
        spacing=spacing,
        origin=origin,
        direction=direction,
        modality=_modality(first, modality),
        **_uids(first),
        sop_instance_uids=tuple(map(_sop_instance_uid, headers)),
        source_files=tuple(files),
        source=folder,
        invert_display=monochrome1,
        lossy_compression=_series_lossy_compression(headers),
        left_out=left_out,
        resampled=resampled,
    )


def _gdcm_series(
    files: list[str],
    headers: list[pydicom.Dataset],
    spacing: tuple,
    direction: np.ndarray,
    rounding: list[np.ndarray],
    folder: str,
    quiet: bool = False,
) -> sitk.Image:
    """The sorted slices ``files`` read by GDCM's series reader, rescaled (float where the rescale needs it).
    ``quiet``: no spacing warning at all (uneven slices the caller resamples: it says so itself)."""
    slopes = {
        (_float(ds, "RescaleSlope", f, 1.0), _float(ds, "RescaleIntercept", f, 0.0))
        for f, ds in zip(files, headers, strict=True)
    }
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    # ITK warns on stderr of any step more than 1e-4 of a spacing off; this series passed our own checks (each step
    # within SPACING_RTOL of the median, each slice within SPACING_RTOL of the grid: a step within twice that, and
    # four times the positions' rounding).
    along = _rounding_allowance(_position_rounding(rounding, direction[:, 2])[0], spacing[2])
    reader.SetSpacingWarningRelThreshold(np.inf if quiet else 2 * SPACING_RTOL + 4 * along / spacing[2])
    # Slice-varying or fractional rescale needs float output, or GDCM would truncate.
    if len(slopes) > 1 or any(s != int(s) or b != int(b) for s, b in slopes):
        reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise ImagingError(f"corrupt or unreadable pixel data ({_last_line(str(exc))})", folder) from exc


def _gdcm_header(path: str) -> sitk.ImageFileReader:
    """GDCM's reading of a file's header (origin, direction), its pixels left undecoded."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise ImagingError(f"GDCM cannot read the header ({_last_line(str(exc))})", path) from exc
    return reader


def _frame_rescale(ds: pydicom.Dataset, n_frames: int, path: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame (slope, intercept): enhanced functional groups, then the top level, then RT Dose."""
    slope = np.full(n_frames, _float(ds, "RescaleSlope", path, 1.0))
    inter = np.full(n_frames, _float(ds, "RescaleIntercept", path, 0.0))
    shared = ds.get("SharedFunctionalGroupsSequence")
    per = ds.get("PerFrameFunctionalGroupsSequence")
    for f in range(n_frames):
        for groups in ((per[f] if per and f < len(per) else None), (shared[0] if shared else None)):
            seq = groups.get("PixelValueTransformationSequence") if groups is not None else None
            if seq:
                slope[f] = _float(seq[0], "RescaleSlope", path, 1.0)
                inter[f] = _float(seq[0], "RescaleIntercept", path, 0.0)
                break
    if "DoseGridScaling" in ds:
        slope[:] = _float(ds, "DoseGridScaling", path, 1.0)
    return slope, inter


def _apply_modality_lut(pixels: np.ndarray, ds: pydicom.Dataset, path: str) -> np.ndarray:
    """Stored values through the file's Modality LUT (in place of a rescale: DICOM allows one or the other), as
    pydicom's ``apply_modality_lut`` maps them; neither GDCM nor our rescale path reads the table."""
    from pydicom.pixels import apply_modality_lut

    try:
        return np.asarray(apply_modality_lut(pixels, ds)).astype(np.int64)
    except (AttributeError, KeyError) as exc:  # pydicom names only the tag
        raise ImagingError(f"ModalityLUTSequence lacks its LUTDescriptor or LUTData ({exc})", path) from exc
    except (IndexError, TypeError, ValueError) as exc:  # e.g. a table shorter than its descriptor says
        raise ImagingError(f"malformed ModalityLUTSequence ({exc})", path) from exc


def _functional(ds: pydicom.Dataset, frame: int, seq_name: str) -> pydicom.Dataset | None:
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if per and frame < len(per) and seq_name in per[frame]:
        return per[frame][seq_name][0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and seq_name in shared[0]:
        return shared[0][seq_name][0]
    return None


def _relative_offsets(offsets: np.ndarray, ipp: np.ndarray, iop: np.ndarray, path: str) -> np.ndarray:
    """RT Dose GridFrameOffsetVector as offsets from the first frame. DICOM allows two kinds: relative (the first
    value is 0) or, for axial frames only, the frames' z coordinates (the first value is the position's z)."""
    if abs(offsets[0]) <= 1e-3:
        return offsets
    if abs(offsets[0] - ipp[2]) <= 1e-3 and np.allclose(iop, [1, 0, 0, 0, 1, 0], atol=ORIENTATION_ATOL):
        return offsets - ipp[2]
    raise ImagingError(
        f"GridFrameOffsetVector starts at {offsets[0]:g}: neither 0 (offsets from the first frame) nor the "
        f"ImagePositionPatient z {ipp[2]:g} of axial frames (their z coordinates), so the frames cannot be placed",
        path,
    )


def _refuse_partly_placed_frames(ds: pydicom.Dataset, n_frames: int, groups: Sequence[str], path: str) -> None:
    """A multi-frame file places its frames in patient space all or none: one frame without its position (or
    orientation, or pixel spacing) beside placed frames would have them all read as an unplaced grid, in file order
    rather than sorted by position; refused, naming the frame and what it lacks."""
    if not any(_functional(ds, f, "PlanePositionSequence") is not None for f in range(n_frames)):
        return  # none placed: a plain grid, flagged as such
    for f in range(n_frames):
        lacking = [s for s in groups if _functional(ds, f, s) is None]
        if lacking:
            raise ImagingError(
                f"frame {f + 1} of {n_frames} has no {' or '.join(lacking)}, though the file gives frame positions "
                "(PlanePositionSequence): its frames cannot be placed in patient space",
                path,
            )


def _file_geometry(
    ds: pydicom.Dataset, n_frames: int, path: str
) -> tuple[np.ndarray | None, tuple, tuple, np.ndarray, bool]:
    """(frame order, spacing, origin, direction, has_patient_geometry) of one DICOM file."""
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        orients, positions, spacings, rounding = [], [], [], []
        groups = ("PlaneOrientationSequence", "PlanePositionSequence", "PixelMeasuresSequence")
        for f in range(n_frames):
            o, p, m = (_functional(ds, f, s) for s in groups)
            if o is None or p is None or m is None:
                _refuse_partly_placed_frames(ds, n_frames, groups, path)
                break
            orients.append(_vec(o.ImageOrientationPatient, 6, "ImageOrientationPatient", path))
            positions.append(_vec(p.ImagePositionPatient, 3, "ImagePositionPatient", path))
            rounding.append(_written_rounding(p.ImagePositionPatient))
            spacings.append(_vec(m.PixelSpacing, 2, "PixelSpacing", path))
        if len(positions) == n_frames:
            if not all(np.allclose(o, orients[0], atol=ORIENTATION_ATOL) for o in orients):
                raise ImagingError("mixed orientations among the frames", path)
            if not all(np.allclose(s, spacings[0], atol=1e-4) for s in spacings):
                raise ImagingError("mixed pixel spacings among the frames", path)
            m0 = _functional(ds, 0, "PixelMeasuresSequence")
            order, spacing, origin, direction = _stack_geometry(
                positions,
                orients[0],
                spacings[0],
                [f"frame {f + 1}" for f in range(n_frames)],
                path,
                _slice_thickness(m0) if m0 is not None else 1.0,
                rounding,
            )
            return order, spacing, origin, direction, True
    if all(t in ds for t in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")):
        iop = _vec(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", path)
        ipp = _vec(ds.ImagePositionPatient, 3, "ImagePositionPatient", path)
        ps = _vec(ds.PixelSpacing, 2, "PixelSpacing", path)
        if n_frames == 1:
            order, spacing, origin, direction = _stack_geometry(
                [ipp], iop, ps, ["frame 1"], path, _slice_thickness(ds)
            )
            return order, spacing, origin, direction, True
        if "GridFrameOffsetVector" in ds:  # RT Dose: frames offset along the normal
            values = list(np.atleast_1d(ds.GridFrameOffsetVector))
            offsets = _vec(values, len(values), "GridFrameOffsetVector", path)
            if len(offsets) != n_frames:
                raise ImagingError(
                    f"GridFrameOffsetVector has {len(offsets)} values for {n_frames} frames", path
                )
            normal = np.cross(iop[:3], iop[3:])
            offsets = _relative_offsets(offsets, ipp, iop, path)
            positions = [ipp + o * normal for o in offsets]
            order, spacing, origin, direction = _stack_geometry(
                positions, iop, ps, [f"frame {f + 1}" for f in range(n_frames)], path, 1.0
            )
            return order, spacing, origin, direction, True
    # No patient geometry: a plain grid, flagged so nobody mistakes it for patient space.
    ps = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    sp = _vec(ps, 2, "PixelSpacing", path) if ps else np.ones(2)
    if np.any(sp <= 0):
        sp = np.ones(2)
    return None, (float(sp[1]), float(sp[0]), _slice_thickness(ds)), (0.0, 0.0, 0.0), np.eye(3), False


def _is_compressed(ds: pydicom.Dataset) -> bool:
    ts = ds.get("file_meta", pydicom.Dataset()).get("TransferSyntaxUID")
    return ts is not None and ts.is_compressed


def _stored_values_via_gdcm(path: str, ds: pydicom.Dataset, n_frames: int, pydicom_error: str) -> np.ndarray:
    """Compressed pixel data that pydicom cannot decode, decoded by GDCM (SimpleITK), as pydicom's ``pixel_array``
    gives it: stored values, so that rescale, MONOCHROME1 and frame order take the path every other file takes.

    GDCM returns rescaled values, and MONOCHROME1 turned into MONOCHROME2 by ``2**BitsStored - 1 - stored``
    (measured on pydicom's RG1/RG3_UNCR.dcm): both are undone here. Frame-wise rescale (functional groups), signed
    MONOCHROME1 and PALETTE COLOR have no such check, so those are refused rather than guessed.
    """
    ts_name = ds.file_meta.TransferSyntaxUID.name
    photometric = str(ds.get("PhotometricInterpretation", ""))
    spp = _int(ds, "SamplesPerPixel", path, 1)
    signed = _int(ds, "PixelRepresentation", path, 0) == 1
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    why_not = None
    if enhanced and spp == 1:
        why_not = "its frames carry their own rescale, which GDCM's reading is not checked against"
    elif photometric == "MONOCHROME1" and signed:
        why_not = "signed MONOCHROME1, which GDCM inverts in a way not checked here"
    elif photometric == "PALETTE COLOR":
        why_not = "PALETTE COLOR, which GDCM turns into RGB itself"
    elif spp not in (1, 3):
        why_not = f"{spp} samples per pixel"
    slope = _float(ds, "RescaleSlope", path, 1.0)
    inter = _float(ds, "RescaleIntercept", path, 0.0)
    exact = spp == 3 or (slope == 1 and inter == int(inter))  # else GDCM must give floats, as it would truncate
    pixels = None
    if why_not is None:
        try:
            if spp == 3 and ("RescaleSlope" in ds or "RescaleIntercept" in ds):
                pixels = _colour_via_gdcm_without_rescale(ds)
            else:
                image = sitk.ReadImage(path) if exact else sitk.ReadImage(path, sitk.sitkFloat64)
                pixels = sitk.GetArrayFromImage(image)
        except RuntimeError as exc:
            why_not = _last_line(str(exc))
    if pixels is None:
        raise ImagingError(
            f"cannot decode the {ts_name} pixel data: pydicom: {_last_line(pydicom_error)}; GDCM: {why_not}. "
            "The file may be damaged; if not, install a decoder pydicom can use (pip install pylibjpeg "
            "pylibjpeg-libjpeg pylibjpeg-openjpeg, or python-gdcm) or convert the file to uncompressed DICOM",
            path,
        )
    if spp == 1:
        pixels = np.rint((pixels.astype(np.float64) - inter) / slope).astype(np.int64)
        if photometric == "MONOCHROME1":
            pixels = (1 << _int(ds, "BitsStored", path)) - 1 - pixels
    if n_frames == 1 and pixels.ndim == (3 if spp == 1 else 4):
        pixels = pixels[0]  # GDCM reads one frame as a one-slice volume; pydicom gives the frame alone
    return pixels


def _colour_via_gdcm_without_rescale(ds: pydicom.Dataset) -> np.ndarray:
    """GDCM's decoding of a colour file that carries a RescaleSlope/Intercept: GDCM applies them to the colour
    samples (wrapping them: SC_rgb.dcm given slope 0.5 came back up to 249 off), though colour has no Modality LUT
    (PS3.3 C.7.6.3.1.2, C.11.1), so it reads a copy without them."""
    bare = copy.deepcopy(ds)
    for tag in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
        if tag in bare:
            delattr(bare, tag)
    with tempfile.TemporaryDirectory() as tmp:
        copy_path = os.path.join(tmp, "colour.dcm")
        bare.save_as(copy_path)
        return sitk.GetArrayFromImage(sitk.ReadImage(copy_path))


def _name_the_transfer_syntax(ds: pydicom.Dataset) -> None:
    """A file without a meta header (no preamble, as older writers leave it) names no transfer syntax, and pydicom
    then refuses to decode its pixels; it read the data set in one of the uncompressed encodings, which is it."""
    if "TransferSyntaxUID" in ds.file_meta or ds.original_encoding[0] is None:
        return
    implicit, little = ds.original_encoding
    ds.file_meta.TransferSyntaxUID = (
        pydicom.uid.ImplicitVRLittleEndian if implicit
        else pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian
    )


def read_dicom_file(
    path: str | os.PathLike[str], modality: str | None = None, max_voxels: int = MAX_VOXELS
) -> Volume:
    """Read a single-frame or multi-frame DICOM image file with pydicom (rescale applied)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise not_a_file(path)
    ds = _header(path)
    _require_image(ds, path)
    n_frames = _int(ds, "NumberOfFrames", path, 1)
    spp = _int(ds, "SamplesPerPixel", path, 1)
    rows, columns = _int(ds, "Rows", path), _int(ds, "Columns", path)
    check_size((n_frames, rows, columns, spp), path, max_voxels)
    try:
        with _decoder_tracebacks_unlogged():
            ds = pydicom.dcmread(path, force=ds.preamble is None)  # no preamble: _header read it forced
            _name_the_transfer_syntax(ds)
            pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for bad pixel data
        if not _is_compressed(ds):
            raise ImagingError(f"corrupt or unreadable pixel data ({exc})", path) from exc
        # pydicom has no decoder installed for JPEG Lossless or 12-bit JPEG (PACS exports often are): GDCM has.
        pixels = _stored_values_via_gdcm(path, ds, n_frames, str(exc))
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        pixels = apply_color_lut(pixels, ds)
        spp = 3
    rgb = spp == 3
    if n_frames == 1:
        pixels = pixels[None]
    want = (n_frames, rows, columns) + ((3,) if rgb else ())
    if pixels.shape != want:
        raise ImagingError(f"pixel data has shape {pixels.shape}, headers say {want}", path)
    order, spacing, origin, direction, geo = _file_geometry(ds, n_frames, path)
    if not rgb and "ModalityLUTSequence" in ds:
        pixels = _compact(_apply_modality_lut(pixels, ds, path))
    elif not rgb:
        slope, inter = _frame_rescale(ds, n_frames, path)
        if np.all(slope == 1) and np.all(inter == inter.astype(np.int64)):
            pixels = pixels.astype(np.int64) + inter.astype(np.int64)[:, None, None]
            pixels = _compact(pixels)
        else:
            pixels = (pixels.astype(np.float64) * slope[:, None, None] + inter[:, None, None]).astype(
                np.float32
            )
    if order is not None:
        pixels = pixels[order]
    check_voxels(pixels, path)
    return Volume(
        array=np.ascontiguousarray(pixels),
        spacing=spacing,
        origin=origin,
        direction=direction,
        modality=_modality(ds, modality),
        **_uids(ds),
        sop_instance_uids=(_sop_instance_uid(ds),),
        source_files=(path,),
        source=path,
        frame_numbers=tuple(int(f) + 1 for f in (order if order is not None else range(n_frames))),
        has_patient_geometry=geo,
        invert_display=photometric == "MONOCHROME1",
        lossy_compression=_lossy_compression(ds),
    )


def read_dicom(
    path: str | os.PathLike[str],
    series_uid: str | None = None,
    modality: str | None = None,
    max_voxels: int = MAX_VOXELS,
    regularize_tilt: bool = False,
    regularize_spacing: bool = False,
) -> Volume:
    """A folder is read as a series, a file as a single or multi-frame image."""
    p = Path(path)
    if p.is_dir():
        return read_dicom_series(p, series_uid=series_uid, modality=modality, max_voxels=max_voxels,
                                 regularize_tilt=regularize_tilt, regularize_spacing=regularize_spacing)
    return read_dicom_file(p, modality=modality, max_voxels=max_voxels)
