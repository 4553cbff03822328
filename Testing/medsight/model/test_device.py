"""Device names as users give them (`--device`, a config's `device`): auto when empty, clear errors otherwise."""

from __future__ import annotations

import pytest
import torch

from medsight.model.loading import parse_device, resolve_device


@pytest.mark.parametrize("empty", [None, ""])
def test_no_device_means_the_best_one_here(empty):
    """Scripts pass `--device "$DEVICE"` with the variable unset: that is auto, as before, not an error."""
    assert resolve_device(empty) == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_names_are_checked_before_the_computer_is():
    assert parse_device("cuda:1") == torch.device("cuda", 1)  # a name, whatever this computer has
    for bad in ("gpu", "xpu", "cuda:x"):
        with pytest.raises(ValueError, match="cpu, cuda, cuda:N"):
            parse_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available on this computer"):
            resolve_device("cuda")


def test_a_dtype_that_is_not_a_float_dtype_is_refused_before_loading(tmp_path):
    """A string (`dtype="bfloat16"`) or an integer dtype reached torch only after every weight was read (minutes
    for the released model), then failed with torch's TypeError; the folder here is never opened."""
    from medsight.model.loading import load_model

    for bad in ("bfloat16", torch.int8):
        with pytest.raises(ValueError, match=rf"dtype {bad!r} is not a floating-point torch.dtype: use torch.bf"):
            load_model(tmp_path / "never_read", device="cpu", dtype=bad)
