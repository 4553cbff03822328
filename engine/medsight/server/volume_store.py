"""Uploaded volumes, content-addressed and kept in memory with a byte bound (least recently used go first)."""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict

import numpy as np

from medsight.imaging import ImagingError, Volume
from medsight.imaging.volume import check_voxels

_ALLOWED_KINDS = "biuf"  # bool, signed, unsigned, float: no objects, strings or complex numbers


def parse_npy(data: bytes, max_voxels: int) -> np.ndarray:
    """Read NPY bytes without ever unpickling; refuse what is not a plain numeric array."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ImagingError(f"the body is not a readable .npy array ({err})", "upload") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in _ALLOWED_KINDS:
        raise ImagingError(f"unsupported array dtype {getattr(array, 'dtype', '?')}", "upload")
    if array.size > max_voxels:
        raise ImagingError(f"oversize image: {array.size} voxels exceeds the limit of {max_voxels}", "upload")
    return array


def volume_from_upload(
    array: np.ndarray,
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    direction: np.ndarray,
    modality: str,
) -> Volume:
    """A Volume from an uploaded (k, j, i) array, or a 2D (H, W[, 3]) image as one axial slice."""
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3 and array.dtype == np.uint8):
        array = array[None]
    check_voxels(array, "upload")
    if not np.all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise ImagingError(f"spacing must be positive, got {spacing}", "upload")
    if abs(abs(np.linalg.det(direction)) - 1) > 1e-3:
        raise ImagingError("direction must be a 3x3 rotation (orthonormal columns)", "upload")
    return Volume(array, spacing=spacing, origin=origin, direction=direction, modality=modality.upper())


def volume_id(volume: Volume) -> str:
    """SHA-256 of the voxels and geometry: the same upload always gets the same id."""
    digest = hashlib.sha256()
    digest.update(str((volume.array.dtype.str, volume.array.shape)).encode())
    digest.update(np.ascontiguousarray(volume.array).tobytes())
    geometry = (volume.spacing, volume.origin, volume.direction.round(9).tolist(), volume.modality)
    digest.update(repr(geometry).encode())
    return digest.hexdigest()


class VolumeStore:
    """Thread-safe LRU of volumes bounded by their total bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, Volume] = OrderedDict()
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
            while self._items and self._bytes + size > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.array.nbytes
            self._items[key] = volume
            self._bytes += size
        return key

    def get(self, key: str) -> Volume | None:
        with self._lock:
            volume = self._items.get(key)
            if volume is not None:
                self._items.move_to_end(key)
            return volume
