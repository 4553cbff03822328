"""What a weights-only unpickle of a released checkpoint may construct, and what to say when a file holds more.

The released files are pickles. `torch.load(weights_only=True)` rebuilds tensors and plain containers only; the
few other globals the releases carry are added here as explicit (object, name) pairs, so nothing outside this list
can ever be called:
- `argparse.Namespace`: the `args` of `region_perceiver/0079280.pt`.
- numpy scalars and dtypes: the UniMed-CLIP checkpoint (open_clip training state) pickles a numpy float, which
  names `numpy.core.multiarray.scalar` and `numpy.dtype` (numpy 1; numpy 2 writes `numpy._core...`); rebuilding
  it also sets the state of numpy 2's dtype class (`numpy.dtypes.Float64DType`). Only numeric dtypes are
  listed: object and structured dtypes are not needed and could carry more than numbers.

A file naming anything else is refused; `convert_trusted` is the way forward for a file the user trusts: it
writes its tensors once to safetensors (no code in that format), and the default allow-list stays as it is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

# Type codes of the numeric numpy dtypes (bool, signed and unsigned ints, floats, complex).
_NUMERIC_TYPECODES = "?bBhHiIlLqQefdgFDG"


def _numpy_scalar():
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2 (and the forward shim of late 1.x)
    except ImportError:  # pragma: no cover - numpy 1.x without numpy._core
        from numpy.core.multiarray import scalar
    return scalar


def allowed_globals() -> list[Any]:
    """The (object, pickled name) pairs a released checkpoint may name besides tensors and containers."""
    import numpy as np

    scalar = _numpy_scalar()
    dtype_classes = {type(np.dtype(code)) for code in _NUMERIC_TYPECODES}
    return [
        (argparse.Namespace, "argparse.Namespace"),
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        (np.dtype, "numpy.dtype"),
        # Not named in numpy 1 or 2 pickles (they name numpy.dtype), but the unpickler checks the type of the
        # object it sets state on; the name is what torch would derive itself.
        *sorted(((cls, f"{cls.__module__}.{cls.__qualname__}") for cls in dtype_classes), key=lambda p: p[1]),
    ]


def allowed_summary() -> str:
    return "tensors, containers, argparse.Namespace, numpy numeric scalars and dtypes"


def refusal_message(path: Path, offenders: list[str], detail: str) -> str:
    named = ", ".join(sorted(offenders)) if offenders else detail
    return (
        f"{path}: refused to unpickle: it names {named}, outside the allow-list ({allowed_summary()}); nothing in it "
        f"was run. If you trust where this file comes from, convert its weights once to safetensors beside it (a "
        f"release folder's copy is then taken in place of the .pt) or pass the converted file instead (the "
        f"allow-list stays as it is): "
        f"python -m medsight.model.unpickling {path} {path.with_suffix('.safetensors')}"
    )


def convert_trusted(source: str | Path, target: str | Path) -> Path:
    """Write the state dict of a pickled checkpoint the user trusts to a safetensors file.

    This is the one place that unpickles without the allow-list, so it runs only when a person asks for it by
    name, for one file, in its own process.
    """
    import zipfile

    import torch

    from medsight.model.checkpoints import CheckpointError, pick_state_dict, refuse_lfs_pointer, save_safetensors
    from medsight.user_files import check_user_file

    check_user_file(source, "checkpoint file", CheckpointError)
    refuse_lfs_pointer(Path(source))
    obj = torch.load(source, map_location="cpu", weights_only=False, mmap=zipfile.is_zipfile(source))
    state = pick_state_dict(obj, source)
    # Copies: safetensors refuses tensors that share storage, and the copies no longer need the mapped file.
    save_safetensors({k: v.clone() for k, v in state.items()}, target)
    return Path(target)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0].startswith("-"):
        print("usage: python -m medsight.model.unpickling TRUSTED_CHECKPOINT.pt OUT.safetensors\n"
              "Unpickles a checkpoint you trust without the allow-list, once, and writes its state dict to "
              "safetensors, which MedSIGHT then loads by default.", file=sys.stderr)
        return 2
    import pickle

    from safetensors import SafetensorError

    try:
        print(convert_trusted(argv[0], argv[1]))
    except SafetensorError as err:  # the target cannot be written
        print(f"error: cannot write {argv[1]}: {err}", file=sys.stderr)
        return 2
    except (ValueError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:  # a missing or damaged file
        text = str(err)
        print(f"error: {text if argv[0] in text else f'{argv[0]}: not a readable PyTorch checkpoint ({text})'}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
