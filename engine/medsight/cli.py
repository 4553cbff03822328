"""The `medsight` command line: `ask` a question about an image or volume slice, `info` about a model."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys

PLANES = ("axial", "coronal", "sagittal")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsight", description="MedSIGHT: ask questions, get answers and masks.")
    sub = parser.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="answer a question about an image or slices of a volume")
    ask.add_argument("path", help="PNG/JPG/TIFF, DICOM file or series folder, NIfTI or NRRD")
    ask.add_argument("question")
    ask.add_argument("--model", default="demo",
                     help="demo (embedded, trained on synthetic data), tiny/full (random weights), folder, or Hub id")
    ask.add_argument("--vision-file", help="UniMed-CLIP checkpoint for the official layout")
    ask.add_argument("--plane", choices=PLANES, default="axial")
    ask.add_argument("--slices", help="'all', 'a:b' (b excluded), or '3,7,9' (default: the middle slice)")
    ask.add_argument("--series", help="DICOM SeriesInstanceUID when the folder holds several series")
    ask.add_argument("--modality", help="override the modality (CT, MR, US, ...)")
    ask.add_argument("--window", help="CT window preset (abdomen, lung, bone, brain, liver)")
    ask.add_argument("--resize-mode", choices=("letterbox", "crop"), default="letterbox",
                     help="letterbox keeps the whole slice; crop is the official centre crop")
    ask.add_argument("--max-new-tokens", type=int, default=512)
    ask.add_argument("--batch", type=int, default=16, help="slices per batch")
    ask.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ask.add_argument("--out", help="segmentation file: .seg.nrrd (3D Slicer), .nii/.nii.gz (+ JSON labels), .dcm")
    ask.add_argument("--overlay", help="write a slice with its masks drawn on it to this PNG")
    ask.add_argument("--json", action="store_true", help="print one JSON object (answer, regions, slices)")

    serve = sub.add_parser("serve", help="run the engine's HTTP server (127.0.0.1 unless told otherwise)")
    serve.add_argument("--model", default="demo", help="demo (embedded), tiny/full (random), folder or Hub id")
    serve.add_argument("--vision-file", help="UniMed-CLIP checkpoint for the official layout")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--token-file", help="file holding the bearer token clients must send (needed for any "
                       "non-loopback host); or set MEDSIGHT_TOKEN. Never on the command line: others can read it")
    serve.add_argument("--token", help=argparse.SUPPRESS)  # deprecated: visible in the process list
    serve.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                       help="another host name clients may use (e.g. behind a proxy); loopback names and --host "
                       "are always allowed, any other Host header is refused (DNS rebinding)")
    serve.add_argument("--device")
    serve.add_argument("--max-upload-mb", type=int, default=1024)
    serve.add_argument("--timeout", type=float, default=600.0,
                       help="seconds an ask may run before it is cancelled (time waiting in the queue not counted)")
    serve.add_argument("--max-waiting", type=int, default=64, help="asks that may wait; more get 429 (busy)")
    serve.add_argument("--ask-memory-mb", type=int, default=8192,
                       help="memory budget of one ask (estimated before it starts; larger asks are refused)")
    serve.add_argument("--threads", type=int, default=None,
                       help="compute threads of the model, set once (default: 1 on a GPU or for a model under 100M "
                       "parameters, else the CPU cores this process may use)")
    serve.add_argument("--audit", metavar="FILE", help="append one JSON line per job to FILE: model, weights hash, "
                       "volume hash, slices, options, region codes, outcome; never text, pixels or identifiers")

    for command in (ask, serve):
        # Mirrors medsight.model.perceiver.ATTENTION_IMPLEMENTATIONS (not imported: `--help` stays free of torch).
        command.add_argument("--perceiver-attention", choices=("eager", "sdpa"), default="sdpa",
                             help="sdpa (default) is PyTorch's fused attention kernel (same values within float "
                             "rounding, faster); eager is the official arithmetic")

    train = sub.add_parser("train", help="run one training stage: medsight train stage1 --config C --data D --out O",
                           add_help=False)
    train.add_argument("stage_args", nargs=argparse.REMAINDER)

    evaluate = sub.add_parser("eval", help="benchmarks: medsight eval diagseg|vqa|mc --data F --report D",
                              add_help=False)
    evaluate.add_argument("eval_args", nargs=argparse.REMAINDER)

    onnx = sub.add_parser("export-onnx", help="export the vision encoder and the perceiver to ONNX")
    onnx.add_argument("--model", default="tiny", help="preset, folder or Hugging Face id")
    onnx.add_argument("--vision-file", help="UniMed-CLIP checkpoint for the official layout")
    onnx.add_argument("--out", required=True, help="folder for the .onnx graphs and manifest.json")
    onnx.add_argument("--opset", type=int, default=18)
    onnx.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto")

    info = sub.add_parser("info", help="sizes and memory needs of a model configuration")
    info.add_argument("--preset", default="full")

    download = sub.add_parser("download", help="fetch a model from the Hugging Face Hub into the local cache")
    download.add_argument("repo", nargs="?", default="Caf0914/MedSIGHT")
    download.add_argument("--revision")
    download.add_argument("--dir", help="copy the files into this folder instead of only caching them")
    return parser


def parse_slices(spec: str | None, count: int) -> list[int]:
    """'all', 'a:b' (Python range, b excluded), '3,7,9' or one index -> sorted unique indices."""
    if spec is None:
        return [count // 2]
    spec = spec.strip()
    try:
        if spec == "all":
            indices = list(range(count))
        elif ":" in spec:
            start, stop = (int(x) if x else None for x in spec.split(":", 1))
            indices = list(range(count))[slice(start, stop)]
        else:
            indices = [int(x) for x in spec.split(",")]
    except ValueError:
        raise ValueError(f"--slices {spec!r}: use 'all', 'a:b' or a comma-separated list of integers") from None
    outside = [i for i in indices if not 0 <= i < count]
    if outside or not indices:
        raise ValueError(f"--slices {spec!r} selects no slice or slices outside 0..{count - 1}")
    return sorted(set(indices))


def _finding(region) -> str:
    """The segment a region belongs to: its label, else its code; printable ASCII (file headers need it)."""
    name = re.sub(r"[^\x20-\x7e]", "", region.label).replace("|", " ").strip()
    return name or region.code or "region"


def _segments(answers) -> dict[str, int]:
    """One 3D segment per finding: regions with the same label (or code, if unlabelled) share a label value."""
    labels: dict[str, int] = {}
    for answer in answers:
        for region in answer.regions:
            labels.setdefault(_finding(region), len(labels) + 1)
    return labels


def _write_segmentation(path: str, volume, answers) -> None:
    from medsight.imaging import Segment, SegmentationBuilder, write_dicom_seg, write_nifti_labelmap, write_seg_nrrd
    from medsight.overlay import PALETTE

    labels = _segments(answers)
    codes: dict[str, str | None] = {}
    for answer in answers:
        for region in answer.regions:
            codes.setdefault(_finding(region), region.code)
    segments = {
        name: Segment(value, name[:64], tuple(c / 255 for c in PALETTE[(value - 1) % len(PALETTE)]), codes[name])
        for name, value in labels.items()
    }
    builder = SegmentationBuilder(volume)
    for answer in answers:
        for region in answer.regions:
            builder.add(answer.slice, region.mask, segments[_finding(region)])
    if not labels:
        raise ValueError(f"the answer has no regions: nothing to write to {path}")
    seg = builder.build()
    lower = path.lower()
    if lower.endswith(".seg.nrrd") or lower.endswith(".nrrd"):
        write_seg_nrrd(seg, path)
    elif lower.endswith((".nii", ".nii.gz")):
        write_nifti_labelmap(seg, path)
    elif lower.endswith(".dcm"):
        write_dicom_seg(seg, path)
    else:
        raise ValueError(f"--out {path}: use .seg.nrrd, .nii, .nii.gz or .dcm")


def _ask(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    import medsight
    from medsight.engine import VolumeSlices
    from medsight.imaging import read_volume, slice_count
    from medsight.model.medsight import ImageOptions
    from medsight.overlay import save_overlay

    volume = read_volume(args.path, series_uid=args.series, modality=args.modality)
    indices = parse_slices(args.slices, slice_count(volume, args.plane))
    engine = medsight.Engine.load(args.model, device=args.device, vision_file=args.vision_file,
                                  perceiver_attention=args.perceiver_attention)
    if engine.model.weights_source.startswith("random"):
        print(f"note: preset {args.model!r} has random weights; its answers are gibberish "
              "(it shows the pipeline works, not what the model knows)", file=sys.stderr)
    options = medsight.GenerationOptions(max_new_tokens=args.max_new_tokens)
    image_options = ImageOptions(resize_mode=args.resize_mode)
    answers = []
    chunks = [indices[i : i + max(1, args.batch)] for i in range(0, len(indices), max(1, args.batch))]
    with tqdm(total=len(indices), unit="slice", disable=len(indices) < 2, file=sys.stderr) as bar:
        for chunk in chunks:
            result = engine.ask(VolumeSlices(volume, args.plane, chunk, args.window), args.question,
                                options, image_options)
            answers.extend(result.answers)
            bar.update(len(chunk))
    if args.out:
        _write_segmentation(args.out, volume, answers)
    if args.overlay:
        from medsight.imaging import to_rgb

        shown = next((a for a in answers if a.regions), answers[len(answers) // 2])
        rgb = to_rgb(shown.slice.pixels, volume.modality, preset=args.window, window_from=volume.array)
        save_overlay(args.overlay, rgb, shown.regions)
    _report(args, answers)
    return 0


def _report(args: argparse.Namespace, answers) -> None:
    def region_json(r) -> dict:
        return {"code": r.code, "label": r.label, "slice": r.slice_index, "index": r.index,
                "pixels": int(r.mask.sum()), "probability": round(r.probability, 4), "bbox": r.bbox}

    if args.json:
        main_answer = answers[len(answers) // 2] if len(answers) > 1 else answers[0]
        print(json.dumps({
            "answer": main_answer.text,
            "regions": [region_json(r) for a in answers for r in a.regions],
            "slices": [{"plane": args.plane, "index": a.slice_index, "answer": a.text} for a in answers],
            "out": args.out,
            "overlay": args.overlay,
        }))
        return
    for a in answers:
        print(f"[{args.plane} slice {a.slice_index}] {a.text}")
        for r in a.regions:
            print(f"  region {r.index}: {r.code} {r.label!r} {int(r.mask.sum())} pixels, p={r.probability:.2f}")
    for name, path in (("segmentation", args.out), ("overlay", args.overlay)):
        if path:
            print(f"{name} written to {path}")


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    import medsight
    from medsight.model.sizes import model_size
    from medsight.server.app import create_app
    from medsight.server.jobs import default_compute_threads
    from medsight.server.security import check_bind

    token = _serve_token(args)
    check_bind(args.host, token)
    engine = medsight.Engine.load(args.model, device=args.device, vision_file=args.vision_file,
                                  perceiver_attention=args.perceiver_attention)
    threads = args.threads or default_compute_threads(model_size(engine.model.config).total, engine.model.device.type)
    app = create_app(engine, token=token, max_upload_bytes=args.max_upload_mb * 1024**2,
                     request_timeout_s=args.timeout, model_name=str(args.model), host=args.host,
                     allowed_hosts=tuple(args.allow_host), max_waiting=args.max_waiting,
                     ask_memory_bytes=args.ask_memory_mb * 1024**2, compute_threads=threads, audit_path=args.audit)
    print(f"MedSIGHT engine ({args.model}) on http://{args.host}:{args.port}/v1  (API docs: /docs)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


def _serve_token(args: argparse.Namespace) -> str | None:
    """The bearer token from --token-file or MEDSIGHT_TOKEN (a --token argument still works, with a warning)."""
    if args.token:
        print("warning: --token is visible to every user of this computer (process list); use MEDSIGHT_TOKEN or "
              "--token-file", file=sys.stderr)
        return args.token
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as err:
            raise ValueError(f"cannot read the token file {args.token_file}: {err.strerror}") from None
        if not token:
            raise ValueError(f"the token file {args.token_file} is empty")
        return token
    return os.environ.get("MEDSIGHT_TOKEN") or None


def _train(args: argparse.Namespace) -> int:
    from medsight.train.cli import main as train_main

    stage_args = args.stage_args[1:] if args.stage_args[:1] == ["--"] else args.stage_args
    return train_main(stage_args)


def _eval(args: argparse.Namespace) -> int:
    from medsight.evaluate.cli import main as eval_main

    return eval_main(args.eval_args[1:] if args.eval_args[:1] == ["--"] else args.eval_args)


def _export_onnx(args: argparse.Namespace) -> int:
    import torch

    import medsight
    from medsight.onnx_export import export_onnx

    model = medsight.load_model(args.model, device="cpu", dtype=torch.float32, vision_file=args.vision_file)
    paths = export_onnx(model, args.out, args.opset, args.exporter)
    for name, path in paths.items():
        print(f"{name}: {path}")
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
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["train"], ["eval"]):  # the trainers and evaluators own their arguments (and --help)
        argv = [argv[0], "--", *argv[1:]]
    args = _parser().parse_args(argv)
    try:
        commands = {"ask": _ask, "serve": _serve, "train": _train, "eval": _eval, "export-onnx": _export_onnx,
                    "info": _info, "download": _download}
        return commands[args.command](args)
    except (ValueError, FileNotFoundError) as err:
        # ImagingError and CheckpointError are ValueErrors: show the message, not a traceback.
        print(f"medsight: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
