"""`Volume`: a voxel array with its exact patient-space geometry and no patient identifiers."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import ImagingError

# LPS (DICOM, ITK) and RAS (Slicer, NIfTI) differ by the sign of the first two axes.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: A modality as DICOM's Modality attribute writes it (CT, MR, US, PT, ...): letters and digits, at most 16. Only CT
#: changes what the model sees (Hounsfield windows and the CT window presets); the prompt does not name the modality.
MODALITY_PATTERN = r"^[A-Za-z0-9]{1,16}$"

#: Default upper bound on voxels (x components) a reader accepts: 1024^3, i.e. 2 GiB of int16.
MAX_VOXELS = 1024**3


@dataclass
class Volume:
    """A 3D image on a regular grid.

    ``array`` is indexed ``[k, j, i]`` (slice, row, column), like SimpleITK and Slicer's
    ``arrayFromVolume``; colour images carry a trailing axis of 3 (RGB). Geometry is stored the ITK way,
    in LPS: ``spacing`` is (i, j, k) in mm, ``origin`` is the LPS centre of voxel (0, 0, 0) and the
    columns of ``direction`` are the LPS unit vectors of the i, j and k axes.

    Only the UIDs needed to reference the source are kept (series, study, frame of reference, and
    per-slice SOP instance UIDs and file paths); names, IDs and dates of the patient never are.
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    modality: str = "OT"
    series_uid: str | None = None
    study_uid: str | None = None
    frame_of_reference_uid: str | None = None
    sop_instance_uids: tuple[str, ...] = ()
    source_files: tuple[str, ...] = ()
    #: For a multi-frame file: the 1-based frame number of each k slice (frames are sorted by position).
    frame_numbers: tuple[int, ...] = ()
    source: str | None = None
    #: False when the file has no patient geometry (PNG, a multi-frame file without positions):
    #: the matrices then map indices to a unit grid only.
    has_patient_geometry: bool = True
    #: DICOM MONOCHROME1: low values are displayed white.
    invert_display: bool = False
    #: A NIfTI input's header transforms, ((qform, qform_code), (sform, sform_code)), 4x4 voxel-to-RAS: a mask
    #: written for it repeats them, so that it stays in the image's space (MNI152, aligned, ...) in every viewer.
    nifti_xforms: tuple[tuple[np.ndarray, int], tuple[np.ndarray, int]] | None = None
    #: DICOM whose pixels went through lossy compression (a lossy transfer syntax, or LossyImageCompression "01"):
    #: which, in words, for the user to be told; None when nothing says so.
    lossy_compression: str | None = None
    #: DICOM images of the series left out of the volume (its localizer), and the folder's non-image objects (a SEG
    #: beside the series), in words, for the user to be told; None when nothing was left out.
    left_out: str | None = None
    #: NaN voxels of a NIfTI, NRRD or MetaImage file, or of an upload to the server, read as the volume's minimum
    #: (`fill_nan`), in words, for the user to be told; None when there were none.
    nan_filled: str | None = None
    #: A DICOM series resampled onto this grid from its acquired slices (a gantry tilt or uneven slice spacing
    #: regularized), in words; None when the voxels are the acquired ones. A DICOM SEG, which lies on its source
    #: images' grid, cannot reference it.
    resampled: str | None = None

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if not self.array.dtype.isnative:  # big-endian files (NIfTI, DICOM) -> native for torch and VTK
            self.array = self.array.astype(self.array.dtype.newbyteorder("="))
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        if self.array.ndim not in (3, 4) or (self.array.ndim == 4 and self.array.shape[3] != 3):
            raise ImagingError(
                f"a Volume needs a (k, j, i) or (k, j, i, 3) array, got {self.array.shape}", self.source
            )
        if self.array.ndim == 4 and self.array.dtype.kind != "u":
            # Every colour reader gives unsigned samples (pydicom's 8/16/32-bit RGB, ITK's RGB pixels, PIL): signed
            # or float values in three channels are something else (a vector field, three echoes), and windowing
            # them as a colour picture would show the model a made-up image.
            raise ImagingError(
                f"a (k, j, i, 3) array is a colour volume, whose samples are unsigned integers; got "
                f"{self.array.dtype} (three channels or a vector field?): give one channel as a (k, j, i) volume",
                self.source,
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        """(k, j, i) voxel counts."""
        return tuple(int(n) for n in self.array.shape[:3])  # type: ignore[return-value]

    @property
    def size_ijk(self) -> tuple[int, int, int]:
        """(i, j, k) voxel counts, the order the matrices use."""
        k, j, i = self.shape
        return i, j, k

    @property
    def is_rgb(self) -> bool:
        return self.array.ndim == 4

    @property
    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix from (i, j, k, 1) voxel indices to LPS millimetres."""
        m = np.eye(4)
        m[:3, :3] = self.direction * np.asarray(self.spacing)[None, :]
        m[:3, 3] = self.origin
        return m

    @property
    def ijk_to_ras(self) -> np.ndarray:
        """4x4 matrix from (i, j, k, 1) voxel indices to RAS millimetres (Slicer's IJKToRAS)."""
        return LPS_TO_RAS @ self.ijk_to_lps

    @property
    def direction_ras(self) -> np.ndarray:
        """Columns: RAS unit vectors of the i, j and k axes."""
        return LPS_TO_RAS[:3, :3] @ self.direction

    def with_array(self, array: np.ndarray, modality: str | None = None) -> Volume:
        """Same geometry and references, new voxels (e.g. a labelmap)."""
        if tuple(array.shape[:3]) != self.shape:
            raise ImagingError(
                f"array shape {array.shape} does not match the volume's {self.shape}", self.source
            )
        return Volume(
            array=array,
            spacing=self.spacing,
            origin=self.origin,
            direction=self.direction.copy(),
            modality=modality or self.modality,
            series_uid=self.series_uid,
            study_uid=self.study_uid,
            frame_of_reference_uid=self.frame_of_reference_uid,
            sop_instance_uids=self.sop_instance_uids,
            source_files=self.source_files,
            frame_numbers=self.frame_numbers,
            source=self.source,
            has_patient_geometry=self.has_patient_geometry,
            nifti_xforms=self.nifti_xforms,
            resampled=self.resampled,
        )

    def same_geometry(self, other: Volume, tol: float = 1e-4) -> bool:
        """True when both volumes have the same grid in patient space."""
        return self.shape == other.shape and bool(np.allclose(self.ijk_to_lps, other.ijk_to_lps, atol=tol))


def volume_from_affine(array_kji: np.ndarray, ijk_to_lps: np.ndarray, **kwargs: object) -> Volume:
    """Build a Volume from a 4x4 IJK-to-LPS matrix (spacing = column norms, direction = unit columns)."""
    m = np.asarray(ijk_to_lps, dtype=float)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(m)):
        raise ImagingError(f"degenerate voxel-to-patient matrix {m[:3, :3].tolist()}", kwargs.get("source"))  # type: ignore[arg-type]
    # A sheared matrix (a NIfTI sform after an affine registration) has no direction matrix: refused, as uploads are.
    check_geometry(spacing, m[:3, 3], m[:3, :3] / spacing[None, :], kwargs.get("source"))  # type: ignore[arg-type]
    return Volume(
        array=array_kji,
        spacing=tuple(spacing),
        origin=tuple(m[:3, 3]),
        direction=m[:3, :3] / spacing[None, :],
        **kwargs,
    )  # type: ignore[arg-type]


def volume_from_ras(array_ijk: np.ndarray, ijk_to_ras: np.ndarray, **kwargs: object) -> Volume:
    """Build a Volume from NIfTI's order and space: an ``[i, j, k]`` (x, y, z) array (``[i, j, k, rgb]`` for colour)
    and its 4x4 IJK-to-RAS affine."""
    axes = (2, 1, 0, *range(3, np.ndim(array_ijk)))  # (i, j, k) -> (k, j, i), a colour axis kept last
    array = np.ascontiguousarray(np.transpose(array_ijk, axes))
    return volume_from_affine(array, LPS_TO_RAS @ np.asarray(ijk_to_ras, dtype=float), **kwargs)


def check_voxels(array: np.ndarray, path: str | None, allow_rgb: bool = True) -> None:
    """Reject empty, NaN or infinite data, the shared last step of every reader."""
    if array.size == 0 or 0 in array.shape:
        raise ImagingError(f"empty image (shape {tuple(array.shape)})", path)
    if np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.complexfloating):
        bad = ~np.isfinite(array)
        if bad.any():
            n_nan = int(np.isnan(array).sum())
            fix = ("no voxel holds a number" if bad.all() else
                   "replace them with finite values (e.g. the smallest finite one) first")
            raise ImagingError(f"{n_nan} NaN and {int(bad.sum()) - n_nan} infinite voxel values: {fix}", path)


def fill_nan(array: np.ndarray) -> tuple[np.ndarray, str | None]:
    """A file's NaN voxels read as its smallest finite value, and what was done, in words (None: no NaN).

    MR pipelines (SPM, FSL, fMRIPrep and the like) write NaN for "no data" outside the brain or field of view; the
    smallest value shows them as the background darkest grey that every window starts from, so they neither pull a
    percentile window nor look like tissue, and every other voxel keeps its value. The user is told how many. A
    volume with no finite voxel, or with infinite ones (no masking convention writes them), is left to
    `check_voxels` to refuse."""
    if not np.issubdtype(array.dtype, np.floating):
        return array, None
    nan = np.isnan(array)
    count = int(nan.sum())
    if not count or count == array.size or np.isinf(array).any():
        return array, None
    low = float(np.nanmin(array))  # no masked copy of the finite voxels: uploads can be GiBs
    array = np.where(nan, array.dtype.type(low), array)
    return array, f"{count} NaN voxels (of {array.size}) read as the volume's minimum {low:g}"


def check_size(shape: tuple[int, ...], path: str | None, max_voxels: int) -> None:
    """Refuse oversize data before it is read into memory."""
    n = int(np.prod([int(s) for s in shape], dtype=np.int64))
    if n > max_voxels:
        raise ImagingError(
            f"oversize image: {n} voxels {tuple(shape)} exceeds the limit of {max_voxels}", path
        )


#: Voxel spacings and origin coordinates accepted from outside (mm): beyond them matrices overflow or lose all
#: precision, and no scanner produces them. The smallest spacing, 0.1 um, is ten times finer than micro-CT's finest
#: voxels; below it a spacing is a unit mix-up or garbage, and a subnormal one (5e-324) silently dropped the rotation
#: from the voxel-to-patient matrix (5e-324 * sin(0.3) rounds to 0).
MIN_SPACING_MM = 1e-4
MAX_SPACING_MM = 1e5
MAX_ORIGIN_MM = 1e9


def check_geometry(spacing, origin, direction, path: str | None, atol: float = 1e-3) -> None:
    """Refuse geometry that would misplace masks: non-positive or absurd spacing, a non-finite or absurd origin,
    or a direction matrix whose columns are not orthonormal (a shear has determinant 1 but is not a rotation)."""
    spacing = np.asarray(spacing, dtype=float)
    origin = np.asarray(origin, dtype=float)
    direction = np.asarray(direction, dtype=float)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing < MIN_SPACING_MM) \
            or np.any(spacing > MAX_SPACING_MM):
        raise ImagingError(f"spacing must be 3 numbers in [{MIN_SPACING_MM:g}, {MAX_SPACING_MM:g}] mm, got "
                           f"{spacing.tolist()}", path)
    if origin.shape != (3,) or not np.all(np.isfinite(origin)) or np.any(np.abs(origin) > MAX_ORIGIN_MM):
        raise ImagingError(f"origin must be 3 finite numbers within +-{MAX_ORIGIN_MM:g} mm, got {origin.tolist()}",
                           path)
    if direction.shape != (3, 3) or not np.all(np.isfinite(direction)) \
            or not np.allclose(direction.T @ direction, np.eye(3), atol=atol):
        raise ImagingError("direction must be a 3x3 rotation or reflection (orthonormal unit columns), got "
                           f"{np.round(direction, 6).tolist()}", path)
