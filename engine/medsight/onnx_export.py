"""Export the image side of MedSIGHT to ONNX: the vision encoder and the Region Perceiver (encode and decode).

Three graphs, all with a dynamic batch dimension (and a dynamic number of codes K for decode):

- ``vision_encoder.onnx``: pixels (B, 3, S, S) -> cls (B, C), patches (B, N, C) of the selected ViT block.
- ``perceiver_encode.onnx``: grid (B, G, G, C) -> region_tokens (B, Q, C).
- ``perceiver_decode.onnx``: grid (B, G, G, C), codes (B, K, C), query_mask (B, K) bool
  -> seg_logits (B, K, 8G, 8G), class_logits (B, K, classes + 1).

Pixel rounding to bfloat16 (the official chatbot's habit) is *not* in the graph: the backend applies it before
the session, exactly as `MedSIGHTModel.encode` does.

Sine position encoding: the grid size G is fixed by the config, so every pyramid level's encoding is a
constant. It is computed once in PyTorch (the float64 power that matches the official values on every CPU) and
baked into the graphs as initializers, one per level; `manifest.json` records this (``"position_encoding":
"constant"``). For the full model that is (24² + 48² + 96² + 192²) x 1024 floats ≈ 200 MB per perceiver graph,
stored as ONNX external data beside the graph file when a graph passes the 2 GB protobuf limit.

Attention: the perceiver is traced with its "eager" kernel (the official arithmetic) whatever kernel the model runs,
because the "sdpa" kernel's fix-up of fully blocked rows is a branch on the data that tracing would freeze.

`torch.onnx.export` with the dynamo exporter is tried first; if it fails, the TorchScript exporter with
``dynamic_axes`` is used. The manifest records which one produced each graph.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from medsight.atomic_files import replace_file, sync_folder
from medsight.folder_lock import LockHeldError, hold_lock
from medsight.model.medsight import MedSIGHTModel
from medsight.model.vision import encode_image

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
VISION_FILE = "vision_encoder.onnx"
ENCODE_FILE = "perceiver_encode.onnx"
DECODE_FILE = "perceiver_decode.onnx"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "medsight-onnx/2"  # 2: "files" (each file's SHA-256) is required; /1 exports lack it
GRAPH_FILES = {"vision_encoder": VISION_FILE, "perceiver_encode": ENCODE_FILE, "perceiver_decode": DECODE_FILE}
#: A graph past `_needs_external_data` keeps its weights in "<graph file>.data" beside it (the name the dynamo
#: exporter writes and the graph refers to).
DATA_FILES = tuple(f"{file}.data" for file in GRAPH_FILES.values())
#: The hidden folder inside the export folder where an export writes its graphs before renaming them into place.
STAGING_PREFIX = ".medsight-onnx-export-"
#: Its OS lock is held by the one export writing into a folder (`folder_lock`); the file stays after the export.
LOCK_FILE = ".medsight-onnx-export.lock"
#: Every name an export may write into its folder.
EXPORT_FILES = (*GRAPH_FILES.values(), *DATA_FILES, MANIFEST_FILE)

GRAPH_IO: dict[str, tuple[list[str], list[str]]] = {
    "vision_encoder": (["pixel_values"], ["cls", "patches"]),
    "perceiver_encode": (["grid"], ["region_tokens"]),
    "perceiver_decode": (["grid", "codes", "query_mask"], ["seg_logits", "class_logits"]),
}


class VisionEncoderGraph(nn.Module):
    """pixels (B, 3, S, S) -> (cls (B, C), patches (B, N, C)) of the configured block."""

    def __init__(self, model: MedSIGHTModel) -> None:
        super().__init__()
        self.encoder = model.image_encoder
        self.select_layer = model.config.vision.select_layer

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = encode_image(self.encoder, pixel_values, self.select_layer)
        return feats.cls, feats.patches


class PerceiverEncodeGraph(nn.Module):
    """grid (B, G, G, C) -> the learned queries after the perceiver, (B, Q, C) (`region_tokens`: no mask work)."""

    def __init__(self, model: MedSIGHTModel) -> None:
        super().__init__()
        self.perceiver = model.region_perceiver

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.perceiver.region_tokens(grid)


class PerceiverDecodeGraph(nn.Module):
    """grid (B, G, G, C), codes (B, K, C), query_mask (B, K) -> seg_logits (B, K, 8G, 8G), class_logits."""

    def __init__(self, model: MedSIGHTModel) -> None:
        super().__init__()
        self.perceiver = model.region_perceiver

    def forward(
        self, grid: torch.Tensor, codes: torch.Tensor, query_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.perceiver.decode(grid, codes, query_mask)


ONNX_EXTRA = "pip install 'medsight[onnx]' (onnxruntime-gpu instead of onnxruntime on a GPU machine)"


def require_packages(*names: str) -> None:
    """Name the missing packages of the ONNX path and how to install them, before any work (torch.onnx and the
    backend would otherwise fail with a traceback deep inside, after the model was loaded)."""
    import importlib.util

    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"the ONNX path needs {', '.join(missing)}: {ONNX_EXTRA}")


#: The oldest ONNX opset the graphs can be written in: LayerNormalization came with 17.
MIN_OPSET = 17


def check_opset(opset: int) -> None:
    """Refuse an opset the graphs cannot be written in (`medsight export-onnx` asks before loading the model)."""
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET} (LayerNormalization), not {opset}")


def export_packages(exporter: str) -> tuple[str, ...]:
    """Packages an export needs: onnx always (both exporters write through it), onnxscript for dynamo only ("auto"
    falls back to TorchScript without it)."""
    return ("onnx", "onnxscript") if exporter == "dynamo" else ("onnx",)


#: The dtypes an Engine may run the model in; the manifest records the exported weights' fingerprint in each.
FINGERPRINT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def weights_fingerprint(model: MedSIGHTModel, dtype: torch.dtype | None = None) -> str:
    """sha256 of the exported parts' weights (vision encoder and perceiver) as `dtype` (default: the model's).

    In the model's own dtype, so that a bfloat16 model loaded from a float32 checkpoint has the fingerprint its
    float32 export recorded for bfloat16 (one rounding either way)."""
    dtype = dtype or model.dtype
    digest = hashlib.sha256()
    for part in ("image_encoder", "region_perceiver"):
        for name, tensor in getattr(model, part).state_dict().items():
            values = tensor.detach().cpu()
            if values.is_floating_point():
                values = values.to(dtype)
            digest.update(f"{part}.{name}:{tuple(values.shape)}:{values.dtype}".encode())
            digest.update(values.contiguous().reshape(-1).view(torch.uint8).numpy())  # its buffer, no copy
    return digest.hexdigest()


def pyramid_sizes(model: MedSIGHTModel) -> list[int]:
    """Grid side of every perceiver level: G, 2G, ..., G * 2**num_stages."""
    g = model.config.vision.grid_size
    return [g * 2**s for s in range(model.config.perceiver.num_stages + 1)]


def _example_inputs(model: MedSIGHTModel, batch: int = 2, codes: int = 3) -> dict[str, tuple[torch.Tensor, ...]]:
    v, p = model.config.vision, model.config.perceiver
    g = v.grid_size
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, codes, dtype=torch.bool)
    mask[0, -1] = False
    return {
        "vision_encoder": (torch.randn(batch, 3, v.image_size, v.image_size, generator=gen),),
        "perceiver_encode": (torch.randn(batch, g, g, p.dim, generator=gen),),
        "perceiver_decode": (
            torch.randn(batch, g, g, p.dim, generator=gen),
            torch.randn(batch, codes, p.dim, generator=gen),
            mask,
        ),
    }


def _dynamic_shapes(name: str) -> tuple[dict[str, dict[int, str]], tuple]:
    """(TorchScript dynamic_axes, dynamo dynamic_shapes) of one graph."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    codes = torch.export.Dim("codes", min=1, max=1024)
    if name == "vision_encoder":
        return {"pixel_values": {0: "batch"}, "cls": {0: "batch"}, "patches": {0: "batch"}}, ({0: batch},)
    if name == "perceiver_encode":
        return {"grid": {0: "batch"}, "region_tokens": {0: "batch"}}, ({0: batch},)
    axes = {
        "grid": {0: "batch"},
        "codes": {0: "batch", 1: "codes"},
        "query_mask": {0: "batch", 1: "codes"},
        "seg_logits": {0: "batch", 1: "codes"},
        "class_logits": {0: "batch", 1: "codes"},
    }
    return axes, ({0: batch}, {0: batch, 1: codes}, {0: batch, 1: codes})


def _export_one(
    module: nn.Module, name: str, args: tuple[torch.Tensor, ...], path: Path, opset: int, exporter: str,
    optimize: bool = True,
) -> str:
    """Export one graph; returns "dynamo" or "torchscript" (whichever produced the file)."""
    inputs, outputs = GRAPH_IO[name]
    axes, shapes = _dynamic_shapes(name)
    if exporter in ("auto", "dynamo"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(
                    module, args, dynamo=True, input_names=inputs, output_names=outputs,
                    dynamic_shapes=shapes, opset_version=opset, optimize=optimize, verbose=False,
                )
                program.save(str(path), external_data=_needs_external_data(module))
            return "dynamo"
        except Exception as err:  # any exporter failure means "try the other exporter"
            if exporter == "dynamo":
                raise
            log.warning("dynamo export of %s failed (%s: %s); falling back to TorchScript", name,
                        type(err).__name__, str(err).splitlines()[0] if str(err) else "")
    # With autograd on, nn.MultiheadAttention takes its plain path (the fused fast path has no ONNX symbolic).
    with warnings.catch_warnings(), torch.enable_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(path), dynamo=False, input_names=inputs, output_names=outputs, dynamic_axes=axes,
            opset_version=opset, do_constant_folding=True,
        )
    return "torchscript"


def _needs_external_data(module: nn.Module) -> bool:
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    return size > (1 << 30)  # leave headroom below protobuf's 2 GB for the baked position encodings


def export_onnx(
    model: MedSIGHTModel, out_dir: str | Path, opset: int = DEFAULT_OPSET, exporter: str = "auto",
    optimize: bool = True,
) -> dict[str, Path]:
    """Write the three graphs and `manifest.json` to `out_dir`; returns their paths by name.

    Args:
        model: a MedSIGHT model; it is exported in float32 on the CPU (a copy is made if it is not already).
        out_dir: created if missing; an export there is replaced once all new graphs are written (a .data file
            no new graph reads is removed).
        opset: ONNX opset, at least 17.
        exporter: "auto" (dynamo, then TorchScript on failure), "dynamo" or "torchscript".
        optimize: run the dynamo exporter's graph optimiser (onnxruntime optimises again at load time).
    """
    check_opset(opset)
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ValueError("exporter must be 'auto', 'dynamo' or 'torchscript'")
    require_packages(*export_packages(exporter))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model.device.type != "cpu" or model.dtype != torch.float32:
        import copy

        model = copy.deepcopy(model).to(device="cpu", dtype=torch.float32)
    model = model.eval()
    # The graphs are written into a hidden folder beside the export and renamed into place once all are complete:
    # an export stopped midway leaves the old one whole, and no file an engine has open is written into (onnxruntime
    # maps a graph's .data file: written in place, a running engine would compute with the new weights, or crash).
    paths = {name: out / file for name, file in GRAPH_FILES.items()}
    paths["manifest"] = out / MANIFEST_FILE
    with _export_lock(out):
        text = json.dumps(_write_graphs(model, out, opset, exporter, optimize), indent=2)
        # Whole or not at all: it marks the export complete, so a write stopped midway (a full disk, a kill) must
        # not leave a torn one beside complete graphs.
        replace_file(paths["manifest"], lambda temporary: temporary.write_text(text, encoding="utf-8"))
    return paths


@contextmanager
def _export_lock(out: Path) -> Iterator[None]:
    """Be the one export writing into `out`: a second one (another terminal) would delete the first's hidden folder
    as a leftover and swap its graphs in among the first's. The OS lock on the lock file ends with its export, killed
    or not; the file stays."""
    lock = out / LOCK_FILE
    try:
        with hold_lock(lock):
            yield
    except LockHeldError as held:
        raise ValueError(f"another export is writing to {out} (process {held.holder}): wait for it to end ({lock} "
                         "stays after an export and needs no deleting: only a running export holds it)") from None


def _write_graphs(model: MedSIGHTModel, out: Path, opset: int, exporter: str, optimize: bool) -> dict:
    """Under the export lock: write the graphs aside, rename them into place and return the manifest to write."""
    for leftover in out.glob(f"{STAGING_PREFIX}*"):  # an export killed before its cleanup (up to 2.4 GB)
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    try:
        # The sdpa kernel fixes up fully blocked rows behind a Python branch on the data, which tracing would
        # freeze at the example input's value: the graphs are traced with the eager (official, branch-free)
        # arithmetic.
        kernel = model.region_perceiver.attention_implementation
        model.region_perceiver.attention_implementation = "eager"
        try:
            used = _export_graphs(model, staging, opset, exporter, optimize)
        finally:
            model.region_perceiver.attention_implementation = kernel
        files = {path.name: file_sha256(path) for path in sorted(staging.iterdir())}
        manifest = _manifest(model, opset, used, files)
        # The manifest vouches for the files beside it: gone while they are swapped, so that a stop midway leaves a
        # folder the backend refuses, not old promises over a mix of new and old graphs.
        (out / MANIFEST_FILE).unlink(missing_ok=True)
        for name in files:
            os.replace(staging / name, out / name)
        for stale in set(DATA_FILES) - set(files):  # an earlier export's weights that no graph reads now
            (out / stale).unlink(missing_ok=True)
        sync_folder(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks (a full model's vision weights are 1.2 GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest(model: MedSIGHTModel, opset: int, used: dict[str, str], files: dict[str, str]) -> dict:
    """What `manifest.json` records: the config and weights the graphs came from, and the sha256 of every file."""
    v = model.config.vision
    return {
        "format": MANIFEST_FORMAT,
        "config": model.config.to_dict(),
        "opset": opset,
        "dtype": "float32",
        "image_size": v.image_size,
        "grid_size": v.grid_size,
        "mask_size": model.config.mask_size,
        "position_encoding": "constant",
        "pixel_rounding": "bfloat16 before the graph (ImageOptions.round_pixels_to_bf16), done by the backend",
        "weights_source": model.weights_source,
        "weights_fingerprint": {str(d).removeprefix("torch."): weights_fingerprint(model, d)
                                for d in FINGERPRINT_DTYPES},
        "graphs": {
            name: {"file": GRAPH_FILES[name], "exporter": used[name], "inputs": GRAPH_IO[name][0],
                   "outputs": GRAPH_IO[name][1]}
            for name in GRAPH_FILES
        },
        # Every file the export wrote (graphs and their .data): a graph or weights file copied in from another
        # export of the same config passes the config and weights checks, and is caught by its digest.
        "files": files,
    }


def _export_graphs(model: MedSIGHTModel, out: Path, opset: int, exporter: str, optimize: bool) -> dict[str, str]:
    """Write the three graphs into `out`; returns the exporter that produced each, by graph name."""
    modules = {
        "vision_encoder": VisionEncoderGraph(model),
        "perceiver_encode": PerceiverEncodeGraph(model),
        "perceiver_decode": PerceiverDecodeGraph(model),
    }
    examples = _example_inputs(model)
    # The perceiver's own cache holds every level's encoding before tracing, so the graphs read them as constants
    # and need neither float64 nor the arange/pow chain at run time.
    for side in pyramid_sizes(model):
        model.region_perceiver.position_encoding(side, side, torch.device("cpu"))
    with torch.no_grad():
        return {name: _export_one(module.eval(), name, examples[name], out / GRAPH_FILES[name], opset, exporter,
                                  optimize)
                for name, module in modules.items()}
