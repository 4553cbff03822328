"""The stage-2 codebook reproduces the official codes and quantised outputs (golden stage2_io.pt)."""

import torch

from medsight_testing.parity import assert_matches


def test_modality_prediction(golden_model, stage2_io):
    book = golden_model.codebook
    assert_matches(book.modality_predictor(stage2_io["cls_token"]), stage2_io["modality_logits"], "modality logits")
    assert int(book.predict_modality(stage2_io["cls_token"])) == stage2_io["predicted_modality"]


def test_cls_token_comes_from_the_encoder(golden_model, perceiver_io, stage2_io):
    enc = golden_model.encode(perceiver_io["pixel_values"][None].double(), round_pixels_to_bf16=False)
    assert_matches(enc.cls, stage2_io["cls_token"], "CLS token")
    assert_matches(enc.region_tokens, stage2_io["region_queries"], "region queries")


def test_every_codebook(golden_model, stage2_io):
    book = golden_model.codebook
    queries = stage2_io["region_queries"][0]
    ref = stage2_io["per_modality"]
    beta = golden_model.config.codebook.beta  # the official commitment weight
    for m in range(len(ref["indices"])):
        q = book.quantize(queries, m)
        assert_matches(q.z, stage2_io["z"][0], "to_code output")
        assert_matches(q.indices, ref["indices"][m], f"codebook {m} indices")
        assert_matches(q.z_q, ref["z_q"][m], f"codebook {m} codes")
        assert_matches(q.decoded, ref["decoded"][m], f"codebook {m} decoded")
        vq = torch.mean((q.z_q - q.z) ** 2)
        assert_matches(vq, ref["vq_loss"][m], f"codebook {m} vq loss")
        assert_matches(beta * vq, ref["commit_loss"][m], f"codebook {m} commit loss")


def test_routes_and_quantised_head(golden_model, perceiver_io, stage2_io):
    book = golden_model.codebook
    queries = stage2_io["region_queries"][0]
    final_features = golden_model.region_perceiver(perceiver_io["perceiver"]["grid_in"]).multi_scale_features[-1]
    for name, ref in stage2_io["routes"].items():
        q = book.quantize(queries, ref["label"])
        assert_matches(q.indices, ref["indices"][0], f"{name} indices")
        assert_matches(q.z_q, ref["z_q"][0], f"{name} z_q")
        seg, cls = book.quantized_head(q.decoded[None], final_features)
        assert_matches(seg, ref["seg_logits_quant"], f"{name} quantised seg logits")
        assert_matches(cls, ref["class_logits_quant"], f"{name} quantised class logits")
    predicted = book.quantize(queries, stage2_io["predicted_modality"]).indices[None]
    assert_matches(predicted, stage2_io["official_forward_indices"], "official forward")


def test_unknown_key_falls_back_to_codebook_zero(golden_model, stage2_io):
    q = golden_model.codebook.quantize(stage2_io["region_queries"][0], stage2_io["unknown_key_label"])
    assert_matches(q.indices[None], stage2_io["unknown_key_indices"], "fallback indices")
    assert_matches(q.z_q[None], stage2_io["unknown_key_z_q"], "fallback codes")
    assert_matches(q.indices, stage2_io["per_modality"]["indices"][0], "codebook 0 indices")
    assert q.token_names()[0] == f"[M0_{int(q.indices[0])}]"


def test_training_warmup_doubling(golden_model, stage2_io):
    queries, key = stage2_io["region_queries"][0], stage2_io["train_warmup_key"]
    q = golden_model.codebook.quantize(queries, key, warmup_doubling=True)
    assert_matches(q.z_q[None], stage2_io["train_warmup_z_q"], "warm-up value (2x code)")
    assert_matches(q.indices[None], stage2_io["train_warmup_indices"], "warm-up indices")
