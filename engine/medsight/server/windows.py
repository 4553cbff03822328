"""The window each ask about a stored volume gets, resolved before the ask is admitted."""

from __future__ import annotations

import threading
from collections import OrderedDict

from medsight.engine import volume_window
from medsight.imaging import Volume, Window

_MISSING = object()


class VolumeWindows:
    """`engine.volume_window` for stored volumes, resolved at admission: a volume whose values no window can map to
    8 bits is refused with a 422, where the job failed after its 200. Remembered per volume id and preset name
    (ids are content hashes, so an entry never goes stale): a percentile window reads the whole volume, seconds for
    a large one, and a volume is asked about many times. One volume is read at a time, since each read copies it;
    a remembered window is looked up without waiting for that read."""

    def __init__(self, max_entries: int = 256) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[tuple[str, str | None], Window | None] = OrderedDict()
        self._lock = threading.Lock()  # the dict only: held for look-ups and inserts, never while reading a volume
        self._reading = threading.Lock()  # one whole-volume read at a time

    def get(self, volume_id: str, volume: Volume, window: str | Window | None) -> Window | None:
        """The window the engine would use; raises ImagingError as the engine would."""
        if isinstance(window, Window):
            return volume_window(volume, window)
        key = (volume_id, window.lower() if window is not None else None)
        found = self._lookup(key)
        if found is not _MISSING:
            return found
        with self._reading:
            found = self._lookup(key)  # an ask about the same volume may have read it while this one waited
            if found is not _MISSING:
                return found
            resolved = volume_window(volume, window)
            with self._lock:
                self._items[key] = resolved
                if len(self._items) > self.max_entries:
                    self._items.popitem(last=False)
            return resolved

    def _lookup(self, key: tuple[str, str | None]):
        with self._lock:
            if key not in self._items:
                return _MISSING
            self._items.move_to_end(key)
            return self._items[key]
