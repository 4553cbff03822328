"""The `medsight` command line: `ask` a question about an image or volume slice, `info` about a model."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

from medsight.imaging import PLANES
from medsight.output_paths import check_export_folder, check_output

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
    ask.add_argument("--plane", choices=PLANES,
                     help="default: axial, or the plane a 2D image lies in (its only plane with slices)")
    ask.add_argument("--slices", help="'all', 'a:b' (b excluded), or '3,7,9', all within the plane "
                     "(default: the middle slice)")
    ask.add_argument("--series", help="DICOM SeriesInstanceUID when the folder holds several series (DICOM only)")
    ask.add_argument("--modality", help="override the modality (CT, MR, US, ...)")
    ask.add_argument("--window", help="CT window preset (abdomen, lung, bone, brain, liver)")
    ask.add_argument("--resize-mode", choices=("letterbox", "crop"), default="letterbox",
                     help="letterbox keeps the whole slice; crop is the official centre crop")
    ask.add_argument("--max-new-tokens", type=int, help="default: GenerationOptions' (the official limit)")
    ask.add_argument("--batch", type=int, default=16, help="slices per batch")
    ask.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ask.add_argument("--out", help="segmentation file: .seg.nrrd (3D Slicer), .nii/.nii.gz (+ a .json labels "
                     "sidecar), .dcm (DICOM input only); never the input; missing folders are created")
    ask.add_argument("--overlay", help="write a slice with its masks drawn on it to this .png")
    ask.add_argument("--overwrite", action="store_true",
                     help="replace existing --out (and its sidecar) and --overlay files (else they are refused)")
    ask.add_argument("--json", action="store_true",
                     help="print one JSON object: answer, regions, slices, out and overlay (the paths written; null "
                     "when a write failed) and errors (one message per output not written)")

    serve = sub.add_parser("serve", help="run the engine's HTTP server (127.0.0.1 unless told otherwise)")
    serve.add_argument("--model", default="demo", help="demo (embedded), tiny/full (random), folder or Hub id")
    serve.add_argument("--vision-file", help=VISION_FILE_HELP)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_port, default=8765, help="1..65535 (default 8765)")
    serve.add_argument("--token-file", help="file holding the bearer token clients must send (needed for any "
                       "non-loopback host); or set MEDSIGHT_TOKEN. Never on the command line: others can read it")
    serve.add_argument("--token", help=argparse.SUPPRESS)  # deprecated: visible in the process list
    serve.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                       help="another host name clients may use (e.g. behind a proxy); loopback names and --host "
                       "are always allowed, any other Host header is refused (DNS rebinding)")
    serve.add_argument("--device")
    serve.add_argument("--max-upload-mb", type=int, default=1024)
    serve.add_argument("--timeout", type=float, default=600.0,
                       help="seconds an ask may run before it is cancelled (time waiting in the queue not counted; "
                       "generation stops at its next step, the masks of the text so far are still decoded)")
    serve.add_argument("--max-waiting", type=int, default=64, help="asks that may wait; more get 429 (busy)")
    serve.add_argument("--ask-memory-mb", type=int, default=8192,
                       help="memory budget of one ask (estimated before it starts; larger asks are refused)")
    serve.add_argument("--threads", type=int, default=None,
                       help="compute threads of the model, set once (default: 1 on a GPU or for a model under 100M "
                       "parameters, else the CPU cores this process may use)")
    serve.add_argument("--audit", metavar="FILE", help="append one JSON line per job to FILE: model, weights hash, "
                       "volume hash, slices, options, region codes and labels, outcome; never question or answer "
                       "text, pixels or identifiers")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                       help="what the engine prints: info (default) adds a line per job and upload (ids, sizes, "
                       "timings; never questions, answers or pixels)")

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
    onnx.add_argument("--out", required=True, help="folder for the .onnx graphs and manifest.json (created if "
                      "missing)")
    onnx.add_argument("--overwrite", action="store_true", help="replace the graphs and manifest the folder holds")
    onnx.add_argument("--opset", type=int, default=18)
    onnx.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto")

    info = sub.add_parser("info", help="sizes and memory needs of a model configuration")
    info.add_argument("--preset", default="full")

    download = sub.add_parser("download", help="fetch a model (only the files it needs) from the Hugging Face Hub "
                              "into the local cache")
    download.add_argument("repo", nargs="?", help="repository id, REPO_ID[@REVISION] (default: the released "
                          "MedSIGHT), or one file as REPO_ID:FILENAME[@REVISION]")
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


def _port(text: str) -> int:
    """argparse type: a TCP port (the server would fail with a traceback on one outside 1..65535)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is outside 1..65535")
    return port


def parse_slices(spec: str | None, count: int) -> list[int]:
    """'all', 'a:b' (b excluded; a defaults to 0, b to the count), '3,7,9' or one index -> sorted unique indices.

    A range reaching outside 0..count is refused like a list: Python's slicing would silently clip it."""
    if spec is None:
        return [count // 2]
    spec = spec.strip()
    try:
        if spec == "all":
            indices = list(range(count))
        elif ":" in spec:
            first, last = spec.split(":", 1)
            start, stop = int(first) if first.strip() else 0, int(last) if last.strip() else count
            # Not Python's slicing, which clips: one index past the plane stays in, so the check below sees it.
            indices = list(range(max(start, -1), min(stop, count + 1)))
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
        raise ValueError("the answer has no regions: nothing to write")
    builder, used = SegmentationBuilder(volume), []
    for value, pairs in enumerate(findings.values(), start=1):
        segment = _segment(value, pairs, used)
        used.append(segment.color)
        for answer, region in pairs:
            builder.add(answer.slice, region.mask, segment)
    write_segmentation(builder.build(), path)


def _ask(args: argparse.Namespace) -> int:
    from medsight.imaging import slice_count

    _check_ask_outputs(args)  # before any work: a refused output must not cost a model load and inference
    _check_vision_file(args)
    volume = _read_input(args)
    args.plane = args.plane or _default_plane(volume)
    indices = parse_slices(args.slices, slice_count(volume, args.plane))
    answers = _answers(args, volume, indices)
    if not args.json:
        _print_answers(args, answers)  # before writing: a failed write must not lose them
    written, errors = _write_outputs(args, volume, answers)
    if args.json:
        _print_json(args, answers, written, errors)
    else:
        for name, path in written.items():
            if path:
                print(f"{'segmentation' if name == 'out' else name} written to {path}")
    for error in errors:
        print(f"medsight: error: {error}", file=sys.stderr)
    return 2 if errors else 0


def _default_plane(volume) -> str:
    """Axial, unless the volume is a 2D image lying in another plane: then that plane, the only one it has."""
    from medsight.imaging.slicing import slice_planes

    planes = slice_planes(volume)
    return planes[0] if len(planes) == 1 else "axial"


def _answers(args: argparse.Namespace, volume, indices: list[int]) -> list:
    from tqdm import tqdm

    import medsight
    from medsight.engine import VolumeSlices
    from medsight.model.medsight import ImageOptions

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
    return answers


def _read_input(args: argparse.Namespace):
    """The input volume, with the reader's Python-API advice put in command-line terms; --series and a .dcm --out
    are checked against what was read."""
    from medsight.imaging import read_volume
    from medsight.imaging.export import check_reference
    from medsight.imaging.read_dicom import NotAnImageError, SeriesChoiceError, series_listing

    try:
        volume = read_volume(args.path, series_uid=args.series, modality=args.modality)
    except SeriesChoiceError as err:
        raise ValueError(f"{err.path}: {len(err.series)} series found; choose one with --series:\n  "
                         f"{series_listing(err.series)}") from None
    except NotAnImageError as err:
        raise ValueError(f"{err.path}: {err.kind}, not an image: medsight ask needs an image (DICOM image file or "
                         "series folder, NIfTI, NRRD, PNG/JPG/TIFF)") from None
    if args.series and not os.path.isdir(args.path) and volume.series_uid != args.series:
        what = f"a DICOM file of series {volume.series_uid}" if volume.source_files else "not DICOM"
        raise ValueError(f"--series {args.series}: only a DICOM folder holds several series; {args.path} is {what}")
    if args.out:
        _named("--out", check_reference, args.out, volume)
    return volume


def _check_ask_outputs(args: argparse.Namespace) -> None:
    """--out (and a NIfTI's sidecar) and --overlay: known format, not an input, not kept files, writable."""
    from medsight.imaging import writer_for
    from medsight.imaging.export_nifti import sidecar_path

    if args.out:
        _named("--out", writer_for, args.out)  # an unknown format fails before the model runs
        check_output(args.out, "--out", args.path, args.overwrite)
        if args.out.lower().endswith((".nii", ".nii.gz")):
            check_output(sidecar_path(args.out), f"--out {args.out}: its labels sidecar", args.path, args.overwrite)
    if args.overlay:
        if not args.overlay.lower().endswith(".png"):
            raise ValueError(f"--overlay {args.overlay}: the overlay is a PNG; give a file name ending in .png")
        check_output(args.overlay, "--overlay", args.path, args.overwrite)


def _named(option: str, check, path: str, *more) -> None:
    """Run an imaging check on an output path; its ImagingError is reworded to name the option."""
    from medsight.imaging import ImagingError

    try:
        check(path, *more)
    except ImagingError as err:
        raise ValueError(f"{option} {path}: {err.problem}") from None


def _check_vision_file(args: argparse.Namespace) -> None:
    """load_model reads a vision file only for a model in the official release layout: refuse one it would ignore."""
    if not args.vision_file:
        return
    from medsight.config import PRESETS
    from medsight.model.checkpoints import CONFIG_FILE
    from medsight.model.loading import EMBEDDED

    model = str(args.model)
    if model in EMBEDDED or model in PRESETS or (Path(model).expanduser() / CONFIG_FILE).is_file():
        raise ValueError(f"--vision-file {args.vision_file}: --model {model} does not use a vision file (only a "
                         "model in the official release layout does)")


def _write_outputs(args: argparse.Namespace, volume, answers) -> tuple[dict[str, str | None], list[str]]:
    """Write --out and --overlay; returns each one's path (None when not written) and the errors of those that
    failed, so that one failed write neither loses the answers nor stops the other output."""
    written: dict[str, str | None] = {}
    errors: list[str] = []
    writers = {"out": lambda path: _write_segmentation(path, volume, answers),
               "overlay": lambda path: _write_overlay(path, volume, answers, args.window)}
    for name, write in writers.items():
        path = getattr(args, name)
        if not path:
            written[name] = None
            continue
        try:
            write(path)
            written[name] = path
        except (ValueError, OSError) as err:
            written[name] = None
            errors.append(f"--{name} {path} not written: {_message(err)}")
    return written, errors


def _write_overlay(path: str, volume, answers, window: str | None) -> None:
    from medsight.imaging import to_rgb
    from medsight.overlay import save_overlay

    shown = next((a for a in answers if a.regions), answers[len(answers) // 2])
    rgb = to_rgb(shown.slice.pixels, volume.modality, preset=window, window_from=volume.array)
    save_overlay(path, rgb, shown.regions)


def _print_answers(args: argparse.Namespace, answers) -> None:
    for a in answers:
        print(f"[{args.plane} slice {a.slice_index}] {a.text}")
        for r in a.regions:
            print(f"  region {r.index}: {r.code} {r.label!r} {int(r.mask.sum())} pixels, p={r.probability:.2f}")
    sys.stdout.flush()


def _print_json(args: argparse.Namespace, answers, written: dict[str, str | None], errors: list[str]) -> None:
    def region_json(r) -> dict:
        return {"code": r.code, "label": r.label, "slice": r.slice_index, "index": r.index,
                "pixels": int(r.mask.sum()), "probability": round(r.probability, 4), "bbox": r.bbox}

    main_answer = answers[len(answers) // 2] if len(answers) > 1 else answers[0]
    print(json.dumps({
        "answer": main_answer.text,
        "regions": [region_json(r) for a in answers for r in a.regions],
        "slices": [{"plane": args.plane, "index": a.slice_index, "answer": a.text} for a in answers],
        **written,
        "errors": errors,
    }))


def _message(err: Exception) -> str:
    """An OSError as 'file: reason' (its str() is '[Errno 13] Permission denied: ...'); anything else as is."""
    if isinstance(err, OSError) and err.strerror:
        files = [f for f in (err.filename, err.filename2) if f is not None]
        return f"{' -> '.join(map(str, files))}: {err.strerror}" if files else err.strerror
    return str(err)


#: Seconds `medsight serve` gives open requests when it is stopped, before it cancels them.
SHUTDOWN_GRACE_S = 3


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    import medsight
    from medsight.model.sizes import model_size
    from medsight.server.app import create_app
    from medsight.server.jobs import default_compute_threads
    from medsight.server.security import check_bind

    logging.getLogger("medsight").setLevel(args.log_level.upper())
    token = _serve_token(args)
    check_bind(args.host, token)
    _check_vision_file(args)
    if args.audit:
        _check_audit(args.audit)
    engine = medsight.Engine.load(args.model, device=args.device, vision_file=args.vision_file,
                                  fetch_vision=args.fetch_vision, perceiver_attention=args.perceiver_attention,
                                  adapter=args.adapter)
    threads = args.threads or default_compute_threads(model_size(engine.model.config).total, engine.model.device.type)
    app = create_app(engine, token=token, max_upload_bytes=args.max_upload_mb * 1024**2,
                     request_timeout_s=args.timeout, model_name=str(args.model), host=args.host,
                     allowed_hosts=tuple(args.allow_host), max_waiting=args.max_waiting,
                     ask_memory_bytes=args.ask_memory_mb * 1024**2, compute_threads=threads, audit_path=args.audit)
    print(f"MedSIGHT engine ({args.model}) on http://{args.host}:{args.port}/v1  (API docs: /docs)", file=sys.stderr)
    # Stopping (Ctrl+C, SIGTERM) waits this long for open asks, then cancels them: it used to wait for every queued
    # ask to run, minutes with a real model.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    return 0


def _check_audit(path: str) -> None:
    """Open the audit file as the server's AuditLog will, so that a folder, a missing folder or a read-only place
    fails now, not after the model has loaded."""
    from medsight.server.audit import open_audit_file

    try:
        os.close(open_audit_file(path))
    except OSError as err:
        raise ValueError(f"--audit {path}: cannot append to it ({err.strerror})") from None


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
        _warn_if_others_can_read(args.token_file)
        return token
    return os.environ.get("MEDSIGHT_TOKEN") or None


def _warn_if_others_can_read(path: str) -> None:
    """A token file other users can read gives them the engine (POSIX permissions; Windows has no such bits)."""
    mode = os.stat(path).st_mode
    if os.name == "posix" and mode & 0o077:
        print(f"warning: other users of this computer can read the token file {path} (mode {mode & 0o777:o}); "
              f"make it yours only: chmod 600 {path}", file=sys.stderr)


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

    _check_vision_file(args)
    check_export_folder(args.out, args.overwrite)
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

    repo = args.repo or RELEASE_REPO
    hub = parse_hub_file(repo)
    repo, revision = parse_repo(repo) or (repo, None)  # REPO_ID@REVISION, as --model takes it
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
    except (ValueError, OSError) as err:
        # ImagingError and CheckpointError are ValueErrors, and a file that cannot be read or written an OSError:
        # show the message, not a traceback. Other exceptions are our bugs and keep theirs.
        print(f"medsight: error: {_message(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
