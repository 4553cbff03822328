"""`medsight eval diagseg|vqa|mc ...`: run (or resume) inference, merge shards, score, write the report.

Sharded runs (``--shard i --num-shards n``, or torchrun's RANK/WORLD_SIZE) each write their own predictions file.
Under torchrun the processes meet at a gloo barrier and rank 0 merges and reports; otherwise rerun the command
without ``--shard``: it merges the shard files, answers whatever is still missing and writes the report.
The report folder records the model and options its predictions were made with (``settings.json``); a rerun, shard
or merge with other ones is refused (`medsight.evaluate.provenance`), so resumed answers are never reported under
another model's name. A folder whose predictions an older medsight made without settings is resumed only with
``--adopt-settings``, which records this command's settings as theirs.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from medsight.commands.errors import CommandParser
from medsight.commands.options import check_vision_file, file_name
from medsight.evaluate.provenance import (
    ADOPT_FLAG,
    SETTINGS_FILE,
    answer_settings,
    check_settings,
    data_settings,
    recorded_settings,
)
from medsight.evaluate.readers import DataError, EvalItem, read_diagseg, read_items
from medsight.evaluate.report import answer_type_line, build_report, report_file_names, write_report
from medsight.evaluate.runner import (
    ITEM_SEED_STRIDE,
    LARGEST_RUN_SEED,
    RunOptions,
    append_predictions,
    merge_shards,
    prediction_path,
    read_predictions,
    run_predictions,
    shard_from_env,
)

DTYPES = ("float32", "bfloat16", "float16", "float64")


def parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="medsight eval", description="Evaluate MedSIGHT on DiagSeg, VQA or OmniMedVQA.")
    p.add_argument("task", choices=("diagseg", "vqa", "mc"),
                   help="diagseg: Dice + recall; vqa: VQA-RAD/SLAKE/PathVQA LLaVA JSON; mc: OmniMedVQA")
    p.add_argument("--data", type=file_name, required=True,
                   help="question file (mc: a file or folder of OmniMedVQA's QA_information/Open-access, or the "
                        "paper's Modality_*.json files; pass --images with the OmniMedVQA folder)")
    p.add_argument("--images", type=file_name, help="root for relative image/mask paths (default: the data file's "
                   "folder); absolute paths in the data are used as written (a missing one is refused)")
    p.add_argument("--model", default="demo",
                   help="demo (default: embedded), tiny/full (random), folder or Hub id")
    p.add_argument("--vision-file", type=file_name, help="UniMed-CLIP checkpoint for the official layout")
    p.add_argument("--adapter", type=file_name, help="LoRA adapter folder (official layout) applied to --model")
    p.add_argument("--report", type=file_name, required=True,
                   help="output folder: predictions*.jsonl, report.json/.md, PNGs (a symbolic link to nothing is "
                        "refused, not followed)")
    p.add_argument("--vqa-data", type=file_name, help="diagseg: the _vqa.json file; recall then comes from a separate "
                   "sampled VQA-path run, as in the paper")
    p.add_argument("--benchmark", choices=("vqa-rad", "slake", "pathvqa"), help="vqa: paper reference numbers")
    p.add_argument("--shard", type=int, help="this process's part, 0 <= i < --num-shards (default: torchrun's "
                   "RANK, else 0); rerun without --shard to merge and report")
    p.add_argument("--num-shards", type=int,
                   help="processes sharing the items (default: torchrun's WORLD_SIZE, else 1)")
    p.add_argument("--limit", type=int, help="only the first N items")
    p.add_argument("--max-new-tokens", type=int, help="default: GenerationOptions' (the official limit)")
    p.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed (default %(default)s)")
    p.add_argument("--sampling", choices=("official", "greedy"), default="official",
                   help="official (default): VQA path sampled at T=0.2 (segmentation greedy); greedy: deterministic")
    p.add_argument("--batch", type=int, default=1,
                   help="same-question items per engine call (greedy only; default %(default)s)")
    p.add_argument("--resize-mode", choices=("crop", "letterbox"), default="crop",
                   help="crop (default): the official centre crop, as the paper's numbers were made; letterbox keeps "
                        "the whole image (`medsight ask`'s default)")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples for the 95%% CIs (default %(default)s)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK under torchrun, else auto)")
    p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary lines on stderr")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout: report (report.json's path; "
                   "null for a shard that leaves the report to the merge), n_items, n_scored, n_missing (null for "
                   "such a shard), shard, num_shards; a refused run prints {\"error\": {\"code\", \"message\"}}")
    p.add_argument(ADOPT_FLAG, action="store_true",
                   help="the --report folder holds predictions but no settings.json, or one without some settings "
                        "(an older medsight made them): record this command's as theirs where unrecorded, and resume")
    return p


class _LazyEngine:
    """Loads the model only when some item still needs an answer (a resumed or merge-only run needs none)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.engine = args, None

    def ask(self, *a, **k):
        if self.engine is None:
            import torch

            from medsight.engine import Engine

            device = _device(self.args)
            dtype = getattr(torch, self.args.dtype) if self.args.dtype else None
            kwargs = {"vision_file": self.args.vision_file} if self.args.vision_file else {}
            if self.args.adapter:
                kwargs["adapter"] = self.args.adapter
            self.engine = Engine.load(self.args.model, device=device, dtype=dtype, **kwargs)
        return self.engine.ask(*a, **k)


def _device(args: argparse.Namespace) -> str | None:
    """--device, else cuda:LOCAL_RANK under torchrun on a GPU host, else None (the loader's choice)."""
    import torch

    if args.device is None and "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return args.device


def _dtype_name(args: argparse.Namespace) -> str:
    """The dtype the model will load in: --dtype, else the loader's default for the device (bfloat16 on CUDA), so a
    run resumed on another kind of device without --dtype is told its answers would come from another dtype."""
    from medsight.model.loading import default_dtype, parse_device, resolve_device

    if args.dtype:
        return args.dtype
    device = _device(args)
    return str(default_dtype(parse_device(device) if device else resolve_device(None))).removeprefix("torch.")


def _runs(args: argparse.Namespace) -> list[tuple[str, list[EvalItem], RunOptions]]:
    """(predictions file stem, items, options) for each generation the task needs."""
    common = {"max_new_tokens": args.max_new_tokens, "sampling": args.sampling, "seed": args.seed,
              "batch": args.batch, "resize_mode": args.resize_mode}
    runs = [("predictions", read_items(args.task, args.data, args.images), RunOptions(args.task, **common))]
    if args.task == "diagseg" and args.vqa_data:
        vqa_items = read_diagseg(args.vqa_data, args.images)
        _check_covers(args, runs[0][1], vqa_items)
        runs.append(("predictions_vqa", vqa_items, RunOptions("vqa", **common)))
    return runs


def _check_covers(args: argparse.Namespace, items: list[EvalItem], vqa_items: list[EvalItem]) -> None:
    """The --vqa-data run (with --limit: its first N items) asks every scored item of --data: the recall comes
    from it, and a missing item would silently leave the report without that item's recall (or any recall)."""
    have = {it.id for it in vqa_items[: args.limit]}
    missing = [it.id for it in items[: args.limit] if it.id not in have]
    if missing:
        where = f"the first {args.limit} items of --vqa-data" if args.limit is not None else "--vqa-data"
        shown = ", ".join(repr(m) for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(f"{where} {args.vqa_data} lack {len(missing)} item(s) of --data {args.data} ({shown}), whose "
                        "diagnosis recall comes from that file: pass the _vqa.json file made with this data"
                        + (" (its items in the same order, or leave out --limit)" if args.limit is not None else ""))


def _check_args(args: argparse.Namespace) -> Path:
    """Refuse values that would silently give a wrong or empty report; returns the report folder."""
    for option, value in (("--limit", args.limit), ("--max-new-tokens", args.max_new_tokens),
                          ("--bootstrap", args.bootstrap), ("--batch", args.batch)):
        if value is not None and value < 1:
            raise ValueError(f"{option} {value}: must be at least 1")
    check_vision_file(args)  # one the model ignores would be named in the report as if it had been used
    # Options of another task were ignored: a DiagSeg report was titled "(slake)", a vqa run dropped --vqa-data.
    for option, value, task in (("--benchmark", args.benchmark, "vqa"), ("--vqa-data", args.vqa_data, "diagseg")):
        if value is not None and args.task != task:
            raise ValueError(f"{option} {value}: only `medsight eval {task}` takes it, not {args.task}")
    if args.seed < 0:  # the bootstrap's generator refused it only after every item was answered, and no report came
        raise ValueError(f"--seed {args.seed}: must be at least 0")
    if args.seed > LARGEST_RUN_SEED:  # torch's generator refused the first item's seed ("Overflow when unpacking")
        raise ValueError(f"--seed {args.seed}: must be at most {LARGEST_RUN_SEED} (each item is sampled with the seed "
                         f"times {ITEM_SEED_STRIDE} plus its position, a 64-bit number)")
    if args.images is not None and not os.path.isdir(args.images):
        what = "not a folder" if os.path.exists(args.images) else "no such folder"
        raise ValueError(f"--images {args.images}: {what}; give the folder the data file's image and mask paths are "
                         "relative to")
    report_dir = Path(args.report)
    _check_report_place(report_dir)
    return report_dir


def _check_report_place(report_dir: Path) -> None:
    """The report folder, or the nearest of its parents that is there, must be a folder. A symbolic link to nothing
    failed with a bare "File exists" (a file below the report path with "Not a directory", naming settings.json). Such
    a link is refused, not followed: its target may be on a disk that is not mounted now, and creating it would put
    the report in the empty folder under the mount point."""
    there = report_dir
    while not there.exists() and not there.is_symlink() and there != there.parent:
        there = there.parent
    what = "--report" if there == report_dir else f"--report {report_dir}: its folder"
    if there.is_symlink() and not there.exists():
        raise ValueError(f"{what} {there} is a symbolic link to {os.readlink(there)}, which is not there; create "
                         "that folder (or mount its disk), or give another --report")
    if not there.is_dir():
        raise ValueError(f"{what} {there} is a file; the report goes into a folder (new or from an earlier run of "
                         "the same evaluation)")


def _resume_vqa_data(args: argparse.Namespace, report_dir: Path) -> None:
    """A DiagSeg folder answered with --vqa-data resumes with it when the rerun leaves it out (it was refused, its
    sampled run's seed taken for a changed setting); another file than the recorded one is refused, naming both (a
    byte-identical copy, or a recorded one that is gone, is taken: each answer's inputs are checked on resume)."""
    recorded = (recorded_settings(report_dir) or {}).get("vqa_data") if args.task == "diagseg" else None
    if recorded is None:
        return
    where = report_dir / SETTINGS_FILE
    if args.vqa_data is None:
        if not os.path.isfile(recorded):
            raise DataError(f"{report_dir}'s recall answers came from --vqa-data {recorded} (recorded in {where}), "
                            "which is not there now: pass its new place with --vqa-data to resume")
        print(f"--vqa-data {recorded}: reused, as recorded in {where}", file=sys.stderr)
        args.vqa_data = recorded
    elif os.path.isfile(recorded) and not filecmp.cmp(args.vqa_data, recorded, shallow=False):
        raise DataError(f"--vqa-data {args.vqa_data}: {report_dir}'s recall answers came from --vqa-data {recorded} "
                        f"(recorded in {where}); pass that file or leave --vqa-data out to resume with it, or choose "
                        "another --report folder for this one")


def _check_no_foreign_report(report_dir: Path, adopt: bool) -> None:
    """A folder no evaluation has recorded its settings in keeps its files: its own report.md or dice.png were
    replaced by this run's report without a word. A folder holding predictions is an evaluation's, an older
    medsight's if it has no settings: `check_settings` says to adopt it (--adopt-settings), not to leave it."""
    if adopt or (report_dir / SETTINGS_FILE).exists() or any(report_dir.glob("predictions*.jsonl")):
        return
    kept = [name for name in report_file_names() if (report_dir / name).exists()]
    if kept:
        raise ValueError(f"--report {report_dir} holds {', '.join(kept)}, which no evaluation recorded there (no "
                         f"{SETTINGS_FILE}); the report would replace them: choose a new or empty folder, or the "
                         "folder of an earlier run of this evaluation")


def _settings(args: argparse.Namespace, runs, report_dir: Path) -> dict:
    """What produced the folder's predictions (`medsight.evaluate.provenance`)."""
    return {**answer_settings(args.task, args.model, args.adapter, args.vision_file, [o for _, _, o in runs],
                             _dtype_name(args), report_dir),
            **data_settings(args.data, args.images, args.vqa_data if args.task == "diagseg" else None)}


def _merge_existing_shards(report_dir: Path, name: str, items: list[EvalItem]) -> Path:
    """Fold any shard files into the single predictions file (ids already there are kept)."""
    path = prediction_path(report_dir, name)
    shards = sorted(report_dir.glob(f"{name}.shard*-of-*.jsonl"))
    if shards:
        have = {str(r["question_id"]) for r in read_predictions(path, repair=True)}
        merged = merge_shards(shards, [it.id for it in items])
        append_predictions(path, [r for r in merged if str(r["question_id"]) not in have])
    return path


def _finish(args: argparse.Namespace, runs, report_dir: Path, settings: dict) -> dict:
    """Merge, answer what is missing, score and write the report (single process or rank 0)."""
    engine = _LazyEngine(args)
    results = {}
    for name, items, options in runs:
        path = _merge_existing_shards(report_dir, name, items)
        results[name] = run_predictions(engine, items, path, options, limit=args.limit,
                                        progress=None if args.quiet else name)
    items = runs[0][1][: args.limit] if args.limit is not None else runs[0][1]
    # The report's settings name --limit (None: every item). settings.json does not: it is compared on resume, and
    # a folder's answers may come from runs with several limits (a --limit smoke run resumed by the full run), none
    # of which changes an answer.
    report = build_report(args.task, items, results["predictions"], n_boot=args.bootstrap, seed=args.seed,
                          benchmark=args.benchmark, text_predictions=results.get("predictions_vqa"),
                          settings={**settings, "limit": args.limit})
    left_out = len(runs[0][1]) - len(items)
    if left_out:  # the items --limit leaves out are counted, not dropped unsaid
        report["notes"].append(f"--limit {args.limit}: only the first {len(items)} of the data's "
                               f"{len(runs[0][1])} items were asked and scored")
    paths = write_report(report, report_dir)
    if args.json:
        _print_json(args, paths["json"], report)
    if not args.quiet:
        limited = f" (--limit: {left_out} more in the data)" if left_out else ""
        print(f"items: {report['n_items']}{limited}, scored: {report['n_scored']}, missing: {report['n_missing']}. "
              f"{answer_type_line(report)}", file=sys.stderr)
        print(f"report: {paths['json']}", file=sys.stderr)
    return report


def _make_folders(folder: Path, made: list[Path]) -> None:
    """Create `folder` and its missing parents one at a time, adding each to `made` by its real path: 'a/b/../c/report'
    creates a, a/b, a/c and a/c/report, where its lexical parents ('a/b/..' is a) would name other folders."""
    current = Path(folder.anchor)
    for part in folder.parts[1:] if folder.anchor else folder.parts:
        current = current / part
        if part == ".." or current.exists():
            continue
        try:
            current.mkdir()
        except FileExistsError:  # made by another process since: not ours to remove
            continue
        made.append(Path(os.path.realpath(current)))


def _start(args: argparse.Namespace, report_dir: Path, settings: dict) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    # Before any answer is asked or reused: a folder answered with other settings is refused.
    check_settings(report_dir, settings, adopt=args.adopt_settings)


@contextmanager
def _left_as_found_unless_answered(report_dir: Path) -> Iterator[None]:
    """A single-process run that stops before it adds an answer (a mistyped --model, an unreadable first image,
    Ctrl+C while the model loads) leaves the --report folder as it found it: the settings.json it had recorded made
    the corrected rerun refused until the user deleted it. Not for shards: another may have started with them."""
    made: list[Path] = []  # the folders this run creates, in order
    settings_file = report_dir / SETTINGS_FILE
    recorded = settings_file.exists()
    before = _predictions_sizes(report_dir)
    try:
        _make_folders(report_dir, made)
        yield
    except BaseException:
        if not recorded and _predictions_sizes(report_dir) == before:
            settings_file.unlink(missing_ok=True)
            for folder in reversed(made):
                try:
                    folder.rmdir()
                except OSError:  # not empty: something else wrote there, kept
                    continue
        raise


def _predictions_sizes(report_dir: Path) -> dict[Path, int]:
    return {p: p.stat().st_size for p in report_dir.glob("predictions*.jsonl")} if report_dir.is_dir() else {}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``medsight eval ...`` (argv excludes the word "eval"); returns the exit code."""
    args = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    shard, num_shards = shard_from_env(args.shard, args.num_shards)
    report_dir = _check_args(args)
    _resume_vqa_data(args, report_dir)
    runs = _runs(args)
    settings = _settings(args, runs, report_dir)
    _check_no_foreign_report(report_dir, args.adopt_settings)
    if num_shards == 1:
        with _left_as_found_unless_answered(report_dir):
            _start(args, report_dir, settings)
            _finish(args, runs, report_dir, settings)
        return 0
    _start(args, report_dir, settings)
    engine = _LazyEngine(args)
    for name, items, options in runs:
        path = prediction_path(report_dir, name, shard, num_shards)
        others = [prediction_path(report_dir, name), *sorted(report_dir.glob(f"{name}.shard*-of-*.jsonl"))]
        run_predictions(engine, items, path, options, shard, num_shards, args.limit,
                        None if args.quiet else f"{name} shard {shard}/{num_shards}",
                        answered=[p for p in others if p != path])
    if "MASTER_ADDR" in os.environ and args.shard is None:
        # torchrun: wait for every rank, then rank 0 merges and reports. gloo works on CPU and GPU hosts; the long
        # timeout covers shards finishing hours apart.
        from datetime import timedelta

        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=timedelta(hours=24))
        dist.barrier()
        if shard == 0:
            _finish(args, runs, report_dir, settings)
        dist.barrier()
        dist.destroy_process_group()
    else:
        if not args.quiet:
            print(f"shard {shard}/{num_shards} done; rerun without --shard to merge and report", file=sys.stderr)
        if args.json:
            _print_json(args, None, None, shard, num_shards)
    return 0


def _print_json(args: argparse.Namespace, report_path: Path | None, report: dict | None, shard: int = 0,
                num_shards: int = 1) -> None:
    counts = {k: None if report is None else report[k] for k in ("n_items", "n_scored", "n_missing")}
    print(json.dumps({"report": None if report_path is None else str(report_path), **counts, "shard": shard,
                      "num_shards": num_shards}), flush=True)


if __name__ == "__main__":
    # The entry point under torchrun (`-m medsight.evaluate.cli`): bad input, Ctrl+C and a reader that left end it as
    # they end `medsight`, not with a traceback per rank.
    from medsight.commands.errors import run_command, wants_json

    sys.exit(run_command(main, "medsight eval", json_errors=wants_json(sys.argv[1:])))
