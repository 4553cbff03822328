"""The outputs of `medsight ask`: --out (a segmentation file) and --overlay (a PNG), checked before the model runs
and written after the answers are printed."""

from __future__ import annotations

import argparse
import re

from medsight.commands.errors import error_message
from medsight.output_paths import check_output


def check_ask_outputs(args: argparse.Namespace) -> None:
    """--out (and a NIfTI's sidecar) and --overlay: known format, not an input, not kept files, writable."""
    from medsight.imaging import writer_for
    from medsight.imaging.export_nifti import written_sidecar_path

    if args.out:
        _named("--out", writer_for, args.out)  # an unknown format fails before the model runs
        check_output(args.out, "--out", args.path, args.overwrite)
        if args.out.lower().endswith((".nii", ".nii.gz")):
            sidecar = written_sidecar_path(args.out)
            check_output(sidecar, f"--out {args.out}: its labels sidecar", args.path, args.overwrite)
    if args.overlay:
        if not args.overlay.lower().endswith(".png"):
            raise ValueError(f"--overlay {args.overlay}: the overlay is a PNG; give a file name ending in .png")
        check_output(args.overlay, "--overlay", args.path, args.overwrite)


def check_out_against_input(out: str, volume) -> None:
    """A .dcm --out needs an input a DICOM SEG can reference: known only once the input is read."""
    from medsight.imaging.export import check_reference

    _named("--out", check_reference, out, volume)


def _named(option: str, check, path: str, *more) -> None:
    """Run an imaging check on an output path; its ImagingError is reworded to name the option."""
    from medsight.imaging import ImagingError

    try:
        check(path, *more)
    except ImagingError as err:
        raise ValueError(f"{option} {path}: {err.problem}") from None


def write_outputs(args: argparse.Namespace, volume, answers, window) -> tuple[dict[str, str | None], list[str]]:
    """Write --out and --overlay; returns each one's path (None when not written) and the errors of those that
    failed, so that one failed write neither loses the answers nor stops the other output. `window` is the one the
    answers were asked in (`engine.volume_window`), so the overlay shows the pixels the model saw."""
    written: dict[str, str | None] = {}
    errors: list[str] = []
    writers = {"out": lambda path: _write_segmentation(path, volume, answers),
               "overlay": lambda path: _write_overlay(path, volume, answers, window)}
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
            errors.append(f"--{name} {path} not written: {error_message(err)}")
    return written, errors


def _write_segmentation(path: str, volume, answers) -> None:
    from medsight.imaging import SegmentationBuilder, write_segmentation

    segments = _finding_segments(answers)
    if not segments:
        raise ValueError("the answer has no regions: nothing to write")
    builder = SegmentationBuilder(volume)
    for segment, pairs in segments:
        for answer, region in pairs:
            builder.add(answer.slice, region.mask, segment)
    write_segmentation(builder.build(), path)


def _finding_segments(answers) -> list[tuple]:
    """Each finding's segment (value, name, colour, code) with its (answer, region) pairs: the one rule for the
    segmentation file and the overlay, so that a region is drawn in its segment's colour."""
    segments, used = [], []
    for value, pairs in enumerate(_findings(answers).values(), start=1):
        segment = _segment(value, pairs, used)
        used.append(segment.color)
        segments.append((segment, pairs))
    return segments


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


def _write_overlay(path: str, volume, answers, window) -> None:
    from medsight.engine import slice_image
    from medsight.overlay import save_overlay

    shown = next((a for a in answers if a.regions), answers[len(answers) // 2])
    # Colours of the findings over all answers, as --out gives them (one per finding, not one per region).
    colours = {id(region): segment.color for segment, pairs in _finding_segments(answers) for _, region in pairs}
    save_overlay(path, slice_image(volume, shown.slice, window), shown.regions,
                 [colours[id(region)] for region in shown.regions])
