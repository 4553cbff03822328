"""A second fixture set in the golden format, with other sizes, seeds, image, codes and labels.

It is computed by this engine, so it proves nothing about parity. It proves that the parity tests read every
size, index, count and label from the fixture files: they must pass on this set unchanged
(`Testing/test_golden_fixtures.py`). The layouts and key names are those of `Testing/golden`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import LogitsProcessor

from medsight.config import CodebookConfig, LLMConfig, MedSIGHTConfig, PerceiverConfig, VisionConfig
from medsight.model.generation import GenerationOptions
from medsight.model.loading import build_model
from medsight.model.perceiver import next_stage_blocked, sine_position_encoding
from medsight.model.tokenizer import load_tokenizer
from medsight.model.vision import encode_image
from medsight.prompt import Message, tokenize_prompt
from medsight.train.losses import lvlm_losses, stage1_losses, stage2_losses, training_labels
from medsight_testing.prompts import prompt_text

# Deliberately unlike the official fixtures: odd grid, 2 perceiver stages, 12 queries, 9 classes, 3 LLM layers.
OTHER = MedSIGHTConfig(
    name="other",
    vision=VisionConfig(image_size=70, patch_size=14, width=40, layers=3, head_width=10, embed_dim=24),
    perceiver=PerceiverConfig(dim=40, num_queries=12, num_stages=2, heads=5, dim_head=6, num_classes=9),
    codebook=CodebookConfig(code_dim=6),
    llm=LLMConfig(vocab_size=835, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
                  num_key_value_heads=2, head_dim=8, bos_token_id=256, eos_token_id=258, pad_token_id=256),
)
QUESTION = "Where is the spleen? Segment it."
ANSWER = "Spleen [M4_3], liver [M9_30] and aorta [M17_1]."


class _Force(LogitsProcessor):
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.ids[min(input_ids.shape[1], len(self.ids) - 1)]] = 0
        return forced


def _blobs(count: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Binary discs at random centres: targets with some overlap with any prediction."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = []
    for _ in range(count):
        cy, cx = (torch.rand(2, generator=gen) * size).tolist()
        radius = size * (0.15 + 0.2 * float(torch.rand(1, generator=gen)))
        masks.append(((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2).double())
    return torch.stack(masks)


def _randomise(model, gen: torch.Generator) -> None:
    """Like the official fixtures: no gain stays 1 and no bias 0 (a dropped one would show), and the language
    model's matrices are drawn wide enough that attention and logits are not near-uniform."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.startswith("language_model."):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def _write_weights(model, source: Path, folder: Path) -> None:
    vision = {f"visual.{k}": v for k, v in model.image_encoder.state_dict().items()}
    torch.save({**vision, "logit_scale": torch.tensor(4.6)}, folder / "vision_encoder_clip.pt")
    vit = json.loads((source / "tiny_vit_openclip_config.json").read_text())
    v = model.config.vision
    vit["embed_dim"] = v.embed_dim
    vit["vision_cfg"].update(image_size=v.image_size, layers=v.layers, width=v.width, patch_size=v.patch_size,
                             head_width=v.head_width, mlp_ratio=v.mlp_ratio)
    (folder / "tiny_vit_openclip_config.json").write_text(json.dumps(vit, indent=2))
    perceiver = {f"region_perceiver.{k}": t for k, t in model.region_perceiver.state_dict().items()}
    torch.save({"model": perceiver, "steps": 1, "args": {}}, folder / "perceiver_stage1_ckpt.pt")
    p = model.config.perceiver
    (folder / "perceiver_heads.json").write_text(json.dumps({"heads": p.heads, "dim_head": p.dim_head}))
    names = {"codebooks.": "quantizer.codebooks.", "to_code.": "region_perceiver.to_code.",
             "from_code.": "region_perceiver.code_decoder.from_code.",
             "segmentation_cls_head_quant.": "region_perceiver.code_decoder.segmentation_cls_head_quant.",
             "modality_predictor.": "modality_predictor."}
    book = {next(new + k[len(old):] for old, new in names.items() if k.startswith(old)): t
            for k, t in model.codebook.state_dict().items()}
    torch.save({"model": book, "steps": 1, "args": {}}, folder / "codebook_stage2_ckpt.pt")
    torch.save(dict(model.language_model.state_dict()), folder / "lvlm_tiny_state_dict.pt")
    llm = json.loads((source / "lvlm_tiny_config.json").read_text())
    c = model.config.llm
    llm.update(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, max_window_layers=c.num_hidden_layers,
               num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
               num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, mm_hidden_size=p.dim)
    (folder / "lvlm_tiny_config.json").write_text(json.dumps(llm, indent=2))
    for name in ("fullsize_shapes_stage1.json", "fullsize_shapes_stage2_trainable.json", "fullsize_shapes_lvlm.json"):
        shutil.copy(source / name, folder / name)
    shutil.copytree(source / "tiny_tokenizer", folder / "tiny_tokenizer")


def _block(model, image: torch.Tensor, index: int) -> torch.Tensor:
    """(B, 1 + N, C) output of one ViT block: CLS then the patch tokens."""
    feats = encode_image(model.image_encoder, image, select_layer=index)
    return torch.cat([feats.cls[:, None], feats.patches], dim=1)


def _perceiver_io(model, gen: torch.Generator) -> dict:
    v, p = model.config.vision, model.region_perceiver
    raw = torch.randint(0, 256, (83, 61, 3), generator=gen, dtype=torch.uint8)
    pixels, _ = model.prepare(raw.numpy(), "crop")
    short, long = 61, 83
    resized = np.asarray(Image.fromarray(raw.numpy()).resize((v.image_size, v.image_size * long // short),
                                                             Image.Resampling.BICUBIC))
    top = round((resized.shape[0] - v.image_size) / 2)
    image = pixels[None].double()
    blocks = [_block(model, image, i) for i in range(v.layers)]
    grid = blocks[-1][:, 1:].reshape(1, v.grid_size, v.grid_size, v.width)
    out = p(grid)
    sides = [v.grid_size * 2**s for s in range(len(out.multi_scale_features))]
    codes = None
    for _ in range(200):  # codes whose decode has a query blocked everywhere (the uniform-attention rows)
        trial = 3 * torch.randn(1, 4, v.width, generator=gen, dtype=torch.float64)
        decoded = p(grid, trial)
        if any(bool(b.all(dim=-1).any()) for b in decoded.blocked_masks):
            codes = trial
            break
    assert codes is not None, "no code set with a fully blocked row"
    pair = torch.cat([image, image.flip(-1)])
    pair_grid = torch.cat([blocks[-1], _block(model, image.flip(-1), -1)])[:, 1:]
    pair_out = p(pair_grid.reshape(2, v.grid_size, v.grid_size, v.width))
    gt_masks, gt_classes = _blobs(3, 2 * model.config.mask_size, gen), torch.tensor([2, 0, 7])
    matched = stage1_losses(out.seg_logits, out.class_logits, [gt_masks], [gt_classes], eos_coef=0.1)
    return {
        "raw_image_uint8": raw,
        "resized_uint8": torch.from_numpy(resized.copy()),
        "cropped_uint8": torch.from_numpy(resized[top : top + v.image_size].copy()),
        "pixel_values": pixels,
        "vit": {"block_outputs": blocks},
        "regtok_patch_features": blocks[-1][:, 1:],
        "perceiver": {
            "grid_in": grid,
            "sine_pe": [sine_position_encoding(s, s, v.width) for s in sides],
            "region_queries_out": out.queries,
            "seg_logits": out.seg_logits,
            "class_logits": out.class_logits,
            "multi_scale_image_features": out.multi_scale_features,
            "head_mask_logits": [*out.head_mask_logits, out.seg_logits],
            "head_class_logits": [*out.head_class_logits, out.class_logits],
            "head_interp_mask": [*out.blocked_masks, next_stage_blocked(out.seg_logits)],
        },
        "decode_mask": {
            "codes": codes,
            "seg_logits": decoded.seg_logits,
            "class_logits": decoded.class_logits,
            "head_interp_mask": [*decoded.blocked_masks, next_stage_blocked(decoded.seg_logits)],
            "fully_blocked_rows": [int(b.all(dim=-1).sum()) for b in decoded.blocked_masks],
        },
        "batch2": {"pixel_values": pair, "patch_features": pair_grid, "region_queries_out": pair_out.queries,
                   "seg_logits": pair_out.seg_logits, "class_logits": pair_out.class_logits},
        "hungarian": {"gt_masks": gt_masks, "gt_classes": gt_classes, "pred_indices": matched["indices"][0][0],
                      "gt_indices": matched["indices"][0][1], "dice_loss": matched["dice"],
                      "bce_loss": matched["bce"], "cls_loss": matched["cls"],
                      "num_classes": model.config.perceiver.num_classes, "eos_coef": 0.1},
    }


def _stage2_io(model, perceiver_io: dict) -> dict:
    book = model.codebook
    enc = model.encode(perceiver_io["pixel_values"][None].double(), round_pixels_to_bf16=False)
    queries = enc.region_tokens[0]
    predicted = int(book.predict_modality(enc.cls))
    every = [book.quantize(queries, m) for m in range(len(book.codebooks))]
    out = model.region_perceiver(perceiver_io["perceiver"]["grid_in"])
    routes = {}
    for name, label in (("predicted", predicted), ("label3", 5)):
        q = book.quantize(queries, label)
        seg, cls = book.quantized_head(q.decoded[None], out.multi_scale_features[-1])
        routes[name] = {"label": label, "indices": q.indices[None], "z_q": q.z_q[None], "decoded": q.decoded[None],
                        "seg_logits_quant": seg, "class_logits_quant": cls}
    gt = perceiver_io["hungarian"]
    losses = stage2_losses(out, book, [5], [gt["gt_masks"]], [gt["gt_classes"]])
    warm = book.quantize(queries, "6", warmup_doubling=True)
    unknown = book.quantize(queries, "77")
    return {
        "cls_token": enc.cls,
        "modality_logits": book.modality_predictor(enc.cls),
        "predicted_modality": predicted,
        "official_forward_indices": routes["predicted"]["indices"],
        "region_queries": enc.region_tokens,
        "z": every[0].z[None],
        "per_modality": {
            "indices": torch.stack([q.indices for q in every]),
            "z_q": torch.stack([q.z_q for q in every]),
            "decoded": torch.stack([q.decoded for q in every]),
            "vq_loss": torch.stack([torch.mean((q.z_q - q.z) ** 2) for q in every]),
            "commit_loss": torch.stack([book.cfg.beta * torch.mean((q.z_q - q.z) ** 2) for q in every]),
        },
        "unknown_key_label": "77",
        "unknown_key_indices": unknown.indices[None],
        "unknown_key_z_q": unknown.z_q[None],
        "routes": routes,
        "train_warmup_key": "6",
        "train_warmup_z_q": warm.z_q[None],
        "train_warmup_indices": warm.indices[None],
        "losses_gt_route3": {
            **{k: losses[k] for k in ("vq_loss", "commit_loss", "recon_mse", "total_quantization_loss", "dice_quant",
                                      "bce_quant", "cls_quant", "dice_normal", "cls_normal")},
            "hungarian_pred": losses["indices"][0][0], "hungarian_gt": losses["indices"][0][1],
        },
    }


def _generation(model, prompt, encoding, options) -> dict:
    out = model.generate([prompt], [encoding], options, keep_logits=True)
    n = out.lengths[0]
    where, states = model.code_states(out, 0, options)
    masks = model.decode_regions(encoding.grid, [states])[0][None]
    tokens = out.tokens[0, :n]
    return {"sequences": tokens, "raw_logits": out.raw_logits[0, :n], "processed_scores": out.scores[0, :n],
            "last_layer_states": out.states[:, :n], "code_new_token_index": torch.tensor(where, dtype=torch.long),
            "seg_embeddings": states, "region_codes": model.language_model.token_projection(states),
            "mask_logits": masks, "answer_text": model.tokenizer.decode(tokens.tolist(), skip_special_tokens=True)}


def _lvlm_io(model, perceiver_io: dict, gen: torch.Generator) -> dict:
    tok = model.tokenizer
    pixels = perceiver_io["pixel_values"]
    encoding = model.encode(pixels[None].double())
    prompt = tokenize_prompt(tok, [Message("user", QUESTION)])
    embeds = model.image_embeddings(encoding)
    inputs, _ = model.language_model.embed_prompts([prompt], list(embeds), model.config.llm.max_sequence_length)
    with torch.no_grad():
        lm = model.language_model(inputs_embeds=inputs, output_hidden_states=True)
    forced_ids = [257, *tok("assistant\n" + ANSWER, add_special_tokens=False)["input_ids"], 258]
    nocode_ids = [257, *tok("assistant\nNo.", add_special_tokens=False)["input_ids"], 258]
    forced = _generation(model, prompt, encoding, GenerationOptions(logits_processors=[_Force(forced_ids)]))
    nocode = _generation(model, prompt, encoding,
                         GenerationOptions(logits_processors=[_Force(nocode_ids)], no_code_fallback=True))
    free = _generation(model, prompt, encoding, GenerationOptions(max_new_tokens=9))
    ids, labels = training_labels(tok, [Message("user", QUESTION), Message("assistant", ANSWER)])
    mask_labels = _blobs(3, 30, gen)[:, None]
    with torch.no_grad():
        train = lvlm_losses(model, [ids], [labels], model.encode(pixels.double()), [mask_labels])
    start = inputs.shape[1] - 1
    return {
        "meta": {"question": QUESTION, "forced_answer": ANSWER, "prompt_string": prompt_text(QUESTION)},
        "prompt_ids": torch.tensor([prompt]),
        "pixel_values_fp32": pixels,
        "tower_features": torch.cat([encoding.patches, encoding.region_tokens], dim=1),
        "projected_image_features": embeds,
        "inputs_embeds": inputs,
        "prompt_logits": lm.logits,
        "prompt_hidden_states": torch.cat([lm.hidden_states[0], lm.hidden_states[1], lm.hidden_states[-1]]),
        "forced": {**forced, "forced_ids": torch.tensor(forced_ids)},
        "forced_nocode": {**nocode, "forced_ids": torch.tensor(nocode_ids)},
        "free": free,
        "train": {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "mask_labels": mask_labels,
                  "code_seq_pos": torch.tensor(train.code_positions[0]), "seg_embeddings": train.seg_embeddings[0],
                  "region_codes": train.region_codes[0], "mask_logits": train.mask_logits,
                  "logits_from_prompt_end": train.logits[:, start:], "loss": train.loss, "ce_loss": train.ce_loss,
                  "mask_loss": train.mask_loss, "dice_loss": train.dice_loss, "bce_loss": train.bce_loss},
    }


def write_other_fixture_set(source: Path, folder: Path, seed: int = 7) -> Path:
    """Write the second set to `folder`; `source` (the golden folder) supplies the tokenizer and the
    full-size shape tables, which do not depend on the tiny sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    config = replace(OTHER)
    model = build_model(config, load_tokenizer(source / "tiny_tokenizer"), seed=seed)
    model.attach_codebook()
    _randomise(model, gen)
    _write_weights(model, source, folder)
    model = model.double()
    with torch.no_grad():
        _write_io(model, folder, gen)
    return folder


def _write_io(model, folder: Path, gen: torch.Generator) -> None:
    perceiver_io = _perceiver_io(model, gen)
    torch.save(perceiver_io, folder / "perceiver_io.pt")
    torch.save(_stage2_io(model, perceiver_io), folder / "stage2_io.pt")
    torch.save(_lvlm_io(model, perceiver_io, gen), folder / "lvlm_io.pt")
