"""`medsight ask`: read the input, answer the question about the chosen slices, print the answers, then write the
requested outputs (`medsight.commands.ask_outputs`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

from medsight.commands.ask_outputs import check_ask_outputs, check_out_against_input, write_outputs
from medsight.commands.errors import READER_LEFT, error_message, reader_left, silence_stdout
from medsight.commands.options import check_vision_file

if TYPE_CHECKING:
    from medsight.imaging import Window


def run_ask(args: argparse.Namespace) -> int:
    from medsight.engine import check_question, volume_window
    from medsight.imaging import slice_count

    check_question(args.question)  # the Engine's own check, before the model loads (minutes for the full model)
    check_ask_outputs(args)  # before any work: a refused output must not cost a model load and inference
    check_vision_file(args)
    volume = _read_input(args)
    if volume.lossy_compression:  # the user judges answers on it: say so, as a radiology viewer does
        print(f"note: the image was lossy compressed ({volume.lossy_compression}); its grey values and fine detail "
              "differ from the acquired image", file=sys.stderr)
    if volume.left_out:  # the user asked about the series: say what of it is not in the volume
        print(f"note: left out of the volume: {volume.left_out}", file=sys.stderr)
    if volume.nan_filled:  # the model sees them as the darkest grey: say so
        print(f"note: {volume.nan_filled}", file=sys.stderr)
    if volume.resampled:  # the voxels are interpolated, not the acquired ones
        print(f"note: resampled: {volume.resampled}", file=sys.stderr)
    args.plane = args.plane or _default_plane(volume)
    indices = parse_slices(args.slices, slice_count(volume, args.plane))
    # Once for the whole run, before the model loads: a volume no window shows is refused at once, and a percentile
    # window (the whole volume read and sorted, 0.7 s for 256 x 256 x 300) is not worked out again for every batch.
    window = volume_window(volume, args.window)
    answers = _answers(args, volume, indices, window)
    left, not_printed = False, None
    if not args.json:
        try:
            _print_answers(args, answers)  # before writing: a failed write must not lose them
        except OSError as err:
            # The reader left (`medsight ask ... --out F | head -1`), or stdout cannot take the answers (`> log` on a
            # full disk): the files asked for are still written, not lost with the answers.
            left = isinstance(err, BrokenPipeError) and reader_left()
            if not left:
                not_printed = f"the answers were not printed: {error_message(err)}"
                silence_stdout()  # the lines below would fail the same way
    written, errors = write_outputs(args, volume, answers, window)
    errors = [not_printed, *errors] if not_printed else errors
    if args.json:
        _print_json(args, volume, answers, written, errors)
    else:
        for name, path in written.items():
            if path:
                print(f"{'segmentation' if name == 'out' else name} written to {path}")
    for error in errors:
        print(f"medsight: error: {error}", file=sys.stderr)
    return 2 if errors else READER_LEFT if left else 0


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


def _default_plane(volume) -> str:
    """Axial, unless the volume is a 2D image lying in another plane: then that plane, the only one it has."""
    from medsight.imaging.slicing import slice_planes

    planes = slice_planes(volume)
    return planes[0] if len(planes) == 1 else "axial"


def _answers(args: argparse.Namespace, volume, indices: list[int], window: Window | None) -> list:
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
    chunks = [indices[i : i + args.batch] for i in range(0, len(indices), args.batch)]
    with tqdm(total=len(indices), unit="slice", disable=len(indices) < 2, file=sys.stderr) as bar:
        for chunk in chunks:
            result = engine.ask(VolumeSlices(volume, args.plane, chunk, window), args.question,
                                options, image_options)
            answers.extend(result.answers)
            bar.update(len(chunk))
    return answers


def _read_input(args: argparse.Namespace):
    """The input volume, with the reader's Python-API advice put in command-line terms; --series, --window and a
    .dcm --out are checked against what was read (before the model loads: minutes for the full model)."""
    from medsight.imaging import read_volume
    from medsight.imaging.read_dicom import NotAnImageError, SeriesChoiceError, series_listing

    try:
        volume = read_volume(args.path, series_uid=args.series, modality=args.modality,
                             regularize_tilt=args.regularize_tilt, regularize_spacing=args.regularize_spacing)
    except SeriesChoiceError as err:
        raise ValueError(f"{err.path}: {len(err.series)} series found; choose one with --series:\n  "
                         f"{series_listing(err.series)}") from None
    except NotAnImageError as err:
        raise ValueError(f"{err.path}: {err.kind}, not an image: medsight ask needs an image (DICOM image file or "
                         "series folder, NIfTI, NRRD, MetaImage, PNG/JPG/TIFF)") from None
    if args.series and not os.path.isdir(args.path) and volume.series_uid != args.series:
        what = f"a DICOM file of series {volume.series_uid}" if volume.source_files else "not DICOM"
        raise ValueError(f"--series {args.series}: only a DICOM folder holds several series; {args.path} is {what}")
    if args.window:
        _check_window(args.window, volume.modality)
    if args.out:
        check_out_against_input(args.out, volume)
    return volume


def _check_window(preset: str, modality: str) -> None:
    """The Engine's own check of a window preset (known, and a CT one only on CT), naming the option."""
    from medsight.imaging import ImagingError
    from medsight.imaging.window import preset_window

    try:
        preset_window(preset, modality)
    except ImagingError as err:
        raise ValueError(f"--window {preset}: {err.problem}") from None


def _print_answers(args: argparse.Namespace, answers) -> None:
    for a in answers:
        print(f"[{args.plane} slice {a.slice_index}] {a.text}")
        for r in a.regions:
            print(f"  region {r.index}: {r.code} {r.label!r} {int(r.mask.sum())} pixels, p={r.probability:.2f}")
    sys.stdout.flush()


def _print_json(args: argparse.Namespace, volume, answers, written: dict[str, str | None], errors: list[str]) -> None:
    """The answers as one JSON object; the notes printed on stderr about the input (images left out of the series,
    lossy compression, NaN voxels filled, resampling) are in it too, so a script reading only stdout learns them
    (they were on stderr alone)."""
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
        "left_out": volume.left_out,
        "lossy_compression": volume.lossy_compression,
        "nan_filled": volume.nan_filled,
        "resampled": volume.resampled,
    }))
