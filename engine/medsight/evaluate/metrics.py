"""Evaluation metrics compatible with the official MedSIGHT / LLaVA-Med scripts, plus strict variants.

Official-compatible: `normalize_word`, the open-question word metrics of `run_eval.py` (whose "exact match" is a
precision-like score), the closed yes/no substring rule, NLTK-style sentence BLEU, the difflib multiple-choice rule
of `run_eval_mc.py` and the notebooks' Dice. Strict: a real exact match and a parsed yes/no accuracy, reported
beside the official numbers because the official rules reward answers a reader would call wrong.
"""

from __future__ import annotations

import difflib
import math
import re
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

ARTICLES = frozenset({"a", "an", "the"})
#: Apostrophe-less spellings -> standard contractions (the official map points the same way, so "dont" and
#: "don't" become one word).
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "couldve": "could've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "im": "i'm", "ive": "i've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "lets": "let's",
    "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "shant": "shan't", "shed": "she'd", "shes": "she's", "shouldnt": "shouldn't", "shouldve": "should've",
    "thats": "that's", "thered": "there'd", "theres": "there's", "theyd": "they'd", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "wasnt": "wasn't", "werent": "weren't", "weve": "we've",
    "whats": "what's", "whens": "when's", "wheres": "where's", "whos": "who's", "whove": "who've",
    "whys": "why's", "wont": "won't", "wouldnt": "wouldn't", "wouldve": "would've", "youd": "you'd",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
# A period is kept only with a digit on both sides ("2.5 cm"); sentence periods and abbreviations go.
_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")
DICE_EPS = 1e-8


def normalize_word(text: str) -> str:
    """Lower-case, strip `/`, `"`, commas and periods not between digits, drop articles, expand contractions."""
    text = str(text).lower()
    for ch in ('/', '"', ","):
        text = text.replace(ch, "")
    text = _PERIOD.sub("", text)
    words = [CONTRACTIONS.get(w, w) for w in text.split() if w not in ARTICLES]
    return " ".join(words)


# -- open questions ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpenScores:
    """Word metrics of one open answer, each in [0, 1]."""

    exact_match: float  # official "exact match": distinct GT words found / prediction tokens (NOT exact)
    precision: float
    recall: float
    f1: float
    bleu: float
    bleu1: float
    bleu2: float
    bleu3: float
    strict_exact: float  # 1 if the normalised strings are equal


def official_exact_match(pred: str, gt: str) -> float:
    """(# distinct normalised GT words present among the prediction tokens) / (# prediction tokens)."""
    p, g = normalize_word(pred).split(), normalize_word(gt).split()
    if not p:
        return 0.0
    present = set(p)
    return sum(1 for w in set(g) if w in present) / len(p)


def precision_recall_f1(pred: str, gt: str) -> tuple[float, float, float]:
    """Token precision, recall and F1; tp counts prediction tokens whose word is in the GT (as officially)."""
    p, g = Counter(normalize_word(pred).split()), Counter(normalize_word(gt).split())
    if not p:
        return 0.0, 0.0, 0.0
    tp = sum(n for w, n in p.items() if w in g)
    fp = sum(n for w, n in p.items() if w not in g)
    fn = sum(n for w, n in g.items() if w not in p)
    if tp == 0:
        return 0.0, 0.0, 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return precision, recall, 2 * precision * recall / (precision + recall)


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def sentence_bleu(reference: Sequence[str], hypothesis: Sequence[str],
                  weights: Sequence[float] = (0.25, 0.25, 0.25, 0.25)) -> float:
    """Sentence BLEU with one reference, as NLTK's `sentence_bleu` without smoothing (its default).

    Clipped n-gram precisions, brevity penalty exp(1 - r/c) when c <= r, 0 when no unigram matches; a zero
    higher-order precision is replaced by the smallest positive float (NLTK's method0), so the score becomes
    vanishingly small rather than exactly 0.
    """
    hyp, ref = list(hypothesis), list(reference)
    precisions = []
    for n in range(1, len(weights) + 1):
        h, r = _ngrams(hyp, n), _ngrams(ref, n)
        numerator = sum(min(c, r[g]) for g, c in h.items())
        denominator = max(1, sum(h.values()))
        precisions.append((numerator, denominator))
    if precisions[0][0] == 0:
        return 0.0
    c, r = len(hyp), len(ref)
    bp = 1.0 if c > r else math.exp(1 - r / c)
    # NLTK's method0: a zero precision becomes the smallest positive float instead of log(0).
    logs = [math.log(num / den if num else sys.float_info.min) for num, den in precisions]
    log_sum = math.fsum(w * lg for w, lg in zip(weights, logs, strict=True))
    return bp * math.exp(log_sum)


#: Weights of BLEU and BLEU-1/2/3: BLEU-n is the individual n-gram score (one weight at n), as in LLaVA-Med.
BLEU_WEIGHTS: dict[str, tuple[float, ...]] = {
    "bleu": (0.25, 0.25, 0.25, 0.25), "bleu1": (1.0, 0.0, 0.0, 0.0), "bleu2": (0.0, 1.0, 0.0, 0.0),
    "bleu3": (0.0, 0.0, 1.0, 0.0),
}


def open_scores(pred: str, gt: str) -> OpenScores:
    """All open-question metrics of one prediction (BLEU on normalised whitespace tokens)."""
    p, g = normalize_word(pred), normalize_word(gt)
    precision, recall, f1 = precision_recall_f1(pred, gt)
    bleu = {k: sentence_bleu(g.split(), p.split(), w) for k, w in BLEU_WEIGHTS.items()}
    return OpenScores(official_exact_match(pred, gt), precision, recall, f1, bleu["bleu"], bleu["bleu1"],
                      bleu["bleu2"], bleu["bleu3"], float(p == g))


# -- closed questions ----------------------------------------------------------------------------------------------
def is_closed(answer_type: str | None) -> bool:
    """The official branch test: the answer type starts with "close" (CLOSED, closed, close-ended...)."""
    return str(answer_type or "").strip().lower().startswith("close")


def closed_hit(pred: str, gt: str) -> float:
    """Official yes/no rule: if "yes" or "no" occurs anywhere (even inside "normal"), hit = GT is a substring."""
    p, g = normalize_word(pred), normalize_word(gt)
    if "yes" in p or "no" in p:
        return float(g in p)
    return 0.0


def parse_yes_no(text: str) -> str | None:
    """The first whole word "yes" or "no" of the answer, or None."""
    for word in re.findall(r"[a-z']+", normalize_word(text)):
        if word in ("yes", "no"):
            return word
    return None


def strict_closed_hit(pred: str, gt: str) -> float:
    """1 when the first yes/no word of the prediction equals the GT's (0 when the prediction has none); a closed GT
    that is no yes/no answer ("left", "MRI": SLAKE and VQA-RAD have many) needs the whole normalised answer, so
    such items are not all scored 0."""
    g = parse_yes_no(gt)
    if g is None:
        return float(normalize_word(pred) == normalize_word(gt))
    return float(parse_yes_no(pred) == g)


# -- multiple choice -----------------------------------------------------------------------------------------------
OPTION_KEYS = ("option_A", "option_B", "option_C", "option_D")


def options_of(item: Mapping) -> list[str]:
    """option_A and option_B, plus option_C / option_D when present (as the official script)."""
    return [str(item[k]) for k in OPTION_KEYS if k in item and item[k] is not None]


def most_similar(text: str, options: Sequence[str]) -> int | None:
    """Index of the option with the highest difflib ratio against `text` (first one on ties), or None when every
    ratio is 0 (an empty answer, or one sharing no character with any option), as the official search for a ratio
    above 0 finds none."""
    if not options:
        raise ValueError("no options to choose from")
    ratios = [difflib.SequenceMatcher(None, text, o).ratio() for o in options]
    return int(np.argmax(ratios)) if max(ratios) > 0 else None


def mc_hit(pred: str, gt_answer: str, options: Sequence[str]) -> float:
    """1 when the option closest to the raw prediction is the option closest to the GT answer (an answer like no
    option is a miss, unless the GT answer is like none either: the official comparison of two Nones)."""
    return float(most_similar(pred, options) == most_similar(gt_answer, options))


# -- segmentation --------------------------------------------------------------------------------------------------
def binarize_logits(logits: torch.Tensor | np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(K, m, m) logits -> (K, H, W) bool: bilinear resize (align_corners=False), then logit > 0."""
    t = torch.as_tensor(np.asarray(logits) if isinstance(logits, np.ndarray) else logits).float()
    if t.ndim == 2:
        t = t[None]
    if t.shape[0] == 0:
        return np.zeros((0, *shape), dtype=bool)
    resized = F.interpolate(t[None], size=tuple(shape), mode="bilinear", align_corners=False)[0]
    return (resized > 0).numpy()


def dice(pred: np.ndarray, gt: np.ndarray, eps: float = DICE_EPS) -> float:
    """(2|P∩G| + eps) / (|P| + |G| + eps), the DiagSeg notebooks' formula: two empty masks score 1.

    (The stage-1 `evaluate_segmentation.py` put eps in the denominator only; that script never ran.)
    """
    p, g = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if p.shape != g.shape:
        raise ValueError(f"mask shapes differ: prediction {p.shape}, ground truth {g.shape}")
    return float((2.0 * np.logical_and(p, g).sum() + eps) / (p.sum() + g.sum() + eps))


def item_dice(pred_masks: np.ndarray, gt: np.ndarray) -> float:
    """Mean Dice over the answer's channels (K, H, W) against one GT union; 0 when no mask was predicted."""
    if len(pred_masks) == 0:
        return 0.0
    return float(np.mean([dice(m, gt) for m in pred_masks]))


def dice_from_logits(logits: torch.Tensor | np.ndarray, gt: np.ndarray) -> float:
    """The notebooks' per-item Dice: resize the (K, m, m) logits to the GT grid, threshold at 0, average."""
    gt = np.asarray(gt, dtype=bool)
    return item_dice(binarize_logits(logits, gt.shape), gt)


# -- aggregation and confidence intervals --------------------------------------------------------------------------
MODALITY_ALIASES = {"dermatoscopy": "Dermoscopy"}


def canonical_modality(name: str | None) -> str:
    """Merge official spellings (Dermatoscopy -> Dermoscopy, as `--modality_split` does)."""
    if name is None or str(name).strip() == "":
        return "unknown"
    return MODALITY_ALIASES.get(str(name).strip().lower(), str(name).strip())


def bootstrap_ci(values: Sequence[float], stat: Callable[[np.ndarray], float] = np.mean, n_boot: int = 1000,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of `stat` over the items (seeded, so reports are reproducible)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return (math.nan, math.nan)
    if x.size == 1 or n_boot < 1:
        v = float(stat(x))
        return (v, v)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    stats = np.array([stat(x[row]) for row in idx])
    alpha = (1 - level) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


def macro_mean(values: Sequence[float], groups: Sequence[str]) -> float:
    """Mean of the per-group means (each modality counts once, however many items it has)."""
    by: dict[str, list[float]] = {}
    for v, g in zip(values, groups, strict=True):
        by.setdefault(g, []).append(float(v))
    return float(np.mean([np.mean(v) for v in by.values()])) if by else math.nan


def macro_bootstrap_ci(values: Sequence[float], groups: Sequence[str], n_boot: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Stratified bootstrap of the macro mean: items are resampled within each group, so groups keep their size."""
    by: dict[str, np.ndarray] = {}
    for g in dict.fromkeys(groups):
        by[g] = np.asarray([v for v, gg in zip(values, groups, strict=True) if gg == g], dtype=np.float64)
    if not by:
        return (math.nan, math.nan)
    if n_boot < 1 or all(len(v) == 1 for v in by.values()):
        m = macro_mean(values, groups)
        return (m, m)
    rng = np.random.default_rng(seed)
    means = np.zeros((n_boot, len(by)))
    for j, v in enumerate(by.values()):
        means[:, j] = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    stats = means.mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))
