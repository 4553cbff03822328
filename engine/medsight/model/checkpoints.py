"""Reading checkpoints: the released official files unchanged, and our own safetensors + JSON format.

Official files:
- UniMed-CLIP open_clip checkpoint: `visual.*` keys (maybe wrapped in `state_dict`, maybe `module.`-prefixed; a
  torch.compile save's `_orig_mod.` prefix is removed too, as it is from the stage-1 and stage-2 files).
- Stage 1, `region_perceiver/0079280.pt`: `{model, optimizer, steps, args}` with `region_perceiver.*` keys;
  `args` is an argparse Namespace.
Pickles are read with `weights_only=True` and the allow-list of `medsight.model.unpickling`, memory-mapped, and
each reader keeps (copies) only the tensors it needs.
- Stage 2 codebook: `{model, ...}` with `quantizer.*`, `region_perceiver.to_code.*`,
  `region_perceiver.code_decoder.*` and `modality_predictor.*` keys.
- `medsight_full_instruct/`: Hugging Face folder (config.json with model_type llava_qwen, safetensors shards,
  tokenizer files with `added_tokens.json`); a folder saved as `pytorch_model.bin` (shards) is read as well.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import signal
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from medsight.user_files import check_user_file

# medsight.model.unpickling is imported where it is used: importing it with the package would make
# `python -m medsight.model.unpickling` (the converter) warn that the module ran after being imported.


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe or does not fit the model; the message says which."""


def safe_torch_load(path: str | Path, mmap: bool = False) -> Any:
    """`torch.load` with `weights_only=True` and the allow-list of `medsight.model.unpickling`.

    `mmap=True` memory-maps zip-format files (everything torch has written since 1.6): tensors are read from disk
    only when touched, so a reader that keeps a part of a large file (the vision tower of a UniMed-CLIP training
    checkpoint) never holds the rest in memory. Such tensors are views of the file: copy what you keep (`owned`)
    and never rewrite the file while they live. A `.safetensors` file (what `convert_trusted` writes) is read as is.
    """
    path = Path(path)
    check_user_file(path, "checkpoint file", CheckpointError)
    refuse_lfs_pointer(path)
    if path.suffix == ".safetensors":
        return read_safetensors_file(path)
    from medsight.model.unpickling import allowed_globals, refusal_message

    mmap = mmap and zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        offenders = _unsafe_globals(path) or _UNSUPPORTED_GLOBAL.findall(str(err))
        if not offenders:  # not a pickle at all (an HTML page, a partial download): nothing was refused
            reason = _UNPICKLER_ERROR.search(str(err))
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (damaged or not a checkpoint: "
                                  f"{reason[1].strip() if reason else 'unreadable pickle'})") from None
        raise CheckpointError(refusal_message(path, offenders, "")) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({err or 'empty or cut short'})") from None


# torch's weights-only unpickler names a refused global as "Unsupported global: GLOBAL module.name", or, for a module
# it blocks outright (posix, os, ...), "Trying to load unsupported GLOBAL posix.system whose module posix is blocked";
# its other complaints (an unknown opcode: the bytes are not a pickle) follow "WeightsUnpickler error:".
_UNSUPPORTED_GLOBAL = re.compile(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)")
_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error:\s*(.+)")
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def refuse_lfs_pointer(path: Path) -> None:
    """A repository cloned without Git LFS holds small text pointers in place of its weight files."""
    with open(path, "rb") as f:
        if f.read(len(_LFS_POINTER)) == _LFS_POINTER:
            raise CheckpointError(f"{path} is a Git LFS pointer, not the weights: the repository was cloned without "
                                  "Git LFS; run `git lfs pull` in it, or get the model with `medsight download`")


def read_safetensors_file(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file; a damaged or partial file is a CheckpointError naming it."""
    return _read_safetensors(Path(path), load_file)


def _safetensors_names(path: Path) -> set[str]:
    """The tensor names in a safetensors file's header (no tensor is read)."""

    def names(name: str) -> set[str]:
        with safe_open(name, framework="pt") as f:
            return set(f.keys())

    return _read_safetensors(path, names)


def _read_safetensors(path: Path, read):
    """`read(str(path))`, with a missing file, a folder, a Git LFS pointer or a damaged or partial file as a
    CheckpointError naming it."""
    check_user_file(path, "safetensors weights file", CheckpointError)
    refuse_lfs_pointer(path)
    with _interrupts_noticed() as interrupted:
        try:
            return read(str(path))
        except Exception as err:  # safetensors raises its own SafetensorError for any malformed header
            if interrupted():
                # Ctrl+C inside the reader's native code came back as another error ("could not determine the
                # shape of object type ..."): it is the interrupt, not a damaged file to download again.
                raise KeyboardInterrupt from None
            raise CheckpointError(f"{path}: not a readable safetensors file, damaged or partly downloaded "
                                  f"({err})") from None


@contextlib.contextmanager
def _interrupts_noticed() -> Iterator[Callable[[], bool]]:
    """While inside, record whether SIGINT arrived (its handler still runs); outside the main thread, or where
    SIGINT is ignored or kills the process, nothing is recorded."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield lambda: False
        return
    seen: list[int] = []

    def handler(signum, frame):
        seen.append(signum)
        previous(signum, frame)

    signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(seen)
    finally:
        signal.signal(signal.SIGINT, previous)


def _unsafe_globals(path: Path) -> list[str]:
    """Every global the file names outside the allow-list (torch reads them without running the pickle)."""
    from medsight.model.unpickling import allowed_globals

    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (ValueError, RuntimeError, OSError, pickle.UnpicklingError):
        return []  # a legacy (non-zip) file: the unpickler's own first complaint is all there is


def owned(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of the kept tensors, so that the memory map of the whole file is released with the loaded object."""
    return {k: v.clone() for k, v in state.items()}


def pick_state_dict(obj: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """The official loaders take `ema`, else `model`, else `state_dict`, else the object itself."""
    if isinstance(obj, dict):
        for key in ("ema", "model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: no state dict of tensors found (looked for ema, model, state_dict)")
    return obj


# What wrapping a model adds to its state dict's names: DDP `module.`, torch.compile `_orig_mod.` (either or both).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the DDP `module.` prefix, decided by the first key as open_clip does; and torch.compile's `_orig_mod.`
    (which open_clip does not remove: a checkpoint saved from a compiled model holds the same weights under it)."""
    while state:
        prefix = next((p for p in _WRAPPER_PREFIXES if next(iter(state)).startswith(p)), None)
        if prefix is None:
            break
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def select_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_into(module: nn.Module, state: dict[str, torch.Tensor], source: str, assign: bool = False) -> None:
    """Load strictly; a missing, unexpected or mis-shaped key raises a CheckpointError naming it."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    # Same shape, but integers or booleans where the model holds floats (or the reverse): load_state_dict would fail
    # with a RuntimeError naming neither the file nor the fix. Other float dtypes are fine: the model is cast later.
    mistyped = [
        f"{k}: checkpoint {_kind(state[k].dtype)} vs model {_kind(expected[k].dtype)}"
        for k in expected
        if k in state and state[k].dtype.is_floating_point != expected[k].dtype.is_floating_point
    ]
    problems = []
    if missing:
        problems.append(f"missing key(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected key(s): {_listing(unexpected)}")
    if wrong:
        problems.append(f"mis-shaped key(s): {_listing(wrong)}")
    if mistyped:
        problems.append(f"key(s) of another kind of number: {_listing(mistyped)}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems))
    module.load_state_dict(state, strict=True, assign=assign)


def _kind(dtype: torch.dtype) -> str:
    """A dtype as a load error names it: "floating point" for any float (a float16 file loads into float32)."""
    return "floating point" if dtype.is_floating_point else str(dtype).removeprefix("torch.")


def _listing(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# -- official files -------------------------------------------------------------------------------------


def read_vision_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The ViT tensors of an open_clip / UniMed-CLIP checkpoint (`visual.*`), text tower ignored."""
    state = strip_module_prefix(pick_state_dict(safe_torch_load(path, mmap=True), path))
    visual = select_prefix(state, "visual.") or select_prefix(state, "image_encoder.")
    if not visual:
        raise CheckpointError(f"{path}: no vision-encoder keys (expected 'visual.*')")
    return owned(visual)


def read_perceiver_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The `region_perceiver.*` tensors of a stage-1 checkpoint (the released 0079280.pt layout).

    ViT keys (`image_encoder.*`, present in EMA saves) are skipped, as the official loader does; any other
    key outside `region_perceiver.` is an error.
    """
    state = strip_module_prefix(pick_state_dict(safe_torch_load(path, mmap=True), path))
    other = [k for k in state if not k.startswith(("region_perceiver.", "image_encoder."))]
    # Stage-2 saves hold codebook keys; they belong to read_codebook_state, not here.
    other = [k for k in other if not k.startswith(("quantizer.", "modality_predictor."))]
    if other:
        raise CheckpointError(f"{path}: unexpected key(s) in a perceiver checkpoint: {_listing(sorted(other))}")
    perceiver = select_prefix(state, "region_perceiver.")
    codebook_parts = ("to_code.", "code_decoder.", "quantizer.")
    perceiver = {k: v for k, v in perceiver.items() if not k.startswith(codebook_parts)}
    if not perceiver:
        raise CheckpointError(f"{path}: no 'region_perceiver.*' keys")
    return owned(perceiver)


_CODEBOOK_KEY_MAP = (
    ("region_perceiver.quantizer.codebooks.", "codebooks."),
    ("quantizer.codebooks.", "codebooks."),
    ("region_perceiver.to_code.", "to_code."),
    ("region_perceiver.code_decoder.from_code.", "from_code."),
    ("region_perceiver.code_decoder.segmentation_cls_head_quant.", "segmentation_cls_head_quant."),
    ("modality_predictor.", "modality_predictor."),
)


def read_codebook_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The stage-2 tensors (codebooks, W_q, W_m, quantised head, modality predictor), renamed to our module."""
    state = strip_module_prefix(pick_state_dict(safe_torch_load(path, mmap=True), path))
    out = {}
    for key, value in state.items():
        for old, new in _CODEBOOK_KEY_MAP:
            if key.startswith(old):
                out[new + key[len(old) :]] = value
                break
    if not out:
        raise CheckpointError(f"{path}: no stage-2 codebook keys (expected 'quantizer.codebooks.*')")
    return owned(out)


INDEX_FILE = "model.safetensors.index.json"  # a sharded Hugging Face folder's map of tensor name -> shard
# What `save_pretrained(safe_serialization=False)` writes instead: PyTorch pickles, which transformers reads too (with
# `weights_only=True`; here with `safe_torch_load`). A folder's safetensors, when it has both, are what is read.
PICKLE_WEIGHTS_FILE = "pytorch_model.bin"
PICKLE_INDEX_FILE = "pytorch_model.bin.index.json"
# Per format: its index, its one-file name, and the names of its files when neither is there (`model*`, as transformers
# and `hub.release_files` name them: another .safetensors file in the folder, an adapter's or a projector's, is not
# the model's weights).
_WEIGHT_FORMATS = ((INDEX_FILE, "model.safetensors", "model*.safetensors"),
                   (PICKLE_INDEX_FILE, PICKLE_WEIGHTS_FILE, "pytorch_model*.bin"))


def shard_names(folder: Path) -> list[str]:
    """The weight files of a Hugging Face folder: the shards its index names, else `model.safetensors` (else its
    .safetensors files); without any safetensors, the same for `pytorch_model.bin`. A malformed index or no weights
    at all is a CheckpointError."""
    return _weight_files(folder)[0]


def _weight_files(folder: Path) -> tuple[list[str], Path | None]:
    """`shard_names`, and the index it followed (None when there is none)."""
    for index_name, single, pattern in _WEIGHT_FORMATS:
        index = folder / index_name
        if index.is_file():
            shards = _index_shards(index)
        elif os.path.lexists(folder / single):  # a folder by that name is refused by its reader, by name
            index, shards = None, [single]
        else:
            index, shards = None, _shard_series(sorted(p.name for p in folder.glob(pattern) if p.is_file()))
        if shards or index is not None:  # an index that names no shard is not passed over for another format
            break
    if not shards:
        raise CheckpointError(f"{folder}: no weights found (model.safetensors or its shards, or pytorch_model.bin)")
    return shards, index


# `save_pretrained`'s shard names count the shards: model-00001-of-00004.safetensors, pytorch_model-00002-of-00003.bin.
_SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<number>\d+)-of-(?P<count>\d+)(?P<suffix>\.[a-z]+)$")


def _shard_series(names: list[str]) -> list[str]:
    """Weight files found without their index, with every shard their names count: a folder whose index and a
    shard have not arrived (a download cut short) lacks that shard by name, not its tensors."""
    series = set(names)
    for name in names:
        found = _SHARD_NAME.match(name)
        if found:
            width, count = len(found["number"]), int(found["count"])
            series |= {f"{found['stem']}-{i:0{width}d}-of-{found['count']}{found['suffix']}"
                       for i in range(1, count + 1)}
    return sorted(series)


def _index_shards(index: Path) -> list[str]:
    kind = "safetensors" if index.name == INDEX_FILE else "PyTorch weights"
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as err:  # not JSON, or no object with a weight_map
        raise CheckpointError(f"{index}: not a valid {kind} index ({err!r})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: not a valid {kind} index (its weight_map must map tensor names "
                              "to shard file names)")
    return sorted(set(weight_map.values()))


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """One weight file of a Hugging Face folder: safetensors, or a PyTorch pickle of a state dict."""
    if path.suffix == ".safetensors":
        return read_safetensors_file(path)
    return owned(pick_state_dict(safe_torch_load(path, mmap=True), path))


def safetensors_names(folder: str | Path) -> set[str]:
    """The tensor names of a Hugging Face folder, from its index or the shards' headers (no tensor is read; a
    pickled shard's tensors are memory-mapped, not read)."""
    folder = Path(folder)
    shards, index = _weight_files(folder)
    if index is not None:
        return set(json.loads(index.read_text())["weight_map"])
    names: set[str] = set()
    for shard in shards:
        if shard.endswith(".safetensors"):
            names |= _safetensors_names(folder / shard)
        else:
            names |= set(pick_state_dict(safe_torch_load(folder / shard, mmap=True), folder / shard))
    return names


def read_safetensors_folder(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face folder: `model.safetensors` or the shards named by its index (or the
    `pytorch_model.bin` forms of these, `shard_names`)."""
    folder = Path(folder)
    shards, index = _weight_files(folder)
    state: dict[str, torch.Tensor] = {}
    found_in: dict[str, str] = {}
    for shard in shards:
        if not os.path.lexists(folder / shard):
            named_by = "named in the index" if index is not None else "counted by the other shards' names"
            raise CheckpointError(f"{folder}: shard {shard} {named_by} is missing")
        tensors = _read_weights(folder / shard)
        # A tensor in two shards (a shard of another save copied in): which one is meant cannot be told.
        twice = sorted(set(tensors) & set(found_in))
        if twice:
            raise CheckpointError(f"{folder}: {twice[0]} is in both {found_in[twice[0]]} and {shard}"
                                  + (f" ({len(twice) - 1} more such tensors)" if len(twice) > 1 else ""))
        found_in.update(dict.fromkeys(tensors, shard))
        state.update(tensors)
    return state


STAGE4_BASE = "model.embed_tokens.base_emb.weight"
STAGE4_CODES = "model.embed_tokens.codebook_emb.weight"
TOWER_PREFIX = "model.vision_tower.vision_tower."


def split_lvlm_state(
    state: dict[str, torch.Tensor], first_code_id: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Separate the language-model tensors from a vision tower saved inside the LVLM (paper-time saves).

    A stage-4 split embedding (`base_emb` + `codebook_emb`) is merged into one matrix, as stage 5 does.
    """
    tower = select_prefix(state, TOWER_PREFIX)
    lm = {k: v for k, v in state.items() if not k.startswith(TOWER_PREFIX)}
    if STAGE4_BASE in lm:
        base = lm.pop(STAGE4_BASE).clone()
        codes = lm.pop(STAGE4_CODES, None)
        if codes is not None:
            base[first_code_id : first_code_id + codes.shape[0]] = codes
        lm["model.embed_tokens.weight"] = base
    return lm, tower


# -- our own format ---------------------------------------------------------------------------------------

CONFIG_FILE = "medsight_config.json"
WEIGHTS_FILE = "model.safetensors"


def save_safetensors(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(path), metadata=metadata or {"format": "pt"})
