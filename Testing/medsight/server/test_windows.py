"""The window of each ask about a stored volume, resolved before admission and remembered per volume."""

from __future__ import annotations

import numpy as np
import pytest

from medsight.engine import volume_window
from medsight.imaging import ImagingError, Volume, Window
from medsight.server.windows import VolumeWindows


def _mr(seed: int) -> Volume:
    return Volume(np.random.default_rng(seed).normal(300, 80, (3, 16, 12)).astype(np.float32), modality="MR")


def test_the_window_is_the_engines_and_is_remembered_per_volume_and_preset():
    windows, first, second = VolumeWindows(max_entries=2), _mr(1), _mr(2)
    assert windows.get("a", first, None) == volume_window(first, None)
    # Ids are content hashes: the same id is the same voxels, so its window is not read again.
    assert windows.get("a", second, None) == volume_window(first, None) != volume_window(second, None)
    assert windows.get("a", second, "AUTO") == volume_window(second, "auto")
    explicit = Window(40, 400)
    assert windows.get("a", first, explicit) == explicit  # given, not remembered
    windows.get("b", second, None)
    assert windows.get("a", second, None) == volume_window(second, None)  # bound of 2: ("a", None) went first


def test_a_volume_no_window_can_show_is_refused_and_not_remembered():
    windows = VolumeWindows()
    huge = Volume(np.full((2, 8, 8), 1e31, np.float32), modality="MR")
    for _ in range(2):
        with pytest.raises(ImagingError, match=r"the volume's values give the window 1e\+31\.\.1e\+31"):
            windows.get("huge", huge, None)
    assert windows.get("huge", huge, Window(0, 100)) == Window(0, 100)


def test_a_remembered_window_is_not_kept_waiting_by_another_volumes_first_read(monkeypatch):
    """The one lock was held while a volume's percentile window was read (seconds for a large volume): an ask about
    an already windowed volume waited behind it. The read of "big" is held open here until the look-up of "a" is
    done; the look-up must return the remembered window meanwhile."""
    import threading

    from medsight.server import windows as windows_module

    windows, small, big = VolumeWindows(), _mr(1), _mr(2)
    remembered = windows.get("a", small, None)
    reading, release = threading.Event(), threading.Event()

    def held_read(volume, window):
        if volume is big:
            reading.set()
            release.wait()
        return volume_window(volume, window)

    monkeypatch.setattr(windows_module, "volume_window", held_read)
    first_read = threading.Thread(target=windows.get, args=("big", big, None))
    first_read.start()
    try:
        assert reading.wait(60)
        looked_up = []
        lookup = threading.Thread(target=lambda: looked_up.append(windows.get("a", small, None)))
        lookup.start()
        lookup.join(60)  # a guard against a hang, not a timing: it returns at once or never, while "big" is held
        assert looked_up == [remembered] and first_read.is_alive()
    finally:
        release.set()
        first_read.join()
    assert windows.get("big", small, None) == volume_window(big, None)  # "big" was remembered once read
