"""The `medsight` command line: its parser, `main` (dispatch; errors become one line and exit code 2) and the
small commands (train, eval, export-onnx, info, download); `ask` and `serve` live in `medsight.commands`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Callable

# Nothing heavier here (see `main`): the commands and what they need are imported inside it.
from medsight.commands.errors import CommandParser, run_command, wants_json

VISION_FILE_HELP = ("UniMed-CLIP checkpoint for the official layout: a path, or REPO_ID:FILENAME[@REVISION] on the "
                    "Hugging Face Hub (downloaded once into its cache)")


def _parser() -> argparse.ArgumentParser:
    from medsight.commands.options import file_name
    from medsight.imaging import PLANES
    from medsight.model.hub import UNIMED_CLIP
    from medsight.server.parent_watch import EXIT_WITH_PARENT_VARIABLE

    parser = CommandParser(prog="medsight", description="MedSIGHT: ask questions, get answers and masks.")
    sub = parser.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="answer a question about an image or slices of a volume")
    ask.add_argument("path", help="PNG/JPG/TIFF, DICOM file or series folder, NIfTI, NRRD or MetaImage (.mha, .mhd)")
    ask.add_argument("question", help="in quotes, e.g. \"Please segment the liver.\"")
    ask.add_argument("--model", default="demo",
                     help="demo (default: embedded, trained on synthetic data), tiny/full (random weights), folder, or "
                     "Hub id")
    ask.add_argument("--vision-file", type=file_name, help=VISION_FILE_HELP)
    ask.add_argument("--plane", choices=PLANES,
                     help="default: axial, or the plane a 2D image lies in (its only plane with slices)")
    ask.add_argument("--slices", help="'all', 'a:b' (b excluded), or '3,7,9' (default: the middle slice): voxel "
                     "indices along the plane's axis in the volume's own order, as Slicer's Data Probe (IJK) and the "
                     "MedSIGHT panel's slice range count them; slice 0 is the volume's first, which may be the top "
                     "or the bottom")
    ask.add_argument("--series", help="DICOM SeriesInstanceUID when the folder holds several series (DICOM only)")
    ask.add_argument("--regularize-tilt", action="store_true",
                     help="read a gantry-tilted DICOM series (slices drifting within their plane), refused without "
                     "it, resampled onto a regular grid as 3D Slicer's acquisition geometry regularization places it "
                     "(a DICOM SEG --out cannot reference it)")
    ask.add_argument("--regularize-spacing", action="store_true",
                     help="read a DICOM series with unevenly spaced slices (a missing slice, a drifting table step), "
                     "refused without it, interpolated linearly onto an evenly spaced grid from its first slice to its "
                     "last, the grid 3D Slicer's acquisition geometry regularization gives it (a DICOM SEG --out "
                     "cannot reference it)")
    ask.add_argument("--modality", type=_modality, help="override the file's modality (CT, MR, US, ...): CT gets "
                     "Hounsfield windows (--window presets, abdomen by default), any other a percentile window")
    ask.add_argument("--window", help="CT window preset (abdomen, lung, bone, brain, liver; CT only), or auto: the "
                     "percentile window any modality gets")
    ask.add_argument("--resize-mode", choices=("letterbox", "crop"), default="letterbox",
                     help="letterbox (default) keeps the whole slice; crop is the official centre crop")
    ask.add_argument("--max-new-tokens", type=_at_least(int, 1),
                     help="default: GenerationOptions' (the official limit)")
    ask.add_argument("--batch", type=_at_least(int, 1), default=16, help="slices per batch (default %(default)s)")
    ask.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ask.add_argument("--out", type=file_name, help="segmentation file: .seg.nrrd (3D Slicer), .nii/.nii.gz (+ a .json "
                     "labels sidecar), .dcm (DICOM input only); never the input; missing folders are created")
    ask.add_argument("--overlay", type=file_name, help="write a slice with its masks drawn on it to this .png")
    ask.add_argument("--overwrite", action="store_true",
                     help="replace existing --out (and its sidecar) and --overlay files (else they are refused); a "
                     "symbolic link is written through: its target gets the new file")
    ask.add_argument("--json", action="store_true",
                     help="print one JSON object: answer, regions, slices, out and overlay (the paths written; null "
                     "when a write failed), errors (one message per output not written), left_out (DICOM images of "
                     "the series left out of the volume, e.g. a localizer, or a SEG in its folder, in words), "
                     "lossy_compression (how the image was lossy compressed), nan_filled (NaN voxels read as the "
                     "volume's minimum) and resampled (how a --regularize-tilt or --regularize-spacing series was "
                     "resampled); the last four are null when there is nothing to say. A refused command prints "
                     "{\"error\": {\"code\", \"message\"}} instead")

    serve = sub.add_parser("serve", help="run the engine's HTTP server (127.0.0.1 unless told otherwise)")
    serve.add_argument("--model", default="demo",
                       help="demo (embedded; the default), tiny/full (random), folder or Hub id")
    serve.add_argument("--vision-file", type=file_name, help=VISION_FILE_HELP)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s, this computer "
                       "only); any other needs --token-file or MEDSIGHT_TOKEN")
    serve.add_argument("--port", type=_port, default=8765, help="1..65535 (default 8765)")
    serve.add_argument("--token-file", type=file_name,
                       help="file holding the bearer token clients must send (needed for any non-loopback host); or "
                       "set MEDSIGHT_TOKEN. Never on the command line: others can read it")
    serve.add_argument("--token", help=argparse.SUPPRESS)  # deprecated: visible in the process list
    serve.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                       help="another host name clients may use (e.g. behind a proxy); loopback names and --host "
                       "are always allowed, any other Host header is refused (DNS rebinding)")
    serve.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    serve.add_argument("--max-upload-mb", type=_at_least(int, 1), default=1024,
                       help="largest upload in MiB (default 1024)")
    serve.add_argument("--timeout", type=_at_least(float, 0, exclusive=True), default=600.0,
                       help="seconds an ask may run before it is cancelled (time waiting in the queue not counted; "
                       "generation stops at its next step, the masks of the text so far are still decoded; "
                       "default %(default)g)")
    serve.add_argument("--max-waiting", type=_at_least(int, 0), default=64,
                       help="asks that may wait; more get 429 (busy) (default %(default)s)")
    serve.add_argument("--ask-memory-mb", type=_at_least(int, 1), default=8192,
                       help="memory budget of one ask in MiB (estimated before it starts; larger asks are refused; "
                       "default %(default)s)")
    serve.add_argument("--threads", type=_at_least(int, 1), default=None,
                       help="compute threads of the model, set once (default: 1 on a GPU or for a model under 100M "
                       "parameters, else the CPU cores this process may use)")
    serve.add_argument("--audit", metavar="FILE", type=file_name, help="append one JSON line per job to FILE: model, "
                       "weights hash, volume hash, slices, options, region codes and labels, outcome; never question "
                       "or answer text, pixels or identifiers")
    serve.add_argument("--exit-with-parent", action="store_true",
                       help="stop, as Ctrl+C stops it, when standard input reaches its end: the program that started "
                       "the engine holds a pipe to it, and its exit or crash closes the pipe (the 3D Slicer module "
                       "does this when \"Stop the local engine when Slicer exits\" is on); a line keep-running on "
                       f"standard input turns it off. Or set {EXIT_WITH_PARENT_VARIABLE}=1")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                       help="what the engine prints: info (default) adds a line per job and upload (ids, sizes, "
                       "timings; never questions, answers or pixels)")

    for command in (ask, serve):
        command.add_argument("--adapter", type=file_name, help="LoRA adapter folder (official layout: "
                             "adapter_config.json, adapter weights, non_lora_trainables.bin) applied to --model")
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
    onnx.add_argument("--model", default="tiny", help="preset, folder or Hugging Face id (default: tiny, random "
                      "weights: name the model the engine serves)")
    onnx.add_argument("--vision-file", type=file_name, help=VISION_FILE_HELP)
    onnx.add_argument("--out", required=True, type=file_name, help="folder for the .onnx graphs and manifest.json "
                      "(created if missing)")
    onnx.add_argument("--overwrite", action="store_true", help="replace the graphs and manifest the folder holds")
    onnx.add_argument("--opset", type=int, default=18, help="ONNX opset (default %(default)s)")
    onnx.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto",
                      help="auto (default): dynamo, falling back to TorchScript for a graph dynamo fails on")

    info = sub.add_parser("info", help="sizes and memory needs of a model configuration")
    info.add_argument("--preset", default="full", help="full (the paper's), demo or tiny (default: full)")
    info.add_argument("--json", action="store_true", help="print one JSON object: preset, parameters (vision, "
                      "perceiver, language_model, total), weight_bytes (bf16, fp32), kv_cache_bytes_per_token, "
                      "embedded_parameters (null unless the preset has an embedded model)")

    download = sub.add_parser("download", help="fetch a model (only the files it needs) from the Hugging Face Hub "
                              "into the local cache")
    download.add_argument("repo", nargs="?", help="repository id, REPO_ID[@REVISION] (default: the released "
                          "MedSIGHT), or one file as REPO_ID:FILENAME[@REVISION]")
    download.add_argument("--revision", help="branch, tag or commit (default: main)")
    download.add_argument("--dir", type=file_name, help="copy the files into this folder instead of only caching them")
    download.add_argument("--overwrite", action="store_true",
                          help="replace files in --dir that no download put there or that changed since (else they "
                          "are refused; files a download left there are kept or updated)")
    download.add_argument("--codebook", action="store_true",
                          help="also the stage-2 codebook file (not needed to answer questions)")
    download.add_argument("--yes", action="store_true", help="do not ask before a large download")
    download.add_argument("--confirm-above", type=float, default=1.0, metavar="GB",
                          help="ask before downloading more than this (default 1 GB; only on a terminal)")

    for command in (ask, serve, onnx, download):
        command.add_argument("--fetch-vision", action="store_true",
                             help=f"download the vision file the release needs, {UNIMED_CLIP} ({UNIMED_CLIP.size}, "
                             f"licence {UNIMED_CLIP.licence}), when the Hugging Face cache lacks it")
    return parser


def _port(text: str) -> int:
    """argparse type: a TCP port (the server would fail with a traceback on one outside 1..65535)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is outside 1..65535")
    return port


def _modality(text: str) -> str:
    """argparse type: a modality as the engine keeps it (upper case, the server's rule for an upload's modality).
    "CT " (a pasted space) was taken as another modality than CT: the slices got a percentile window, not CT's."""
    from medsight.imaging.volume import MODALITY_PATTERN

    value = text.strip().upper()
    if not re.fullmatch(MODALITY_PATTERN, value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a modality: use letters and digits, at most 16 (CT, MR, "
                                         "US, ...)")
    return value


def _at_least(kind: type[int] | type[float], low: float, exclusive: bool = False) -> Callable[[str], float]:
    """argparse type: a number >= `low` (> `low` when `exclusive`). Out of range, the server started and then refused
    every upload (--max-upload-mb -5), cancelled every ask at once (--timeout 0), or its compute thread died and
    asks waited forever (--threads -2)."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not (value > low if exclusive else value >= low):  # NaN fails both
            raise argparse.ArgumentTypeError(f"{text} is not {'>' if exclusive else '>='} {low}")
        return value

    return parse


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
    from medsight.commands.options import check_vision_file
    from medsight.onnx_export import check_opset, export_onnx, export_packages, require_packages
    from medsight.output_paths import check_export_folder

    require_packages(*export_packages(args.exporter))
    check_opset(args.opset)  # before the model loads (minutes for the full model), not after
    check_vision_file(args)
    check_export_folder(args.out, args.overwrite)
    model = medsight.load_model(args.model, device="cpu", dtype=torch.float32, vision_file=args.vision_file,
                                fetch_vision=args.fetch_vision)
    paths = export_onnx(model, args.out, args.opset, args.exporter)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from medsight.config import MedSIGHTConfig, get_preset
    from medsight.model.checkpoints import CONFIG_FILE
    from medsight.model.loading import EMBEDDED
    from medsight.model.sizes import kv_cache_bytes_per_token, model_size

    config = get_preset(args.preset)
    size = model_size(config)
    gib = 1024**3
    embedded = EMBEDDED.get(args.preset)
    # Its trainer sized the vocabulary and classes to its data, so `--model demo` is not the bare preset.
    trained = (model_size(MedSIGHTConfig.from_json(embedded / CONFIG_FILE))
               if embedded is not None and (embedded / CONFIG_FILE).is_file() else None)
    if args.json:
        print(json.dumps({"preset": config.name, "parameters": {"vision": size.vision, "perceiver": size.perceiver,
                          "language_model": size.language_model, "total": size.total},
                          "weight_bytes": {"bf16": size.weight_bytes(), "fp32": size.total * 4},
                          "kv_cache_bytes_per_token": kv_cache_bytes_per_token(config),
                          "embedded_parameters": None if trained is None else trained.total}))
        return 0
    print(f"preset {config.name}: vision {size.vision:,} + perceiver {size.perceiver:,} + language model "
          f"{size.language_model:,} = {size.total:,} parameters")
    print(f"weights: bf16 {size.weight_bytes() / gib:.2f} GiB, fp32 {size.total * 4 / gib:.2f} GiB; "
          f"KV cache {kv_cache_bytes_per_token(config) / 1024:.0f} KiB per token (bf16)")
    if trained is not None:
        print(f"the embedded {args.preset} model (--model {args.preset}) is sized to its training data: "
              f"{trained.total:,} parameters")
    return 0


def _download(args: argparse.Namespace) -> int:
    """Show what will be fetched (files and sizes) first, ask before a large download, then fetch with the Hub's
    own progress bars: only the layout's files (allow-patterns), the codebook and UniMed-CLIP only when asked."""
    from dataclasses import replace

    from medsight.model.hub import (
        RELEASE_REPO,
        HubUnreachableError,
        cached_download,
        fetch_release,
        parse_hub_file,
        parse_repo,
        plan_file,
        plan_release,
        why_offline,
    )
    from medsight.output_paths import check_download_folder

    repo = args.repo or RELEASE_REPO
    hub = parse_hub_file(repo)
    repo, revision = parse_repo(repo) or (repo, None)  # REPO_ID@REVISION, as --model takes it
    named = hub.revision if hub is not None else revision
    if named and args.revision and named != args.revision:
        raise ValueError(f"two revisions asked for: @{named} in {args.repo} and --revision {args.revision}; give one")
    revision = revision or args.revision
    try:
        if hub is not None:
            hub = replace(hub, revision=hub.revision or args.revision)
            plan = plan_file(hub)
        else:
            plan = plan_release(repo, revision, codebook=args.codebook, vision=args.fetch_vision)
    except HubUnreachableError:  # nothing can be listed: say what the cache holds instead
        found = cached_download(hub, repo, revision, args.codebook, args.fetch_vision)
        if args.dir:
            raise ValueError(f"{why_offline()}: nothing was copied into {args.dir}; the local Hugging Face cache "
                             f"holds what is needed at {found}") from None
        print(f"not checked against the Hub ({why_offline()}): the local Hugging Face cache holds everything "
              "needed", file=sys.stderr)
        print(found)
        return 0
    if args.dir:
        check_download_folder(args.dir, plan.names(), args.overwrite)  # before anything is fetched
    print("\n".join(plan.lines()), file=sys.stderr, flush=True)
    ask_first = plan.total > args.confirm_above * 1e9 and not args.yes and sys.stdin.isatty()
    if ask_first and input(f"Download {plan.total / 1e9:.2f} GB? [y/N] ").strip().lower() not in ("y", "yes"):
        print("nothing downloaded", file=sys.stderr)
        return 1
    folder = fetch_release(plan, local_dir=args.dir)
    print(folder / hub.filename if hub is not None else folder)
    return 0


def main(argv: list[str] | None = None) -> int:
    # The imports too run inside run_command: Ctrl+C in the seconds torch takes to import (the package's and the
    # commands' imports once ran before it) is then "medsight: interrupted" and 130, not a traceback.
    argv = sys.argv[1:] if argv is None else argv
    return run_command(lambda: _run(argv), "medsight", json_errors=wants_json(argv))


def _run(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if argv[:1] in (["train"], ["eval"]):  # the trainers and evaluators own their arguments (and --help)
        argv = [argv[0], "--", *argv[1:]]
    from medsight.commands.serve import run_serve, watch_parent_early

    watched = argv[:1] == ["serve"] and watch_parent_early(argv[1:], os.environ)  # before the parser's imports
    args = _parser().parse_args(argv)
    args.parent_watched = watched
    from medsight.commands.ask import run_ask

    commands = {"ask": run_ask, "serve": run_serve, "train": _train, "eval": _eval, "export-onnx": _export_onnx,
                "info": _info, "download": _download}
    return commands[args.command](args)

if __name__ == "__main__":
    sys.exit(main())
