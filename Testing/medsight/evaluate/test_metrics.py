"""Hand-computed cases for the official-compatible metrics and their quirks."""

import difflib
import math
import sys

import numpy as np
import pytest
import scipy.stats
import torch

from medsight.evaluate.metrics import (
    BOOTSTRAP_BLOCK,
    bootstrap_ci,
    closed_hit,
    dice,
    dice_from_logits,
    macro_bootstrap_ci,
    macro_mean,
    mc_hit,
    most_similar,
    normalize_word,
    official_exact_match,
    open_scores,
    parse_yes_no,
    precision_recall_f1,
    sentence_bleu,
    strict_closed_hit,
)


def test_normalize_word():
    assert normalize_word('The "Left" kidney, an organ.') == "left kidney organ"
    assert normalize_word("Size 2.5 cm. Done.") == "size 2.5 cm done"
    assert normalize_word("It isnt A tumor") == "it isn't tumor"


def test_normalize_word_is_the_official_glossary():
    """The official glossary.py: 21 punctuation marks, deleted beside a space (or anywhere once the text has a
    digit,digit) and else made a space; number words to digits ("none" -> "0"); every period not before a digit
    dropped; its contraction map only (no "shed" -> "she'd"). Only '/', '"' and ',' were handled, and no numbers."""
    cases = {
        "CT/MRI": "ct mri", "(B)": "b", "The answer is (benign).": "answer is benign", "x-ray": "x ray",
        "Is it normal?": "is it normal", "yes!": "yes", "left; right": "left right", "1,000 x-ray": "1000 xray",
        "[M0_16] liver": "m0 16 liver", "Two lesions": "2 lesions", "none": "0", "a .5 cm": ".5 cm",
        "shed cells": "shed cells", "lets see": "lets see", "couldnt've": "couldn't've",
    }
    assert {text: normalize_word(text) for text in cases} == cases


def test_open_recall_follows_the_official_normalisation():
    """run_eval.py's recall of answers that differ from the GT only by punctuation or a number word: each GT word is
    found, so recall 1 (it was 0 for all four)."""
    cases = [("The diagnosis is a benign tumor (fibroadenoma).", "Fibroadenoma"), ("Two lesions are seen.", "2"),
             ("Findings: glioma?", "glioma"), ("CT/MRI", "MRI")]
    assert [open_scores(pred, gt).recall for pred, gt in cases] == [1.0] * len(cases)
    # tp 1 (fibroadenoma), fp 4 (diagnosis is benign tumor) -> precision 1/5.
    assert open_scores(*cases[0]).precision == pytest.approx(1 / 5)


def test_exact_match_is_not_exact():
    # GT words {brain, tumor} both found; 5 prediction tokens after dropping "a" -> 2/5.
    assert official_exact_match("a brain tumor in brain tissue", "brain tumor") == pytest.approx(2 / 5)
    # Distinct GT words count once: "tumor tumor" GT, prediction "tumor" -> 1/1.
    assert official_exact_match("tumor", "tumor tumor") == 1.0
    assert official_exact_match("", "tumor") == 0.0
    s = open_scores("a brain tumor in brain tissue", "brain tumor")
    assert s.exact_match == pytest.approx(0.4) and s.strict_exact == 0.0
    assert open_scores("tumor", "brain tumor").exact_match == 1.0  # a partial answer scores 100
    assert open_scores("The brain tumor.", "brain tumor").strict_exact == 1.0


def test_precision_recall_f1_counts_candidate_tokens():
    # pred tokens: brain, brain, mass (tumor/brain after articles); GT: brain tumor.
    # tp = 2 (both "brain" tokens), fp = 1 (mass), fn = 1 (tumor).
    p, r, f = precision_recall_f1("brain brain mass", "brain tumor")
    assert p == pytest.approx(2 / 3) and r == pytest.approx(2 / 3) and f == pytest.approx(2 / 3)
    # Repeats of a matched word push recall to 1 even though "tumor" part is matched only once.
    assert precision_recall_f1("tumor tumor tumor", "tumor") == (1.0, 1.0, 1.0)
    assert precision_recall_f1("", "tumor") == (0.0, 0.0, 0.0)
    assert precision_recall_f1("nothing", "tumor") == (0.0, 0.0, 0.0)
    # recall 1/2 when only one of two GT words appears: tp 1, fn 1; precision 1/3.
    p, r, _ = precision_recall_f1("benign lesion seen", "benign tumor")
    assert (p, r) == (pytest.approx(1 / 3), pytest.approx(1 / 2))


def test_bleu_tiny_case():
    ref = ["the", "cat", "is", "on", "the", "mat"]
    hyp = ["the", "cat", "is", "on", "mat"]
    # p1 = 5/5, p2 = 3/4, p3 = 2/3, p4 = 1/2; c = 5 < r = 6 -> BP = exp(1 - 6/5).
    expected = math.exp(-0.2) * (1 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert sentence_bleu(ref, hyp) == pytest.approx(expected, rel=1e-12)
    assert sentence_bleu(ref, hyp, (1, 0, 0, 0)) == pytest.approx(math.exp(-0.2))
    assert sentence_bleu(ref, hyp, (0, 1, 0, 0)) == pytest.approx(math.exp(-0.2) * 3 / 4)
    # Longer hypothesis: BP = 1; identical -> 1.
    assert sentence_bleu(ref, ref) == pytest.approx(1.0)
    # No unigram match -> exactly 0; a missing 4-gram -> tiny but positive (NLTK without smoothing).
    assert sentence_bleu(ref, ["dog"]) == 0.0
    tiny = sentence_bleu(["a", "b", "c"], ["a", "b", "c"])
    assert tiny == pytest.approx(sys.float_info.min ** 0.25, rel=1e-9) and 0 < tiny < 1e-70


def test_closed_substring_quirk():
    assert closed_hit("Yes, there is a lesion.", "yes") == 1.0
    assert closed_hit("No.", "yes") == 0.0
    # "no" inside "normal" triggers the branch, and GT "no" is a substring of "normal": a hit.
    assert closed_hit("The heart looks normal", "no") == 1.0
    assert closed_hit("a nodule is seen", "no") == 1.0
    # Neither yes nor no anywhere -> 0 even if the GT is contained ("left" question).
    assert closed_hit("left", "left") == 0.0
    # The strict variant reads the first yes/no word.
    assert strict_closed_hit("The heart looks normal", "no") == 0.0
    assert strict_closed_hit("No, yes", "no") == 1.0
    assert parse_yes_no("Well, yes.") == "yes"


def test_strict_closed_accuracy_of_a_closed_question_answered_by_a_name():
    """SLAKE / VQA-RAD closed items answered 'Left' or 'MRI': the strict rule found no yes/no word in the GT and
    scored every such item 0, a right answer included; it now needs the whole normalised answer."""
    cases = [("Left.", "left", 1.0), ("The left", "Left", 1.0), ("left lung", "left", 0.0), ("right", "left", 0.0),
             ("MRI", "MRI", 1.0), ("No", "left", 0.0), ("", "left", 0.0)]
    assert [strict_closed_hit(pred, gt) for pred, gt, _ in cases] == [hit for _, _, hit in cases]
    assert [closed_hit(pred, gt) for pred, gt, _ in cases] == [0.0] * len(cases)  # the official rule: no yes/no


def test_multiple_choice_difflib():
    options = ["Liver", "Lung", "Kidney", "Brain"]
    assert most_similar("The image shows the lungs", options) == 1
    assert mc_hit("lung", "Lung", options) == 1.0
    assert mc_hit("kidney", "Liver", options) == 0.0
    # An empty answer, or one sharing no character with any option, chooses none (not the first option).
    assert most_similar("", ["ab", "cd"]) is None and most_similar("xyz", ["ab", "cd"]) is None
    assert mc_hit("", "Liver", options) == 0.0
    assert mc_hit("", "", options) == 1.0  # the official quirk: no option for either, None == None


def test_multiple_choice_compares_option_to_answer_as_run_eval_mc():
    """run_eval_mc.py scores SequenceMatcher(None, option, answer): with the answer second, difflib's autojunk (a
    second string of 200+ characters) ignores its frequent letters, and this answer scores 0 against the MRI
    option; with the arguments swapped it chose MRI, another option than the official script's."""
    options = ["Computed tomography", "Magnetic resonance imaging", "Ultrasound", "X-ray"]
    answer = ("The image appears to be a magnetic resonance imaging scan of the brain, showing axial slices with "
              "contrast enhancement; it is not computed tomography or an ultrasound examination, and the intensity "
              "pattern is typical of a T1-weighted sequence.")
    assert len(answer) >= 200  # difflib's autojunk threshold
    official = [difflib.SequenceMatcher(None, o, answer).ratio() for o in options]
    assert official[1] == 0.0 and int(np.argmax(official)) == 0
    assert most_similar(answer, options) == 0
    assert mc_hit(answer, "Computed tomography", options) == 1.0


def test_dice_and_empty_masks():
    a = np.zeros((4, 4), bool)
    b = a.copy()
    assert dice(a, b) == 1.0  # two empty masks agree perfectly (eps in numerator and denominator)
    a[0, :2] = True
    b[0, 1:3] = True
    assert dice(a, b) == pytest.approx((2 * 1 + 1e-8) / (2 + 2 + 1e-8))
    with pytest.raises(ValueError, match="shapes differ"):
        dice(a, np.zeros((3, 3), bool))


def test_dice_from_logits_resizes_bilinear():
    # 2x2 logits -> 4x4 with align_corners=False: the left column's +1 and right column's -1 blend only in the
    # middle columns; columns 0-1 stay > 0.
    logits = torch.tensor([[[1.0, -1.0], [1.0, -1.0]]])
    gt = np.zeros((4, 4), bool)
    gt[:, :2] = True
    assert dice_from_logits(logits, gt) == pytest.approx(2 * 8 / (16 + 1e-6))
    # Two channels: the second is empty -> mean of (1, 0).
    two = torch.cat([logits, -torch.ones(1, 2, 2)])
    assert dice_from_logits(two, gt) == pytest.approx((16 / (16 + 1e-6)) / 2)
    assert dice_from_logits(torch.zeros(0, 2, 2), gt) == 0.0


def test_macro_and_bootstrap():
    values, groups = [1.0, 0.0, 0.0, 1.0], ["CT", "CT", "CT", "MRI"]
    assert macro_mean(values, groups) == pytest.approx((1 / 3 + 1) / 2)
    lo, hi = bootstrap_ci(values, n_boot=500, seed=1)
    assert 0 <= lo <= 0.5 <= hi <= 1
    assert bootstrap_ci(values, n_boot=500, seed=1) == (lo, hi)  # seeded
    mlo, mhi = macro_bootstrap_ci(values, groups, n_boot=500, seed=1)
    assert mlo <= macro_mean(values, groups) <= mhi and mhi <= 1.0
    assert bootstrap_ci([0.3]) == (0.3, 0.3)


def _one_piece_bootstrap_ci(values, n_boot, seed, level=0.95):
    """The intervals as computed before the resamples were drawn in blocks: one (n_boot, n) index matrix."""
    x = np.asarray(values, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    stats = np.array([np.mean(x[row]) for row in idx])
    return float(np.quantile(stats, (1 - level) / 2)), float(np.quantile(stats, 1 - (1 - level) / 2))


def _one_piece_macro_ci(values, groups, n_boot, seed, level=0.95):
    rng = np.random.default_rng(seed)
    by = [np.asarray([v for v, g in zip(values, groups, strict=True) if g == k]) for k in dict.fromkeys(groups)]
    means = np.zeros((n_boot, len(by)))
    for j, v in enumerate(by):
        means[:, j] = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    stats = means.mean(axis=1)
    return float(np.quantile(stats, (1 - level) / 2)), float(np.quantile(stats, 1 - (1 - level) / 2))


# (n items, n resamples): one block; several blocks of many rows with a partial last one; one row per block.
BLOCK_CASES = [(BOOTSTRAP_BLOCK // 1000 // 2, 1000), (BOOTSTRAP_BLOCK // 300 + 1, 1000), (BOOTSTRAP_BLOCK + 1, 3)]


@pytest.mark.parametrize(("n", "n_boot"), BLOCK_CASES)
def test_bootstrap_in_blocks_is_bit_identical_to_one_piece(n, n_boot):
    values = np.random.default_rng(n).random(n)  # continuous values: any change of a draw moves a bound
    assert bootstrap_ci(values, n_boot=n_boot, seed=7) == _one_piece_bootstrap_ci(values, n_boot, 7)
    hits = (values < 0.6).astype(float)  # a 0/1 accuracy, as a report's
    assert bootstrap_ci(hits, n_boot=n_boot, seed=3) == _one_piece_bootstrap_ci(hits, n_boot, 3)


@pytest.mark.parametrize(("n", "n_boot"), BLOCK_CASES[:2])
def test_macro_bootstrap_in_blocks_is_bit_identical_to_one_piece(n, n_boot):
    rng = np.random.default_rng(n)
    values = rng.random(n)
    # A large group drawn in several blocks, a small one in one, and a group of one item.
    groups = ["CT" if i % 5 else "MRI" for i in range(n - 1)] + ["OCT"]
    got = macro_bootstrap_ci(list(values), groups, n_boot=n_boot, seed=5)
    assert got == _one_piece_macro_ci(list(values), groups, n_boot, 5)


@pytest.mark.parametrize("n", [BOOTSTRAP_BLOCK // 1000 // 2, BOOTSTRAP_BLOCK // 300 + 1])
def test_bootstrap_matches_scipy_percentile_bootstrap(n):
    values = np.random.default_rng(n).random(n)
    ref = scipy.stats.bootstrap((values,), np.mean, n_resamples=1000, method="percentile", confidence_level=0.95,
                                rng=np.random.default_rng(11))
    assert bootstrap_ci(values, n_boot=1000, seed=11) == tuple(ref.confidence_interval)
