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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

ARTICLES = frozenset({"a", "an", "the"})
#: The official `glossary.py` contraction map (its four capitalised keys, "Im", "Ive", "Id've", "I'dve", are left out:
#: they are looked up after lower-casing, so they never match).
CONTRACTIONS: dict[str, str] = {
    'aint': "ain't", 'arent': "aren't", 'cant': "can't", 'couldve': "could've", 'couldnt': "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", 'didnt': "didn't", 'doesnt': "doesn't",
    'dont': "don't", 'hadnt': "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", 'hasnt': "hasn't",
    'havent': "haven't", 'hed': "he'd", "hed've": "he'd've", "he'dve": "he'd've", 'hes': "he's", 'howd': "how'd",
    'howll': "how'll", 'hows': "how's", 'isnt': "isn't", 'itd': "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    'itll': "it'll", "let's": "let's", 'maam': "ma'am", 'mightnt': "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", 'mightve': "might've", 'mustnt': "mustn't", 'mustve': "must've",
    'neednt': "needn't", 'notve': "not've", 'oclock': "o'clock", 'oughtnt': "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", 'shant': "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", 'shouldve': "should've", 'shouldnt': "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": 'somebodyd', "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", 'somebodyll': "somebody'll", 'somebodys': "somebody's", 'someoned': "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", 'someonell': "someone'll", 'someones': "someone's",
    'somethingd': "something'd", "somethingd've": "something'd've", "something'dve": "something'd've",
    'somethingll': "something'll", 'thats': "that's", 'thered': "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", 'therere': "there're", 'theres': "there's", 'theyd': "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", 'theyll': "they'll", 'theyre': "they're", 'theyve': "they've",
    'twas': "'twas", 'wasnt': "wasn't", "wed've": "we'd've", "we'dve": "we'd've", 'weve': "we've",
    'werent': "weren't", 'whatll': "what'll", 'whatre': "what're", 'whats': "what's", 'whatve': "what've",
    'whens': "when's", 'whered': "where'd", 'wheres': "where's", 'whereve': "where've", 'whod': "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", 'wholl': "who'll", 'whos': "who's", 'whove': "who've",
    'whyll': "why'll", 'whyre': "why're", 'whys': "why's", 'wont': "won't", 'wouldve': "would've",
    'wouldnt': "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", 'yall': "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", 'youd': "you'd", "youd've": "you'd've", "you'dve": "you'd've", 'youll': "you'll",
    'youre': "you're", 'youve': "you've",
}
#: The official `manual_map`: number words become digits ("two" and "2" are one answer), "none" becomes "0".
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
#: The official punctuation: each is deleted where the text has it beside a space (or has a digit,digit anywhere),
#: else it becomes a space, so "(benign)" is "benign" and "x-ray" is "x ray".
PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_NUMBER = re.compile(r"(\d)(\,)(\d)")
# The official pattern verbatim: "(?!<=" is a typo for a lookbehind, so it removes every period not followed by a
# digit ("2.5" and ".5" stay, "5." goes).
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
#: The official call passes re.UNICODE (32) as `count`: only the first 32 such periods go (kept for equal scores).
_PERIOD_COUNT = int(re.UNICODE)
DICE_EPS = 1e-8


def normalize_word(text: str) -> str:
    """The official `normalize_word` of lower-cased text: punctuation deleted or made a space, periods not before
    a digit dropped, number words to digits, articles dropped, contractions expanded."""
    text = str(text).lower()
    out = text
    for p in PUNCT:
        # The official test reads the text as given, while its replacements accumulate.
        if p + " " in text or " " + p in text or _COMMA_NUMBER.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out, count=_PERIOD_COUNT)
    words = [NUMBER_WORDS.get(w, w) for w in out.split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words).replace(",", "")


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
    # run_eval.py hands the normalised strings to its word metrics, which normalise them again (as these do).
    precision, recall, f1 = precision_recall_f1(p, g)
    bleu = {k: sentence_bleu(g.split(), p.split(), w) for k, w in BLEU_WEIGHTS.items()}
    return OpenScores(official_exact_match(p, g), precision, recall, f1, bleu["bleu"], bleu["bleu1"],
                      bleu["bleu2"], bleu["bleu3"], float(p == g))


# -- closed questions ----------------------------------------------------------------------------------------------
def text_kind(answer_type: str | None) -> str | None:
    """The branch of `run_eval.py` an answer type takes: "open" when it is "open" lower-cased, "closed" when it
    starts with "close" (CLOSED, closed, close-ended...), else None: the official script scores such an item by no
    metric at all (not as open)."""
    kind = str(answer_type or "").lower()
    return "open" if kind == "open" else "closed" if kind.startswith("close") else None


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
    # Option first, answer second, as run_eval_mc.py: the ratio is not symmetric (difflib's autojunk drops the
    # frequent characters of its second string once it has 200), so a long answer may choose another option.
    ratios = [difflib.SequenceMatcher(None, o, text).ratio() for o in options]
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
#: The modalities of the paper's DiagSeg table, spelled as it and the official files spell them.
PAPER_MODALITIES = ("CT", "MRI", "X-ray", "Pathology", "US", "Endoscopy", "Dermoscopy", "OCT")
#: The OmniMedVQA modalities the paper's code scores (its Modality_{CT,OCT,X-Ray,MRI,ultrasound,Microscopy,Fundus}.json
#: files, one accuracy each), in the spellings above; Microscopy and Fundus have no DiagSeg column.
OMNIMED_MODALITIES = ("CT", "OCT", "X-ray", "MRI", "US", "Microscopy", "Fundus")
#: Other names of those modalities, folded (`_folded`): the official Dermatoscopy (`--modality_split` merges it), and
#: the spellings of the spec's other data sets (OmniMedVQA's "ultrasound", the grounding notebook's "MR").
MODALITY_ALIASES = {"dermatoscopy": "Dermoscopy", "ultrasound": "US", "mr": "MRI"}
#: OmniMedVQA's ``modality_type`` values as its QA files spell them (typos and the missing ")" included), and the same
#: names corrected, as copies of the data spell them: without these a report on the released files grouped items under
#: names no paper row has. Its other values (restricted-access files) are kept as written and named in the report.
OMNIMED_MODALITY_TYPES = {
    "CT(Computed Tomography)": "CT", "MR (Mag-netic Resonance Imaging)": "MRI",
    "OCT (Optical Coherence Tomography": "OCT", "OCT (Optical Coherence Tomography)": "OCT", "X-Ray": "X-ray",
    "ultrasound": "US", "Microscopy Images": "Microscopy", "Fundus Photography": "Fundus", "Dermoscopy": "Dermoscopy",
}


def _folded(name: str) -> str:
    """A modality name without case, hyphens, spaces or underscores: "X-Ray", "xray" and "X ray" are X-ray."""
    return "".join(c for c in name.lower() if c not in "-_ ")


_CANONICAL = {**{_folded(m): m for m in (*PAPER_MODALITIES, *OMNIMED_MODALITIES)}, **MODALITY_ALIASES,
              **{_folded(name): m for name, m in OMNIMED_MODALITY_TYPES.items()}, "unknown": "unknown"}


def canonical_modality(name: str | None) -> str:
    """The paper's spelling of a modality the data spells otherwise ("X-Ray", SLAKE's, was no X-ray: its rows got
    no paper number, and a file with both spellings had two groups); other names as written (stripped)."""
    if name is None or str(name).strip() == "":
        return "unknown"
    return _CANONICAL.get(_folded(str(name)), str(name).strip())


def one_spelling_each(names: Sequence[str]) -> list[str]:
    """`names` with the spellings of a modality outside the paper's table made one ("Fundus", "FUNDUS" and "fundus"
    were three groups of the report): names equal but for case, hyphens, spaces or underscores (`_folded`) all take
    the spelling most of them use, the first of those on a tie."""
    counts = Counter(names)
    chosen: dict[str, str] = {}
    for name, count in counts.items():  # in first-seen order, so a tie keeps the first
        key = _folded(name)
        if key not in chosen or count > counts[chosen[key]]:
            chosen[key] = name
    return [chosen[_folded(name)] for name in names]


#: Index values drawn per block of bootstrap resamples (8 MiB of int64): the (n_boot, n) index matrix of a large
#: report (88,000 OmniMedVQA items: 700 MB, with the values it picks twice that) is never held in one piece.
BOOTSTRAP_BLOCK = 1 << 20


def _resample_blocks(rng: np.random.Generator, n: int, n_boot: int) -> Iterator[np.ndarray]:
    """The rows of ``rng.integers(0, n, size=(n_boot, n))`` in consecutive blocks of at most `BOOTSTRAP_BLOCK`
    values (one row at least). The generator's stream is drawn in the same order, so the rows are the same numbers
    as the one-piece matrix's and the intervals stay bit-identical (checked by the tests)."""
    rows = max(1, BOOTSTRAP_BLOCK // n)
    for start in range(0, n_boot, rows):
        yield rng.integers(0, n, size=(min(rows, n_boot - start), n))


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
    stats = np.array([stat(x[row]) for block in _resample_blocks(rng, x.size, n_boot) for row in block])
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
        start = 0
        for block in _resample_blocks(rng, len(v), n_boot):
            means[start : start + len(block), j] = v[block].mean(axis=1)
            start += len(block)
    stats = means.mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))
