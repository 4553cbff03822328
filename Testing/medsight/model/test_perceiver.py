"""The Region Perceiver reproduces every official intermediate (golden perceiver_io.pt)."""

import pytest
import torch

from medsight.model.perceiver import sine_position_encoding
from medsight_testing.parity import assert_matches


def grid_shape(perceiver_io: dict) -> tuple[int, ...]:
    """(B, side, side, width) of the batch-of-two patch features, the side taken from the recorded input grid."""
    _, side, _, width = perceiver_io["perceiver"]["grid_in"].shape
    return (perceiver_io["batch2"]["patch_features"].shape[0], side, side, width)


def test_sine_position_encoding_is_exact(perceiver_io):
    for pe in perceiver_io["perceiver"]["sine_pe"]:
        side = pe.shape[1]
        ours = sine_position_encoding(side, side, pe.shape[-1])
        assert ours.dtype == torch.float32
        assert torch.equal(ours, pe), f"PE at {side}x{side} differs"


def test_forward_matches_every_intermediate(golden_model, perceiver_io):
    ref = perceiver_io["perceiver"]
    out = golden_model.region_perceiver(ref["grid_in"])
    assert_matches(out.queries, ref["region_queries_out"], "final queries")
    assert_matches(out.seg_logits, ref["seg_logits"], "seg logits")
    assert_matches(out.class_logits, ref["class_logits"], "class logits")
    for i, (ours, theirs) in enumerate(zip(out.multi_scale_features, ref["multi_scale_image_features"], strict=True)):
        assert_matches(ours, theirs, f"multi-scale features {i}")
    # Head calls: init + one per stage, then the final call (which repeats the last stage's).
    stages = len(ref["multi_scale_image_features"]) - 1  # the input grid, then one map per stage
    assert len(ref["head_mask_logits"]) == stages + 2
    for i in range(stages + 1):
        assert_matches(out.head_mask_logits[i], ref["head_mask_logits"][i], f"head call {i} masks")
        assert_matches(out.head_class_logits[i], ref["head_class_logits"][i], f"head call {i} classes")
    assert_matches(out.seg_logits, ref["head_mask_logits"][-1], "final head call")
    assert len(out.blocked_masks) == stages
    for s in range(stages):
        assert_matches(out.blocked_masks[s], ref["head_interp_mask"][s], f"attention mask consumed by stage {s}")


def test_decode_with_given_codes(golden_model, perceiver_io):
    ref = perceiver_io["decode_mask"]
    grid = perceiver_io["perceiver"]["grid_in"]
    out = golden_model.region_perceiver(grid, ref["codes"])
    assert_matches(out.seg_logits, ref["seg_logits"], "decode seg logits")
    assert_matches(out.class_logits, ref["class_logits"], "decode class logits")
    for s, blocked in enumerate(out.blocked_masks):
        assert_matches(blocked, ref["head_interp_mask"][s], f"decode mask stage {s}")
    # The fixture records, per stage, how many query rows are blocked everywhere (uniform attention).
    fully_blocked = [int(blocked.all(dim=-1).sum()) for blocked in out.blocked_masks]
    assert fully_blocked == [int(n) for n in ref["fully_blocked_rows"]]
    assert sum(fully_blocked) > 0, "the fixture should exercise the uniform-attention rows"


def test_batch_entries_never_mix(golden_model, perceiver_io):
    batch = perceiver_io["batch2"]
    out = golden_model.region_perceiver(batch["patch_features"].reshape(grid_shape(perceiver_io)))
    assert_matches(out.queries, batch["region_queries_out"], "batch2 queries")
    assert_matches(out.seg_logits, batch["seg_logits"], "batch2 seg logits")
    assert_matches(out.class_logits, batch["class_logits"], "batch2 class logits")


@torch.no_grad()
def test_padded_batch_decode_equals_per_sample_decode(golden_model, perceiver_io):
    """Samples with different numbers of codes decode as one padded batch without changing any result."""
    perceiver = golden_model.region_perceiver
    grids = perceiver_io["batch2"]["patch_features"].reshape(grid_shape(perceiver_io))
    batch, width = grids.shape[0], grids.shape[-1]
    assert batch == 2  # one sample gets more codes than the other
    gen = torch.Generator().manual_seed(0)
    codes = [torch.randn(k, width, generator=gen, dtype=torch.float64) for k in (3, 1)]
    single = [perceiver.decode(grids[i : i + 1], codes[i][None])[0][0] for i in range(batch)]
    padded = torch.zeros(batch, 3, width, dtype=torch.float64)
    valid = torch.zeros(batch, 3, dtype=torch.bool)
    for i, c in enumerate(codes):
        padded[i, : len(c)] = c
        valid[i, : len(c)] = True
    # Garbage in the padding slots must not leak into real queries.
    padded[1, 1:] = 1e3
    batched, _ = perceiver.decode(grids, padded, valid)
    for i, c in enumerate(codes):
        diff = float((batched[i, : len(c)] - single[i]).abs().max())
        assert diff <= 1e-5, f"sample {i}: padded decode differs by {diff}"
    unmasked, _ = perceiver.decode(grids, padded)
    assert float((unmasked[1, :1] - single[1]).abs().max()) > 1e-3, "without the mask padding must matter"


def test_cached_position_encoding_is_the_same_tensor_values(golden_model):
    """The perceiver keeps its encodings itself (no module-level cache): same values, computed once per size."""
    perceiver = golden_model.region_perceiver
    dim = perceiver.cfg.dim
    first = perceiver.position_encoding(6, 6, torch.device("cpu"))
    assert torch.equal(first, sine_position_encoding(6, 6, dim))
    assert perceiver.position_encoding(6, 6, torch.device("cpu")) is first  # computed once
    assert (6, 6, "cpu") in perceiver.position_encodings


def test_sdpa_attention_reproduces_the_official_decode(golden_model, perceiver_io):
    """The fused kernel gives the golden forward and decode, fully blocked (uniform) rows included."""
    perceiver = golden_model.region_perceiver
    ref = perceiver_io["decode_mask"]
    grid = perceiver_io["perceiver"]["grid_in"]
    assert perceiver.attention_implementation == "eager"
    try:
        perceiver.attention_implementation = "sdpa"
        out = perceiver(grid, ref["codes"])
        assert any(b.all(dim=-1).any() for b in out.blocked_masks)  # the uniform-row branch really runs
        assert_matches(out.seg_logits, ref["seg_logits"], "sdpa decode seg logits")
        assert_matches(out.class_logits, ref["class_logits"], "sdpa decode class logits")
        full = perceiver(grid)
        assert_matches(full.seg_logits, perceiver_io["perceiver"]["seg_logits"], "sdpa forward seg logits")
    finally:
        perceiver.attention_implementation = "eager"
    with pytest.raises(ValueError, match=r"must be one of \('eager', 'sdpa'\), not 'flash'"):
        perceiver.attention_implementation = "flash"


def test_official_attention_runs_in_float16(golden_model, perceiver_io):
    """A model loaded with dtype=torch.float16 (GPUs without bfloat16): the official arithmetic's fill value -1e9
    overflowed float16 (a RuntimeError at the first question); it now gives the float64 decode within float16's
    rounding, fully blocked (uniform) rows included, as the fused kernel does."""
    import copy

    half = copy.deepcopy(golden_model.region_perceiver).to(torch.float16)
    ref = perceiver_io["decode_mask"]
    grid = perceiver_io["perceiver"]["grid_in"].to(torch.float16)
    eager = half(grid, ref["codes"].to(torch.float16))
    assert any(b.all(dim=-1).any() for b in eager.blocked_masks)
    half.attention_implementation = "sdpa"
    fused = half(grid, ref["codes"].to(torch.float16))
    scale = ref["seg_logits"].abs().max().item()
    for name, out in (("eager", eager), ("sdpa", fused)):
        diff = (out.seg_logits.double() - ref["seg_logits"]).abs().max().item()
        print(f"float16 {name}: max abs diff {diff:.2e} (logits up to {scale:.2e})")
        assert diff <= 1e-2 * scale, (name, diff)
