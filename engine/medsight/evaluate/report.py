"""Scores predictions and writes report.json, report.md and PNG charts.

Every reported number is a dict ``{metric, group, aggregate, value, n, ci95, unit}`` with values in percent, as
the official tables print them. Per-item scores are recomputed from the predictions file (masks from its
run-length encodings), so a report can always be rebuilt without the model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from medsight.atomic_files import replace_files
from medsight.evaluate.metrics import (
    OMNIMED_MODALITIES,
    PAPER_MODALITIES,
    bootstrap_ci,
    closed_hit,
    item_dice,
    macro_bootstrap_ci,
    macro_mean,
    mc_hit,
    open_scores,
    strict_closed_hit,
    text_kind,
)
from medsight.evaluate.readers import DataError, EvalItem
from medsight.evaluate.runner import Prediction, decode_masks, load_gt_mask

#: MedSIGHT's published DiagSeg numbers (Table 2, project page), by modality as the files spell them
#: (`PAPER_MODALITIES`: data spelling them otherwise is read as these, `canonical_modality`).
PAPER_DIAGSEG = {
    "dice": {"CT": 65.8, "MRI": 82.3, "X-ray": 57.7, "Pathology": 52.9, "US": 65.8, "Endoscopy": 70.0,
             "Dermoscopy": 87.7, "OCT": 55.6, "avg": 69.9},
    "recall": {"CT": 54.6, "MRI": 54.4, "X-ray": 59.1, "Pathology": 80.1, "US": 51.7, "Endoscopy": 62.4,
               "Dermoscopy": 40.2, "OCT": 69.3, "avg": 58.9},
}
#: Table 1: closed accuracy ("close") and overall recall ("all") per VQA benchmark, and the OmniMedVQA accuracy.
PAPER_VQA = {"vqa-rad": {"closed_accuracy": 79.9, "recall_all": 61.4},
             "slake": {"closed_accuracy": 70.9, "recall_all": 60.2},
             "pathvqa": {"closed_accuracy": 66.3, "recall_all": 42.6}}
PAPER_MC = {"avg": 68.9}
OPEN_METRICS = ("exact_match", "f1", "precision", "recall", "bleu", "bleu1", "bleu2", "bleu3", "strict_exact")


@dataclass
class ItemScore:
    """Per-item scores in [0, 1] (only the metrics that apply to the item)."""

    id: str
    modality: str
    scores: dict[str, float]
    #: The item's GT mask union is empty (nothing above the notebooks' 127), seen when its Dice read it.
    gt_empty: bool = False


def _join(items: Sequence[EvalItem], predictions: Sequence[Prediction]) -> list[tuple[EvalItem, Prediction]]:
    """Pair items and predictions by id (the official scripts zip by order, which silently misaligns on a gap)."""
    by_id = {str(p["question_id"]): p for p in predictions}
    return [(it, by_id[it.id]) for it in items if it.id in by_id]


def scored_type(item: EvalItem) -> str | None:
    """The metric family an item is scored by: "mc" (OmniMedVQA's, with its options), or run_eval.py's "open" or
    "closed" (`text_kind`); None for a type the official scoring skips (a VQA or DiagSeg file's "mc" too, and a
    blank one: run_eval.py has no options and skips them)."""
    return "mc" if item.answer_type == "mc" and item.options else text_kind(item.answer_type)


def text_scores(item: EvalItem, text: str) -> dict[str, float]:
    """Official and strict text metrics of one answer, chosen by the item's answer type (none for a type
    run_eval.py skips: its recall, accuracy and BLEU leave such an item out)."""
    kind = scored_type(item)
    if kind is None:
        return {}
    if kind == "mc":
        return {"accuracy": mc_hit(text, item.answer, item.options)}
    if kind == "closed":
        hit = closed_hit(text, item.answer)
        return {"closed_accuracy": hit, "strict_closed_accuracy": strict_closed_hit(text, item.answer),
                "recall_all": hit}
    s = open_scores(text, item.answer)
    return {**{m: getattr(s, m) for m in OPEN_METRICS}, "recall_all": s.recall}


def mask_dice(item: EvalItem, prediction: Prediction, key: str = "masks", gt: np.ndarray | None = None) -> float:
    """Dice of the stored binarised masks (`key`: "masks", the official frame, or "masks_image") against the union
    of the item's GT masks (`gt`, read from the item's files when not given)."""
    masks, qid = prediction.get(key), prediction["question_id"]
    if masks is None:
        raise DataError(f"prediction {qid!r} has no masks (not a segmentation run?)")
    gt = load_gt_mask(item.masks) if gt is None else gt
    shape = masks.get("shape") if isinstance(masks, dict) else None
    if not isinstance(shape, list) or tuple(shape) != gt.shape:
        raise DataError(f"prediction {qid!r}: {key} shape {shape} != GT {gt.shape}")
    try:
        pred = decode_masks(masks, gt.shape)
    except DataError as err:  # a hand-edited or damaged predictions file: say which answer
        raise DataError(f"prediction {qid!r}: {key}: {err}") from None
    return item_dice(pred, gt)


def score_items(items: Sequence[EvalItem], predictions: Sequence[Prediction], with_dice: bool = False,
                text_predictions: Sequence[Prediction] | None = None) -> list[ItemScore]:
    """Per-item scores. ``text_predictions`` (DiagSeg's separate VQA-path run) replaces the text of
    ``predictions`` for the text metrics when given, as the paper's recall comes from another generation."""
    text_by_id = None if text_predictions is None else {str(p["question_id"]): p["text"] for p in text_predictions}
    out = []
    for item, pred in _join(items, predictions):
        text = pred["text"] if text_by_id is None else text_by_id.get(item.id)
        scores = {} if text is None else text_scores(item, text)
        gt_empty = False
        if with_dice:
            gt = load_gt_mask(item.masks)
            gt_empty = not gt.any()
            scores["dice"] = mask_dice(item, pred, gt=gt)
            if "masks_image" in pred:  # older predictions have only the official frame's masks
                scores["strict_dice"] = mask_dice(item, pred, "masks_image", gt)
        out.append(ItemScore(item.id, item.modality, scores, gt_empty))
    return out


def _entry(metric: str, group: str, aggregate: str, values: Sequence[float], ci: tuple[float, float],
           value: float | None = None, paper: float | None = None) -> dict:
    v = float(np.mean(values)) if value is None else value
    return {"metric": metric, "group": group, "aggregate": aggregate, "value": round(100 * v, 4), "n": len(values),
            "ci95": [round(100 * c, 4) for c in ci], "unit": "%", "paper": paper}


def aggregate(scores: Sequence[ItemScore], metric: str, n_boot: int = 1000, seed: int = 0,
              paper: dict[str, float] | None = None, paper_avg: str = "macro_mean") -> list[dict]:
    """Per-modality means, the per-sample mean and (with several modalities) the macro mean, each with a CI.

    ``paper_avg`` names the aggregate the paper's "avg" is compared with ("macro_mean" or "per_sample_mean").
    """
    pairs = [(s.scores[metric], s.modality) for s in scores if metric in s.scores]
    if not pairs:
        return []
    values, groups = [p[0] for p in pairs], [p[1] for p in pairs]
    paper = paper or {}
    rows = []
    modalities = sorted(set(groups))
    if len(modalities) > 1:
        for m in modalities:
            vals = [v for v, g in pairs if g == m]
            rows.append(_entry(metric, m, "mean", vals, bootstrap_ci(vals, n_boot=n_boot, seed=seed),
                               paper=paper.get(m)))
        rows.append(_entry(metric, "all", "macro_mean", values, macro_bootstrap_ci(values, groups, n_boot, seed),
                           value=macro_mean(values, groups),
                           paper=paper.get("avg") if paper_avg == "macro_mean" else None))
    rows.append(_entry(metric, "all", "per_sample_mean", values, bootstrap_ci(values, n_boot=n_boot, seed=seed),
                       paper=_paper_beside_per_sample_mean(paper, paper_avg, modalities)))
    return rows


def _paper_beside_per_sample_mean(paper: dict[str, float], paper_avg: str, modalities: Sequence[str]) -> float | None:
    """The paper's number for the per-sample mean row. With several modalities: its "avg" where that is a per-sample
    mean (else the macro mean's row has it). With one modality: the paper's number for that modality (DiagSeg's CT
    alone is compared with CT's 65.8, not with the average over eight), none where the paper's "avg" spans other
    modalities (a macro mean, or a table with per-modality numbers: one OmniMedVQA Modality_*.json file), else the
    "avg" (a pooled VQA benchmark, or data that names no modality: the whole benchmark, presumably)."""
    if len(modalities) == 1 and modalities[0] != "unknown":
        if modalities[0] in paper:
            return paper[modalities[0]]
        if paper_avg == "macro_mean" or any(k != "avg" for k in paper):
            return None
    return paper.get("avg") if paper_avg == "per_sample_mean" or len(modalities) == 1 else None


def build_report(task: str, items: Sequence[EvalItem], predictions: Sequence[Prediction], n_boot: int = 1000,
                 seed: int = 0, benchmark: str | None = None,
                 text_predictions: Sequence[Prediction] | None = None, settings: dict | None = None) -> dict:
    """The report dict: task, what produced the predictions (`settings`, from `medsight.evaluate.provenance`),
    counts, notes and every metric row."""
    if task == "mc":  # the readers refuse such items; one built in Python is named, not scored as skipped
        for item in items:
            if not item.options:
                raise DataError(f"item {item.id!r}: answer type 'mc' without options to score the answer against")
    scores = score_items(items, predictions, with_dice=task == "diagseg", text_predictions=text_predictions)
    outside = modalities_not_in_paper(task, scores)
    rows: list[dict] = []
    if task == "diagseg":
        # The paper's Dice avg (69.9) fits a per-sample mean, its recall avg (58.9) the macro mean (spec 8.4).
        rows += aggregate(scores, "dice", n_boot, seed, _paper_for(PAPER_DIAGSEG["dice"], outside),
                          paper_avg="per_sample_mean")
        rows += aggregate(scores, "recall", n_boot, seed, _paper_for(PAPER_DIAGSEG["recall"], outside))
        rows += aggregate(scores, "strict_dice", n_boot, seed)
        # run_eval.py scores a closed item of the file by its yes/no rule, as in the VQA benchmarks.
        for m in (*OPEN_METRICS, "closed_accuracy", "strict_closed_accuracy"):
            if m != "recall":
                rows += aggregate(scores, m, n_boot, seed)
    elif task == "vqa":
        ref = PAPER_VQA.get((benchmark or "").lower(), {})
        for m in (*OPEN_METRICS, "closed_accuracy", "strict_closed_accuracy", "recall_all"):
            # run_eval.py pools every item of the benchmark (its --modality_split tables come before the overall
            # one), so the paper's number goes beside the per-sample mean even where the data names modalities.
            rows += aggregate(scores, m, n_boot, seed, {"avg": ref[m]} if m in ref else None,
                              paper_avg="per_sample_mean")
    elif task == "mc":
        rows += aggregate(scores, "accuracy", n_boot, seed, _paper_for(PAPER_MC, outside))
    else:
        raise ValueError(f"unknown task {task!r}")
    notes = [
        "values are percentages; ci95 = seeded percentile bootstrap over items (stratified by modality for "
        "macro means)",
        "exact_match is the official score (distinct GT words found / prediction tokens), not an exact match; "
        "strict_exact is the real one",
        "closed_accuracy is the official substring rule ('no' inside 'normal' counts); strict_closed_accuracy "
        "compares the first yes/no word (the whole normalised answer where the GT is no yes/no answer)",
        "predictions are paired with items by id, not by order",
    ]
    if task == "vqa":
        notes.append("recall is over the open items (run_eval.py's recall row); recall_all, which the paper's 'all' "
                     "column is compared with, is the mean over every item of the open recall and the closed yes/no "
                     "hit [inferred: the official code prints no 'all'; open recall alone is far below it]")
    nonsquare, reshaped, wide = _image_shape_counts(items)
    if wide:
        notes.append(f"{wide} of {len({it.image for it in items})} images have more than 8 bits per pixel (16-bit or "
                     "float): they are read as the official code reads them (PIL convert('RGB')), which clips every "
                     "value above 255 to white, so a 16-bit CT or MR slice reaches the model almost white; convert "
                     "them to 8-bit with the intended window first")
    modalities = {s.modality for s in scores}
    alone = next(iter(modalities)) if len(modalities) == 1 and "unknown" not in modalities else None
    if alone is not None and task in ("mc", "diagseg"):
        # The paper's averages span modalities: the notes on them would name a comparison the rows do not make.
        papers = PAPER_DIAGSEG if task == "diagseg" else {}
        numbers = ", ".join(f"{m} {p[alone]}" for m, p in papers.items() if alone in p)
        notes.append(f"every item is of one modality ({alone}): " + (
            f"the paper's numbers for it ({numbers}) are set beside the per-sample mean" if numbers else
            "the paper has no number for it alone (its average spans other modalities), so none is set beside it"))
    elif task == "mc" and not outside:
        notes.append("the paper's OmniMedVQA 68.9 is set beside the macro mean over modalities [inferred: "
                     "run_eval_mc.py prints one accuracy per Modality_*.json file and the code does not say how the "
                     "paper combined them]; per_sample_mean is the accuracy pooled over all items")
    if outside:
        notes.append(_outside_note(task, outside))
    if task == "diagseg" and alone is None and not outside:
        notes.append("paper Dice avg 69.9 matches a per-sample mean better than the macro mean (67.2) [inferred]; "
                     "paper Recall avg 58.9 is the macro mean")
    if task == "diagseg":
        notes.append("dice is the official one (the model's square input frame resized onto the GT mask); "
                     "strict_dice scores the engine's masks on the image (the crop or letterbox inverted): the two "
                     "agree on square images")
        if text_predictions is None:
            notes.append("recall uses the greedy segmentation run's text; the paper used a separate sampled "
                         "VQA-path run (pass --vqa-data to reproduce that)")
        if nonsquare:
            notes.append(f"{nonsquare} of {len(items)} images are not square: their Dice follows the official "
                         "notebooks, which stretch the model's square input frame (the centre crop, or the letterbox) "
                         "over the whole GT mask, so it does not measure the mask on the image (DiagSeg's images are "
                         "square); strict_dice does")
        empty = _empty_gt_masks(items, scores)
        if empty:
            notes.append(f"{empty} of {len(items)} items have an empty GT mask (no pixel above 127, the notebooks' "
                         "threshold: masks stored as 0/1 labels read as empty); their Dice is 0 for any predicted "
                         "mask")
        if reshaped:
            notes.append(f"{reshaped} of {len(items)} items have GT masks of another aspect ratio than their image: "
                         "both Dice stretch the masks onto those GT masks, so neither measures the mask on the image "
                         "(check that the masks belong to these images)")
    return {"task": task, "benchmark": benchmark, "settings": settings, "n_items": len(items), "n_scored": len(scores),
            "n_missing": len(items) - len(scores), "answer_types": answer_type_counts(items, scores),
            "unscored_answer_types": unscored_types(items), "modalities_not_in_paper": outside,
            "bootstrap": {"n": n_boot, "seed": seed}, "notes": notes, "metrics": rows}


#: The modalities each task's paper numbers are given for (a VQA benchmark's are pooled over its modalities).
PAPER_GROUPS = {"diagseg": PAPER_MODALITIES, "mc": OMNIMED_MODALITIES}


def modalities_not_in_paper(task: str, scores: Sequence[ItemScore]) -> dict[str, int]:
    """The scored items' modalities the paper has no row for in `task` (kept as the data names them: OmniMedVQA's
    Dermoscopy, which the paper's code leaves out, or a modality only its restricted-access files have), with their
    item counts, so a group no paper number stands beside is named rather than silently compared."""
    known = PAPER_GROUPS.get(task)
    out: dict[str, int] = {}
    if known is None:
        return out
    for s in scores:
        if s.modality not in known and s.modality != "unknown":
            out[s.modality] = out.get(s.modality, 0) + 1
    return dict(sorted(out.items()))


def _paper_for(paper: dict[str, float], outside: dict[str, int]) -> dict[str, float]:
    """The paper's numbers a run's rows may stand beside: its average spans only its own modalities, so with items
    of another modality in the 'all' rows it would compare two different sets, and is left out."""
    return {k: v for k, v in paper.items() if k != "avg"} if outside else paper


def _outside_note(task: str, outside: dict[str, int]) -> str:
    named = ", ".join(f"{m} ({n} items)" for m, n in outside.items())
    which = "OmniMedVQA modalities its code scores" if task == "mc" else "DiagSeg table's modalities"
    return (f"modalities not among the paper's {which} ({', '.join(PAPER_GROUPS[task])}), kept as the data names "
            f"them, with no paper number: {named}; their items count in the 'all' rows, so the paper's average, "
            "which does not include them, is not set beside those rows (leave those items out to compare with it)")


#: The metric whose rows count the scored items of each answer type (every item of the type has it).
TYPE_METRIC = {"open": "recall", "closed": "closed_accuracy", "mc": "accuracy"}


def answer_type_counts(items: Sequence[EvalItem], scores: Sequence[ItemScore]) -> dict[str, dict[str, int]]:
    """Per answer type of the data: its items, how many have text scores, and how many were skipped (no answer,
    or no text metric for the type), so no type's items leave the report unsaid."""
    by_id = {s.id: s for s in scores}
    out: dict[str, dict[str, int]] = {}
    for item in items:
        kind = scored_type(item)
        if kind is None:  # counted by unscored_types
            continue
        row = out.setdefault(kind, {"items": 0, "scored": 0, "skipped": 0})
        row["items"] += 1
        score = by_id.get(item.id)
        row["scored" if score is not None and TYPE_METRIC[kind] in score.scores else "skipped"] += 1
    return out


def unscored_types(items: Sequence[EvalItem]) -> dict[str, int]:
    """How many items have each answer type that no text metric scores (neither "open" nor "close...", as
    run_eval.py branches), so the items it skips are named, not silently left out."""
    out: dict[str, int] = {}
    for item in items:
        if scored_type(item) is None:
            out[item.answer_type] = out.get(item.answer_type, 0) + 1
    return out


def unscored_text(counts: dict[str, int]) -> str:
    """'2 items of another answer type (1 'other', 1 'yesno') have no text score: run_eval.py scores only ...'."""
    kinds = ", ".join(f"{n} {kind!r}" for kind, n in counts.items())
    return (f"{sum(counts.values())} item(s) of another answer type ({kinds}) have no text score: run_eval.py scores "
            "only the types 'open' and 'close...' and skips the others, so they are skipped here too")


def answer_type_line(report: dict) -> str:
    """'Answer types: 7 open (recall ...), 2 closed (closed_accuracy ...)' for report.md and the console."""
    parts = []
    for kind, c in report.get("answer_types", {}).items():
        skipped = f", {c['skipped']} skipped" if c["skipped"] else ""
        parts.append(f"{kind} {c['scored']} of {c['items']} scored{skipped} ({TYPE_METRIC[kind]})")
    if report.get("unscored_answer_types"):
        parts.append(unscored_text(report["unscored_answer_types"]))
    return "Answer types: " + "; ".join(parts) + "." if parts else ""


def _image_shape_counts(items: Sequence[EvalItem]) -> tuple[int, int, int]:
    """How many items' images are not square, how many items have a GT mask whose aspect ratio is not its image's
    (more than a mask pixel of rounding off: strict_dice resizes the engine's mask on the image onto the GT grid,
    which places it right only at the image's aspect ratio), and how many image files store more than 8 bits per
    pixel (PIL modes I;16..., I, F). Read from the headers, each image once; unreadable files are not counted (an
    unreadable mask leaves its image's own counts)."""
    from PIL import Image

    from medsight.user_files import IMAGE_READ_ERRORS, is_other_aspect, is_wide_mode

    headers: dict[Path, tuple[tuple[int, int], str] | None] = {}

    def header(path: Path) -> tuple[tuple[int, int], str] | None:
        """Size and mode of a file, read once per path (items share images and masks)."""
        if path not in headers:
            try:
                with Image.open(path) as im:
                    headers[path] = (im.size, im.mode)
            except IMAGE_READ_ERRORS:  # a DecompressionBombError too: it stopped the report being built
                headers[path] = None
        return headers[path]

    nonsquare = reshaped = 0
    wide: dict[Path, bool] = {}
    for item in items:
        found = header(item.image)
        if found is None:
            continue
        (width, height), mode = found
        nonsquare += width != height
        wide[item.image] = is_wide_mode(mode)
        masks = [header(mask) for mask in item.masks]
        if any(m is None for m in masks):
            continue
        reshaped += any(is_other_aspect((height, width), (mh, mw)) for (mw, mh), _ in masks)
    return nonsquare, reshaped, sum(wide.values())


def _empty_gt_masks(items: Sequence[EvalItem], scores: Sequence[ItemScore]) -> int:
    """How many items' GT mask union is empty as binarised. Scored items say so from the mask their Dice read; only
    the others (no prediction yet) are read here, unreadable ones not counted."""
    seen = {s.id: s.gt_empty for s in scores}
    count = 0
    for item in items:
        if item.id in seen:
            count += seen[item.id]
            continue
        try:
            count += not load_gt_mask(item.masks).any()
        except DataError:
            continue
    return count


# -- writing -------------------------------------------------------------------------------------------------------
def _fmt(v: float | None) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def _settings_lines(settings: dict | None) -> list[str]:
    """Which model and options produced the predictions (a report without them cannot be attributed)."""
    if not settings:
        return []
    model = f"{settings['model']} ({settings['model_weights']})"
    extras = [f"{k} {settings[k]}" for k in ("adapter", "vision_file") if settings.get(k)]
    options = [f"{k} {settings[k]}" for k in ("sampling", "max_new_tokens", "seed", "batch", "resize_mode", "dtype")
               if settings.get(k) is not None]
    if settings.get("limit") is not None:  # a partial run: only the data's first items were asked and scored
        options.append(f"--limit {settings['limit']}")
    data = [f"Data: {', '.join(settings[k] for k in ('data', 'vqa_data') if settings.get(k))} (images under "
            f"{settings['images']}).", ""] if settings.get("data") else []
    return [f"Model: {', '.join([model, *extras])}.", "", *data, f"Options: {', '.join(options)}.", ""]


def to_markdown(report: dict) -> str:
    """One table row per metric entry."""
    lines = [f"# MedSIGHT evaluation: {report['task']}" + (f" ({report['benchmark']})" if report["benchmark"] else ""),
             "", *_settings_lines(report.get("settings")),
             f"Items: {report['n_items']}, scored: {report['n_scored']}, missing: {report['n_missing']}.", "",
             *([answer_type_line(report), ""] if answer_type_line(report) else []),
             "| metric | group | aggregate | value (%) | 95% CI | n | paper |", "|---|---|---|---|---|---|---|"]
    for r in report["metrics"]:
        ci = f"{_fmt(r['ci95'][0])}-{_fmt(r['ci95'][1])}"
        lines.append(f"| {r['metric']} | {r['group']} | {r['aggregate']} | {_fmt(r['value'])} | {ci} | {r['n']} | "
                     f"{_fmt(r['paper'])} |")
    lines += ["", "Notes:", *[f"- {n}" for n in report["notes"]], ""]
    return "\n".join(lines)


def _chart_rows(report: dict, metric: str) -> list[dict]:
    """The rows a metric's chart shows: per modality and per sample (none: the report has no such metric)."""
    return [r for r in report["metrics"] if r["metric"] == metric and r["aggregate"] != "macro_mean"]


def _chart(rows: list[dict], metric: str, path: Path) -> None:
    """Per-modality bars with CI whiskers, the paper's values beside them where the modality matches."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in tests
    import matplotlib.pyplot as plt

    labels = [r["group"] if r["aggregate"] == "mean" else "all (per sample)" for r in rows]
    values = [r["value"] for r in rows]
    err = np.array([[max(0.0, r["value"] - r["ci95"][0]), max(0.0, r["ci95"][1] - r["value"])] for r in rows]).T
    err = np.nan_to_num(err)
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(rows) + 2), 3.6))
    ax.bar(x - 0.2, values, 0.4, yerr=err, capsize=3, label="this run")
    paper = [r["paper"] for r in rows]
    if any(p is not None for p in paper):
        ax.bar(x + 0.2, [p if p is not None else 0 for p in paper], 0.4, label="paper (MedSIGHT)", alpha=0.7)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


CHART_METRICS = {"diagseg": ("dice", "recall"), "vqa": ("recall_all", "recall", "closed_accuracy"),
                 "mc": ("accuracy",)}


def report_file_names() -> list[str]:
    """Every file name `write_report` may write, for any task."""
    charts = dict.fromkeys(f"{metric}.png" for metrics in CHART_METRICS.values() for metric in metrics)
    return ["report.json", "report.md", *charts]


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """report.json, report.md and one PNG per headline metric the report has; returns the written paths.

    Written together (`replace_files`): a failed or interrupted write leaves the folder's previous report whole, and
    a chart of the previous report that this one has no rows for is removed, so no file describes another run."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md"}
    files = [(paths["json"], lambda p: p.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8"), ""),
             (paths["md"], lambda p: p.write_text(to_markdown(report), encoding="utf-8"), "")]
    stale = []
    for metric in CHART_METRICS.get(report["task"], ()):
        png = out / f"{metric}.png"
        rows = _chart_rows(report, metric)
        if rows:
            paths[metric] = png
            files.append((png, partial(_chart, rows, metric), ".png"))
        else:
            stale.append(png)
    replace_files(files)
    for png in stale:
        png.unlink(missing_ok=True)
    return paths
