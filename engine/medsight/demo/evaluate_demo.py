"""Evaluate a demo model on the demo test split: ``python -m medsight.demo.evaluate_demo MODEL DATA --report DIR``.

Every question of the test LVLM JSON (``lvlm/test.json``; placeholders are fine, only the GT masks and reference
answers are read) is asked alone with its image, with the default greedy decoding:

* segmentation questions: Dice between the union of the answer's masks and the union of the GT masks the reference
  answer mentions. Mask logits are resized bilinearly onto the image grid and thresholded at 0 (as in the official
  DiagSeg evaluation); an answer without a code scores 0. ``dice_mean`` decodes each code from the model's own
  ``code_state_position`` (what `medsight.Engine` does by default: "at" for models trained by `medsight.train`),
  ``dice_mean_other`` from the other position ("before" is the official inference path).
* modality questions: correct when the answer names the sample's modality and no other.
* yes/no questions (lesion presence, organ visibility): the answer's yes/no (a leading "yes"/"no", or "... so the
  answer is no") must equal the reference's.
* diagnosis questions (extra): correct when the answer and reference agree on "lesion" vs "no abnormality".
* not-visible questions (a segmentation question whose reference is "The X is not visible in this image."):
  correct when the answer says so and carries no region code.
* every answer: the words (letter runs) it has that never occur in the training answers (``lvlm/train.json``);
  such an answer is garbled, whatever else it says. Counted per question kind (``unknown_word_answers``).

``--mni`` adds the checks on the README's MNI152 volume (`mni_checks`): the white-matter question over every
axial, coronal and sagittal slice (share of answers with an unknown word) and "Segment the brain." Dice against
nilearn's MNI152 brain mask on the axial slices through the brain.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medsight.commands.options import path_name
from medsight.engine import Engine
from medsight.evaluate.metrics import dice
from medsight.model.generation import GenerationOptions
from medsight.model.loading import load_pretrained
from medsight.model.medsight import MedSIGHTModel
from medsight.train.data import read_mask, read_rgb

from .catalog import SOURCES
from .mni_checks import mni_checks, mni_markdown
from .qa import DIAG_Q, MODALITY_Q, NOT_VISIBLE, PLACEHOLDER, answer_vocabulary, closed_kind, words

MAX_NEW_TOKENS = 160  # the longest demo answer (all structures of a CT slice) is ~130 bytes
_YES = re.compile(r"^\W*yes\b", re.IGNORECASE)
_NO = re.compile(r"^\W*no\b|\bthe answer is no\b", re.IGNORECASE)


def question_kind(question: str) -> str:
    q = question.strip()
    if q in MODALITY_Q:
        return "modality"
    kind = closed_kind(q)
    if kind is not None:
        return kind
    if q in DIAG_Q:
        return "diagnosis"
    return "segmentation"


def yes_no(text: str) -> str | None:
    if _YES.search(text):
        return "yes"
    if _NO.search(text):
        return "no"
    return None


def modality_correct(text: str, label: int) -> bool:
    low = text.lower()
    named = {s.modality_label for s in SOURCES if s.modality_name.lower() in low}
    return named == {label}


def _union(regions, shape) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    for r in regions:
        out |= r.mask
    return out


def _resolve(data_root: Path, rel: str) -> Path:
    return data_root / rel


def evaluate(model_dir: str | Path | MedSIGHTModel, data_dir: str | Path, split: str = "test",
             max_questions: int | None = None, max_new_tokens: int = MAX_NEW_TOKENS,
             batch_size: int = 16) -> dict:
    """Scores of a demo model on a demo data split (see the module docstring); ``questions`` lists every answer."""
    model = model_dir if isinstance(model_dir, MedSIGHTModel) else load_pretrained(model_dir)
    engine = Engine(model.to(torch.float32).eval())  # the product's code path; its cache encodes each image once
    data_root = Path(data_dir)
    items = json.loads((data_root / "lvlm" / f"{split}.json").read_text())
    vocabulary = training_vocabulary(data_root)
    position = model.config.code_state_position
    default = GenerationOptions(max_new_tokens=max_new_tokens)
    other = GenerationOptions(max_new_tokens=max_new_tokens,
                              hidden_state_position="before" if position == "at" else "at")
    t0 = time.perf_counter()
    # Every question with its image, then the images of one question in batches (the LM is small: per-step
    # overhead dominates, and one ask batches the same question over many images).
    jobs = []
    images: dict[str, np.ndarray] = {}
    for item in items:
        if item["image"] not in images:
            images[item["image"]] = read_rgb(_resolve(data_root, item["image"]))
        conv = item["conversations"]
        for j in range(0, len(conv) - 1, 2):
            if max_questions is not None and len(jobs) >= max_questions:
                break
            question = conv[j]["value"].replace("<image>", "").strip()
            jobs.append((item, question, conv[j + 1]["value"]))
    by_question: dict[str, list[int]] = defaultdict(list)
    for n, (_, question, _) in enumerate(jobs):
        by_question[question].append(n)
    records: list[dict | None] = [None] * len(jobs)
    for question, numbers in by_question.items():
        segmentation = question_kind(question) == "segmentation"
        for b in range(0, len(numbers), batch_size):
            chunk = numbers[b : b + batch_size]
            pictures = [images[jobs[n][0]["image"]] for n in chunk]
            answers = engine.ask(pictures, question, default)
            # The other state position decodes the same greedy text differently: only the masks are needed.
            others = engine.ask(pictures, question, other) if segmentation else [None] * len(chunk)
            for n, answer, answer_other in zip(chunk, answers, others, strict=True):
                item, _, reference = jobs[n]
                records[n] = _score(answer, answer_other, images[item["image"]], item, question, reference,
                                    data_root)
                records[n]["unknown_words"] = sorted(words(answer.text) - vocabulary)
    return {"split": split, "code_state_position": position, **summarise(records, time.perf_counter() - t0)}


def training_vocabulary(data_root: str | Path) -> set[str]:
    """The words of the training answers of a demo data folder (`qa.answer_vocabulary`)."""
    return answer_vocabulary(json.loads((Path(data_root) / "lvlm" / "train.json").read_text()))


def _score(answer, answer_other, image, item, question, reference, data_root):
    kind = question_kind(question)
    if kind == "segmentation" and NOT_VISIBLE in reference:
        kind = "not_visible"
    rec = {"id": item["id"], "kind": kind, "question": question, "reference": reference, "answer": answer.text,
           "modality_label": item["modality_label"], "codes": [r.code for r in answer.regions]}
    if kind == "segmentation":
        ids = PLACEHOLDER.findall(reference)
        files = item.get("mask_files") or {}
        gt = np.zeros(image.shape[:2], dtype=bool)
        for m in ids:
            gt |= read_mask(_resolve(data_root, files[m])).numpy() > 0.5
        rec.update(
            structures=sorted({_structure_of(m, item) for m in ids}),
            dice=dice(_union(answer.regions, gt.shape), gt) if answer.regions else 0.0,
            dice_other=dice(_union(answer_other.regions, gt.shape), gt) if answer_other.regions else 0.0,
            n_gt=len(ids), n_pred=len(answer.regions),
        )
    elif kind == "not_visible":
        rec["correct"] = NOT_VISIBLE in answer.text and not answer.regions
    elif kind == "modality":
        rec["correct"] = modality_correct(answer.text, item["modality_label"])
    elif kind in ("presence", "visible"):
        rec["expected"], rec["predicted"] = yes_no(reference), yes_no(answer.text)
        rec["correct"] = rec["expected"] == rec["predicted"]
    else:
        low = answer.text.lower()
        expected = "no abnormality" not in reference.lower()
        predicted = "no abnormality" not in low and ("lesion" in low or "nodule" in low)
        rec["correct"] = expected == predicted
    return rec


def _structure_of(mask_id: str, item: dict) -> str:
    """The structure name of a mask id ``<sample_id>_<structure with underscores>``."""
    sample_id = item["id"].rsplit("_q", 1)[0]
    return mask_id[len(sample_id) + 1 :].replace("_", " ")


def _mean(values) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def summarise(records: list[dict], seconds: float = 0.0) -> dict:
    seg = [r for r in records if r["kind"] == "segmentation"]
    mod = [r for r in records if r["kind"] == "modality"]
    yn = [r for r in records if r["kind"] in ("presence", "visible")]
    diag = [r for r in records if r["kind"] == "diagnosis"]
    absent = [r for r in records if r["kind"] == "not_visible"]
    per_structure = defaultdict(list)
    per_source = defaultdict(list)
    names = {s.modality_label: s.key for s in SOURCES}
    for r in seg:
        per_structure[r["structures"][0] if len(r["structures"]) == 1 else "several structures"].append(r["dice"])
        per_source[names.get(r["modality_label"], str(r["modality_label"]))].append(r["dice"])
    return {
        "dice_mean": _mean(r["dice"] for r in seg),
        "dice_mean_other": _mean(r["dice_other"] for r in seg),
        "modality_accuracy": _mean(r["correct"] for r in mod),
        "yes_no_accuracy": _mean(r["correct"] for r in yn),
        "presence_accuracy": _mean(r["correct"] for r in yn if r["kind"] == "presence"),
        "visible_accuracy": _mean(r["correct"] for r in yn if r["kind"] == "visible"),
        "diagnosis_accuracy": _mean(r["correct"] for r in diag),
        "not_visible_accuracy": _mean(r["correct"] for r in absent),
        "unknown_word_answers": unknown_word_counts(records),
        "answers_with_codes": _mean(r["n_pred"] > 0 for r in seg),
        "n_segmentation": len(seg), "n_modality": len(mod), "n_yes_no": len(yn), "n_diagnosis": len(diag),
        "n_not_visible": len(absent),
        "dice_per_structure": {k: {"mean": _mean(v), "n": len(v)} for k, v in sorted(per_structure.items())},
        "dice_per_source": {k: {"mean": _mean(v), "n": len(v)} for k, v in sorted(per_source.items())},
        "seconds": round(seconds, 1),
        "questions": records,
    }


def unknown_word_counts(records: list[dict]) -> dict:
    """Answers with a word outside the training answers (``unknown_words`` of each record), in all and per
    question kind: ``{"n", "with_unknown", "share", "examples", "per_kind": {kind: {"n", "with_unknown"}}}``."""
    per_kind: dict[str, dict[str, int]] = {}
    for r in records:
        counts = per_kind.setdefault(r["kind"], {"n": 0, "with_unknown": 0})
        counts["n"] += 1
        counts["with_unknown"] += bool(r.get("unknown_words"))
    n, bad = len(records), sum(bool(r.get("unknown_words")) for r in records)
    examples = [r["answer"] for r in records if r.get("unknown_words")][:5]
    return {"n": n, "with_unknown": bad, "share": bad / n if n else None, "examples": examples,
            "per_kind": dict(sorted(per_kind.items()))}


#: The demo model's targets (issue 22) on the test split; and no test answer with a word outside the training answers.
TARGETS = {"dice_mean": 0.82, "modality_accuracy": 0.97, "yes_no_accuracy": 0.92}
#: On the README's MNI152 volume (`mni_checks`): at most this share of white-matter answers with an unknown word,
#: and at least this "Segment the brain." Dice.
MNI_UNKNOWN_SHARE_MAX = 0.01
MNI_BRAIN_DICE_MIN = 0.85


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def markdown(scores: dict) -> str:
    position = scores.get("code_state_position", "before")
    other = "before" if position == "at" else "at"
    rows = [
        (f"Mean Dice, segmentation questions (model default: state {position} the code)", "dice_mean",
         "n_segmentation"),
        (f"Mean Dice, state {other} the code", "dice_mean_other", "n_segmentation"),
        ("Modality accuracy", "modality_accuracy", "n_modality"),
        ("Yes/no accuracy (presence + visibility)", "yes_no_accuracy", "n_yes_no"),
        ("  lesion presence", "presence_accuracy", None),
        ("  organ visibility", "visible_accuracy", None),
        ("Diagnosis agreement (lesion vs none)", "diagnosis_accuracy", "n_diagnosis"),
        ("Not-visible structures answered as such", "not_visible_accuracy", "n_not_visible"),
        ("Segmentation answers with at least one code", "answers_with_codes", None),
    ]
    lines = [f"# Demo model evaluation ({scores.get('split', 'test')} split)", "", "| metric | value | target | n |",
             "|---|---|---|---|"]
    for title, key, n in rows:
        target = TARGETS.get(key)
        lines.append(f"| {title} | {_fmt(scores.get(key))} | {'>= ' + str(target) if target else ''} | "
                     f"{scores.get(n, '') if n else ''} |")
    lines += ["", "| structure | mean Dice | n |", "|---|---|---|"]
    for name, v in scores["dice_per_structure"].items():
        lines.append(f"| {name} | {_fmt(v['mean'])} | {v['n']} |")
    lines += ["", "| source | mean Dice | n |", "|---|---|---|"]
    for name, v in scores["dice_per_source"].items():
        lines.append(f"| {name} | {_fmt(v['mean'])} | {v['n']} |")
    unknown = scores.get("unknown_word_answers")
    if unknown:
        lines += ["", "Answers with a word that never occurs in the training answers:", "",
                  "| question kind | answers | with such a word |", "|---|---|---|"]
        for kind, v in unknown["per_kind"].items():
            lines.append(f"| {kind} | {v['n']} | {v['with_unknown']} |")
        lines.append(f"| all | {unknown['n']} | {unknown['with_unknown']} |")
        lines += [f"- `{a}`" for a in unknown["examples"]]
    if scores.get("mni"):
        lines += ["", mni_markdown(scores["mni"])]
    lines += ["", f"Evaluation time: {scores.get('seconds', 0):.0f} s.", ""]
    return "\n".join(lines)


def plot(scores: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    keys = ["dice_mean", "modality_accuracy", "yes_no_accuracy", "diagnosis_accuracy"]
    labels = ["Dice", "modality", "yes/no", "diagnosis"]
    values = [scores.get(k) or 0.0 for k in keys]
    axes[0].bar(labels, values, color=["tab:blue", "tab:green", "tab:orange", "tab:gray"])
    for i, k in enumerate(keys):
        if k in TARGETS:
            axes[0].hlines(TARGETS[k], i - 0.4, i + 0.4, colors="red", linestyles="dashed")
    axes[0].set_ylim(0, 1)
    axes[0].set_title("test split (red: target)")
    per = scores["dice_per_structure"]
    axes[1].barh(list(per), [v["mean"] or 0.0 for v in per.values()], color="tab:blue")
    axes[1].set_xlim(0, 1)
    axes[1].set_title("Dice per structure")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(scores: dict, report_dir: str | Path) -> Path:
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown(scores))
    (out / "scores.json").write_text(json.dumps(scores, indent=1) + "\n")
    plot(scores, out / "scores.png")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m medsight.demo.evaluate_demo",
                                description="Evaluate a demo model on the demo test split.")
    p.add_argument("model", type=path_name, help="model folder (save_pretrained format)")
    p.add_argument("data", type=path_name, help="demo data folder (python -m medsight.demo)")
    p.add_argument("--report", type=path_name, help="write report.md, scores.json and scores.png here")
    p.add_argument("--split", default="test")
    p.add_argument("--max-questions", type=int)
    p.add_argument("--mni", action="store_true",
                   help="also run the checks on the README's MNI152 volume (medsight.demo.mni_checks)")
    args = p.parse_args(argv)
    scores = evaluate(args.model, args.data, args.split, args.max_questions)
    if args.mni:
        scores["mni"] = mni_checks(load_pretrained(args.model).to(torch.float32), training_vocabulary(args.data))
    if args.report:
        write_report(scores, args.report)
    print(markdown(scores))
    return 0


if __name__ == "__main__":
    # A missing model or data folder is one line naming the file, as for `medsight eval`, not a traceback.
    from medsight.commands.errors import run_command

    sys.exit(run_command(main, "python -m medsight.demo.evaluate_demo"))
