"""Train the CPU demo model end to end: ``python -m medsight.demo.train_demo OUT_DIR [--minutes 60]``.

Steps (all under OUT_DIR):

1. ``data/``: the demo data set (`build_demo_data`, size "default"; "tiny" with ``--smoke``).
2. ``stage1`` ... ``stage5``, ``finish``: the five training stages (`medsight.train.stages`) on the "demo"
   preset, each starting from the previous stage's weights (its ``final/`` folder, recorded as the phase's
   ``init_from``; stage 1's random weights are saved in ``init/``), then a last stretch of stage 5 (`PHASES`). The ViT
   is trained in stage 1 (``train_vision``) because no pretrained UniMed-CLIP is available offline. Each phase
   gets a share of the wall-clock budget; its step count is derived from a short speed probe on a copy of the
   model, so the cosine schedule still ends on time.
3. After stage 2 the LVLM JSON's ``{code:<mask_id>}`` placeholders are filled from the trained codebook: for each
   GT mask, the code of its Hungarian-matched perceiver query under the sample's modality label
   (``data/lvlm/<split>_coded.json``).
4. ``model/``: the final checkpoint (our format) with ``MODEL_CARD.md``; ``report/``: the test-split evaluation
   (`medsight.demo.evaluate_demo`) and, except with ``--smoke``, the checks on the README's MNI152 volume
   (`medsight.demo.mni_checks`).

The language model reads a BPE tokenizer learned on the training conversations (`medsight.demo.tokenizer`), built
right after the data. ``--previous-run DIR`` (repeatable) lists earlier runs (their ``summary.json``) next to this
one in the model card, so runs with different ``--seed`` are reported together. ``--seed`` seeds the training
(initial weights, codebook, batch order); ``--data-seed`` the data, so runs with different training seeds are
scored on the same test split.

``--resume`` skips every phase whose ``final/`` folder exists (and reuses data and filled codes).
Vision features are frozen in stages 3-5, so their encodings are cached per image in one cache shared by those
stages (same values, less time).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medsight.commands.options import path_name
from medsight.config import MedSIGHTConfig, get_preset
from medsight.feature_cache import FeatureCache
from medsight.model.loading import build_model, load_pretrained, save_pretrained
from medsight.model.medsight import MedSIGHTModel
from medsight.model.preprocess import prepare_image
from medsight.train.data import read_mask, read_rgb
from medsight.train.losses import hungarian_match
from medsight.train.stages import (
    RUNNERS,
    Stage1Config,
    Stage2Config,
    Stage3Config,
    Stage4Config,
    Stage5Config,
)

from .build import build_demo_data
from .catalog import SOURCES, SPLITS, STRUCTURES
from .qa import balance_closed_answers, closed_question_items, fill_codes
from .samples import EMPTY_SLICE_P, MIN_LESION_CONTRAST
from .tokenizer import build_demo_tokenizer

log = logging.getLogger("medsight.demo.train_demo")

PRESET = "demo"
#: The training phases in order, with the stage each runs: the five stages, then "finish", a last stretch of
#: stage 5 at a lower learning rate on its data plus copies cut down to the closed questions (`_stage_data`).
PHASES = {"stage1": 1, "stage2": 2, "stage3": 3, "stage4": 4, "stage5": 5, "finish": 5}
#: Share of the training budget per phase (stage 1 matters most for Dice, stage 5 for the text). The language
#: model starts untrained, so stages 3-4 (which freeze it) teach little; stage 5 gets the time instead, and the
#: finish phase (where the yes/no answers still improved most per step) a larger part of it.
PHASE_SHARES = {"stage1": 0.41, "stage2": 0.03, "stage3": 0.02, "stage4": 0.07, "stage5": 0.29, "finish": 0.18}
#: The finish phase restarts the cosine schedule from this peak (stage 5 peaks at 1e-3): a lower rate after stage 5
#: improves the yes/no answers without losing Dice, which closed-question-only steps would cost.
FINISH_LR = 3e-4
#: Seconds kept aside after training for the evaluation (test split and MNI152 checks, about 30 s), writing the
#: checkpoint and a phase that overruns its estimate (stage 1 by up to a minute).
RESERVE_S = 180.0
PROBE_STEPS = 10  # fewer made the estimate noisy
CODE_BATCH = 16
ENCODING_CACHE_BYTES = 8 << 30  # every training image's encoding, kept through stages 3-5 (about 0.5 GB)
YES_NO_WEIGHT = 5.0
SMOKE_STEPS = 2
CARD_FILE = "MODEL_CARD.md"
INIT_DIR = "init"  # stage 1's starting weights (`train_demo`)


def stage_configs(smoke: bool) -> dict[int, object]:
    """The demo's stage settings; ``max_steps`` is filled in from the time budget (or SMOKE_STEPS)."""
    # init_from is set per phase (`train_demo`): the folder each phase really starts from.
    common = dict(device="cpu", seed=0, log_every=1)
    # Batches of 8 conversations with padded code slots (a named deviation, see `lvlm_losses`): more samples per
    # second than the official batch of 1, and the gradient of 8 answers per step.
    # Only the answers are labelled (a named deviation, `training_labels`): with the official rule the model also
    # learns "newline -> <|im_start|>" and opened answers on blank slices with a new chat header.
    lvlm = dict(batch_size=2 if smoke else 8, grad_accum=1, warmup_ratio=0.03, min_lr=1e-5, pad_code_slots=True,
                label_prompt_markup=False)
    return {
        1: Stage1Config(lr=6e-4, batch_size=2 if smoke else 8, warmup_ratio=0.03, min_lr=1e-5, train_vision=True,
                        **common),
        2: Stage2Config(lr=1e-3, batch_size=2 if smoke else 8, warmup_ratio=0.03, min_lr=1e-5, **common),
        3: Stage3Config(lr=1e-3, **lvlm, **common),
        4: Stage4Config(lr=1e-3, **lvlm, **common),
        # A yes/no answer's first token is its verdict; weighted x YES_NO_WEIGHT in the CE (deviation).
        5: Stage5Config(lr=1e-3, gradient_checkpointing=False, yes_no_weight=YES_NO_WEIGHT, **lvlm, **common),
    }


def demo_model_config(tokenizer) -> MedSIGHTConfig:
    """The "demo" preset sized for the demo data's classes (parts and whole organs) and ``tokenizer``'s vocabulary
    (the learned BPE merges sit between the chat specials and the region codes)."""
    config = get_preset(PRESET)
    config.perceiver.num_classes = len(STRUCTURES)
    config.llm.vocab_size = len(tokenizer)
    return config


# ----------------------------------------------------------------------------------------------------------------
# Region codes from the stage-2 codebook
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def mask_codes(model: MedSIGHTModel, data_root: Path, split: str) -> tuple[dict[str, str], dict]:
    """mask_id -> "M{m}_{k}" for every GT mask of a split, with collision statistics.

    Each image runs through the ViT and perceiver (training preprocessing: centre crop, fp32); its GT masks are
    Hungarian-matched to the 20 queries (the stage-1 criterion) and each matched query is quantised with the
    codebook of the image's modality label.
    """
    assert model.codebook is not None
    v = model.config.vision
    codes: dict[str, str] = {}
    images = collisions = 0
    per_class: dict[int, set[str]] = {}
    for source in SOURCES:
        doc = json.loads((data_root / source.key / f"{split}.json").read_text())
        by_image: dict[int, list[dict]] = {}
        for ann in doc["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        groups = list(by_image.values())
        for b in range(0, len(groups), CODE_BATCH):
            chunk = groups[b : b + CODE_BATCH]
            pixels = torch.stack([
                prepare_image(read_rgb(data_root / source.key / "images" / anns[0]["file_name"]), v.image_size,
                              v.image_mean, v.image_std, "crop")[0]
                for anns in chunk
            ])
            encoding = model.encode(pixels.to(model.device, model.dtype), round_pixels_to_bf16=False)
            out = model.region_perceiver(encoding.grid)
            for i, anns in enumerate(chunk):
                gt = torch.stack([read_mask(data_root / source.key / "masks" / a["mask_file"]) for a in anns])
                classes = torch.tensor([a["category_id"] for a in anns])
                pred_idx, gt_idx = hungarian_match(out.seg_logits[i].float(), out.class_logits[i].float(), gt,
                                                   classes)
                quant = model.codebook.quantize(out.queries[i], source.modality_label)
                names = {}
                for p, g in zip(pred_idx.tolist(), gt_idx.tolist(), strict=True):
                    names[anns[g]["mask_id"]] = f"M{quant.modality}_{int(quant.indices[p])}"
                    per_class.setdefault(int(anns[g]["category_id"]), set()).add(names[anns[g]["mask_id"]])
                codes.update(names)
                images += 1
                collisions += len(names) != len(set(names.values()))
    stats = {"images": images, "masks": len(codes), "images_with_shared_code": collisions,
             "distinct_codes": len(set(codes.values())),
             "codes_per_class": {str(c): len(s) for c, s in sorted(per_class.items())}}
    return codes, stats


def fill_split_codes(model: MedSIGHTModel, data_root: Path) -> dict:
    """Write ``lvlm/<split>_coded.json`` for every split; returns per-split code statistics."""
    stats = {}
    for split in SPLITS:
        codes, stats[split] = mask_codes(model, data_root, split)
        items = json.loads((data_root / "lvlm" / f"{split}.json").read_text())
        filled = fill_codes(items, codes.__getitem__)
        (data_root / "lvlm" / f"{split}_coded.json").write_text(json.dumps(filled, indent=1) + "\n")
    (data_root / "lvlm" / "code_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats


# ----------------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class StageReport:
    stage: int
    steps: int = 0
    seconds: float = 0.0
    budget_s: float = 0.0
    seconds_per_step: float = 0.0
    last_loss: float | None = None
    last_terms: dict = field(default_factory=dict)
    skipped: bool = False


def _seconds_per_step(records: Sequence[dict]) -> float:
    """The median step time: the first step carries one-off costs, and another process busy for a few seconds
    slowed the mean of a probe by a fifth and took 650 steps from stage 1."""
    if len(records) >= 3:
        return float(np.median(np.diff([r["time"] for r in records])))
    return records[-1]["time"] / max(1, len(records))


def _encoding_cache(stage: int, cache: FeatureCache) -> dict[str, FeatureCache]:
    """Stages 3-5 freeze the ViT and the perceiver, so they share the run's one cache of image encodings (keyword for
    the runner; it keys entries by those weights). Stages 1-2 train the vision side and take none."""
    return {"cache": cache} if stage >= 3 else {}


def probe_speed(stage: int, model: MedSIGHTModel, data, config, cache: FeatureCache) -> float:
    """Seconds per optimizer step, from a few steps on a throw-away copy of the model."""
    trial = copy.deepcopy(model)
    probe = copy.deepcopy(config)
    probe.max_steps, probe.save_every = PROBE_STEPS, 0
    with tempfile.TemporaryDirectory(prefix=f"medsight_probe{stage}_") as tmp:
        result = RUNNERS[stage](trial, data, probe, tmp, **_encoding_cache(stage, cache))
    # From stage 4 on, most images are already in the shared cache, as they will be in the run: a probe on a cold
    # cache overestimated stage 5's steps by a quarter and left that time unused.
    return _seconds_per_step(result.records)


def run_one_stage(stage: int, model: MedSIGHTModel, data, config, out_dir: Path, budget_s: float,
                  smoke: bool, cache: FeatureCache) -> StageReport:
    report = StageReport(stage, budget_s=budget_s)
    if smoke:
        config.max_steps = SMOKE_STEPS
    else:
        t0 = time.perf_counter()
        sps = probe_speed(stage, model, data, config, cache)
        spent = time.perf_counter() - t0
        report.seconds_per_step = sps
        config.max_steps = max(PROBE_STEPS, int((budget_s - spent) * 0.95 / sps))
        log.info("stage %d: %.2f s/step (probe %.0f s) -> %d steps for %.0f s", stage, sps, spent,
                 config.max_steps, budget_s)
    config.save_every = config.max_steps if smoke else max(1, config.max_steps // 3)  # intermediate checkpoints
    t0 = time.perf_counter()
    result = RUNNERS[stage](model, data, config, out_dir, **_encoding_cache(stage, cache))
    report.seconds = time.perf_counter() - t0
    report.steps = result.last_step
    if result.records:
        last = result.records[-1]
        report.last_loss = last.get("loss")
        report.last_terms = {k: round(v, 5) for k, v in last.items() if k not in ("step", "time")}
    return report


def _stage_data(phase: str, data_root: Path):
    stage = PHASES[phase]
    if stage <= 2:
        return data_root
    coded = data_root / "lvlm" / "train_coded.json"
    if stage < 5:
        return coded
    items = balance_closed_answers(json.loads(coded.read_text()))
    if phase == "finish":
        items += closed_question_items(items)
    path = data_root / "lvlm" / f"train_{phase}.json"
    path.write_text(json.dumps(items, indent=1) + "\n")
    return path


def _check_out(out: Path, resume: bool) -> None:
    """A folder holding an earlier demo run is refused before any work (rebuilding the data would cost minutes and
    the first stage would then refuse it anyway): --resume reuses its finished phases, else another folder."""
    earlier = [name for name in ("data", "model", *PHASES) if (out / name).exists()]
    if earlier and not resume:
        raise ValueError(f"{out} holds an earlier demo run ({', '.join(earlier)}): pass --resume to reuse its "
                         "finished phases, or give another output folder")


def train_all(out: Path, minutes: float, smoke: bool = False, seed: int = 0, resume: bool = False,
              start: float | None = None, data_size: str = "large",
              previous_runs: Sequence[Path] = (), data_seed: int = 0) -> dict:
    """Build data, run the five stages, fill codes, evaluate, write ``out/model``; returns the summary."""
    start = time.perf_counter() if start is None else start
    deadline = start + minutes * 60.0
    _check_out(out, resume)
    out.mkdir(parents=True, exist_ok=True)
    data_root = out / "data"
    summary: dict = {"preset": PRESET, "minutes": minutes, "smoke": smoke, "seed": seed, "data_seed": data_seed,
                     "data_size": "tiny" if smoke else data_size, "stages": {}}

    t0 = time.perf_counter()
    if not (resume and (data_root / "summary.json").is_file()):
        build_demo_data(data_root, "tiny" if smoke else data_size, data_seed)
    summary["data_seconds"] = round(time.perf_counter() - t0, 1)
    data_counts = json.loads((data_root / "summary.json").read_text())
    summary["images"] = {split: data_counts[split]["images"] for split in SPLITS}
    log.info("data ready in %s (%.0f s)", data_root, summary["data_seconds"])

    configs = stage_configs(smoke)
    reserve = 0.0 if smoke else RESERVE_S
    model: MedSIGHTModel | None = None
    source: Path | None = None  # the folder `model` was saved in, recorded as the next phase's init_from
    cache = FeatureCache(ENCODING_CACHE_BYTES)
    names = list(PHASES)
    for n, phase in enumerate(names):
        stage = PHASES[phase]
        final = out / phase / "final"
        if resume and final.is_dir():
            model, source = load_pretrained(final), final
            summary["stages"][phase] = {"skipped": True}
            log.info("%s: reusing %s", phase, final)
        else:
            if resume and (out / phase).is_dir():
                # An interrupted phase restarts from scratch (the trainer refuses a folder that holds a run).
                log.info("%s: restarting (its earlier run did not finish)", phase)
                shutil.rmtree(out / phase)
            if model is None:
                # The preset's random weights resized to the demo data and tokenizer, which no preset name builds:
                # saved, so that stage 1's recorded init_from is a folder train loads to these very weights ("demo"
                # names the shipped trained model).
                tokenizer = build_demo_tokenizer(json.loads((data_root / "lvlm" / "train.json").read_text()))
                source = save_pretrained(build_model(demo_model_config(tokenizer), tokenizer, seed=seed),
                                         out / INIT_DIR)
                model = load_pretrained(source)
            if stage == 2 and model.codebook is None:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    model.attach_codebook()
            config = copy.deepcopy(configs[stage])
            config.seed, config.init_from = seed, str(source)
            if phase == "finish":
                config.lr = FINISH_LR
            remaining = deadline - time.perf_counter() - reserve
            share = PHASE_SHARES[phase] / sum(PHASE_SHARES[p] for p in names[n:])
            report = run_one_stage(stage, model, _stage_data(phase, data_root), config, out / phase,
                                   max(30.0, remaining * share), smoke, cache)
            summary["stages"][phase] = report.__dict__
            log.info("%s done: %d steps in %.0f s, loss %s", phase, report.steps, report.seconds, report.last_loss)
            model, source = load_pretrained(final), final  # exactly what was saved (and frees the optimizer state)
        if phase == "stage2" and not (resume and (data_root / "lvlm" / "train_coded.json").is_file()):
            t0 = time.perf_counter()
            summary["codes"] = fill_split_codes(model, data_root)
            summary["code_seconds"] = round(time.perf_counter() - t0, 1)
            log.info("codes filled in %.0f s: %s", summary["code_seconds"], json.dumps(summary["codes"]["train"]))
        elif phase == "stage2":
            summary["codes"] = json.loads((data_root / "lvlm" / "code_stats.json").read_text())
    assert model is not None
    summary["train_seconds"] = round(time.perf_counter() - start, 1)

    model_dir = save_pretrained(model, out / "model")
    from .evaluate_demo import evaluate, write_report

    t0 = time.perf_counter()
    scores = evaluate(model_dir, data_root, **({"max_questions": 8, "max_new_tokens": 24} if smoke else {}))
    summary["eval_seconds"] = round(time.perf_counter() - t0, 1)
    if not smoke:
        from .evaluate_demo import training_vocabulary
        from .mni_checks import mni_checks

        t0 = time.perf_counter()
        scores["mni"] = mni_checks(load_pretrained(model_dir).to(torch.float32), training_vocabulary(data_root))
        summary["mni_seconds"] = round(time.perf_counter() - t0, 1)
    write_report(scores, out / "report")
    summary["scores"] = {k: v for k, v in scores.items() if k not in ("questions",)}
    summary["total_seconds"] = round(time.perf_counter() - start, 1)
    summary["runs"] = [*collect_runs(previous_runs), run_entry(summary)]
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    write_model_card(model_dir, summary)
    shutil.copy(out / "report" / "report.md", model_dir / "EVALUATION.md")
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Runs (one per seed) and the model card
# ----------------------------------------------------------------------------------------------------------------
def run_entry(summary: dict) -> dict:
    """One run's line for the model card: seed, budget, wall time and headline scores."""
    s = summary.get("scores", {})
    mni = s.get("mni") or {}
    unknown = s.get("unknown_word_answers") or {}
    return {
        "seed": summary.get("seed"), "data_seed": summary.get("data_seed", summary.get("seed")),
        "minutes": summary.get("minutes"), "data_size": summary.get("data_size"),
        "smoke": summary.get("smoke", False), "total_seconds": summary.get("total_seconds"),
        **{k: s.get(k) for k in ("dice_mean", "modality_accuracy", "yes_no_accuracy", "not_visible_accuracy")},
        "unknown_word_answers": unknown.get("with_unknown"), "answers": unknown.get("n"),
        "mni_white_matter_unknown_share": (mni.get("white_matter") or {}).get("share"),
        "mni_brain_dice": (mni.get("brain") or {}).get("dice_mean"),
    }


def collect_runs(folders: Sequence[Path]) -> list[dict]:
    """The runs recorded in earlier output folders' ``summary.json`` (each folder's own list, in order)."""
    runs: list[dict] = []
    for folder in folders:
        path = Path(folder) / "summary.json"
        if not path.is_file():
            raise FileNotFoundError(f"--previous-run {folder}: no summary.json (is it a finished train_demo output?)")
        summary = json.loads(path.read_text())
        runs += [r for r in summary.get("runs") or [run_entry(summary)] if r not in runs]
    return runs


def _runs_table(runs: Sequence[dict], this: dict) -> list[str]:
    """The runs as table rows; the row equal to ``this`` (the checkpoint's own `run_entry`) is marked."""

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f} %"

    def num(x):
        return "n/a" if x is None else f"{x:.3f}"

    lines = ["| seed | Dice | modality | yes/no | not visible | test answers with an unknown word | MNI152 white "
             "matter: unknown-word share | MNI152 brain Dice | minutes |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        mark = " (this checkpoint)" if r == this else ""
        lines.append(
            f"| {r.get('seed')}{mark} | {num(r.get('dice_mean'))} | {pct(r.get('modality_accuracy'))} | "
            f"{pct(r.get('yes_no_accuracy'))} | {pct(r.get('not_visible_accuracy'))} | "
            f"{r.get('unknown_word_answers', 'n/a')} of {r.get('answers', 'n/a')} | "
            f"{pct(r.get('mni_white_matter_unknown_share'))} | {num(r.get('mni_brain_dice'))} | "
            f"{(r.get('total_seconds') or 0) / 60:.0f} |")
    return lines


def _folder_mb(folder: Path) -> float:
    """The folder's size in MB (10**6 bytes, as the card and the README say MB)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 1e6


def _targets_line(scores: dict) -> str:
    """Which of the project's targets (`evaluate_demo.TARGETS`) the scores meet, in words."""
    from .evaluate_demo import MNI_BRAIN_DICE_MIN, MNI_UNKNOWN_SHARE_MAX, TARGETS

    def verdict(key: str) -> str:
        value = scores.get(key)
        return "met" if value is not None and value >= TARGETS[key] else "**not met**"

    unknown = (scores.get("unknown_word_answers") or {}).get("with_unknown")
    mni = scores.get("mni") or {}
    share = (mni.get("white_matter") or {}).get("share")
    brain = (mni.get("brain") or {}).get("dice_mean")

    def met(ok: bool | None) -> str:
        return "not run" if ok is None else "met" if ok else "**not met**"

    return ("Project targets: " + ", ".join(f"{key} >= {target}: {verdict(key)}" for key, target in TARGETS.items())
            + f", no test answer with an unknown word: {met(None if unknown is None else unknown == 0)}"
            + f", MNI152 white-matter answers with an unknown word <= {100 * MNI_UNKNOWN_SHARE_MAX:g} %: "
            + f"{met(None if share is None else share <= MNI_UNKNOWN_SHARE_MAX)}"
            + f", MNI152 brain Dice >= {MNI_BRAIN_DICE_MIN}: "
            + f"{met(None if brain is None else brain >= MNI_BRAIN_DICE_MIN)}"
            + ".")


def _tokenizer_words(vocab_size: int) -> str:
    merges = vocab_size - 259 - 576
    if merges == 0:
        return "a byte tokenizer (vocabulary 835 = 259 bytes/special tokens + 576 region codes)"
    return (f"a byte-level BPE tokenizer learned on the training conversations (`medsight.demo.tokenizer`; "
            f"vocabulary {vocab_size} = 259 bytes/special tokens + {merges} merges + 576 region codes; every answer "
            f"word is one or two tokens)")


def write_model_card(model_dir: Path, summary: dict) -> Path:
    cfg = json.loads((model_dir / "medsight_config.json").read_text())
    v, p, c, llm = cfg["vision"], cfg["perceiver"], cfg["codebook"], cfg["llm"]
    mask_size = MedSIGHTConfig.from_dict(cfg).mask_size
    s = summary.get("scores", {})

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f} %"

    lines = [
        "# MedSIGHT demo model (CPU-trained, synthetic data)",
        "",
        "**Not for clinical use.** This model was trained in about an hour on two CPU cores, on synthetic "
        "phantoms only. It exists to demonstrate and test the MedSIGHT pipeline and the 3D Slicer extension; "
        "its answers say nothing about real patients.",
        "",
        "## What it is",
        "",
        f"- Preset `demo`: ViT {v['layers']} layers x width {v['width']} on {v['image_size']} px images "
        f"(patch {v['patch_size']}, {v['image_size'] // v['patch_size']}x{v['image_size'] // v['patch_size']} grid), "
        f"Region Perceiver dim {p['dim']} ({p['num_queries']} queries, {p['num_stages']} stages -> "
        f"{mask_size} px masks, {p['num_classes']} classes), "
        f"codebook {c['num_modalities']} x {c['codebook_size']} codes of dim {c['code_dim']}, Qwen3-style LM "
        f"{llm['num_hidden_layers']} layers x hidden {llm['hidden_size']} on {_tokenizer_words(llm['vocab_size'])}.",
        "- Deviation from the published recipe: the ViT is trained from scratch in stage 1 (no pretrained "
        "UniMed-CLIP offline) and the language model is not pretrained either; learning rates are higher than the "
        "official ones and step counts are set by a wall-clock budget. Stages 3-5 use batches of 8 with padded code "
        "slots (`pad_code_slots`) and label the answers only, not the prompt's newlines and chat markers "
        f"(`label_prompt_markup`); stage 5 weights the verdict token of yes/no answers x{YES_NO_WEIGHT:g} in the "
        "cross-entropy (`yes_no_weight`), and repeats conversations with the rarer answer to a closed question "
        "until \"yes\" is about as frequent as \"no\" per modality and question kind (`balance_closed_answers`). "
        "A final phase (`finish`) continues stage 5 at a lower learning rate on the same data plus copies cut down "
        "to their closed questions (`closed_question_items`). The official recipe has batch 1, labelled prompt "
        "markup, no weighting, no repeats and no finish phase.",
        f"- Size: {_folder_mb(model_dir):.1f} MB, the whole folder (float32 safetensors, codebook included).",
        "",
        "## Data",
        "",
        "Synthetic, seeded and generated offline by `python -m medsight.demo` (`medsight.demo.build_demo_data`, "
        f"size `{summary.get('data_size', 'default')}`, seed {summary.get('data_seed', 0)}): abdominal CT phantoms "
        "(liver, spleen, kidneys, liver lesions; modality "
        "label 0), T1 brain MRI built on the MNI152 template with synthetic lesions (grey/white matter, lesion; "
        "label 1) and chest X-ray-like images (lungs, heart, nodules; label 2). Split by subject into "
        f"train/val/test ({'/'.join(str(n) for n in summary.get('images', {}).values())} images at "
        f"{v['image_size']} px). Region codes in the answers come from the "
        "trained stage-2 codebook (Hungarian-matched query of each GT mask, quantised under the modality label). "
        "Every VQA conversation opens with a closed question (lesion presence or organ visibility, with \"no\" as "
        "likely as \"yes\" for organs when the slice allows both; every closed answer opens with its verdict) and half "
        f"the segmentation ones add one. Each CT and MRI subject also gives, with probability {EMPTY_SLICE_P:g}, one "
        "slice beyond its anatomy, where every structure asked for is \"not visible\" and every closed answer is "
        "\"no\". A lesion "
        f"is labelled only where it stands out in the displayed slice (mean grey level >= {MIN_LESION_CONTRAST:g} "
        "standard deviations from a ring around it); slices that cut a lesion too thinly or too faintly are left "
        "out. Whole organs (brain = grey matter + white matter + lesion, both lungs, both kidneys) are segmentation "
        "targets of their own, their masks the union of the parts'; a segmentation question about a structure the "
        "slice lacks, another source's or one the data never shows is answered \"The ... is not visible in this "
        "image.\"",
        "",
        "## Training",
        "",
        "`python -m medsight.demo.train_demo OUT_DIR --minutes "
        f"{summary.get('minutes')} --data-size {summary.get('data_size', 'default')}` (one command: data, five "
        "stages and the finish phase, codes, evaluation, this folder).",
        "",
        "| phase | trains | steps | seconds | last loss |",
        "|---|---|---|---|---|",
    ]
    trains = {"stage1": "ViT + Region Perceiver", "stage2": "codebook + modality predictor",
              "stage3": "mm_projector", "stage4": "token_projection + code embeddings",
              "stage5": "language model + projectors",
              "finish": f"stage 5 at lr {FINISH_LR:g}, plus closed-question-only copies"}
    for phase in PHASES:
        st = summary["stages"].get(phase, {})
        loss = st.get("last_loss")
        lines.append(f"| {phase} | {trains[phase]} | {st.get('steps', 'reused')} | {st.get('seconds', 0):.0f} | "
                     f"{'n/a' if loss is None else f'{loss:.4f}'} |")
    lines += [
        "",
        f"Total wall time of the command: {summary.get('total_seconds', 0):.0f} s "
        f"(training incl. data and codes: {summary.get('train_seconds', 0):.0f} s).",
        "",
        "## Runs",
        "",
        "Every run of the training command recorded with this one (`--previous-run`), in the order they ran (same "
        "data size, budget and data seed, different `--seed`):",
        "",
        *_runs_table(summary.get("runs") or [run_entry(summary)], run_entry(summary)),
        "",
        "## Scores on the held-out test split",
        "",
        f"- Mean Dice on segmentation questions: **{s.get('dice_mean', float('nan')):.3f}** "
        f"({s.get('n_segmentation', 0)} questions; union of the answer's masks vs union of the GT masks the "
        "question asks for, logits resized bilinearly to the image and thresholded at 0; no code -> Dice 0).",
        f"- Modality accuracy: **{pct(s.get('modality_accuracy'))}** ({s.get('n_modality', 0)} questions; the "
        "answer must name the right modality and no other).",
        f"- Yes/no accuracy: **{pct(s.get('yes_no_accuracy'))}** ({s.get('n_yes_no', 0)} lesion-presence and "
        "organ-visibility questions).",
        "",
        "Each question is asked alone with its image through `MedSIGHTModel.generate` with the default greedy "
        "decoding, region codes decoded from the model's `code_state_position`; see `EVALUATION.md` for the "
        "per-structure table.",
        "",
        _targets_line(s),
        "",
        "## Limits",
        "",
        "- Synthetic data only; no real anatomy variability, scanners or pathology. Do not use on patients.",
        "- Fixed answer templates; the language model knows nothing beyond them.",
        f"- 2D slices at {v['image_size']} px; small lesions are coarse at the {mask_size} px mask resolution.",
    ]
    path = model_dir / CARD_FILE
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medsight.demo.train_demo",
                                description="Build the demo data, train the demo model through all five stages, "
                                            "evaluate it and write a checkpoint with a model card.")
    p.add_argument("out_dir", type=path_name)
    p.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget of the whole command")
    p.add_argument("--smoke", action="store_true", help="tiny data and a few steps per stage (tests)")
    p.add_argument("--seed", type=int, default=0, help="training seed: initial weights, codebook, batch order")
    p.add_argument("--data-seed", type=int, default=0, help="demo data seed (the same test split for every --seed)")
    p.add_argument("--resume", action="store_true", help="reuse finished stages (their final/ folders)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--data-size", default="large", choices=("default", "large"),
                   help="demo data size (medsight.demo.build.SIZES); --smoke always uses tiny")
    p.add_argument("--previous-run", type=path_name, action="append", default=[], metavar="DIR",
                   help="an earlier output folder whose runs the model card lists with this one (repeatable)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    start = time.perf_counter()
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    for noisy in ("medsight.train.loop",):
        logging.getLogger(noisy).setLevel(logging.WARNING if args.smoke else logging.INFO)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        summary = train_all(args.out_dir, args.minutes, args.smoke, args.seed, args.resume, start, args.data_size,
                            args.previous_run, args.data_seed)
    except ValueError as err:  # what the user gave (folder, data, settings): one line, not a traceback
        print(f"train_demo: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"model": str(args.out_dir / "model"), "total_seconds": summary["total_seconds"],
                      **summary["scores"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
