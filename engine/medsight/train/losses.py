"""The official training losses, reproduced term by term.

* Stage 1 (Region Perceiver): Hungarian matching of the 20 queries to the GT masks, then Dice + BCE + class CE
  over the matched pairs only.
* Stage 2 (codebook): vq / commit / reconstruction terms, plus the Stage-1 losses on the quantised head with the
  assignment of the normal head.
* Stages 3-5 (LVLM): the LLaVA-NeXT label rule, the HF causal-LM CE and the mask loss on the code states.

All functions follow the official quirks on purpose (see the spec sections cited in each docstring); they are
what the released weights were trained with.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from medsight.model.lvlm import IMAGE_TOKEN_INDEX
from medsight.prompt import ASSISTANT_HEADER, Message, tokenize_turns

IGNORE_INDEX = -100  # HF / LLaVA "no label"
EOS_COEF = 0.1  # weight of the "no object" class; it is never a target, so it has no effect (kept for fidelity)
HUNGARIAN_SMOOTH = 1.0  # Dice smoothing of the Stage-1 criterion
LVLM_DICE_SMOOTH = 1e-6  # Dice smoothing of the LVLM mask loss
LVLM_COUNT_EPS = 1e-8  # the official code adds this to the mask count before dividing
COMMIT_BETA = 0.25  # hard-coded in the official VectorQuantizerST; the yaml value is unused
COMMIT_WEIGHT = 0.25  # weight of commit_loss in the total, on top of COMMIT_BETA
ENTROPY_WEIGHT = 0.01  # entropy term weight (the entropy itself is 0 with entropy_loss_ratio=0)


# --------------------------------------------------------------------------------------------------------------
# Stage 1
# --------------------------------------------------------------------------------------------------------------
def _upsample(pred_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) -> (N, H, W) bilinear, align_corners=False: predictions are compared at the GT resolution."""
    if tuple(pred_logits.shape[-2:]) == tuple(size):
        return pred_logits
    return F.interpolate(pred_logits[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _pairwise_bce(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """(N, P) logits, (G, P) targets -> (G, N) pixel-mean BCE-with-logits, without materialising G*N*P."""
    # BCE(x, t) = softplus(x) - x*t, so the pairwise mean splits into a per-prediction and a cross term.
    pos = F.softplus(pred).sum(dim=1)  # (N,)
    return (pos[None, :] - gt @ pred.t()) / pred.shape[1]


def _pairwise_dice(pred: torch.Tensor, gt: torch.Tensor, smooth: float = HUNGARIAN_SMOOTH) -> torch.Tensor:
    """(N, P) logits, (G, P) targets -> (G, N) Dice cost 1 - (2 sum(p t) + s) / (sum p + sum t + s)."""
    prob = pred.sigmoid()
    inter = gt @ prob.t()
    return 1 - (2 * inter + smooth) / (prob.sum(dim=1)[None, :] + gt.sum(dim=1)[:, None] + smooth)


def matching_cost(
    pred_logits: torch.Tensor, class_logits: torch.Tensor, gt_masks: torch.Tensor, gt_classes: torch.Tensor
) -> torch.Tensor:
    """The (G, N) Stage-1 matching cost: BCE + Dice - softmax probability of the GT class."""
    pred = _upsample(pred_logits, tuple(gt_masks.shape[-2:])).flatten(1)
    gt = gt_masks.flatten(1).to(pred.dtype)
    prob = class_logits.softmax(dim=-1)  # (N, C+1)
    return _pairwise_bce(pred, gt) + _pairwise_dice(pred, gt) - prob[:, gt_classes].t()


@torch.no_grad()
def hungarian_match(
    pred_logits: torch.Tensor, class_logits: torch.Tensor, gt_masks: torch.Tensor, gt_classes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign one query to each GT mask (one image).

    Args:
        pred_logits: (N, h, w) mask logits; upsampled bilinearly to the GT size before costing.
        class_logits: (N, C+1) class logits.
        gt_masks: (G, H, W) binary masks at their native resolution.
        gt_classes: (G,) class labels.

    Returns:
        (pred_idx, gt_idx), int64, ordered by GT index. With G > N only N GT masks are matched.
    """
    if gt_masks.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long, device=pred_logits.device)
        return empty, empty
    cost = matching_cost(pred_logits, class_logits, gt_masks, gt_classes)
    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
    as_long = dict(dtype=torch.long, device=pred_logits.device)
    return torch.as_tensor(cols, **as_long), torch.as_tensor(rows, **as_long)


def class_weights(num_classes: int, eos_coef: float = EOS_COEF, dtype=None, device=None) -> torch.Tensor:
    """(C+1,) CE weights: 1 for every real class, eos_coef for the trailing "no object" class."""
    weights = torch.ones(num_classes + 1, dtype=dtype, device=device)
    weights[-1] = eos_coef
    return weights


def stage1_losses(
    pred_logits: torch.Tensor,
    class_logits: torch.Tensor,
    gt_masks: Sequence[torch.Tensor],
    gt_classes: Sequence[torch.Tensor],
    indices: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    eos_coef: float = EOS_COEF,
) -> dict[str, torch.Tensor]:
    """Stage-1 criterion over a batch: Dice, BCE and weighted class CE over matched pairs only.

    Args:
        pred_logits: (B, N, h, w) mask logits.
        class_logits: (B, N, C+1) class logits.
        gt_masks: per image, (G_b, H_b, W_b) binary masks (sizes may differ between images).
        gt_classes: per image, (G_b,) labels.
        indices: per image (pred_idx, gt_idx); computed with `hungarian_match` when None. Stage 2 passes the
            normal head's assignment here to score the quantised head.

    Returns:
        dict(dice, bce, cls, indices): each loss summed over matches and divided by the batch's match count.
    """
    if indices is None:
        pairs = zip(pred_logits, class_logits, gt_masks, gt_classes, strict=True)
        indices = [hungarian_match(p, c, m, k) for p, c, m, k in pairs]
    weights = class_weights(class_logits.shape[-1] - 1, eos_coef, class_logits.dtype, class_logits.device)
    dice = bce = cls = pred_logits.new_zeros(())
    count = 0
    for b, (pred_idx, gt_idx) in enumerate(indices):
        if pred_idx.numel() == 0:
            continue
        target = gt_masks[b][gt_idx].to(pred_logits.dtype)
        pred = _upsample(pred_logits[b][pred_idx], tuple(target.shape[-2:])).flatten(1)
        target = target.flatten(1)
        prob = pred.sigmoid()
        dice_b = 1 - (2 * (prob * target).sum(1) + HUNGARIAN_SMOOTH) / (prob.sum(1) + target.sum(1) + HUNGARIAN_SMOOTH)
        bce_b = F.binary_cross_entropy_with_logits(pred, target, reduction="none").mean(1)
        labels = gt_classes[b][gt_idx].to(class_logits.device)
        # Per-match weighted CE summed here and normalised by the match count below (all target weights are 1).
        cls_b = F.cross_entropy(class_logits[b][pred_idx], labels, weight=weights, reduction="none")
        dice, bce, cls = dice + dice_b.sum(), bce + bce_b.sum(), cls + cls_b.sum()
        count += pred_idx.numel()
    # Official: normalise by the (at least 1) number of matches in the per-device batch.
    norm = max(count, 1)
    return {"dice": dice / norm, "bce": bce / norm, "cls": cls / norm, "indices": list(indices)}


# --------------------------------------------------------------------------------------------------------------
# Stage 2
# --------------------------------------------------------------------------------------------------------------
def quantization_losses(z: torch.Tensor, z_q: torch.Tensor, decoded: torch.Tensor, queries: torch.Tensor) -> dict:
    """The codebook terms of one sample (Stage 2).

    Args:
        z: (N, c) un-normalised `to_code` output (the official code compares it with unit-norm codes).
        z_q: (N, c) selected codes (forward value).
        decoded: (N, d) `from_code(z_q)`.
        queries: (N, d) final perceiver queries Q.

    Returns:
        dict(vq_loss, commit_loss, recon_mse, total_quantization_loss).
    """
    # vq trains the codes (z fixed), commit trains to_code (codes fixed): same value, different gradients.
    vq = F.mse_loss(z_q, z.detach())
    commit = COMMIT_BETA * F.mse_loss(z_q.detach(), z)
    recon = F.mse_loss(decoded, queries)
    entropy = z.new_zeros(())  # entropy_loss_ratio = 0 in the released run
    total = vq + COMMIT_WEIGHT * commit + ENTROPY_WEIGHT * entropy + recon
    return {"vq_loss": vq, "commit_loss": commit, "recon_mse": recon, "total_quantization_loss": total}


def stage2_losses(
    perceiver_out,
    codebook,
    modalities: Sequence[int | str],
    gt_masks: Sequence[torch.Tensor],
    gt_classes: Sequence[torch.Tensor],
    warmup_doubling: bool = False,
) -> dict:
    """Stage-2 losses for a batch: quantise each sample, score the quantised head with the normal assignment.

    Args:
        perceiver_out: `PerceiverOutput` of the frozen Stage-1 perceiver on the batch.
        codebook: `RegionCodebook`.
        modalities: per sample, the GT modality label that routes to a codebook.
        warmup_doubling: reproduce the official training warm-up value (2x the code).

    Returns:
        dict with the quantisation terms (averaged over samples), `{dice,bce,cls}_quant`, `{dice,bce,cls}_normal`,
        `indices`, `seg_logits_quant`, `class_logits_quant` and `loss` (the official Stage-2 objective, in which the
        reconstruction MSE is counted twice).
    """
    normal = stage1_losses(perceiver_out.seg_logits, perceiver_out.class_logits, gt_masks, gt_classes)
    parts = [
        codebook.quantize(q, m, warmup_doubling=warmup_doubling)
        for q, m in zip(perceiver_out.queries, modalities, strict=True)
    ]
    terms = [quantization_losses(p.z, p.z_q, p.decoded, q) for p, q in zip(parts, perceiver_out.queries, strict=True)]
    out = {k: torch.stack([t[k] for t in terms]).mean() for k in terms[0]}
    decoded = torch.stack([p.decoded for p in parts])
    seg_q, cls_q = codebook.quantized_head(decoded, perceiver_out.multi_scale_features[-1])
    quant = stage1_losses(seg_q, cls_q, gt_masks, gt_classes, indices=normal["indices"])
    for name in ("dice", "bce", "cls"):
        out[f"{name}_quant"], out[f"{name}_normal"] = quant[name], normal[name]
    out.update(indices=normal["indices"], seg_logits_quant=seg_q, class_logits_quant=cls_q)
    # The modality-router CE is not included: callers add it when they train the predictor.
    out["loss"] = out["dice_quant"] + out["bce_quant"] + out["cls_quant"] + out["total_quantization_loss"] + out[
        "recon_mse"
    ]
    return out


# --------------------------------------------------------------------------------------------------------------
# LVLM (stages 3-5)
# --------------------------------------------------------------------------------------------------------------
def _single_id(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{text!r} is not a single token for this tokenizer: {ids}")
    return ids[0]


def training_labels(tokenizer, messages: Sequence[Message], num_images: int = 1,
                    label_prompt_markup: bool = True) -> tuple[list[int], list[int]]:
    """Ids and labels of a full training conversation, with the official (LLaVA-NeXT `preprocess_qwen`) rule.

    System and user turns are -100 except every newline, `<|im_start|>` and `<|im_end|>` id (the official code
    unmasks these anywhere); assistant turns are labelled in full, header included; image placeholders are -100.

    ``label_prompt_markup=False`` (deviation) labels the assistant turns only. With the official rule a newline is
    most often followed by `<|im_start|>` in the labels, so a small model can open its answer with a new chat
    header on an image unlike its training data (the text then reads "assistant...").
    """
    markup = ("\n", "<|im_start|>", "<|im_end|>") if label_prompt_markup else ()
    keep = {_single_id(tokenizer, text) for text in markup}
    ids: list[int] = []
    labels: list[int] = []
    for text, turn_ids in tokenize_turns(tokenizer, messages, num_images):
        assistant = text.startswith(ASSISTANT_HEADER)
        ids.extend(turn_ids)
        labels.extend(IGNORE_INDEX if t == IMAGE_TOKEN_INDEX else t if assistant or t in keep else IGNORE_INDEX
                      for t in turn_ids)
    return ids, labels


def embedding_positions(
    input_ids: Sequence[int], image_length: int, image_token_index: int = IMAGE_TOKEN_INDEX
) -> list[int]:
    """Position of each id in the embedded sequence (each image placeholder becomes `image_length` rows).

    For ids after the (single) image this is index + (image_length - 1), the official offset #embeddings - #ids.
    """
    positions, shift = [], 0
    for i, token in enumerate(input_ids):
        positions.append(i + shift)
        if token == image_token_index:
            shift += image_length - 1
    return positions


def expand_labels(labels: Sequence[int], input_ids: Sequence[int], image_length: int,
                  image_token_index: int = IMAGE_TOKEN_INDEX) -> list[int]:
    """Labels at the embedded positions: every image embedding is -100."""
    out: list[int] = []
    for token, label in zip(input_ids, labels, strict=True):
        out.extend([IGNORE_INDEX] * image_length if token == image_token_index else [label])
    return out


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """HF causal-LM CE: logits cast to float32, shifted by one, mean over labelled tokens.

    ``weights`` (B, L), aligned with ``labels``, turns the mean into a weighted mean (None: the official loss).
    """
    logits = logits.float()
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    if weights is None:
        return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)
    per_token = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="none")
    w = weights[:, 1:].reshape(-1).to(per_token) * (shift_labels != IGNORE_INDEX)
    return (per_token * w).sum() / w.sum().clamp_min(1e-12)


def answer_starts(input_ids: Sequence[int], header: Sequence[int]) -> list[int]:
    """Indices of the first id after each occurrence of ``header`` (the assistant turn's opening ids)."""
    n, ids, head = len(header), list(input_ids), list(header)
    if not head:
        return []  # no header, no answer to find
    return [i + n for i in range(len(ids) - n) if ids[i : i + n] == head]


_YES_NO = re.compile(r"(yes|no)\b", re.IGNORECASE)


def yes_no_starts(tokenizer, input_ids: Sequence[int], header: Sequence[int]) -> list[int]:
    """The `answer_starts` whose answer opens with the word "yes" or "no": a closed question's verdict."""
    return [i for i in answer_starts(input_ids, header)
            if _YES_NO.match(tokenizer.decode([t for t in input_ids[i : i + 8] if t >= 0]))]


def mask_targets(mask_labels: torch.Tensor | None, num_slots: int, size: tuple[int, int], dtype=None,
                 device=None) -> torch.Tensor:
    """(num_slots, h, w) targets: the first min(n, K) masks resized bilinearly (not re-binarised), rest zero.

    Args:
        mask_labels: (n, 1, H, W) or (n, H, W) binary masks in code order, or None.
    """
    out = torch.zeros(num_slots, *size, dtype=dtype, device=device)
    if mask_labels is None or mask_labels.shape[0] == 0 or num_slots == 0:
        return out
    masks = mask_labels if mask_labels.ndim == 4 else mask_labels[:, None]
    masks = masks[:num_slots].to(device=device, dtype=dtype if dtype is not None else torch.get_default_dtype())
    resized = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)[:, 0]
    out[: resized.shape[0]] = resized
    return out


def mask_losses(mask_logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LVLM mask loss: (Dice, BCE), each summed over masks and divided by B*K + 1e-8; empty targets give 0.

    Args:
        mask_logits: (B, K, h, w); targets: (B, K, h, w) in [0, 1].
    """
    logits = mask_logits.flatten(2)
    target = targets.flatten(2).to(logits.dtype)
    prob = logits.sigmoid()
    dice = 1 - (2 * (prob * target).sum(-1) + LVLM_DICE_SMOOTH) / (prob.sum(-1) + target.sum(-1) + LVLM_DICE_SMOOTH)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(-1)
    # Samples without masks (pure VQA) must not be pushed towards empty masks: zero their terms.
    present = target.sum(-1) > 0
    dice = torch.where(present, dice, torch.zeros_like(dice))
    bce = torch.where(present, bce, torch.zeros_like(bce))
    count = logits.shape[0] * logits.shape[1] + LVLM_COUNT_EPS
    return dice.sum() / count, bce.sum() / count


@dataclass
class LVLMLosses:
    """Result of one teacher-forced LVLM training forward."""

    loss: torch.Tensor
    ce_loss: torch.Tensor
    mask_loss: torch.Tensor
    dice_loss: torch.Tensor
    bce_loss: torch.Tensor
    logits: torch.Tensor  # (B, L, V)
    code_positions: list[list[int]]  # per sample, embedded positions of the states that were decoded
    seg_embeddings: torch.Tensor  # (B, K, H) last-layer states at those positions
    region_codes: torch.Tensor  # (B, K, d) token_projection output
    mask_logits: torch.Tensor  # (B, K, m, m)


def lvlm_losses(
    model,
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    encoding,
    mask_labels: Sequence[torch.Tensor | None],
    pad_code_slots: bool = False,
    yes_no_weight: float = 1.0,
) -> LVLMLosses:
    """The official stage 3-5 training forward: CE + Dice + BCE (all weights 1).

    Args:
        model: `MedSIGHTModel`.
        input_ids, labels: per sample, from `training_labels` (one image placeholder each).
        encoding: `ImageEncoding` of the batch's images (one per sample, in order). The vision side is frozen.
        mask_labels: per sample, (n, 1, H, W) binary masks in the order of the codes, or None.
        pad_code_slots: deviation, off by default. Officially every sample of a batch must have the same number
            of codes K (the collator stacks them), which in practice means batch size 1. When True, samples with
            fewer codes are padded to the batch's largest K with empty slots: state at position 0, zero target,
            masked out of the perceiver's attention. The mask loss ignores them as it ignores a pure-VQA sample's
            slot; they do count in the B*K denominator, as that slot does officially. This makes batches > 1 usable.
        yes_no_weight: deviation, 1 (official) by default. The CE weight of the first token of each answer that
            opens with "yes" or "no" (`yes_no_starts`); the CE becomes the weighted mean. That token is a closed
            question's verdict, one among hundreds of easy template tokens. Other answers' first tokens keep
            weight 1: many are a random template choice, and weighting every answer's first token garbled the demo
            model's other answers.

    With no code, the state at position 0 is decoded (K = 1), which the loss ignores when there are no targets.
    """
    if yes_no_weight <= 0:
        raise ValueError(f"yes_no_weight must be positive, got {yes_no_weight}")
    if not (len(input_ids) == len(labels) == len(mask_labels) == encoding.grid.shape[0]):
        raise ValueError("input_ids, labels, mask_labels and the encoding must describe the same samples")
    lm = model.language_model
    # encode() runs under inference_mode; clone so the trainable projector can save its input for backward.
    patches, regions, grid = (t.clone() for t in (encoding.patches, encoding.region_tokens, encoding.grid))
    image_embeds = lm.mm_projector(torch.cat([patches, regions], dim=1).to(next(lm.parameters()).dtype))
    image_length = image_embeds.shape[1]
    limit = model.config.llm.max_sequence_length

    header = model.tokenizer(ASSISTANT_HEADER, add_special_tokens=False)["input_ids"] if yes_no_weight != 1.0 else []
    rows, row_labels, code_pos, starts = [], [], [], []
    for b, (ids, labs) in enumerate(zip(input_ids, labels, strict=True)):
        ids = list(ids)
        # The inference path's embedding (text rows, the image's rows at its placeholder); one sample, no padding.
        rows.append(lm.embed_prompts([ids], [image_embeds[b]], limit)[0][0])
        row_labels.append(expand_labels(labs, ids, image_length))
        positions = embedding_positions(ids, image_length)
        starts.append([positions[i] for i in yes_no_starts(model.tokenizer, ids, header)])
        is_code = model.codes.is_code(torch.tensor(ids))
        # Training decodes the states AT the codes (inference uses the state before); no code -> position 0.
        code_pos.append([positions[i] for i in torch.nonzero(is_code).flatten().tolist()] or [0])
    counts = [len(p) for p in code_pos]
    query_mask = None
    if len(set(counts)) != 1:
        if not pad_code_slots:
            raise ValueError("every sample of a batch must have the same number of region codes "
                             "(official collator); pass pad_code_slots=True to pad them")
        slots = max(counts)
        code_pos = [p + [0] * (slots - len(p)) for p in code_pos]
        # A sample's own masks fill its own slots only; the padding slots keep a zero target.
        mask_labels = [None if m is None else m[:n] for m, n in zip(mask_labels, counts, strict=True)]
        # The K codes of a sample are decoded jointly: padding must be invisible to the real slots.
        query_mask = torch.tensor([[k < n for k in range(slots)] for n in counts], device=grid.device)

    # Right padding, as in the official collator.
    length = max(r.shape[0] for r in rows)
    inputs = rows[0].new_zeros(len(rows), length, rows[0].shape[1])
    attention = torch.zeros(len(rows), length, dtype=torch.long, device=inputs.device)
    label_tensor = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long, device=inputs.device)
    weights = torch.ones(label_tensor.shape, device=inputs.device) if header else None
    for b, (row, labs) in enumerate(zip(rows, row_labels, strict=True)):
        inputs[b, : row.shape[0]] = row
        attention[b, : row.shape[0]] = 1
        label_tensor[b, : row.shape[0]] = torch.tensor(labs)
        if weights is not None:
            weights[b, starts[b]] = yes_no_weight

    out = lm(inputs_embeds=inputs, attention_mask=attention, output_hidden_states=True, use_cache=False)
    ce = causal_lm_loss(out.logits, label_tensor, weights)
    states = out.hidden_states[-1]
    index = torch.tensor(code_pos, device=states.device)
    seg = torch.gather(states, 1, index[..., None].expand(-1, -1, states.shape[-1]))
    codes = lm.token_projection(seg)
    mask_logits, _ = model.region_perceiver.decode(grid, codes.to(grid.dtype), query_mask)
    size = tuple(mask_logits.shape[-2:])
    targets = torch.stack([
        mask_targets(m, mask_logits.shape[1], size, mask_logits.dtype, mask_logits.device) for m in mask_labels
    ])
    dice, bce = mask_losses(mask_logits, targets)
    mask = dice + bce
    return LVLMLosses(ce + mask, ce, mask, dice, bce, out.logits, code_pos, seg, codes, mask_logits)

