"""The `medsight` command line: `ask` a question about an image or volume slice, `info` about a model."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys

from medsight.imaging import PLANES

VISION_FILE_HELP = ("UniMed-CLIP checkpoint for the official layout: a path, or REPO_ID:FILENAME[@REVISION] on the "
                    "Hugging Face Hub (downloaded once into its cache)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsight", description="MedSIGHT: ask questions, get answers and masks.")
    sub = parser.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="answer a question about an image or slices of a volume")
    ask.add_argument("path", help="PNG/JPG/TIFF, DICOM file or series folder, NIfTI or NRRD")
    ask.add_argument("question")
    ask.add_argument("--model", default="demo",
                     help="demo (embedded, trained on synthetic data), tiny/full (random weights), folder, or Hub id")
    ask.add_argument("--vision-file", help=VISION_FILE_HELP)
    ask.add_argument("--plane", choices=PLANES, default="axial")
    ask.add_argument("--slices", help="'all', 'a:b' (b excluded), or '3,7,9' (default: the middle slice)")
    ask.add_argument("--series", help="DICOM SeriesInstanceUID when the folder holds several series")
    ask.add_argument("--modality", help="override the modality (CT, MR, US, ...)")
    ask.add_argument("--window", help="CT window preset (abdomen, lung, bone, brain, liver)")
    ask.add_argument("--resize-mode", choices=("letterbox", "crop"), default="letterbox",
                     help="letterbox keeps the whole slice; crop is the official centre crop")
    ask.add_argument("--max-new-tokens", type=int, help="default: GenerationOptions' (the official limit)")
    ask.add_argument("--batch", type=int, default=16, help="slices per batch")
    ask.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ask.add_argument("--out", help="segmentation file: .seg.nrrd (3D Slicer), .nii/.nii.gz (+ JSON labels), .dcm")
    ask.add_argument("--overlay", help="write a slice with its masks drawn on it to this PNG")
    ask.add_argument("--json", action="store_true", help="print one JSON object (answer, regions, slices)")

    serve = sub.add_parser("serve", help="run the engine's HTTP server (127.0.0.1 unless told otherwise)")
    serve.add_argument("--model", default="demo", help="demo (embedded), tiny/full (random), folder or Hub id")
    serve.add_argument("--vision-file", help=VISION_FILE_HELP)
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
        command.add_argument("--adapter", help="LoRA adapter folder (official layout: adapter_config.json, adapter "
                             "weights, non_lora_trainables.bin) applied to --model")
        # Mirrors medsight.model.perceiver.ATTENTION_IMPLEMENTATIONS (not imported: `--help` stays free of torch).
        command.add_argument("--perceiver-attention", choices=("eager", "sdpa"), default="sdpa",
                             help="sdpa (default) is PyTorch's fused attention kernel (same values within float "
                             "rounding, faster); eager is the official arithmetic")

    train = sub.add_parser("train", help="run one training stage: medsight train stage1|...|stage5|lora --config C "
                           "--data D --out O; medsight train plan (memory per GPU); medsight train merge (LoRA)",
                           add_help=False)
    train.add_argument("stage_args", nargs=argparse.REMAINDER)

    evaluate = sub.add_parser("eval", help="benchmarks: medsight eval diagseg|vqa|mc --data F --report D",
                              add_help=False)
    evaluate.add_argument("eval_args", nargs=argparse.REMAINDER)

    onnx = sub.add_parser("export-onnx", help="export the vision encoder and the perceiver to ONNX")
    onnx.add_argument("--model", default="tiny", help="preset, folder or Hugging Face id")
    onnx.add_argument("--vision-file", help=VISION_FILE_HELP)
    onnx.add_argument("--out", required=True, help="folder for the .onnx graphs and manifest.json")
    onnx.add_argument("--opset", type=int, default=18)
    onnx.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto")

    info = sub.add_parser("info", help="sizes and memory needs of a model configuration")
    info.add_argument("--preset", default="full")

    download = sub.add_parser("download", help="fetch a model (only the files it needs) from the Hugging Face Hub "
                              "into the local cache")
    download.add_argument("repo", nargs="?", help="repository id (default: the released MedSIGHT), or "
                          "one file as REPO_ID:FILENAME[@REVISION]")
    download.add_argument("--revision")
    download.add_argument("--dir", help="copy the files into this folder instead of only caching them")
    download.add_argument("--codebook", action="store_true",
                          help="also the stage-2 codebook file (not needed to answer questions)")
    download.add_argument("--yes", action="store_true", help="do not ask before a large download")
    download.add_argument("--confirm-above", type=float, default=1.0, metavar="GB",
                          help="ask before downloading more than this (default 1 GB; only on a terminal)")

    from medsight.model.hub import UNIMED_CLIP

    for command in (ask, serve, onnx, download):
        command.add_argument("--fetch-vision", action="store_true",
                             help=f"download the vision file the release needs, {UNIMED_CLIP} ({UNIMED_CLIP.size}, "
                             f"licence {UNIMED_CLIP.licence}), when the Hugging Face cache lacks it")
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


def _findings(answers) -> dict[str, list]:
    """Regions grouped into findings by the Slicer module's rule: the normalised label, else the code."""
    from medsight.naming import normalise_label

    groups: dict[str, list] = {}
    for answer in answers:
        for region in answer.regions:
            groups.setdefault(normalise_label(region.label) or (region.code or "region"), []).append((answer, region))
    return groups


def _segment(value: int, pairs: list, used: list):
    """A finding's segment, named, coloured and coded as the Slicer module names its suggestion."""
    from medsight.imaging import UNCODED, Segment
    from medsight.naming import colour_for, display_name, term_for

    label = pairs[0][1].label
    codes = list(dict.fromkeys(r.code for _, r in pairs if r.code))
    fallback = ", ".join(codes) or "Region"
    # Printable ASCII without "|": file headers need it.
    name = re.sub(r"[^\x20-\x7e]", "", display_name(label, fallback=fallback)).replace("|", " ").strip()[:64]
    colour = colour_for(label or fallback, avoid=used)
    return Segment(value, name or "Region", colour, codes[0] if codes else None, term_for(label) or UNCODED)


def _write_segmentation(path: str, volume, answers) -> None:
    from medsight.imaging import SegmentationBuilder, write_segmentation

    findings = _findings(answers)
    if not findings:
        raise ValueError(f"the answer has no regions: nothing to write to {path}")
    builder, used = SegmentationBuilder(volume), []
    for value, pairs in enumerate(findings.values(), start=1):
        segment = _segment(value, pairs, used)
        used.append(segment.color)
        for answer, region in pairs:
            builder.add(answer.slice, region.mask, segment)
    write_segmentation(builder.build(), path)


def _ask(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    import medsight
    from medsight.engine import VolumeSlices
    from medsight.imaging import read_volume, slice_count, writer_for
    from medsight.model.medsight import ImageOptions
    from medsight.overlay import save_overlay

    if args.out:
        writer_for(args.out)  # an unknown format fails before the model runs
    volume = read_volume(args.path, series_uid=args.series, modality=args.modality)
    indices = parse_slices(args.slices, slice_count(volume, args.plane))
    engine = medsight.Engine.load(args.model, device=args.device, vision_file=args.vision_file,
                                  fetch_vision=args.fetch_vision, perceiver_attention=args.perceiver_attention,
                                  adapter=args.adapter)
    if engine.model.weights_source.startswith("random"):
        print(f"note: preset {args.model!r} has random weights; its answers are gibberish "
              "(it shows the pipeline works, not what the model knows)", file=sys.stderr)
    limit = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
    options = medsight.GenerationOptions(**limit)
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
                                  fetch_vision=args.fetch_vision, perceiver_attention=args.perceiver_attention,
                                  adapter=args.adapter)
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

    model = medsight.load_model(args.model, device="cpu", dtype=torch.float32, vision_file=args.vision_file,
                                fetch_vision=args.fetch_vision)
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
    """Show what will be fetched (files and sizes) first, ask before a large download, then fetch with the Hub's
    own progress bars: only the layout's files (allow-patterns), the codebook and UniMed-CLIP only when asked."""
    from dataclasses import replace

    from medsight.model.hub import RELEASE_REPO, fetch_release, parse_hub_file, plan_file, plan_release

    repo = args.repo or RELEASE_REPO
    hub = parse_hub_file(repo)
    if hub is not None:
        hub = replace(hub, revision=hub.revision or args.revision)
        plan = plan_file(hub)
    else:
        plan = plan_release(repo, args.revision, codebook=args.codebook, vision=args.fetch_vision)
    print("\n".join(plan.lines()), file=sys.stderr, flush=True)
    ask_first = plan.total > args.confirm_above * 1e9 and not args.yes and sys.stdin.isatty()
    if ask_first and input(f"Download {plan.total / 1e9:.2f} GB? [y/N] ").strip().lower() not in ("y", "yes"):
        print("nothing downloaded", file=sys.stderr)
        return 1
    folder = fetch_release(plan, local_dir=args.dir)
    print(folder / hub.filename if hub is not None else folder)
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
