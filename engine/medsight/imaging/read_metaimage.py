"""Reader for MetaImage (``.mha``, or an ``.mhd`` header beside its ``.raw`` data) with SimpleITK.

ITK (and so 3D Slicer) reads the header's TransformMatrix, Offset and ElementSpacing as LPS, as this reader does.
The data file's existence and size are checked first: ITK's own error for a missing or short data file says "No such
file or directory" about the header (which exists) and prints MetaIO's details to the console.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import SimpleITK as sitk  # noqa: N813  (the universal alias)

from .errors import ImagingError
from .read_files import _exists, _squeeze_to_3d
from .volume import MAX_VOXELS, Volume, check_size, check_voxels, fill_nan, volume_from_affine

#: The header is short text; more than this without an ElementDataFile line is not a MetaImage header.
_MAX_HEADER_BYTES = 1 << 20


def _header(path: str) -> tuple[dict[str, str], int]:
    """The header's ``key = value`` pairs up to ElementDataFile (its last field), and the byte offset after it."""
    with open(path, "rb") as f:
        head = f.read(_MAX_HEADER_BYTES)
    fields: dict[str, str] = {}
    offset = 0
    for line in head.splitlines(keepends=True):
        offset += len(line)
        key, sep, value = line.decode("latin-1").partition("=")
        if not sep:
            continue
        fields[key.strip().lower()] = value.strip()
        if key.strip().lower() == "elementdatafile":
            return fields, offset
    raise ImagingError("not a MetaImage header (no ElementDataFile line)", path)


#: Header fields that place the voxels, with how many numbers each holds (n: NDims). MetaIO reads a malformed one
#: as zeros or the identity without a word ("Offset = nan 2 3" gave the origin (0, 0, 0)), so they are checked here.
_GEOMETRY_FIELDS = {"Offset": 1, "Position": 1, "Origin": 1, "ElementSpacing": 1, "TransformMatrix": 2,
                    "Rotation": 2, "Orientation": 2}


def _check_fields(fields: dict[str, str], path: str) -> None:
    """Refuse a DimSize or geometry field that is not NDims (or NDims squared) finite numbers."""
    try:
        ndims = int(fields.get("ndims", ""))
        dims = [int(v) for v in fields.get("dimsize", "").split()]
    except ValueError:
        ndims, dims = 0, []
    if ndims < 1 or len(dims) != ndims or min(dims) < 1:
        raise ImagingError(f"malformed NDims {fields.get('ndims')!r} or DimSize {fields.get('dimsize')!r}: "
                           "DimSize must be NDims positive integers", path)
    for name, power in _GEOMETRY_FIELDS.items():
        text = fields.get(name.lower())
        if text is None:
            continue
        try:
            values = np.asarray([float(v) for v in text.split()])
        except ValueError:
            values = np.asarray([np.nan])
        if len(values) != ndims**power or not np.all(np.isfinite(values)):
            raise ImagingError(f"malformed {name} {text!r}: {ndims**power} finite numbers expected", path)


def _check_data_file(path: str, fields: dict[str, str], data_offset: int, nbytes: int) -> None:
    """Refuse a missing data file, or data of another size than DimSize x ElementType needs (a truncated copy, or a
    header that does not describe its data); compressed data must inflate to that size."""
    name = fields["elementdatafile"]
    start = 0
    if name.upper() == "LOCAL":
        data_path, start = path, data_offset
    elif name.upper().startswith("LIST") or "%" in name or " " in name:
        return  # one file per slice: ITK checks those
    else:
        data_path = os.path.join(os.path.dirname(path), name)
        if not os.path.isfile(data_path):
            raise ImagingError(f"its data file {name} (ElementDataFile) is missing; keep it beside the header", path)
        header_size = int(fields.get("headersize", "0") or 0)
        if header_size == -1:  # the data are the file's last bytes, after a header of any size
            start = max(0, os.path.getsize(data_path) - nbytes)
        elif header_size > 0:
            start = header_size
    if fields.get("binarydata", "true").lower() != "true":
        return  # numbers as text: their byte count says nothing; ITK reports missing ones
    if fields.get("compresseddata", "false").lower() == "true":
        available = _inflated_size(data_path, start, int(fields.get("compresseddatasize", "0") or 0), path)
    else:
        available = os.path.getsize(data_path) - start
    if available != nbytes:
        raise ImagingError(
            f"{os.path.basename(data_path)} holds {available} bytes of pixel data{_inflated(fields)} but DimSize "
            f"{fields.get('dimsize')} of {fields.get('elementtype')} needs {nbytes} (a truncated file, or a header "
            "that does not describe its data)",
            path,
        )


def _inflated_size(data_path: str, start: int, compressed_size: int, path: str) -> int:
    """The size of the compressed data once inflated. ITK reads damaged zlib data without a word (half a volume of
    wrong voxels, measured), so the stream is checked here, in chunks to keep memory flat."""
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # zlib or gzip, as MetaIO accepts
    size = 0
    with open(data_path, "rb") as f:
        f.seek(start)
        left = compressed_size or -1
        try:
            while left:
                chunk = f.read(1 << 20 if left < 0 else min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk) if left > 0 else 0
                size += len(inflater.decompress(chunk))
                if inflater.eof:
                    break
        except zlib.error as exc:
            raise ImagingError(f"damaged compressed pixel data ({exc})", path) from exc
    if not inflater.eof:
        raise ImagingError("compressed pixel data end early (a truncated file?)", path)
    return size


def _itk_error(exc: RuntimeError) -> str:
    """ITK's own words, without its source file and line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    said = [line.split("ERROR:", 1)[1].split("):", 1)[-1].strip() for line in lines if "ERROR:" in line]
    return " ".join(said + lines[-1:]) if said else (lines[-1] if lines else type(exc).__name__)


def _inflated(fields: dict[str, str]) -> str:
    return " once inflated" if fields.get("compresseddata", "").lower() == "true" else ""


def read_metaimage(
    path: str | os.PathLike[str], modality: str | None = None, max_voxels: int = MAX_VOXELS
) -> Volume:
    """Read a 2D or 3D MetaImage (``.mha`` or ``.mhd`` + data file), grey or RGB, with its LPS geometry."""
    path = os.fspath(path)
    _exists(path)
    fields, data_offset = _header(path)
    _check_fields(fields, path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.SetImageIO("MetaImageIO")
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise ImagingError(f"unreadable MetaImage header ({_itk_error(exc)})", path) from exc
    size = reader.GetSize()  # (i, j, k, ...)
    channels = reader.GetNumberOfComponents()
    shape = _squeeze_to_3d(size, path)
    check_size((*shape, channels), path, max_voxels)
    itemsize = sitk.GetArrayViewFromImage(sitk.Image([1] * 2, reader.GetPixelID())).itemsize
    _check_data_file(path, fields, data_offset, int(np.prod(size, dtype=np.int64)) * channels * itemsize)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise ImagingError(f"unreadable MetaImage ({_itk_error(exc)})", path) from exc
    array = sitk.GetArrayFromImage(image)  # (k, j, i[, c]) for 3D, (j, i[, c]) for 2D
    if channels != 1 and not (channels == 3 and array.dtype == np.uint8):
        raise ImagingError(f"{channels} {array.dtype} components per voxel (a vector field?); "
                           "one grey value or 8-bit RGB is expected", path)
    array = array.reshape(shape[::-1] + ((3,) if channels == 3 else ()))
    array, nan_filled = fill_nan(array)
    check_voxels(array, path)
    dim = image.GetDimension()
    m = np.eye(4)
    n = min(dim, 3)  # 2D: the slice's plane at k = 0, one unit thick, as ITK reads it into a 3D image (Slicer)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(dim, dim)[:n, :n]
    m[:n, :n] = direction * np.asarray(image.GetSpacing(), dtype=float)[None, :n]
    m[:n, 3] = image.GetOrigin()[:n]
    return volume_from_affine(array, m, modality=(modality or "OT").upper(), source=path, nan_filled=nan_filled)
