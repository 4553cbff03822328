"""An onnxruntime backend for the image side of MedSIGHT (vision encoder + Region Perceiver encode/decode).

Reads a folder written by `medsight.onnx_export.export_onnx` and runs its three graphs with onnxruntime: the
CUDA execution provider when onnxruntime-gpu is installed, the CPU provider otherwise. Inputs and outputs are
torch tensors, so the backend slots in where `MedSIGHTModel.encode` and `RegionPerceiver.decode` are called.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medsight.config import MedSIGHTConfig
from medsight.model.medsight import ImageEncoding
from medsight.onnx_export import (
    GRAPH_FILES,
    GRAPH_IO,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    file_sha256,
    require_packages,
    weights_fingerprint,
)

REEXPORT = "run `medsight export-onnx` for this model"


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, CPU always as the fallback."""
    require_packages("onnxruntime")
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def read_manifest(folder: Path) -> dict:
    """The folder's manifest, refused with what to do when it is missing, torn, of another format version or lacks
    the keys this version reads (a JSON or KeyError from deep inside would name neither the file nor the fix)."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ValueError(f"{folder} holds no ONNX export ({MANIFEST_FILE} is missing, or an export was "
                         f"interrupted): {REEXPORT}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable manifest ({err}): {REEXPORT}") from None
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != MANIFEST_FORMAT:
        raise ValueError(f"{path} is of format {found!r}, this medsight reads {MANIFEST_FORMAT!r}: {REEXPORT}")
    missing = [key for key in ("config", "graphs", "files") if key not in manifest]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: {REEXPORT}")
    return manifest


def exported_config(manifest: dict, path: Path) -> MedSIGHTConfig:
    """The config the graphs were exported from; one this medsight cannot read (a newer version's fields, a hand
    edit) is refused naming the manifest, not with an AttributeError or a message that names no file."""
    try:
        return MedSIGHTConfig.from_dict(manifest["config"])
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        raise ValueError(f"{path} holds a config this medsight cannot read ({err}): {REEXPORT}") from None


def open_graph(folder: Path, name: str, options, providers: list[str]):
    """An onnxruntime session of one graph, whose inputs and outputs must be the ones the backend feeds and reads:
    a missing, torn or misplaced graph file is a clear error at load, not an onnxruntime one at the first image."""
    import onnxruntime as ort

    path = folder / GRAPH_FILES[name]
    if not path.is_file():
        raise ValueError(f"the ONNX export in {folder} lacks {path.name}: {REEXPORT}")
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as err:  # onnxruntime's load errors (InvalidProtobuf, Fail, ...) derive from Exception only
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path} cannot be loaded ({first}): {REEXPORT}") from None
    io = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    if io != GRAPH_IO[name]:
        raise ValueError(f"{path} is not the {name} graph (inputs {io[0]}, outputs {io[1]}): {REEXPORT}")
    return session


def check_files(folder: Path, manifest: dict) -> None:
    """Every file the manifest lists must be the one the export wrote: a graph or .data file copied in from another
    export (of the same config, so that nothing else tells) is refused naming it, not run with the wrong weights."""
    files = manifest["files"]
    if not isinstance(files, dict) or not set(GRAPH_FILES.values()) <= set(files):
        raise ValueError(f"{folder / MANIFEST_FILE} does not list the graph files: {REEXPORT}")
    for name, digest in files.items():
        path = folder / name
        if path.name != name or not path.is_file():
            raise ValueError(f"the ONNX export in {folder} lacks {name}: {REEXPORT}")
        if file_sha256(path) != digest:
            raise ValueError(f"{path} is not the file this export wrote (from another export?): {REEXPORT}")


class OnnxVisionBackend:
    """The exported vision encoder and perceiver behind `encode` / `decode`, on onnxruntime.

    Args:
        out_dir: the export folder (graphs + manifest.json).
        providers: onnxruntime execution providers; default CUDA if available, else CPU.
        intra_op_threads: CPU threads per session (0 = onnxruntime's default).
    """

    def __init__(self, out_dir: str | Path, providers: Sequence[str] | None = None, intra_op_threads: int = 0) -> None:
        require_packages("onnxruntime")
        import onnxruntime as ort

        self.folder = Path(out_dir)
        self.manifest = read_manifest(self.folder)
        # Sizes from the exported config (what check_model compares), not the manifest's informational copies; read
        # before the graphs, whose sessions are the slow part.
        self.config = exported_config(self.manifest, self.folder / MANIFEST_FILE)
        self.providers = list(providers) if providers is not None else default_providers()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        self.sessions = {name: open_graph(self.folder, name, options, self.providers) for name in GRAPH_FILES}
        # After the sessions, which name a torn or misplaced graph more precisely than a digest can.
        check_files(self.folder, self.manifest)
        self.image_size = self.config.vision.image_size
        self.grid_size = self.config.vision.grid_size

    def check_model(self, model) -> None:
        """Refuse a model these graphs were not exported from (another config, other weights, an older export):
        a stale folder would otherwise answer with another model's image features, without any error."""
        exported = self.config
        for part in ("vision", "perceiver"):
            ours, theirs = getattr(model.config, part), getattr(exported, part)
            if ours != theirs:
                differ = [k for k, v in vars(ours).items() if getattr(theirs, k, None) != v]
                raise ValueError(f"the ONNX export in {self.folder} is of another model ({part} config differs in "
                                 f"{', '.join(differ)}): {REEXPORT}")
        fingerprints = self.manifest.get("weights_fingerprint")
        if not isinstance(fingerprints, dict):
            raise ValueError(f"the ONNX export in {self.folder} has no record of its weights (an older export): "
                             f"{REEXPORT}")
        dtype = str(model.dtype).removeprefix("torch.")
        if fingerprints.get(dtype) != weights_fingerprint(model):
            raise ValueError(f"the ONNX export in {self.folder} was made from other weights than this model's "
                             f"(a stale export?): {REEXPORT}")

    @property
    def provider(self) -> str:
        """The provider that actually runs the graphs (the first one onnxruntime accepted)."""
        return self.sessions["vision_encoder"].get_providers()[0]

    def _run(self, name: str, **inputs: np.ndarray) -> list[np.ndarray]:
        return self.sessions[name].run(None, inputs)

    def encode(self, pixel_values: torch.Tensor, round_pixels_to_bf16: bool = True) -> ImageEncoding:
        """(B, 3, S, S) or (3, S, S) pixels -> ImageEncoding (float32 CPU tensors), as `MedSIGHTModel.encode`."""
        if pixel_values.ndim == 3:
            pixel_values = pixel_values[None]
        if round_pixels_to_bf16:
            pixel_values = pixel_values.to(torch.bfloat16)
        pixels = pixel_values.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        cls, patches = self._run("vision_encoder", pixel_values=pixels)
        b, _, c = patches.shape
        grid = patches.reshape(b, self.grid_size, self.grid_size, c)
        (tokens,) = self._run("perceiver_encode", grid=grid)
        return ImageEncoding(torch.from_numpy(cls), torch.from_numpy(patches), torch.from_numpy(grid),
                             torch.from_numpy(tokens))

    def decode(
        self, grids: torch.Tensor, codes: torch.Tensor, query_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """grids (B, G, G, C), projected codes (B, K, C), query_mask (B, K) bool (True = real)
        -> seg_logits (B, K, 8G, 8G) and class_logits (B, K, classes + 1), as `RegionPerceiver.decode`."""
        if query_mask is None:
            query_mask = torch.ones(codes.shape[:2], dtype=torch.bool)

        def arr(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
            return t.detach().to(device="cpu", dtype=dtype).contiguous().numpy()

        seg, cls = self._run("perceiver_decode", grid=arr(grids, torch.float32), codes=arr(codes, torch.float32),
                             query_mask=arr(query_mask, torch.bool))
        return torch.from_numpy(seg), torch.from_numpy(cls)

    def region_decode(self, grids: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``decode`` argument of `MedSIGHTModel.decode_regions` (the Engine passes it): `decode` on
        onnxruntime, mask logits back on the grids' device and dtype (token_projection stays in PyTorch)."""
        logits, classes = self.decode(grids, codes)
        return logits.to(device=grids.device, dtype=grids.dtype), classes
