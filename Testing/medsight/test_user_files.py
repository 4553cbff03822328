"""The one check of a file the user named: missing, a folder, or a special file, each said as what it is."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from medsight.train.data import read_rgb
from medsight.user_files import check_user_file, read_user_image


def test_a_named_file_that_is_no_file_says_what_it_is(tmp_path):
    fifo = tmp_path / "train.json"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=rf"^{fifo} is a named pipe \(FIFO\), not a file; expected the data file$"):
        check_user_file(fifo, "data file")
    with pytest.raises(ValueError, match=r"^/dev/null is a character device, not a file; expected the data file$"):
        check_user_file("/dev/null", "data file")
    with pytest.raises(ValueError, match=rf"^{tmp_path} is a folder; expected the data file$"):
        check_user_file(tmp_path, "data file")
    with pytest.raises(ValueError, match=rf"^data file not found: {tmp_path / 'nope.json'}$"):
        check_user_file(tmp_path / "nope.json", "data file")
    (tmp_path / "ok.json").write_text("{}")
    check_user_file(tmp_path / "ok.json", "data file")


def test_an_image_of_more_than_8_bits_is_refused_for_training_rather_than_read_white(tmp_path):
    """PIL converts a 16-bit greyscale image to RGB by clipping every value above 255: a CT slice saved as a 16-bit
    PNG came back almost all white (a ramp over the 16-bit range: 99.6% of its pixels 255), and training learnt from
    it silently. With wide_ok false (training's `read_rgb`) it is refused naming file and mode; by default it reads as
    the official code reads it (evaluation counts such images in its report); 8-bit greyscale reads replicated."""
    ramp = np.linspace(0, 2**16 - 1, 64 * 64).reshape(64, 64)
    wide, narrow = tmp_path / "ct16.png", tmp_path / "ct8.png"
    Image.fromarray(ramp.astype(np.uint16)).save(wide)
    Image.fromarray((ramp / 257).astype(np.uint8)).save(narrow)
    with pytest.raises(ValueError, match=rf"cannot use the image {wide}: its pixels are I;16 \(more than 8 bits, "
                                         rf"values 0 to {int(ramp.max())}\)"):
        read_rgb(wide)
    clipped = read_user_image(wide, "image")
    assert (clipped == np.clip(ramp, 0, 255).astype(np.uint8)[..., None]).all()  # the official reading
    rgb = read_rgb(narrow)
    assert rgb.shape == (*ramp.shape, 3) and (rgb == (ramp / 257).astype(np.uint8)[..., None]).all()


def test_a_16_bit_image_of_8_bit_values_is_read_for_training_as_the_official_code_reads_it(tmp_path):
    """Only values the 8-bit read would clip are refused: a 16-bit PNG holding 0..255 (as some converters write 8-bit
    data) reads exactly under the official convert('RGB'), and training refused it by its mode alone."""
    values = (np.arange(64 * 64).reshape(64, 64) % 256).astype(np.uint16)
    path = tmp_path / "ct16_of_8.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    rgb = read_rgb(path)
    assert np.abs(rgb.astype(int) - values[..., None]).max() == 0
    assert (rgb == read_user_image(path, "image")).all()
