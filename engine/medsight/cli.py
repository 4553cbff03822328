"""The `medsight` command line: `ask` a question about an image or volume slice, `info` about a model."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import numpy as np

PLANES = ("axial", "coronal", "sagittal")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsight", description="MedSIGHT: ask questions, get answers and masks.")
    sub = parser.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="answer a question about an image or one slice of a volume")
    ask.add_argument("path", help="PNG/JPG/TIFF, DICOM file or series folder, NIfTI or NRRD")
    ask.add_argument("question")
    ask.add_argument("--model", default="tiny", help="preset (tiny: random weights), folder, or Hugging Face id")
    ask.add_argument("--vision-file", help="UniMed-CLIP checkpoint for the official layout")
    ask.add_argument("--plane", choices=PLANES, default="axial")
    ask.add_argument("--slice", type=int, help="slice index along the plane (default: the middle slice)")
    ask.add_argument("--modality", help="override the modality (CT, MR, US, ...)")
    ask.add_argument("--window", help="CT window preset (abdomen, lung, bone, brain, liver)")
    ask.add_argument("--resize-mode", choices=("letterbox", "crop"), default="letterbox",
                     help="letterbox keeps the whole slice; crop is the official centre crop")
    ask.add_argument("--max-new-tokens", type=int, default=512)
    ask.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ask.add_argument("--overlay", help="write the slice with the masks drawn on it to this PNG")
    ask.add_argument("--json", action="store_true", help="print one JSON object (answer, regions)")

    serve = sub.add_parser("serve", help="run the engine's HTTP server (127.0.0.1 unless told otherwise)")
    serve.add_argument("--model", default="tiny", help="preset, folder or Hugging Face id")
    serve.add_argument("--vision-file", help="UniMed-CLIP checkpoint for the official layout")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--token", default=os.environ.get("MEDSIGHT_TOKEN"),
                       help="bearer token required from clients (needed for any non-loopback host)")
    serve.add_argument("--device")
    serve.add_argument("--max-upload-mb", type=int, default=1024)
    serve.add_argument("--timeout", type=float, default=600.0, help="seconds before a running ask is cancelled")

    info = sub.add_parser("info", help="sizes and memory needs of a model configuration")
    info.add_argument("--preset", default="full")

    download = sub.add_parser("download", help="fetch a model from the Hugging Face Hub into the local cache")
    download.add_argument("repo", nargs="?", default="Caf0914/MedSIGHT")
    download.add_argument("--revision")
    download.add_argument("--dir", help="copy the files into this folder instead of only caching them")
    return parser


def _load_slice(args: argparse.Namespace) -> tuple[np.ndarray, str]:
    """Read the input, pick the slice and window it to 8-bit RGB."""
    from medsight.imaging import extract_slice, read_volume, slice_count, to_rgb

    volume = read_volume(args.path, modality=args.modality)
    count = slice_count(volume, args.plane)
    index = count // 2 if args.slice is None else args.slice
    if not 0 <= index < count:
        raise ValueError(f"--slice {index} is outside the volume's {count} {args.plane} slices")
    slab = extract_slice(volume, args.plane, index)
    rgb = to_rgb(slab.pixels, volume.modality, preset=args.window, window_from=volume.array)
    return rgb, f"{args.plane} slice {index} of {count}"


def _ask(args: argparse.Namespace) -> int:
    import torch

    import medsight
    from medsight.model.medsight import ImageOptions
    from medsight.overlay import save_overlay

    image, where = _load_slice(args)
    model = medsight.load_model(args.model, device=args.device, vision_file=args.vision_file)
    if args.model in medsight.config.PRESETS:
        print(f"note: preset {args.model!r} has random weights; its answers are gibberish "
              "(it shows the pipeline works, not what the model knows)", file=sys.stderr)
    options = medsight.GenerationOptions(max_new_tokens=args.max_new_tokens)
    with torch.inference_mode():
        answer = model.ask(image, args.question, options, ImageOptions(resize_mode=args.resize_mode))
    if args.overlay:
        save_overlay(args.overlay, image, answer.regions)
    if args.json:
        print(json.dumps({
            "answer": answer.text,
            "input": where,
            "regions": [
                {"code": r.code, "label": r.label, "index": r.index, "pixels": int(r.mask.sum()),
                 "probability": round(r.probability, 4), "bbox": r.bbox}
                for r in answer.regions
            ],
            "overlay": args.overlay,
        }))
    else:
        print(f"[{where}] {answer.text}")
        for r in answer.regions:
            print(f"  region {r.index}: {r.code} {r.label!r} {int(r.mask.sum())} pixels, p={r.probability:.2f}")
        if args.overlay:
            print(f"overlay written to {args.overlay}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    import medsight
    from medsight.server.app import create_app
    from medsight.server.security import check_bind

    check_bind(args.host, args.token)
    engine = medsight.Engine.load(args.model, device=args.device, vision_file=args.vision_file)
    app = create_app(engine, token=args.token, max_upload_bytes=args.max_upload_mb * 1024**2,
                     request_timeout_s=args.timeout, model_name=str(args.model))
    print(f"MedSIGHT engine ({args.model}) on http://{args.host}:{args.port}/v1  (API docs: /docs)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


def _info(args: argparse.Namespace) -> int:
    from medsight.config import get_preset
    from medsight.model.sizes import kv_cache_bytes_per_token, model_size

    config = get_preset(args.preset)
    size = model_size(config)
    gib = 1024**3
    print(f"preset {config.name}: vision {size.vision:,} + perceiver {size.perceiver:,} + language model "
          f"{size.language_model:,} = {size.total:,} parameters")
    print(f"weights: bf16 {size.weight_bytes() / gib:.2f} GiB, fp32 {size.total * 4 / gib:.2f} GiB; "
          f"KV cache {kv_cache_bytes_per_token(config) / 1024:.0f} KiB per token (bf16)")
    return 0


def _download(args: argparse.Namespace) -> int:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = snapshot_download(repo_id=args.repo, revision=args.revision, local_dir=args.dir)
    except LocalEntryNotFoundError:
        raise ValueError(f"{args.repo}: not in the local cache, and the Hub cannot be reached (offline?)") from None
    except HfHubHTTPError as err:
        raise ValueError(f"{args.repo}: download failed ({err})") from None
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        commands = {"ask": _ask, "serve": _serve, "info": _info, "download": _download}
        return commands[args.command](args)
    except (ValueError, FileNotFoundError) as err:
        # ImagingError and CheckpointError are ValueErrors: show the message, not a traceback.
        print(f"medsight: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
