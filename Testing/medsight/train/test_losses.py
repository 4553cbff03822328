"""Training losses: golden parity (stages 1, 2 and LVLM) plus small hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from medsight.model.lvlm import IMAGE_TOKEN_INDEX
from medsight.prompt import ASSISTANT_HEADER, Message, tokenize_turns
from medsight.train.losses import (
    IGNORE_INDEX,
    answer_starts,
    causal_lm_loss,
    class_weights,
    embedding_positions,
    expand_labels,
    hungarian_match,
    lvlm_losses,
    mask_losses,
    mask_targets,
    quantization_losses,
    stage1_losses,
    stage2_losses,
    training_labels,
    yes_no_starts,
)

TOL = 1e-10


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    diff = (actual.double() - expected.double()).abs().max().item()
    assert diff <= tol, f"max abs diff {diff:g} > {tol:g}"


# ---------------------------------------------------------------------------------------------------------------
# Golden parity
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def perceiver_out(golden_model, perceiver_io):
    with torch.no_grad():
        return golden_model.region_perceiver(perceiver_io["perceiver"]["grid_in"])


@pytest.fixture(scope="module")
def lvlm_train(golden_model, lvlm_io):
    meta, ref = lvlm_io["meta"], lvlm_io["train"]
    messages = [Message("user", meta["question"]), Message("assistant", meta["forced_answer"])]
    ids, labels = training_labels(golden_model.tokenizer, messages)
    encoding = golden_model.encode(lvlm_io["pixel_values_fp32"])  # rounds pixels to bf16 like the chatbot
    with torch.no_grad():
        result = lvlm_losses(golden_model, [ids], [labels], encoding, [ref["mask_labels"]])
    return ids, labels, result


def test_hungarian_matches_golden(perceiver_out, perceiver_io):
    ref = perceiver_io["hungarian"]
    pred_idx, gt_idx = hungarian_match(
        perceiver_out.seg_logits[0], perceiver_out.class_logits[0], ref["gt_masks"], ref["gt_classes"]
    )
    assert pred_idx.tolist() == ref["pred_indices"].tolist()
    assert gt_idx.tolist() == ref["gt_indices"].tolist()


def test_stage1_losses_match_golden(perceiver_out, perceiver_io):
    ref = perceiver_io["hungarian"]
    assert perceiver_out.class_logits.shape[-1] == ref["num_classes"] + 1
    losses = stage1_losses(
        perceiver_out.seg_logits, perceiver_out.class_logits, [ref["gt_masks"]], [ref["gt_classes"]],
        eos_coef=ref["eos_coef"],
    )
    _close(losses["dice"], ref["dice_loss"])
    _close(losses["bce"], ref["bce_loss"])
    _close(losses["cls"], ref["cls_loss"])


def test_stage2_losses_match_golden(golden_model, perceiver_out, perceiver_io, stage2_io):
    # The Stage-2 fixture used the Stage-1 GT (its normal-head losses equal the Stage-1 values) and the label of
    # its `label3` route.
    gt = perceiver_io["hungarian"]
    ref = stage2_io["losses_gt_route3"]
    route = stage2_io["routes"]["label3"]
    with torch.no_grad():
        out = stage2_losses(perceiver_out, golden_model.codebook, [route["label"]], [gt["gt_masks"]],
                            [gt["gt_classes"]])
    pred_idx, gt_idx = out["indices"][0]
    assert pred_idx.tolist() == ref["hungarian_pred"].tolist()
    assert gt_idx.tolist() == ref["hungarian_gt"].tolist()
    for name in ("vq_loss", "commit_loss", "recon_mse", "total_quantization_loss", "dice_quant", "bce_quant",
                 "cls_quant", "dice_normal", "cls_normal"):
        _close(out[name], ref[name])
    _close(out["seg_logits_quant"], route["seg_logits_quant"])
    _close(out["class_logits_quant"], route["class_logits_quant"])
    expected = ref["dice_quant"] + ref["bce_quant"] + ref["cls_quant"] + ref["total_quantization_loss"] + ref[
        "recon_mse"
    ]
    _close(out["loss"], expected)


def test_training_labels_match_golden(lvlm_train, lvlm_io):
    ids, labels, _ = lvlm_train
    assert ids == lvlm_io["train"]["input_ids"][0].tolist()
    assert labels == lvlm_io["train"]["labels"][0].tolist()


def test_lvlm_losses_match_golden(lvlm_train, lvlm_io):
    _, _, result = lvlm_train
    ref = lvlm_io["train"]
    assert result.code_positions == [ref["code_seq_pos"].tolist()]
    assert result.ce_loss.dtype == torch.float32
    assert abs(result.ce_loss.item() - ref["ce_loss"].item()) <= 1e-6 * abs(ref["ce_loss"].item())
    for name in ("loss", "mask_loss", "dice_loss", "bce_loss"):
        _close(getattr(result, name), ref[name])
    _close(result.seg_embeddings[0], ref["seg_embeddings"])
    _close(result.region_codes[0], ref["region_codes"])
    _close(result.mask_logits, ref["mask_logits"])
    start = lvlm_io["inputs_embeds"].shape[1] - 1  # the last prompt position
    _close(result.logits[:, start : start + ref["logits_from_prompt_end"].shape[1]], ref["logits_from_prompt_end"])


def image_embeddings(lvlm_io: dict) -> int:
    """How many embeddings replace the image placeholder (patch tokens + region queries)."""
    return lvlm_io["tower_features"].shape[1]


def test_causal_lm_loss_equals_hf_loss(golden_model, lvlm_io, lvlm_train):
    """Our shift-and-mean must agree with the loss HF computes itself from labels."""
    ids, labels, result = lvlm_train
    expanded = torch.tensor([expand_labels(labels, ids, image_embeddings(lvlm_io))])
    lm_loss = torch.nn.functional.cross_entropy(
        result.logits[0, :-1].float(), expanded[0, 1:], ignore_index=IGNORE_INDEX
    )
    _close(causal_lm_loss(result.logits, expanded), lm_loss, 0.0)


def test_answer_starts_are_the_first_answer_tokens(golden_model):
    tok = golden_model.tokenizer
    messages = [Message("user", "<image>\nIs there a lesion?"), Message("assistant", "Yes."),
                Message("user", "Where?"), Message("assistant", "No idea.")]
    ids, labels = training_labels(tok, messages)
    starts = answer_starts(ids, tok(ASSISTANT_HEADER, add_special_tokens=False)["input_ids"])
    assert len(starts) == 2
    assert tok.decode(ids[starts[0] :]).startswith("Yes.<|im_end|>")
    assert tok.decode(ids[starts[1] :]).startswith("No idea.<|im_end|>")
    assert all(labels[i] == ids[i] for i in starts)  # both are supervised tokens
    assert answer_starts(ids, []) == []


def test_label_prompt_markup_off_labels_the_assistant_turns_only(golden_model):
    """Official rule: newline and chat-marker ids of the prompt are labels too (so a newline is followed by
    `<|im_start|>` in most labelled positions). Off: the labelled tokens are exactly the assistant turns'."""
    tok = golden_model.tokenizer
    messages = [Message("user", "<image>\nIs there a lesion?"), Message("assistant", "Yes."),
                Message("user", "Where?"), Message("assistant", "No idea.")]
    ids, official = training_labels(tok, messages)
    same_ids, labels = training_labels(tok, messages, label_prompt_markup=False)
    assert same_ids == ids
    in_answer = [text.startswith(ASSISTANT_HEADER) for text, turn in tokenize_turns(tok, messages) for _ in turn]
    assert sum(in_answer) < len(ids)
    labelled = [label != IGNORE_INDEX for label in labels]
    assert labelled == in_answer
    assert all(labels[i] == ids[i] for i in range(len(ids)) if labelled[i])
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    prompt_markup = [i for i in range(len(ids)) if not in_answer[i] and official[i] != IGNORE_INDEX]
    assert any(ids[i] == im_start for i in prompt_markup)  # the official rule labels prompt markup


def test_yes_no_starts_pick_only_yes_no_verdicts(golden_model):
    tok = golden_model.tokenizer
    header = tok(ASSISTANT_HEADER, add_special_tokens=False)["input_ids"]
    messages = [Message("user", "<image>\nIs there a lesion?"), Message("assistant", "No, none."),
                Message("user", "Which modality?"), Message("assistant", "Nothing like it; a CT."),
                Message("user", "Is the liver visible?"), Message("assistant", "yes")]
    ids, _ = training_labels(tok, messages)
    starts = answer_starts(ids, header)
    assert yes_no_starts(tok, ids, header) == [starts[0], starts[2]]  # "Nothing" is not "No"


def test_yes_no_weight_is_a_weighted_mean_of_the_token_losses(golden_model, lvlm_io):
    """Weight 1 is the official loss exactly; weight w counts a yes/no answer's first token w times."""
    meta, ref = lvlm_io["meta"], lvlm_io["train"]
    messages = [Message("user", meta["question"]), Message("assistant", "Yes, " + meta["forced_answer"])]
    ids, labels = training_labels(golden_model.tokenizer, messages)
    encoding = golden_model.encode(lvlm_io["pixel_values_fp32"])
    with torch.no_grad():
        official = lvlm_losses(golden_model, [ids], [labels], encoding, [ref["mask_labels"]])
        same = lvlm_losses(golden_model, [ids], [labels], encoding, [ref["mask_labels"]], yes_no_weight=1.0)
        weighted = lvlm_losses(golden_model, [ids], [labels], encoding, [ref["mask_labels"]], yes_no_weight=7.0)
    _close(same.ce_loss, official.ce_loss, 0.0)
    header = golden_model.tokenizer(ASSISTANT_HEADER, add_special_tokens=False)["input_ids"]
    n_image = image_embeddings(lvlm_io)
    starts = [embedding_positions(ids, n_image)[i] for i in yes_no_starts(golden_model.tokenizer, ids, header)]
    assert len(starts) == 1
    expanded = torch.tensor(expand_labels(labels, ids, n_image))
    per_token = torch.nn.functional.cross_entropy(
        official.logits[0, :-1].double(), expanded[1:], ignore_index=IGNORE_INDEX, reduction="none"
    )
    counted = (expanded[1:] != IGNORE_INDEX).double()
    counted[starts[0] - 1] *= 7.0  # the logits at p - 1 predict the label at p
    _close(weighted.ce_loss, (per_token * counted).sum() / counted.sum(), 1e-6)
    assert abs(weighted.ce_loss.item() - official.ce_loss.item()) > 1e-4  # the weight does change the loss
    _close(weighted.mask_loss, official.mask_loss, 0.0)
    with pytest.raises(ValueError, match="yes_no_weight must be positive"):
        lvlm_losses(golden_model, [ids], [labels], encoding, [ref["mask_labels"]], yes_no_weight=0.0)


def test_lvlm_losses_backpropagate_to_trainable_parts(golden_model, lvlm_io):
    meta, ref = lvlm_io["meta"], lvlm_io["train"]
    messages = [Message("user", meta["question"]), Message("assistant", meta["forced_answer"])]
    ids, labels = training_labels(golden_model.tokenizer, messages)
    encoding = golden_model.encode(lvlm_io["pixel_values_fp32"])
    lm = golden_model.language_model
    lm.zero_grad(set_to_none=True)
    try:
        lvlm_losses(golden_model, [ids], [labels], encoding, [ref["mask_labels"]]).loss.backward()
        for module in (lm.token_projection, lm.mm_projector, lm.lm_head):
            grads = [p.grad for p in module.parameters()]
            assert all(g is not None and torch.isfinite(g).all() for g in grads)
            assert any(g.abs().sum() > 0 for g in grads)
    finally:
        golden_model.zero_grad(set_to_none=True)


def test_lvlm_batch_of_two_equals_single(golden_model, lvlm_io, lvlm_train):
    """Right-padded batching: a shorter second sample must not change the first one's states or masks."""
    ids, labels, single = lvlm_train
    ref = lvlm_io["train"]
    # As many codes as the fixture's answer (the official collator needs one K per batch), in a shorter text.
    codes = " and ".join(f"[M0_{k}]" for k in range(len(ref["code_seq_pos"])))
    short_ids, short_labels = training_labels(
        golden_model.tokenizer, [Message("user", "Kidney?"), Message("assistant", f"Here {codes}.")]
    )
    assert len(short_ids) < len(ids)
    pixels = lvlm_io["pixel_values_fp32"]
    encoding = golden_model.encode(torch.stack([pixels, pixels.flip(-1)]))
    with torch.no_grad():
        batch = lvlm_losses(golden_model, [ids, short_ids], [labels, short_labels], encoding,
                            [ref["mask_labels"], ref["mask_labels"]])
    _close(batch.seg_embeddings[0], single.seg_embeddings[0], 1e-12)
    _close(batch.mask_logits[0], single.mask_logits[0], 1e-12)
    _close(batch.logits[0, : single.logits.shape[1]], single.logits[0], 1e-12)


def test_lvlm_mixed_code_counts_need_padding_and_padding_changes_no_slot(golden_model, lvlm_io, lvlm_train):
    """pad_code_slots: each sample's own slots keep their values; the mask loss sums are those of the singles."""
    ids, labels, single = lvlm_train
    ref = lvlm_io["train"]
    k_first = single.mask_logits.shape[1]
    one_ids, one_labels = training_labels(
        golden_model.tokenizer, [Message("user", "Kidney?"), Message("assistant", "Here [M0_1].")]
    )
    pixels = lvlm_io["pixel_values_fp32"]
    encoding = golden_model.encode(torch.stack([pixels, pixels.flip(-1)]))
    second_masks = ref["mask_labels"][1:2]
    args = ([ids, one_ids], [labels, one_labels], encoding, [ref["mask_labels"], second_masks])
    assert k_first > 1
    with pytest.raises(ValueError, match="pad_code_slots"):
        lvlm_losses(golden_model, *args)
    with torch.no_grad():
        mixed = lvlm_losses(golden_model, *args, pad_code_slots=True)
        alone = lvlm_losses(golden_model, [one_ids], [one_labels], encoding.select(1), [second_masks])
    assert mixed.mask_logits.shape[:2] == (2, k_first)
    assert mixed.code_positions[1][1:] == [0] * (k_first - 1)
    _close(mixed.mask_logits[0], single.mask_logits[0], 1e-12)
    _close(mixed.mask_logits[1, :1], alone.mask_logits[0], 1e-12)
    # Padding slots have no target, so they add nothing to the sums; only the denominator is B * K_max.
    for term in ("dice_loss", "bce_loss"):
        summed = getattr(single, term) * k_first + getattr(alone, term) * 1
        _close(getattr(mixed, term) * (2 * k_first), summed, 1e-6)


def test_lvlm_without_codes_decodes_position_zero(golden_model, lvlm_io):
    messages = [Message("user", "Is there a kidney?"), Message("assistant", "No.")]
    ids, labels = training_labels(golden_model.tokenizer, messages)
    encoding = golden_model.encode(lvlm_io["pixel_values_fp32"])
    with torch.no_grad():
        result = lvlm_losses(golden_model, [ids], [labels], encoding, [None])
    assert result.code_positions == [[0]]
    assert result.mask_logits.shape[1] == 1
    assert result.mask_loss.item() == 0.0
    _close(result.loss, result.ce_loss, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------------------------------------------
def _gt_square(size: int = 8, lo: int = 2, hi: int = 6) -> torch.Tensor:
    gt = torch.zeros(size, size, dtype=torch.float64)
    gt[lo:hi, lo:hi] = 1
    return gt


def test_stage1_hand_computed_values():
    # 2x2 logits of 0 (p = 0.5) against one foreground pixel; class logits all 0.
    pred = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    cls = torch.zeros(1, 1, 4, dtype=torch.float64)
    gt = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    out = stage1_losses(pred, cls, [gt], [torch.tensor([2])])
    assert out["dice"].item() == pytest.approx(1 - (2 * 0.5 + 1) / (2.0 + 1 + 1), abs=1e-15)
    assert out["bce"].item() == pytest.approx(math.log(2), abs=1e-15)
    assert out["cls"].item() == pytest.approx(math.log(4), abs=1e-15)


def test_stage1_perfect_prediction_has_zero_mask_loss():
    gt = _gt_square()
    logits = (gt * 2 - 1) * 60  # sigmoid saturates: p is 1 on the mask and ~1e-26 off it
    pred = torch.stack([-60 * torch.ones_like(gt), logits])[None]
    cls = torch.zeros(1, 2, 3, dtype=torch.float64)
    cls[0, 1, 1] = 50.0
    out = stage1_losses(pred, cls, [gt[None]], [torch.tensor([1])])
    assert out["indices"][0][0].tolist() == [1]
    assert out["dice"].item() == pytest.approx(0.0, abs=1e-12)
    assert out["bce"].item() == pytest.approx(0.0, abs=1e-12)
    assert out["cls"].item() == pytest.approx(0.0, abs=1e-12)


def test_hungarian_upsamples_predictions_to_gt_size():
    # Predictions at 4x4, GT at 8x8: query 0 covers the GT region, query 1 the complement.
    gt = _gt_square()
    small = torch.nn.functional.avg_pool2d(gt[None, None], 2)[0, 0]
    pred = torch.stack([(small * 2 - 1) * 10, (1 - small * 2) * 10])
    pred_idx, gt_idx = hungarian_match(pred, torch.zeros(2, 3, dtype=torch.float64), gt[None], torch.tensor([0]))
    assert pred_idx.tolist() == [0] and gt_idx.tolist() == [0]


def test_more_gt_than_queries_matches_only_the_queries():
    g = torch.Generator().manual_seed(0)
    gt = (torch.rand(3, 8, 8, generator=g) > 0.5).double()
    pred = torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64)
    cls = torch.randn(1, 2, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2])
    pred_idx, gt_idx = hungarian_match(pred[0], cls[0], gt, labels)
    assert sorted(pred_idx.tolist()) == [0, 1]
    assert len(set(gt_idx.tolist())) == 2
    out = stage1_losses(pred, cls, [gt], [labels])
    # Normalised by the 2 matches, not the 3 GT masks.
    manual = torch.nn.functional.cross_entropy(cls[0][pred_idx], labels[gt_idx], reduction="sum") / 2
    _close(out["cls"], manual, 1e-14)


def test_stage1_normalises_by_matches_over_the_batch():
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    cls = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    gts = [(torch.rand(1, 4, 4, generator=g) > 0.5).double(), (torch.rand(2, 4, 4, generator=g) > 0.5).double()]
    labels = [torch.tensor([0]), torch.tensor([1, 3])]
    batch = stage1_losses(pred, cls, gts, labels)
    singles = [stage1_losses(pred[i : i + 1], cls[i : i + 1], [gts[i]], [labels[i]]) for i in range(2)]
    for name in ("dice", "bce", "cls"):
        _close(batch[name], (singles[0][name] * 1 + singles[1][name] * 2) / 3, 1e-14)


def test_stage1_without_gt_gives_zero():
    out = stage1_losses(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 3), [torch.zeros(0, 4, 4)], [torch.zeros(0)])
    assert out["dice"].item() == out["bce"].item() == out["cls"].item() == 0.0


def test_class_weights():
    assert class_weights(3).tolist() == pytest.approx([1.0, 1.0, 1.0, 0.1])


def test_quantization_losses_hand_computed():
    z = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    z_q = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    q = torch.zeros(2, 3, dtype=torch.float64)
    decoded = torch.ones(2, 3, dtype=torch.float64)
    out = quantization_losses(z, z_q, decoded, q)
    mse = (1 + 1 + 0 + 4) / 4
    assert out["vq_loss"].item() == pytest.approx(mse)
    assert out["commit_loss"].item() == pytest.approx(0.25 * mse)
    assert out["recon_mse"].item() == pytest.approx(1.0)
    assert out["total_quantization_loss"].item() == pytest.approx(mse + 0.0625 * mse + 1.0)


def test_lvlm_mask_loss_hand_computed():
    logits = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    targets = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    targets[0, 0, 0, 0] = 1  # slot 1 stays empty and must add nothing, but still counts in B*K
    dice, bce = mask_losses(logits, targets)
    eps = 1e-6
    assert dice.item() == pytest.approx((1 - (1 + eps) / (3 + eps)) / (2 + 1e-8), abs=1e-15)
    assert bce.item() == pytest.approx(math.log(2) / (2 + 1e-8), abs=1e-15)


def test_lvlm_mask_loss_perfect_and_empty():
    gt = _gt_square()[None, None]
    dice, bce = mask_losses((gt * 2 - 1) * 60, gt)
    assert dice.item() == pytest.approx(0.0, abs=1e-12)
    assert bce.item() == pytest.approx(0.0, abs=1e-12)
    dice, bce = mask_losses(torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.zeros(2, 3, 8, 8))
    assert dice.item() == 0.0 and bce.item() == 0.0


def test_mask_targets_fill_first_slots_without_rebinarising():
    masks = torch.zeros(3, 1, 5, 5, dtype=torch.float64)
    masks[:, :, 1:4, 1:4] = 1
    out = mask_targets(masks, 2, (4, 4), torch.float64)  # more masks than slots: only the first two are used
    assert out.shape == (2, 4, 4)
    assert ((out > 0) & (out < 1)).any()  # bilinear values are kept as soft targets
    out = mask_targets(masks[:1], 3, (4, 4), torch.float64)
    assert out[0].sum() > 0 and out[1:].abs().sum() == 0
    assert mask_targets(None, 2, (4, 4)).abs().sum() == 0


def test_training_labels_rule(golden_model):
    tok = golden_model.tokenizer
    newline = tok("\n", add_special_tokens=False)["input_ids"][0]
    specials = set(tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]))
    messages = [Message("user", "Q one?"), Message("assistant", "A [M1_2]."), Message("user", "Q two?"),
                Message("assistant", "B.")]
    ids, labels = training_labels(tok, messages)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    assert labels[ids.index(IMAGE_TOKEN_INDEX)] == IGNORE_INDEX
    text_turn_ids = set(tok("Q one? Q two? system You are", add_special_tokens=False)["input_ids"])
    for token, label in zip(ids, labels, strict=True):
        if token in specials or token == newline:
            assert label == token
    # Both assistant turns are labelled in full; no user/system text token is.
    assert sum(label != IGNORE_INDEX for label in labels) > 0
    prefix = tok("<|im_start|>assistant\nA [M1_2].<|im_end|>\n", add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(ids)) if ids[i : i + len(prefix)] == prefix)
    assert labels[start : start + len(prefix)] == prefix
    last = tok("<|im_start|>assistant\nB.<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert ids[-len(last) :] == last and labels[-len(last) :] == last
    user = [i for i, (t, lab) in enumerate(zip(ids, labels, strict=True)) if t in text_turn_ids - {newline}
            and i < start and t not in specials]
    assert user and all(labels[i] == IGNORE_INDEX for i in user)


def test_embedding_positions_and_expanded_labels():
    ids = [5, IMAGE_TOKEN_INDEX, 6, 7]
    assert embedding_positions(ids, 4) == [0, 1, 5, 6]
    assert expand_labels([5, IGNORE_INDEX, -100, 7], ids, 4) == [5, *[IGNORE_INDEX] * 4, IGNORE_INDEX, 7]
