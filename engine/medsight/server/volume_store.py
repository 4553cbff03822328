"""Uploaded volumes, content-addressed and kept in memory with a byte bound (least recently used go first)."""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from medsight.imaging import ImagingError, Volume
from medsight.imaging.slicing import check_sliceable
from medsight.imaging.volume import check_geometry, check_size, check_voxels, fill_nan

_ALLOWED_KINDS = "iuf"  # signed, unsigned, float: no booleans (a mask is not an image), objects, strings, complex
_NPY_MAGIC = b"\x93NUMPY"
_MAX_HEADER = 10_000


@dataclass(frozen=True)
class NpyHeader:
    """What an .npy header declares; `offset` is where the voxels start."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    offset: int

    @property
    def data_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def total_bytes(self) -> int:
        return self.offset + self.data_bytes


def read_npy_header(prefix: bytes | bytearray, max_voxels: int) -> NpyHeader | None:
    """Parse the header at the start of an upload, before its voxels are read; None while more bytes are needed.

    Raises ImagingError for anything but a plain 2D/3D numeric array (a zip/.npz, a pickle, booleans, objects) and
    for shapes over `max_voxels` ("oversize"), so nothing is allocated for a body that would be refused.
    """
    head = bytes(prefix[:len(_NPY_MAGIC)])
    if head != _NPY_MAGIC[:len(head)]:
        kind = "a zip archive (.npz)" if head.startswith(b"PK") else "not a .npy array"
        raise ImagingError(f"the body is {kind}; upload one array as .npy bytes", "upload")
    if len(prefix) < 10:
        return None
    major = prefix[6]
    if major not in (1, 2):
        raise ImagingError(f"unsupported .npy format version {major}.{prefix[7]}", "upload")
    size_bytes = 2 if major == 1 else 4
    if len(prefix) < 8 + size_bytes:
        return None
    header_len = int.from_bytes(prefix[8:8 + size_bytes], "little")
    offset = 8 + size_bytes + header_len
    if header_len > _MAX_HEADER:
        raise ImagingError(f".npy header of {header_len} bytes is too long", "upload")
    if len(prefix) < offset:
        return None
    reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    try:
        stream = io.BytesIO(bytes(prefix[8:offset]))
        shape, fortran, dtype = reader(stream, max_header_size=_MAX_HEADER)
    except Exception as err:  # numpy's parser of untrusted text raises many kinds (ValueError, TokenError, ...)
        raise ImagingError(f"unreadable .npy header ({type(err).__name__})", "upload") from None
    if dtype.kind not in _ALLOWED_KINDS or dtype.hasobject or dtype.fields is not None or dtype.subdtype:
        raise ImagingError(f"unsupported array dtype {dtype} (need integers or floats)", "upload")
    if len(shape) not in (2, 3, 4):
        raise ImagingError(f"an upload must be a 2D image or a (k, j, i) volume, got shape {shape}", "upload")
    _check_dimensions(shape)
    check_size(shape, "upload", max_voxels)
    return NpyHeader(tuple(int(n) for n in shape), dtype, bool(fortran), offset)


def _check_dimensions(shape: tuple[int, ...]) -> None:
    """numpy's header parser takes any integers: a negative size would make the byte count (and the array) wrong."""
    if any(n < 0 for n in shape):
        raise ImagingError(f"the .npy header declares shape {shape}, with a negative dimension", "upload")
    if any(n == 0 for n in shape):
        raise ImagingError(f"the .npy header declares shape {shape}: an empty image", "upload")


def array_from_npy(header: NpyHeader, body: bytearray | memoryview) -> np.ndarray:
    """The voxels of a complete upload whose header was checked (no copy; never unpickles)."""
    if len(body) != header.total_bytes:
        raise ImagingError(f"the .npy body has {len(body) - header.offset} bytes of voxels, its header declares "
                           f"{header.data_bytes}", "upload")
    return np.ndarray(header.shape, header.dtype, buffer=body, offset=header.offset,
                      order="F" if header.fortran_order else "C")


def volume_from_upload(
    array: np.ndarray,
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    direction: np.ndarray,
    modality: str,
) -> Volume:
    """A Volume from an uploaded (k, j, i) array, or a 2D (H, W[, 3]) image as one axial slice.

    NaN voxels read as the volume's smallest value, as from a file (`fill_nan`: 3D Slicer loads a NIfTI's NaN as
    they are, and its user cannot easily replace them); `Volume.nan_filled` says how many, for the response."""
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3 and array.dtype == np.uint8):
        array = array[None]
    check_geometry(spacing, origin, direction, "upload")
    array, nan_filled = fill_nan(array)
    check_voxels(array, "upload")
    volume = Volume(array, spacing=spacing, origin=origin, direction=direction, modality=modality.upper(),
                    nan_filled=nan_filled)
    check_sliceable(volume)  # e.g. (1, 1, W): a line of voxels, nothing to ask about
    return volume


def volume_id(volume: Volume) -> str:
    """SHA-256 of the voxels and geometry: the same upload always gets the same id."""
    digest = hashlib.sha256()
    digest.update(str((volume.array.dtype.str, volume.array.shape)).encode())
    digest.update(np.ascontiguousarray(volume.array))  # the buffer itself: tobytes() would copy the volume
    geometry = (volume.spacing, volume.origin, volume.direction.round(9).tolist(), volume.modality)
    digest.update(repr(geometry).encode())
    if volume.nan_filled:  # not the upload of the filled voxels: its id would report no NaN filled
        digest.update(volume.nan_filled.encode())
    return digest.hexdigest()


class StoreBusyError(Exception):
    """No room for a new volume: the rest of the store is held by volumes that asks are using."""


class VolumeStore:
    """Thread-safe LRU of volumes bounded by their total bytes. A pinned volume (one that an ask waits for or runs
    on) is not evicted: the ask would keep it in memory anyway, outside the bound."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, Volume] = OrderedDict()
        self._pins: dict[str, int] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, volume: Volume) -> str:
        key = volume_id(volume)
        size = volume.array.nbytes
        if size > self.max_bytes:
            raise ImagingError(f"volume of {size} bytes exceeds the store's {self.max_bytes} bytes", "upload")
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return key
            while self._bytes + size > self.max_bytes:
                victim = next((k for k in self._items if not self._pins.get(k)), None)
                if victim is None:
                    raise StoreBusyError(f"the engine's volume memory ({self.max_bytes} bytes) is held by volumes "
                                         "in use by asks; retry when they are done")
                self._bytes -= self._items.pop(victim).array.nbytes
            self._items[key] = volume
            self._bytes += size
        return key

    def get(self, key: str, pin: bool = False) -> Volume | None:
        """The volume (now the most recently used), or None; `pin`: keep it until as many `unpin` calls."""
        with self._lock:
            volume = self._items.get(key)
            if volume is not None:
                self._items.move_to_end(key)
                if pin:
                    self._pins[key] = self._pins.get(key, 0) + 1
            return volume

    def unpin(self, key: str) -> None:
        with self._lock:
            left = self._pins.pop(key) - 1
            if left:
                self._pins[key] = left


class UploadBudget:
    """Bytes of the uploads being received at once, bounded like the store: each upload holds its body (and, while
    it is checked and hashed, copies of it) until it is stored, so uploads at once would otherwise take memory
    without limit. A lone upload is always let through: the store refuses it if it can never fit."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.in_flight = 0
        self._lock = threading.Lock()

    def reserve(self, size: int) -> bool:
        """Count `size` more bytes in flight; False (nothing counted) if that would go over the bound."""
        with self._lock:
            if self.in_flight and self.in_flight + size > self.max_bytes:
                return False
            self.in_flight += size
            return True

    def release(self, size: int) -> None:
        with self._lock:
            self.in_flight -= size
