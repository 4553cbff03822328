"""Reading a file the user named (a config, a data list, an image), with errors that name the file and what it
should be."""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

#: What PIL raises for a file it cannot decode: OSError mostly (truncated, not an image), the others from some
#: damaged files' headers, and the decompression-bomb guard.
IMAGE_READ_ERRORS = (OSError, SyntaxError, ValueError, struct.error, Image.DecompressionBombError)


def read_user_text(path: str | Path, what: str, error: type[ValueError] = ValueError) -> str:
    """The UTF-8 text of `path`, without a leading byte-order mark (Windows editors and PowerShell write one, which
    JSON refuses); a missing, folder or unreadable one raises `error` naming it and `what` (e.g. "data file"), so
    commands print one line instead of a traceback."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise _unreadable(path, what, err, error) from None


def read_user_json(path: str | Path, what: str, error: type[ValueError] = ValueError) -> Any:
    """The decoded JSON of `path`; a missing, unreadable or malformed file raises `error` naming it and `what`."""
    text = read_user_text(path, what, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{path}: the {what} is not valid JSON ({err})") from None


def is_wide_mode(mode: str) -> bool:
    """Whether a PIL image mode stores more than 8 bits per pixel (I;16..., I, F): PIL's conversion of one to RGB or
    L clips every value above 255 to white, as the official `convert('RGB')` does."""
    return mode.startswith("I") or mode == "F"


def clips_to_8_bits(im: Image.Image) -> bool:
    """Whether reading `im` as 8 bits changes its values: an image of more than 8 bits per pixel (`is_wide_mode`)
    holding a value outside 0..255. A 16-bit PNG of 8-bit values reads exactly, as the official code reads it."""
    if not is_wide_mode(im.mode):
        return False
    low, high = im.getextrema()
    return low < 0 or high > 255


def is_other_aspect(image_hw: tuple[int, int], mask_hw: tuple[int, int]) -> bool:
    """Whether a mask of `mask_hw` (height, width) pixels has another aspect ratio than an image of `image_hw`: more
    than a mask pixel of rounding off. Masks are scaled onto their image's frame, so one of another size but the
    image's aspect ratio fits it, and one of another aspect ratio would be stretched."""
    (height, width), (mask_height, mask_width) = image_hw, mask_hw
    return abs(mask_height - mask_width * height / width) > 1


def read_user_image(path: str | Path, what: str, mode: str = "RGB",
                    error: type[ValueError] = ValueError, wide_ok: bool = True) -> np.ndarray:
    """The 8-bit pixels of `path` converted to PIL `mode` ("RGB": (H, W, 3), "L": (H, W)); a missing, folder or
    undecodable file raises `error` naming it and `what` (e.g. "image", "mask"). With `wide_ok` false so does an image
    of more than 8 bits per pixel whose values the conversion would clip (`clips_to_8_bits`; evaluation reads it as
    the official code does and counts it; training refuses to learn from a 16-bit CT slice turned almost all white)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            if wide_ok or not clips_to_8_bits(im):
                return np.asarray(im.convert(mode))
            wide, (low, high) = im.mode, im.getextrema()
    except IMAGE_READ_ERRORS as err:
        raise _unreadable(path, what, err, error) from None
    raise error(f"cannot use the {what} {path}: its pixels are {wide} (more than 8 bits, values {low:g} to {high:g}), "
                "and read as 8 bits every value above 255 would turn white (below 0, black); save it as an 8-bit "
                "image (windowed) first")


def check_user_image(path: str | Path, what: str, error: type[ValueError] = ValueError) -> tuple[int, int]:
    """The (height, width) of an image file the user named, from its header, after checking the whole file's structure
    (`Image.verify`: a PNG's chunks and checksums) without decoding its pixels: a cheap check before long work that
    decodes it later. `verify` checks nothing of a JPEG, so a JPEG is decoded at 1/8 scale (its DCT scaling, a few
    ms), which reads its whole compressed stream: a truncated download is found here, not part-way through the work.
    A missing, folder, truncated or undecodable one raises `error` as `read_user_image` does."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            width, height = im.size
            if im.format in ("JPEG", "MPO"):
                im.draft(im.mode, (max(1, width // 8), max(1, height // 8)))
                im.load()
            else:
                im.verify()
    except IMAGE_READ_ERRORS as err:
        raise _unreadable(path, what, err, error) from None
    return height, width


def special_file_kind(path: str | os.PathLike[str]) -> str | None:
    """What a path is that exists but is neither a file nor a folder ("a named pipe (FIFO)", "a character device"
    such as /dev/null, ...), else None: reading one blocks for a writer or never ends, and "not found" would be
    false."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    kinds = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), None)


def check_user_file(path: str | Path, what: str, error: type[ValueError] = ValueError) -> None:
    """A file the user named is there and is a file, checked before long work that reads it later; a missing one, a
    folder or a special file (a FIFO, /dev/null) raises `error` in the words the readers above use."""
    path = Path(path)
    if path.is_dir():
        raise _unreadable(path, what, IsADirectoryError(), error)
    kind = special_file_kind(path)
    if kind:
        raise error(f"{path} is {kind}, not a file; expected the {what}")
    if not path.is_file():
        raise _unreadable(path, what, FileNotFoundError(), error)


def _unreadable(path: Path, what: str, err: Exception, error: type[ValueError]) -> ValueError:
    """The one-line error for a user's file that cannot be read, saying whether it is missing or a folder."""
    if isinstance(err, FileNotFoundError):
        return error(f"{what} not found: {path}")
    if isinstance(err, IsADirectoryError):
        return error(f"{path} is a folder; expected the {what}")
    return error(f"cannot read the {what} {path}: {err}")
